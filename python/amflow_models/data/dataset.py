"""Clip sampling, augmentation and the video dataset.

Sampling (``num_frames`` indices out of a clip of ``total`` frames):
- ``uniform`` (TSN segments, for SSv2-like data): the clip is cut into ``num_frames`` equal
  segments and one frame is taken from each, at random in training, at the centre otherwise.
- ``dense`` (for Kinetics-like data): ``num_frames`` frames ``frame_interval`` apart from a
  start chosen at random in training; in testing, ``num_clips`` starts spread evenly.
Clips shorter than what is asked for loop.

Training views: one random-resized crop shared by all frames, then a horizontal flip with
probability ½ that also swaps mirrored labels (``flip_pairs``), then optionally torchvision's
RandAugment (``rand_augment``, e.g. ``m7-n4``: 4 ops at magnitude 7) and, on the normalised
clip, RandomErasing (probability ``random_erasing``), each drawn once for the whole clip so
that every frame gets the same ops and the same erased box. Every random choice is drawn
from ``rng`` (a ``random.Random``; the ``random`` module itself by default), so a training item
is a function of its index and its generator's seed (see ``loader.py``). Test views: the short side
resized to ``image_size``, then ``num_crops`` crops (1: centre; 3: both ends and centre of the
long side), for each of ``num_clips`` temporal clips: ``(V, T, 3, S, S)`` with V = clips × crops.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .annotations import VideoRecord
from .video_io import read_clip

SAMPLINGS = ("uniform", "dense")


def parse_rand_augment(text: str) -> tuple[int, int]:
    """``"m7-n4"`` (timm's notation) → ``(magnitude 7, num_ops 4)``."""
    parts = {part[:1]: part[1:] for part in text.split("-")}
    try:
        magnitude, ops = int(parts.pop("m")), int(parts.pop("n"))
    except (KeyError, ValueError):
        raise ValueError(f"rand_augment must look like m7-n4 (magnitude 0..30, ops ≥ 1), got {text!r}") from None
    if parts or not (0 <= magnitude <= 30 and ops >= 1):
        raise ValueError(f"rand_augment must look like m7-n4 (magnitude 0..30, ops ≥ 1), got {text!r}")
    return magnitude, ops


def _seeded(transform, video: torch.Tensor, rng) -> torch.Tensor:
    """A torchvision transform (which draws from torch's generator) with its draws seeded from
    ``rng``, so that the item stays a function of its generator's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(63))
        return transform(video)


def uniform_indices(total: int, num_frames: int, *, train: bool, shift: float = 0.5, rng=random) -> list[int]:
    """One frame per segment: at a random point (train) or at fraction ``shift`` of each segment."""
    segment = total / num_frames
    return [min(total - 1, int(segment * (i + (rng.random() if train else shift)))) for i in range(num_frames)]


def dense_indices(
    total: int, num_frames: int, interval: int, *, train: bool, clip: int = 0, num_clips: int = 1, rng=random
) -> list[int]:
    """``num_frames`` frames ``interval`` apart, from a random start (train) or the start of test
    clip ``clip`` of ``num_clips`` spread evenly; looping where the clip is too short."""
    span = max(0, total - (num_frames - 1) * interval - 1)
    start = rng.randint(0, span) if train else round(span * (clip + 0.5) / num_clips) if span else 0
    return [(start + i * interval) % total for i in range(num_frames)]


def resize_short_side(video: torch.Tensor, size: int) -> torch.Tensor:
    """``(T, 3, H, W)`` float frames resized (antialiased bilinear) so that min(H, W) = size."""
    height, width = video.shape[-2:]
    factor = size / min(height, width)
    target = (max(size, round(height * factor)), max(size, round(width * factor)))
    return F.interpolate(video, size=target, mode="bilinear", antialias=True, align_corners=False)


def random_resized_crop(video: torch.Tensor, size: int, scale: tuple[float, float], rng=random) -> torch.Tensor:
    """One crop of random area fraction in ``scale`` and aspect ratio in [3/4, 4/3], for all frames."""
    height, width = video.shape[-2:]
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h, w = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
        if 0 < h <= height and 0 < w <= width:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    crop = video[..., top:top + h, left:left + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def spatial_crops(video: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """Centre crop (1) or start/centre/end crops along the long side (3) of resized frames."""
    height, width = video.shape[-2:]
    if num_crops == 1:
        offsets = [((height - size) // 2, (width - size) // 2)]
    else:
        along = [0, (max(height, width) - size) // 2, max(height, width) - size]
        offsets = [(o, (width - size) // 2) if height > width else ((height - size) // 2, o) for o in along]
    return [video[..., top:top + size, left:left + size] for top, left in offsets]


class VideoDataset(Dataset):
    """Clips of ``records`` as normalised float tensors and their labels.

    Training items are ``(T, 3, S, S)``; test items ``(V, T, 3, S, S)`` (see the module docstring).

    Args:
        records: from :func:`load_annotations` (or any list of ``VideoRecord``).
        num_frames: frames per clip T.
        image_size: the model's input size S.
        mean, std: per-channel normalisation of [0, 1] pixels (the backbone's).
        train: random sampling and augmentation, or deterministic test views.
        sampling: ``uniform`` or ``dense``; ``frame_interval`` for ``dense``.
        num_clips, num_crops: test views (1 or 3 crops).
        scale: area range of the training crop.
        flip: horizontal flips in training; ``flip_pairs`` maps a label to its mirror.
        rand_augment: ``"m7-n4"``-style RandAugment for training clips, or None.
        random_erasing: probability of RandomErasing a training clip.
    """

    def __init__(
        self, records: list[VideoRecord], *, num_frames: int, image_size: int, mean, std, train: bool,
        sampling: str = "uniform", frame_interval: int = 1, num_clips: int = 1, num_crops: int = 1,
        scale: tuple[float, float] = (0.4, 1.0), flip: bool = True, flip_pairs: dict[int, int] | None = None,
        rand_augment: str | None = None, random_erasing: float = 0.0,
    ):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        if min(num_frames, image_size, frame_interval, num_clips) < 1:
            raise ValueError(
                "num_frames, image_size, frame_interval and num_clips must be ≥ 1, got "
                f"{num_frames}, {image_size}, {frame_interval}, {num_clips}"
            )
        self.records, self.num_frames, self.image_size, self.train = records, num_frames, image_size, train
        self.sampling, self.frame_interval = sampling, frame_interval
        self.num_clips, self.num_crops = num_clips, num_crops
        self.scale, self.flip, self.flip_pairs = scale, flip, dict(flip_pairs or {})
        if not 0.0 <= random_erasing <= 1.0:
            raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing}")
        from torchvision.transforms import v2

        self.rand_augment = None
        if rand_augment:
            magnitude, ops = parse_rand_augment(rand_augment)
            self.rand_augment = v2.RandAugment(num_ops=ops, magnitude=magnitude)
        self.random_erasing = v2.RandomErasing(p=random_erasing) if random_erasing else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def _indices(self, total: int, clip: int, rng) -> list[int]:
        if self.sampling == "uniform":
            return uniform_indices(
                total, self.num_frames, train=self.train, shift=(clip + 0.5) / self.num_clips, rng=rng
            )
        return dense_indices(
            total, self.num_frames, self.frame_interval, train=self.train, clip=clip, num_clips=self.num_clips,
            rng=rng,
        )

    def _to_float(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.permute(0, 3, 1, 2).float().div_(255)

    def _normalise(self, video: torch.Tensor) -> torch.Tensor:
        return (video - self.mean) / self.std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index)

    def load(self, index: int, rng=random) -> tuple[torch.Tensor, int]:
        """Item ``index`` with its random choices drawn from ``rng``; raises ``ClipReadError``
        (or ``OSError``) for a clip that cannot be read."""
        record = self.records[index]
        label = record.label
        if self.train:
            video = self._to_float(read_clip(record.path, lambda total: self._indices(total, 0, rng)))
            video = random_resized_crop(video, self.image_size, self.scale, rng)
            if self.flip and rng.random() < 0.5:
                video, label = video.flip(-1), self.flip_pairs.get(label, label)
            if self.rand_augment is not None:
                video = _seeded(self.rand_augment, video.clamp_(0, 1), rng)
            video = self._normalise(video)
            if self.random_erasing is not None:
                video = _seeded(self.random_erasing, video, rng)
            return video, label
        views = []
        for clip in range(self.num_clips):
            video = self._to_float(read_clip(record.path, lambda total, c=clip: self._indices(total, c, rng)))
            views += spatial_crops(resize_short_side(video, self.image_size), self.image_size, self.num_crops)
        return self._normalise(torch.stack(views)), label
