"""Training and evaluation: the fit loop (one process, or one per GPU under torchrun), exact
resume, distributed evaluation, checkpoints.

A checkpoint holds the model, data and train configs, the class names and only the trainable
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
from .train_config import RESUMABLE_CHANGES, TrainConfig

__all__ = ["DataConfig", "Preempted", "TrainConfig", "evaluate", "fit", "load_checkpoint", "train_image_model"]


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


# where the data lives may change between a run and its resumption (another node's scratch disk)
DATA_LOCATIONS = {"train_list", "val_list", "root", "labels_file"}


def _check_resumable(checkpoint: dict, path: Path, now: dict) -> None:
    """Raise ``ValueError`` listing what differs between the run that wrote ``checkpoint`` and
    ``now`` (its model, data and train configs and its ``run``: world size, global batch, clips),
    where it would make the resumed run another run. The kernel backend may differ, and so may
    the world size at the same global batch (the data order depends on the global batch only, see
    ``data/loader.py``); so may the data's location, and ``epochs`` may grow (the cosine schedule
    then stretches): ``RESUMABLE_CHANGES``."""
    if "train_config" not in checkpoint:
        raise ValueError(f"--resume: {str(path)!r} holds no state to resume from (a best.pt, or an older amflow's)")
    saved = {"model_config": ModelConfig.from_dict(checkpoint["model_config"]).to_dict(),
             **{what: checkpoint[what] for what in ("data_config", "train_config", "run")}}
    ignored = {"model_config": {"backend"}, "data_config": DATA_LOCATIONS, "train_config": RESUMABLE_CHANGES,
               "run": {"world_size"}}
    problems = [f"{what.removesuffix('_config')} {key}: {saved[what].get(key)!r} in the checkpoint, "
                f"{now[what].get(key)!r} now"
                for what in saved for key in sorted((set(saved[what]) | set(now[what])) - ignored[what])
                if saved[what].get(key) != now[what].get(key)]
    if problems:
        train, run = saved["train_config"], saved["run"]
        raise ValueError(
            f"--resume: {str(path)!r} was written by a different run: {'; '.join(problems)}. Resume with the "
            f"checkpoint's settings ({run['world_size']} process(es) × --batch-size {train['batch_size']}, "
            f"--lr {train['lr']}, --weight-decay {train['weight_decay']}, --seed {train['seed']}), or train into "
            "another --out"
        )


def fit(
    model_config: ModelConfig, data: DataConfig, train: TrainConfig, out_dir: str | Path, *, workers: int = 2,
    device: str | None = None, dist_backend: str = "auto", compile: bool = False, resume: bool = False,
    progress: bool = True, log=print,
) -> dict:
    """Train ``model_config`` on ``data`` as ``train`` says (``train_config.py``), keeping
    ``last.pt``, ``best.pt`` and ``metrics.jsonl`` in ``out_dir``. ``workers`` loader processes
    per training process, ``device`` (default: cuda where available), ``compile``
    (``torch.compile`` the model) decide only where and how fast the run goes.

    Under torchrun every process calls this and trains a ``DistributedDataParallel`` replica:
    ``train.batch_size`` is per process. One process × N·b clips and N processes × b clips see
    the same data per step (``data/loader.py``) and reach the same parameters up to rounding.

    - ``resume``: continue from ``out_dir/last.pt`` (written after every epoch, before each
      validation and on SIGTERM). With the same world size on a CPU the resumed run ends
      bitwise equal to one never interrupted.
    - SIGTERM: the step in progress finishes, ``last.pt`` is written, :class:`Preempted` is raised.
    - A training clip that cannot be read is logged and replaced by another; more than
      ``train.max_bad_clips`` distinct ones stop the run with a ``ValueError`` listing them.

    Returns ``{"best": metrics of the best epoch, "history": per-epoch metrics, "seconds": …,
    "classes": …}``.
    """
    if data.train_list is None or data.val_list is None:
        raise ValueError("fit: the data config needs train_list and val_list")
    # SIGTERM caught from the start: one during setup stops the run after its first step
    with StopRequest() as stop, session(device, dist_backend) as runtime:
        run = _Run(runtime, model_config, data, train, Path(out_dir), workers=workers,
                   log=log if runtime.is_main else lambda *_: None)
        if resume:
            run.resume()
        run.start_metrics_log()
        compiled = torch.compile(run.model) if compile else run.model
        forward = compiled if runtime.world_size == 1 else DistributedDataParallel(
            compiled, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
        run.log(f"{runtime.world_size} process{'es' if runtime.world_size > 1 else ''} × {train.batch_size} clips = "
                f"{run.state['run']['global_batch']} clips per step, {run.steps} step{'s' if run.steps > 1 else ''} "
                f"per epoch, on {runtime.device.type}")
        began = time.perf_counter()
        for epoch in range(run.epoch, train.epochs):
            run.train_epoch(epoch, forward, stop, progress=progress and runtime.is_main)
            run.end_epoch(epoch, compiled)
        return {"best": run.best, "history": run.history, "seconds": time.perf_counter() - began,
                "classes": run.classes}


class _Run:
    """One training run's model, loaders, optimiser, schedule and progress, split into the steps
    :func:`fit` takes: build (``__init__``), ``resume``, ``train_epoch``, ``end_epoch``."""

    def __init__(self, runtime: Runtime, model_config: ModelConfig, data: DataConfig, train: TrainConfig,
                 out_dir: Path, *, workers: int, log):
        self.runtime, self.model_config, self.train, self.log = runtime, model_config, train, log
        if runtime.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path, self.best_path, self.metrics_path = (out_dir / "last.pt", out_dir / "best.pt",
                                                             out_dir / "metrics.jsonl")
        seed_everything(train.seed)  # the same initial model in every process
        self.model = build_model(model_config)
        self.data = complete_data_config(data, self.model.backbone)
        shared = dict(batch_size=train.batch_size, workers=workers, world_size=runtime.world_size,
                      rank=runtime.rank, seed=train.seed)
        self.train_loader, self.classes = make_loader(self.data, self.data.train_list, train=True, **shared)
        self.val_loader, _ = make_loader(self.data, self.data.val_list, train=False, num_clips=train.val_clips,
                                         num_crops=train.val_crops, **shared)
        if len(self.classes) != model_config.num_classes:
            raise ValueError(f"num_classes={model_config.num_classes} but the annotations have "
                             f"{len(self.classes)} classes")
        seed_everything(train.seed + 1 + runtime.rank)  # each process its own stream (dropout, if a model has any)
        self.model.to(runtime.device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=train.lr,
                                           weight_decay=train.weight_decay)
        self.steps = steps = self.train_loader.sampler.steps
        total = train.epochs * steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min(1.0, (s + 1) / steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
        )
        # what a checkpoint records of the run, and what a resumed one is compared with
        self.state = {"model_config": model_config.to_dict(), "data_config": asdict(self.data),
                      "train_config": train.to_dict(),
                      "run": {"world_size": runtime.world_size, "global_batch": runtime.world_size * train.batch_size,
                              "train_clips": len(self.train_loader.dataset)}}
        self.epoch, self.step, self.history, self.best, self.bad_clips = 0, 0, [], None, {}
        self.loss_sum, self.seen = 0.0, 0  # this process's running training loss in the epoch

    def resume(self) -> None:
        """Continue from ``last.pt``, where one exists and was written by the same run."""
        if not self.last_path.is_file():
            self.log(f"--resume: {self.last_path} does not exist; starting afresh")
            return
        checkpoint = read_checkpoint(self.last_path)
        _check_resumable(checkpoint, self.last_path, self.state)
        self.model.load_state_dict(checkpoint["state"], strict=False)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        self.history, self.best, self.bad_clips = checkpoint["history"], checkpoint["best"], checkpoint["bad_clips"]
        processes, rank = checkpoint["processes"], self.runtime.rank
        if len(processes) == self.runtime.world_size:
            set_random_states(processes[rank]["random"], self.runtime.device)
            self.loss_sum, self.seen = processes[rank]["loss_sum"], processes[rank]["seen"]
        else:  # same global batch, so the same data; the epoch's running loss goes to process 0
            self.log(f"resuming {len(processes)} processes' run with {self.runtime.world_size}: the data order is "
                     "the same, the processes' random streams start afresh")
            if self.runtime.is_main:
                self.loss_sum, self.seen = sum(p["loss_sum"] for p in processes), sum(p["seen"] for p in processes)
        if checkpoint["train_config"]["epochs"] != self.train.epochs:
            self.log(f"the run had {checkpoint['train_config']['epochs']} epochs, now {self.train.epochs}: the "
                     "cosine schedule changes")
        self.log(f"resumed from {self.last_path} at epoch {self.epoch + 1}, step {self.step} of {self.steps}")

    def start_metrics_log(self) -> None:
        """A fresh run does not append to an old log; a resumed one keeps its epochs' lines."""
        if self.runtime.is_main:
            path = self.metrics_path
            kept = path.read_text().splitlines(keepends=True)[:self.epoch] if path.is_file() else []
            path.write_text("".join(kept))

    def train_epoch(self, epoch: int, forward, stop: StopRequest, *, progress: bool) -> None:
        """The steps of ``epoch`` from ``self.step`` on; on SIGTERM, ``last.pt`` and :class:`Preempted`."""
        device, steps, train = self.runtime.device, self.steps, self.train
        self.model.train()
        self.train_loader.sampler.set_epoch(epoch, start_step=self.step)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{train.epochs}", leave=False, disable=not progress,
                   initial=self.step, total=steps)
        for step, batch in enumerate(bar, start=self.step + 1):
            video, label = batch["video"].to(device, non_blocking=True), batch["label"].to(device)
            with autocast(device):
                loss = F.cross_entropy(forward(video).float(), label, label_smoothing=train.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            self.loss_sum, self.seen = self.loss_sum + loss.item() * label.numel(), self.seen + label.numel()
            bar.set_postfix(loss=f"{self.loss_sum / self.seen:.3f}")
            new = [(path, reason) for path, reason in batch["failed"] if path not in self.bad_clips]
            stops, failures = self.runtime.sum([int(stop.requested), len(new)])
            if failures:
                _count_bad_clips(self.runtime.gather(new), self.bad_clips, train.max_bad_clips, self.log)
            if stops:
                self.write_last(epoch, step)
                raise Preempted(f"stopped by SIGTERM after step {step} of {steps} of epoch {epoch + 1}; "
                                f"{self.last_path} holds the run: continue it with the same command and --resume")
        self.write_last(epoch, steps)  # a kill during validation costs only the validation

    def end_epoch(self, epoch: int, model: torch.nn.Module) -> None:
        """Validate ``model`` after ``epoch``, log the metrics, keep ``best.pt`` and ``last.pt``."""
        self.step, (loss_sum, seen) = 0, self.runtime.sum([self.loss_sum, self.seen])
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / seen, **evaluate(model, self.val_loader, self.runtime)}
        self.loss_sum, self.seen = 0.0, 0
        self.history.append({k: v for k, v in metrics.items() if k not in ("confusion", "unscorable")})
        select_by = self.train.select_by
        improved = self.best is None or metrics[select_by] > self.best[select_by]
        self.best = self.history[-1] if improved else self.best
        if self.runtime.is_main:  # the log first: a resumed run cuts it back to its checkpoint's epochs
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            if improved:
                save_checkpoint(self.describe(epoch + 1), self.best_path)
        self.write_last(epoch + 1, 0)
        self.epoch = epoch + 1
        if metrics["unscorable"]:
            self.log(f"{len(metrics['unscorable'])} validation clips could not be read and were not scored, e.g. "
                     + metrics["unscorable"][0]["reason"])
        self.log(f"epoch {epoch + 1}/{self.train.epochs}: train loss {metrics['train_loss']:.3f}, val top-1 "
                 f"{metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}{' (best)' if improved else ''}")

    def describe(self, epoch: int) -> dict:
        """What ``best.pt`` holds: the configs, the class names and the trained parameters."""
        return {**self.state, "classes": self.classes, "seed": self.train.seed, "state": trainable_state(self.model),
                "epoch": epoch, "history": self.history, "best": self.best}

    def write_last(self, epoch: int, step: int) -> None:
        """``last.pt``: what ``best.pt`` holds and what resuming needs, every process's random states included."""
        device = self.runtime.device
        processes = self.runtime.gather({"random": random_states(device), "loss_sum": self.loss_sum,
                                         "seen": self.seen})
        if self.runtime.is_main:
            save_checkpoint({**self.describe(epoch), "step": step, "optimizer": self.optimizer.state_dict(),
                             "schedule": self.schedule.state_dict(), "processes": processes,
                             "bad_clips": self.bad_clips}, self.last_path)
        self.runtime.barrier()  # no process leaves (ends the job) while process 0 still writes


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
