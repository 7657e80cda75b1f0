"""Training and evaluation: the fit loop (one process, or one per GPU under torchrun), exact
resume, distributed evaluation, checkpoints.

A checkpoint holds the model and data configs, the class names and only the trainable
parameters (the frozen backbone is rebuilt from its own source). ``last.pt`` adds what resuming
needs: the optimiser and schedule, the epoch and step reached, every process's random states and
running loss, and the unreadable clips met so far. ``metrics.jsonl`` gets one JSON line per epoch.
Process 0 alone writes files, logs and progress bars; every process reads ``last.pt`` to resume.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from amflow_kernels.nn import set_backend

from .build import ModelConfig, build_model
from .checkpoints import read_checkpoint, save_checkpoint
from .data.annotations import load_annotations
from .data.loader import DataConfig, complete_data_config, make_loader
from .distributed import Runtime, session
from .preemption import Preempted, StopRequest

__all__ = ["DataConfig", "Preempted", "evaluate", "fit", "load_checkpoint", "train_image_model"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on GPUs; full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, runtime: Runtime | None = None, *,
             progress: bool = False) -> dict:
    """Top-1/top-5 accuracy, mean per-class top-1 (``mean_class_accuracy``: the mean over the
    classes present of each class's recall, Toyota Smarthome's metric), mean loss and the
    confusion matrix (rows: true class) of the clips
    of ``loader``, which the processes of ``runtime`` share (``ShardSampler``); every process
    returns the metrics of all clips, computed from per-clip results in clip order, so they equal
    a single-process evaluation's. Test items with several views ``(B, V, T, …)`` are scored by
    the mean of their views' logits. Clips that cannot be read are not scored: ``unscorable``
    lists them (``path``, ``reason``) and ``clips`` counts the scored ones."""
    runtime = runtime or Runtime()
    model.eval()
    classes = model.num_classes
    scored, failed = [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        failed += batch["failed"]
        if batch["video"] is None:
            continue
        video, label = batch["video"].to(runtime.device, non_blocking=True), batch["label"].to(runtime.device)
        with autocast(runtime.device):
            if video.dim() == 6:
                logits = model(video.flatten(0, 1)).float().unflatten(0, video.shape[:2]).mean(1)
            else:
                logits = model(video).float()
        losses = F.cross_entropy(logits, label, reduction="none")
        ranked = logits.topk(min(5, classes), dim=1).indices
        scored += zip(batch["index"].tolist(), batch["label"].tolist(), losses.tolist(), ranked.tolist())
    parts = runtime.gather((scored, failed))
    scored = sorted(item for part, _ in parts for item in part)
    unscorable = [{"path": path, "reason": reason} for _, part in parts for path, reason in part]
    if not scored:
        raise ValueError(f"no clip could be scored: all {len(unscorable)} failed to load, e.g. {unscorable[:3]}")
    confusion = [[0] * classes for _ in range(classes)]
    for _, label, _, ranked in scored:
        confusion[label][ranked[0]] += 1
    count = len(scored)
    recalls = [row[c] / sum(row) for c, row in enumerate(confusion) if sum(row)]
    return {
        "top1": sum(ranked[0] == label for _, label, _, ranked in scored) / count,
        "mean_class_accuracy": sum(recalls) / len(recalls),
        "top5": sum(label in ranked for _, label, _, ranked in scored) / count,
        "loss": math.fsum(loss for _, _, loss, _ in scored) / count,
        "clips": count, "unscorable": unscorable, "confusion": confusion,
    }


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path: str | Path, *, backend: str | None = None, device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint of :func:`fit` describes, with its trained parameters, and the checkpoint.

    The frozen backbone is rebuilt from its source under the run's seed, so that a backbone
    without pretrained weights (tests, the demo's image model before loading) is the one the
    run trained on."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(checkpoint.get("seed", 0))
        model = build_model(ModelConfig.from_dict(checkpoint["model_config"]))
    expected = set(trainable_state(model))
    if set(checkpoint["state"]) != expected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match its model config: missing "
            f"{sorted(expected - set(checkpoint['state']))[:5]}, "
            f"unexpected {sorted(set(checkpoint['state']) - expected)[:5]}"
        )
    model.load_state_dict(checkpoint["state"], strict=False)
    if backend is not None:
        set_backend(model, backend)
    return model.to(device), checkpoint


def random_states(device: torch.device) -> dict:
    """Every random generator a training process draws from (restored by :func:`set_random_states`)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_random_states(states: dict, device: torch.device) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


