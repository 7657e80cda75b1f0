"""One config for every model variant, the factory that builds it, and its parameter report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from torch import nn

from .backbone import create_backbone
from .model import AMFlowVideoModel
from .zeroi2v import ZeroI2V

VARIANTS = ("none", "vanilla", "aligned", "zeroi2v")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (stored in every checkpoint).

    ``variant``: ``vanilla``/``aligned`` AM flow, ``none`` (the same adapters and TPMs without
    AM flow) or ``zeroi2v``. Block numbers are 1-based, as in the paper ("AM/2(1,12)")."""

    num_classes: int
    backbone: str = "vit_base_patch16_224"
    pretrained: bool = False
    checkpoint_path: str | None = None
    backbone_kwargs: dict = field(default_factory=dict)
    variant: str = "vanilla"
    tpm: str = "lstm"
    adapter_dim: int = 64
    adapter_blocks: list[int] | None = None
    flow_blocks: list[int] | None = None
    offset: int = 1
    max_frames: int = 32
    aligner_dim: int = 96
    aligner_depth: int = 1
    backend: str = "auto"

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(config: ModelConfig) -> nn.Module:
    """The model ``config`` describes, its backbone created (and loaded) through timm."""
    if config.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {config.variant!r}")
    backbone = create_backbone(
        config.backbone, pretrained=config.pretrained, checkpoint_path=config.checkpoint_path,
        **config.backbone_kwargs,
    )
    if config.variant == "zeroi2v":
        return ZeroI2V(backbone, config.num_classes, adapter_dim=config.adapter_dim,
                       adapter_blocks=config.adapter_blocks)
    return AMFlowVideoModel(
        backbone, config.num_classes, flow=config.variant, flow_blocks=config.flow_blocks,
        adapter_blocks=config.adapter_blocks, tpm=config.tpm, adapter_dim=config.adapter_dim,
        offset=config.offset, max_frames=config.max_frames, aligner_dim=config.aligner_dim,
        aligner_depth=config.aligner_depth, backend=config.backend,
    )


COMPONENTS = {
    "backbone": "backbone (ViT)", "flows": "AM flow (aligning encoders)", "adapters": "adapters",
    "tpms": "temporal modules + heads", "frame_head": "last-frame head",
}


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts per component, plus ``total``."""
    report: dict[str, dict[str, int]] = {}
    for name, parameter in model.named_parameters():
        component = COMPONENTS.get(name.split(".")[0], name.split(".")[0])
        row = report.setdefault(component, {"trainable": 0, "frozen": 0})
        row["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    report["total"] = {k: sum(row[k] for row in report.values()) for k in ("trainable", "frozen")}
    return report


def format_report(report: dict[str, dict[str, int]]) -> str:
    lines = [f"{'component':<30} {'trainable':>12} {'frozen':>12}"]
    lines += [f"{name:<30} {row['trainable']:>12,} {row['frozen']:>12,}" for name, row in report.items()]
    return "\n".join(lines)
