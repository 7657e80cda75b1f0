"""Loaders: which clips each process reads, in which order, and what a clip that cannot be read does.

Every random choice of a training item (frames, crop, flip) is drawn from a generator seeded by
``(seed, epoch, clip index)`` alone, so an item is the same whichever process, loader worker or
resumed run produces it. With :class:`TrainSampler`'s order it follows that

- the step-s batches of N processes × b clips hold the same clips, augmented the same way, as
  the step-s batch of one process × N·b clips;
- a run resumed from a checkpoint (even one written mid-epoch) replays exactly the data of the
  run it continues.

A clip that cannot be decoded does not stop a run: a training item is replaced by another clip
(drawn from the item's own generator), a test item is reported as unscorable. The batch carries
the failures (``failed``: ``(path, reason)`` pairs, the reason naming the path) to the training
loop, which counts them.
"""

from __future__ import annotations

import random
import signal
from dataclasses import asdict, dataclass, fields

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .annotations import flip_label_pairs, load_annotations
from .dataset import VideoDataset
from .video_io import ClipReadError

# a clip that exists but cannot be decoded, or that vanished after the annotations were read
READ_ERRORS = (ClipReadError, OSError)
# consecutive unreadable clips after which a training item gives up (the data is broken, not a clip)
MAX_REPLACEMENTS = 10


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
    rand_augment: str | None = None
    random_erasing: float = 0.0

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def complete_data_config(data: DataConfig, backbone: torch.nn.Module) -> DataConfig:
    """Fill image size and normalisation from the backbone where the config leaves them."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    size = data.image_size or backbone.patch_embed.img_size[0]
    mean = tuple(data.mean or cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(data.std or cfg.get("std", (0.229, 0.224, 0.225)))
    return DataConfig(**{**asdict(data), "image_size": size, "mean": mean, "std": std})


class TrainSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled, ``drop_last``) over whole steps, yielding item keys
    ``(index, seed)``, able to start an epoch at a given step (a run resumed mid-epoch).

    Epoch e shuffles the clips with a permutation seeded by ``seed + e``; process r of N takes
    the permutation's positions r, r + N, r + 2N, … (``DistributedSampler``'s interleave) in
    batches of b. Its step-s batch is positions s·N·b + j·N + r, j < b, so the N batches of step s
    together are positions [s·N·b, (s+1)·N·b): one process with batch N·b takes exactly those.
    ``steps`` = ⌊clips / (N·b)⌋ per epoch; the clips left over are dropped (another set each epoch).
    """

    def __init__(self, size: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0):
        if size < world_size * batch_size:
            raise ValueError(
                f"the training set has {size} clips, fewer than one step takes: {world_size} process"
                f"{'es' if world_size > 1 else ''} × batch_size {batch_size}; lower --batch-size or the number "
                "of processes"
            )
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.steps, self.start_step = batch_size, size // (world_size * batch_size), 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self):
        indices = list(super().__iter__())[self.start_step * self.batch_size:self.steps * self.batch_size]
        return iter([(index, f"{self.seed}/{self.epoch}/{index}") for index in indices])

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.batch_size


class ShardSampler(Sampler):
    """The batches of a single-process pass over ``size`` clips, dealt to the processes: process r
    of N takes batches r, r + N, r + 2N, … (batch k: clips [k·b, (k+1)·b)). Every clip is read
    exactly once, none padded or dropped, and every batch holds the clips it would hold in one
    process, so per-clip results, hence metrics, are those of a single-process evaluation with the
    same batch size, bit for bit. Keys ``(index, None)``."""

    def __init__(self, size: int, batch_size: int, *, world_size: int = 1, rank: int = 0):
        self.indices = [index for first in range(rank * batch_size, size, world_size * batch_size)
                        for index in range(first, min(first + batch_size, size))]

    def __iter__(self):
        return iter([(index, None) for index in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


class ClipItems(Dataset):
    """``clips``' items by key ``(index, seed)``: seeded random choices, and unreadable clips
    replaced (training: by a clip drawn from the item's generator) or reported (testing: the
    item's ``video`` is None). Items are dicts ``index, video, label, failed``."""

    def __init__(self, clips: VideoDataset):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, str | None]) -> dict:
        index, seed = key
        rng = random.Random(seed)  # test items (seed None) draw nothing from it
        failed, candidate = [], index
        while True:
            try:
                video, label = self.clips.load(candidate, rng)
                return {"index": index, "video": video, "label": label, "failed": failed}
            except READ_ERRORS as error:
                path, message = self.clips.records[candidate].path, str(error).splitlines()[0]
                failed.append((path, message if path in message else f"{path}: {message}"))
            if not self.clips.train:
                return {"index": index, "video": None, "label": self.clips.records[index].label, "failed": failed}
            if len(failed) == MAX_REPLACEMENTS:
                raise ClipReadError(
                    f"{MAX_REPLACEMENTS} clips in a row could not be read; is the data set broken? "
                    + "; ".join(reason for _, reason in failed)
                )
            candidate = rng.randrange(len(self.clips))


def collate_clips(items: list[dict]) -> dict:
    """A batch: ``video`` (stacked, or None when no item could be read), ``label`` and ``index``
    of the readable items, ``unscorable`` (indices of test items that could not be read) and
    ``failed`` (every ``(path, reason)`` met while loading the batch)."""
    readable = [item for item in items if item["video"] is not None]
    return {
        "video": torch.stack([item["video"] for item in readable]) if readable else None,
        "label": torch.tensor([item["label"] for item in readable], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in readable], dtype=torch.long),
        "unscorable": [item["index"] for item in items if item["video"] is None],
        "failed": [failure for item in items for failure in item["failed"]],
    }


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers leave SIGTERM (a scheduler's, sent to the whole process group) to the
    training process, which finishes its step and checkpoints; it then stops its workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(
    data: DataConfig, annotation_file: str, *, train: bool, batch_size: int, workers: int, world_size: int = 1,
    rank: int = 0, seed: int = 0, num_clips: int = 1, num_crops: int = 1,
) -> tuple[DataLoader, list[str]]:
    """The loader of this process (``rank`` of ``world_size``) over ``annotation_file``'s clips,
    and the class names: training with :class:`TrainSampler` (call its ``set_epoch``), testing
    with :class:`ShardSampler`. Batches are :func:`collate_clips` dicts."""
    records, classes = load_annotations(
        data.format, annotation_file, data.root, labels_file=data.labels_file, skip_missing=data.skip_missing
    )
    clips = VideoDataset(
        records, num_frames=data.num_frames, image_size=data.image_size,
        mean=data.mean, std=data.std, train=train, sampling=data.sampling, frame_interval=data.frame_interval,
        num_clips=num_clips, num_crops=num_crops, scale=(data.min_scale, 1.0), flip=data.flip,
        flip_pairs=flip_label_pairs(classes), rand_augment=data.rand_augment, random_erasing=data.random_erasing,
    )
    if train:
        sampler = TrainSampler(len(clips), batch_size, world_size=world_size, rank=rank, seed=seed)
    else:
        sampler = ShardSampler(len(clips), batch_size, world_size=world_size, rank=rank)
    loader = DataLoader(
        ClipItems(clips), batch_size=batch_size, sampler=sampler, collate_fn=collate_clips, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), worker_init_fn=_ignore_sigterm,
        generator=torch.Generator().manual_seed(seed),  # the loader draws its worker seeds from its own generator
    )
    return loader, classes