# what a resumed run must keep: the data order and the schedule depend on them (see _check_resumable)
RUN_SETTINGS = ("global_batch", "train_clips", "lr", "weight_decay", "label_smoothing", "val_views", "select_by",
                "seed")
# the validation metrics best.pt can be chosen by
SELECT_BY = ("top1", "mean_class_accuracy")
# where the data lives may change between a run and its resumption (another node's scratch disk)
DATA_LOCATIONS = {"train_list", "val_list", "root", "labels_file"}


def _check_resumable(checkpoint: dict, path: Path, model_config: ModelConfig, data: DataConfig, run: dict) -> None:
    """Raise ``ValueError`` listing what differs between the run that wrote ``checkpoint`` and
    this one, where it would make the resumed run another run. The kernel backend may differ, and
    so may the world size at the same global batch (the data order depends on the global batch
    only, see ``data/loader.py``); so may the data's location, and ``epochs`` may grow (the
    cosine schedule then stretches)."""
    if "run" not in checkpoint:
        raise ValueError(f"--resume: {str(path)!r} holds no state to resume from (a best.pt, or an older amflow's)")
    problems = []
    for what, saved, now in (("model", ModelConfig.from_dict(checkpoint["model_config"]).to_dict(),
                              model_config.to_dict()),
                             ("data", checkpoint["data_config"], asdict(data)), ("run", checkpoint["run"], run)):
        ignored = {"backend"} if what == "model" else DATA_LOCATIONS
        keys = RUN_SETTINGS if what == "run" else sorted((set(saved) | set(now)) - ignored)
        problems += [f"{what} {key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} now"
                     for key in keys if saved.get(key) != now.get(key)]
    if problems:
        saved = checkpoint["run"]
        raise ValueError(
            f"--resume: {str(path)!r} was written by a different run: {'; '.join(problems)}. Resume with the "
            f"checkpoint's settings ({saved['world_size']} process(es) × --batch-size {saved['batch_size']}, "
            f"--lr {saved['lr']}, --weight-decay {saved['weight_decay']}, --seed {saved['seed']}), or train into "
            "another --out"
        )


