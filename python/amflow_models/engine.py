"""Training and evaluation: loaders from a data config, the fit loop, checkpoints, metrics.

A checkpoint holds the model and data configs, the class names and only the trainable
parameters (the frozen backbone is rebuilt from its own source), plus the optimiser state for
resuming. ``metrics.jsonl`` gets one JSON line per epoch.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from amflow_kernels.nn import set_backend

from .build import ModelConfig, build_model
from .checkpoints import read_checkpoint, save_checkpoint
from .data.annotations import flip_label_pairs, load_annotations
from .data.dataset import VideoDataset


@dataclass
class DataConfig:
    """Where the clips are and how they are sampled (stored in every checkpoint).

    ``image_size``, ``mean`` and ``std`` default to the backbone's (its ``pretrained_cfg``)."""

    train_list: str | None = None
    val_list: str | None = None
    format: str = "list"
    root: str = "."
    labels_file: str | None = None
    num_frames: int = 8
    sampling: str = "uniform"
    frame_interval: int = 1
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    skip_missing: bool = False
    flip: bool = True
    min_scale: float = 0.4

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def complete_data_config(data: DataConfig, backbone: torch.nn.Module) -> DataConfig:
    """Fill image size and normalisation from the backbone where the config leaves them."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    size = data.image_size or backbone.patch_embed.img_size[0]
    mean = tuple(data.mean or cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(data.std or cfg.get("std", (0.229, 0.224, 0.225)))
    return DataConfig(**{**asdict(data), "image_size": size, "mean": mean, "std": std})


def make_loader(
    data: DataConfig, annotation_file: str, *, train: bool, batch_size: int, workers: int,
    num_clips: int = 1, num_crops: int = 1,
) -> tuple[DataLoader, list[str]]:
    records, classes = load_annotations(
        data.format, annotation_file, data.root, labels_file=data.labels_file, skip_missing=data.skip_missing
    )
    dataset = VideoDataset(
        records, num_frames=data.num_frames, image_size=data.image_size,
        mean=data.mean, std=data.std, train=train, sampling=data.sampling, frame_interval=data.frame_interval,
        num_clips=num_clips, num_crops=num_crops, scale=(data.min_scale, 1.0), flip=data.flip,
        flip_pairs=flip_label_pairs(classes),
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) > batch_size,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
    )
    return loader, classes


def autocast(device: torch.device):
    """bf16 autocast on GPUs; full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, *, progress: bool = False) -> dict:
    """Top-1/top-5 accuracy, mean loss and the confusion matrix (rows: true class). Test items
    with several views ``(B, V, T, …)`` are scored by the average of their views' logits."""
    model.eval()
    classes = model.num_classes
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    top1 = top5 = loss = count = 0
    for video, label in tqdm(loader, desc="eval", leave=False, disable=not progress):
        video, label = video.to(device, non_blocking=True), label.to(device)
        with autocast(device):
            if video.dim() == 6:
                logits = model(video.flatten(0, 1)).float().unflatten(0, video.shape[:2]).mean(1)
            else:
                logits = model(video).float()
        loss += F.cross_entropy(logits, label, reduction="sum").item()
        ranked = logits.topk(min(5, classes), dim=1).indices
        top1 += (ranked[:, 0] == label).sum().item()
        top5 += (ranked == label[:, None]).any(1).sum().item()
        count += label.numel()
        pairs = label.cpu() * classes + ranked[:, 0].cpu()
        confusion += torch.bincount(pairs, minlength=classes**2).view(classes, classes)
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "clips": count,
            "confusion": confusion.tolist()}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path: str | Path, *, backend: str | None = None, device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model a checkpoint of :func:`fit` describes, with its trained parameters, and the checkpoint."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
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


