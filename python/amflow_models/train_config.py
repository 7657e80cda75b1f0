"""How a video model is trained: the settings of one run of :func:`amflow_models.engine.fit`.

``TrainConfig`` is the one place these settings and their defaults live: ``amflow train`` takes
its flags' defaults from its fields, the presets override them by name, every checkpoint stores
them and a resumed run is compared with them. What only decides where and how fast a run goes
(device, loader processes, ``torch.compile``) is not a setting of the run and stays an argument
of ``fit``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# the validation metrics best.pt can be chosen by
SELECT_BY = ("top1", "mean_class_accuracy")
# spatial crops per validation clip: the centre one, or three along the longer side
VAL_CROPS = (1, 3)
# what may change when a run is resumed: epochs stretches the cosine schedule; batch_size may change
# with the world size at the same global batch (the data order depends on the global batch only)
RESUMABLE_CHANGES = frozenset({"epochs", "batch_size", "max_bad_clips"})


@dataclass(frozen=True)
class TrainConfig:
    """AdamW (``lr``, ``weight_decay``) on a cosine schedule with one warm-up epoch over
    ``epochs``, cross-entropy with ``label_smoothing``; ``batch_size`` clips per step in each
    process (under torchrun a step takes world size × ``batch_size``, and nothing is scaled for
    it); validation after every epoch on ``val_clips`` temporal clips × ``val_crops`` spatial
    crops, ``best.pt`` chosen by ``select_by``; up to ``max_bad_clips`` unreadable training clips
    are replaced before the run stops; ``seed`` fixes the initialisation and the data order."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    val_clips: int = 1
    val_crops: int = 1
    select_by: str = "top1"
    max_bad_clips: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{name} must be ≥ {least}, got {getattr(self, name)}"
                    for name, least in (("epochs", 1), ("batch_size", 1), ("val_clips", 1), ("max_bad_clips", 0))
                    if getattr(self, name) < least]
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.val_crops not in VAL_CROPS:
            problems.append(f"val_crops must be one of {', '.join(map(str, VAL_CROPS))}, got {self.val_crops}")
        if self.select_by not in SELECT_BY:
            problems.append(f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