def fit(
    model_config: ModelConfig, data: DataConfig, out_dir: str | Path, *, epochs: int = 10, batch_size: int = 8,
    lr: float = 1e-3, weight_decay: float = 0.05, workers: int = 2, device: str | None = None,
    label_smoothing: float = 0.0, val_views: tuple[int, int] = (1, 1), select_by: str = "top1",
    dist_backend: str = "auto",
    compile: bool = False, resume: bool = False, seed: int = 0, max_bad_clips: int = 10, progress: bool = True,
    log=print,
) -> dict:
    """Train ``model_config`` on ``data`` (AdamW, cosine schedule with one warm-up epoch,
    cross-entropy with ``label_smoothing``), evaluate after every epoch on ``val_views``
    (temporal clips, spatial crops: the evaluation protocol's, for a ``best.pt`` chosen by it),
    keep ``last.pt`` and ``best.pt`` (by ``select_by``: ``top1`` or ``mean_class_accuracy``) in
    ``out_dir``.

    Under torchrun every process calls this and trains a ``DistributedDataParallel`` replica:
    ``batch_size`` is per process, a step takes world size × ``batch_size`` clips, and nothing
    (learning rate included) is scaled for it. One process × N·b clips and N processes × b clips
    see the same data per step (``data/loader.py``) and reach the same parameters up to rounding.

    - ``resume``: continue from ``out_dir/last.pt`` (written after every epoch, before each
      validation and on SIGTERM). With the same world size on a CPU the resumed run ends
      bitwise equal to one never interrupted.
    - SIGTERM: the step in progress finishes, ``last.pt`` is written, :class:`Preempted` is raised.
    - A training clip that cannot be read is logged and replaced by another; more than
      ``max_bad_clips`` distinct ones stop the run with a ``ValueError`` listing them.

    Returns ``{"best": metrics of the best epoch, "history": per-epoch metrics, "seconds": …}``.
    """
    if data.train_list is None or data.val_list is None:
        raise ValueError("fit: the data config needs train_list and val_list")
    if max_bad_clips < 0:
        raise ValueError(f"max_bad_clips must be ≥ 0, got {max_bad_clips}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    # SIGTERM caught from the start: one during setup stops the run after its first step
    with StopRequest() as stop, session(device, dist_backend) as runtime:
        return _fit(runtime, stop, model_config, data, Path(out_dir), epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, label_smoothing=label_smoothing, val_views=tuple(val_views),
                    select_by=select_by,
                    workers=workers, compile=compile, resume=resume, seed=seed,
                    max_bad_clips=max_bad_clips, progress=progress and runtime.is_main,
                    log=log if runtime.is_main else lambda *_: None)


def _fit(runtime: Runtime, stop: StopRequest, model_config, data, out_dir, *, epochs, batch_size, lr, weight_decay,
         label_smoothing, val_views, select_by, workers, compile, resume, seed, max_bad_clips, progress,
         log) -> dict:
    device, world_size = runtime.device, runtime.world_size
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)  # the same initial model in every process
    model = build_model(model_config)
    data = complete_data_config(data, model.backbone)
    train_loader, classes = make_loader(data, data.train_list, train=True, batch_size=batch_size, workers=workers,
                                        world_size=world_size, rank=runtime.rank, seed=seed)
    val_loader, _ = make_loader(data, data.val_list, train=False, batch_size=batch_size, workers=workers,
                                world_size=world_size, rank=runtime.rank, seed=seed, num_clips=val_views[0],
                                num_crops=val_views[1])
    if len(classes) != model_config.num_classes:
        raise ValueError(f"num_classes={model_config.num_classes} but the annotations have {len(classes)} classes")
    seed_everything(seed + 1 + runtime.rank)  # each process its own stream (dropout, if a model has any)
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    sampler = train_loader.sampler
    steps = sampler.steps
    total = epochs * steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    run = {"world_size": world_size, "batch_size": batch_size, "global_batch": world_size * batch_size,
           "train_clips": len(train_loader.dataset), "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
           "label_smoothing": label_smoothing, "val_views": list(val_views), "select_by": select_by, "seed": seed}
    start_epoch, start_step, history, best, bad_clips = 0, 0, [], None, {}
    loss_sum, seen = 0.0, 0  # this process's running training loss in the epoch
    last_path, best_path, metrics_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    if resume and last_path.is_file():
        checkpoint = read_checkpoint(last_path)
        _check_resumable(checkpoint, last_path, model_config, data, run)
        model.load_state_dict(checkpoint["state"], strict=False)
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step"]
        history, best = checkpoint["history"], checkpoint["best"]
        bad_clips = checkpoint["bad_clips"]
        processes = checkpoint["processes"]
        if len(processes) == world_size:
            set_random_states(processes[runtime.rank]["random"], device)
            loss_sum, seen = processes[runtime.rank]["loss_sum"], processes[runtime.rank]["seen"]
        else:  # same global batch, so the same data; the epoch's running loss goes to process 0
            log(f"resuming {len(processes)} processes' run with {world_size}: the data order is the same, the "
                "processes' random streams start afresh")
            if runtime.is_main:
                loss_sum, seen = sum(p["loss_sum"] for p in processes), sum(p["seen"] for p in processes)
        if checkpoint["run"]["epochs"] != epochs:
            log(f"the run had {checkpoint['run']['epochs']} epochs, now {epochs}: the cosine schedule changes")
        log(f"resumed from {last_path} at epoch {start_epoch + 1}, step {start_step} of {steps}")
    elif resume:
        log(f"--resume: {last_path} does not exist; starting afresh")
    if runtime.is_main:  # a fresh run does not append to an old log, a resumed one keeps its epochs' lines
        kept = metrics_path.read_text().splitlines(keepends=True)[:start_epoch] if metrics_path.is_file() else []
        metrics_path.write_text("".join(kept))
    compiled = torch.compile(model) if compile else model
    forward = compiled if world_size == 1 else DistributedDataParallel(
        compiled, device_ids=[device.index] if device.type == "cuda" else None
    )
    log(f"{world_size} process{'es' if world_size > 1 else ''} × {batch_size} clips = {world_size * batch_size} clips "
        f"per step, {steps} step{'s' if steps > 1 else ''} per epoch, on {device.type}")

    def write_last(epoch: int, step: int) -> None:
        processes = runtime.gather({"random": random_states(device), "loss_sum": loss_sum, "seen": seen})
        if runtime.is_main:
            save_checkpoint({
                **describe(epoch), "step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "run": run, "processes": processes, "bad_clips": bad_clips,
            }, last_path)
        runtime.barrier()  # no process leaves (ends the job) while process 0 still writes

    def describe(epoch: int) -> dict:
        return {"model_config": model_config.to_dict(), "data_config": asdict(data), "classes": classes,
                "seed": seed, "state": trainable_state(model), "epoch": epoch, "history": history, "best": best}

    began = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        model.train()
        sampler.set_epoch(epoch, start_step=start_step)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress,
                   initial=start_step, total=steps)
        for step, batch in enumerate(bar, start=start_step + 1):
            video, label = batch["video"].to(device, non_blocking=True), batch["label"].to(device)
            with autocast(device):
                loss = F.cross_entropy(forward(video).float(), label, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, seen = loss_sum + loss.item() * label.numel(), seen + label.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
            new = [(path, reason) for path, reason in batch["failed"] if path not in bad_clips]
            stops, failures = runtime.sum([int(stop.requested), len(new)])
            if failures:
                _count_bad_clips(runtime.gather(new), bad_clips, max_bad_clips, log)
            if stops:
                write_last(epoch, step)
                message = (f"stopped by SIGTERM after step {step} of {steps} of epoch {epoch + 1}; {last_path} "
                           "holds the run: continue it with the same command and --resume")
                raise Preempted(message)
        write_last(epoch, steps)  # a kill during validation costs only the validation
        start_step, (loss_sum, seen) = 0, runtime.sum([loss_sum, seen])
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
                   **evaluate(compiled, val_loader, runtime)}
        loss_sum, seen = 0.0, 0
        history.append({k: v for k, v in metrics.items() if k not in ("confusion", "unscorable")})
        improved = best is None or metrics[select_by] > best[select_by]
        best = history[-1] if improved else best
        if runtime.is_main:  # the log first: a resumed run cuts it back to its checkpoint's epochs
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            if improved:
                save_checkpoint(describe(epoch + 1), best_path)
        write_last(epoch + 1, 0)
        if metrics["unscorable"]:
            log(f"{len(metrics['unscorable'])} validation clips could not be read and were not scored, e.g. "
                + metrics["unscorable"][0]["reason"])
        log(f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.3f}, val top-1 "
            f"{metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}{' (best)' if improved else ''}")
    return {"best": best, "history": history, "seconds": time.perf_counter() - began, "classes": classes}