def fit(
    model_config: ModelConfig, data: DataConfig, out_dir: str | Path, *, epochs: int = 10, batch_size: int = 8,
    lr: float = 1e-3, weight_decay: float = 0.05, workers: int = 2, device: str | None = None,
    compile: bool = False, resume: bool = False, seed: int = 0, progress: bool = True, log=print,
) -> dict:
    """Train ``model_config`` on ``data`` (AdamW, cosine schedule with one warm-up epoch),
    evaluate after every epoch, keep ``last.pt`` and ``best.pt`` (by val top-1) in ``out_dir``.

    Returns ``{"best": metrics of the best epoch, "history": per-epoch metrics, "seconds": …}``.
    """
    if data.train_list is None or data.val_list is None:
        raise ValueError("fit: the data config needs train_list and val_list")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(seed)
    model = build_model(model_config)
    data = complete_data_config(data, model.backbone)
    train_loader, classes = make_loader(data, data.train_list, train=True, batch_size=batch_size, workers=workers)
    val_loader, _ = make_loader(data, data.val_list, train=False, batch_size=batch_size, workers=workers)
    if len(classes) != model_config.num_classes:
        raise ValueError(f"num_classes={model_config.num_classes} but the annotations have {len(classes)} classes")
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    steps, warmup = epochs * len(train_loader), len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start, history, best = 0, [], None
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last_path.is_file():
        checkpoint = read_checkpoint(last_path)
        model.load_state_dict(checkpoint["state"], strict=False)
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        start, history, best = checkpoint["epoch"], checkpoint["history"], checkpoint["best"]
        log(f"resumed from {last_path} after epoch {start}")
    if start == 0:
        (out_dir / "metrics.jsonl").write_text("")  # a fresh run does not append to an old log
    forward = torch.compile(model) if compile else model
    began = time.perf_counter()
    for epoch in range(start, epochs):
        model.train()
        total = seen = 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for video, label in bar:
            video, label = video.to(device, non_blocking=True), label.to(device)
            with autocast(device):
                loss = F.cross_entropy(forward(video).float(), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + loss.item() * label.numel(), seen + label.numel()
            bar.set_postfix(loss=f"{total / seen:.3f}")
        metrics = {"epoch": epoch + 1, "train_loss": total / seen, **evaluate(forward, val_loader, device)}
        history.append({k: v for k, v in metrics.items() if k != "confusion"})
        improved = best is None or metrics["top1"] > best["top1"]
        best = metrics if improved else best
        checkpoint = {
            "model_config": model_config.to_dict(), "data_config": asdict(data), "classes": classes,
            "state": trainable_state(model), "epoch": epoch + 1, "history": history, "best": best,
        }
        if improved:
            save_checkpoint(checkpoint, best_path)
        resumable = {**checkpoint, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
        save_checkpoint(resumable, last_path)
        with (out_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        log(f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.3f}, val top-1 "
            f"{metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}{' (best)' if improved else ''}")
    return {"best": best, "history": history, "seconds": time.perf_counter() - began, "classes": classes}


def train_image_model(
    backbone: str, backbone_kwargs: dict, data: DataConfig, out_file: str | Path, *, epochs: int = 10,
    batch_size: int = 64, lr: float = 1e-3, workers: int = 2, seed: int = 0, progress: bool = True, log=print,
) -> dict:
    """Fine-tune the whole image model on single frames (``data.num_frames`` is forced to 1), as
    the paper prepares its "image model" before freezing it; save its state dict to ``out_file``
    (loadable as ``ModelConfig.checkpoint_path``). Returns the final validation metrics."""
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
        bar = tqdm(train_loader, desc=f"image model {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for image, label in bar:
            loss = F.cross_entropy(model(image[:, 0]), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        correct = count = 0
        with torch.no_grad():
            for image, label in val_loader:
                correct += (model(image[:, 0, 0]).argmax(1) == label).sum().item()
                count += label.numel()
        metrics = {"epoch": epoch + 1, "top1": correct / count}
        log(f"image model epoch {epoch + 1}/{epochs}: frame top-1 {metrics['top1']:.3f}")
    save_checkpoint(model.state_dict(), out_file)
    return metrics