def _count_bad_clips(found: list[list[tuple[str, str]]], bad_clips: dict, limit: int, log) -> None:
    """Add the unreadable training clips every process met in a step to ``bad_clips``; past
    ``limit`` distinct ones, stop the run (every process does, as all hold the same record)."""
    for path, reason in (failure for part in found for failure in part):
        if path not in bad_clips:
            bad_clips[path] = reason
            log(f"unreadable training clip: {reason}; another clip took its place "
                f"({len(bad_clips)} unreadable so far, --max-bad-clips {limit})")
    if len(bad_clips) > limit:
        listing = "\n".join(f"  {reason}" for reason in bad_clips.values())
        raise ValueError(f"{len(bad_clips)} training clips cannot be read, more than --max-bad-clips {limit}; "
                         f"repair or remove them, or raise the limit:\n{listing}")


def train_image_model(
    backbone: str, backbone_kwargs: dict, data: DataConfig, out_file: str | Path, *, epochs: int = 10,
    batch_size: int = 64, lr: float = 1e-3, workers: int = 2, seed: int = 0, progress: bool = True, log=print,
) -> dict:
    """Fine-tune the whole image model on single frames (``data.num_frames`` is forced to 1),
    as the demo prepares its image model before freezing it; save its state dict to
    ``out_file`` (loadable as ``ModelConfig.checkpoint_path``). Returns the final validation
    metrics."""
    import timm

    seed_everything(seed)
    _, classes = load_annotations(data.format, data.train_list, data.root, labels_file=data.labels_file)
    model = timm.create_model(backbone, pretrained=False, num_classes=len(classes), **backbone_kwargs)
    data = complete_data_config(DataConfig(**{**asdict(data), "num_frames": 1}), model)
    train_loader, _ = make_loader(data, data.train_list, train=True, batch_size=batch_size, workers=workers)
    val_loader, _ = make_loader(data, data.val_list, train=False, batch_size=batch_size, workers=workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(train_loader))
    metrics = {}
    for epoch in range(epochs):
        model.train()
        train_loader.sampler.set_epoch(epoch)
        bar = tqdm(train_loader, desc=f"image model {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for batch in bar:
            loss = F.cross_entropy(model(batch["video"][:, 0]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        correct = count = 0
        with torch.no_grad():
            for batch in val_loader:
                correct += (model(batch["video"][:, 0, 0]).argmax(1) == batch["label"]).sum().item()
                count += batch["label"].numel()
        metrics = {"epoch": epoch + 1, "top1": correct / count}
        log(f"image model epoch {epoch + 1}/{epochs}: frame top-1 {metrics['top1']:.3f}")
    save_checkpoint(model.state_dict(), out_file)
    return metrics
