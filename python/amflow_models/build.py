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
    AM flow) or ``zeroi2v``. The default backbone is the papers' DINOv2 ViT-B/14 at 224 pixels
    (16 × 16 patches); its weights come from ``pretrained`` (a download) or ``checkpoint_path``.
    Block numbers are 1-based, as in the paper: its AM/2(1,12) is
    ``flow_blocks=[1, 12], tpm_blocks=[1, 12]`` with adapters in every block.

    ``adapter_dim`` defaults to 64 for the AM flow variants (the papers give no width) and to a
    quarter of the token width for ZeroI2V (its ratio 0.25). ``temporal_heads`` (ZeroI2V only)
    lists STDHA's frame offsets, head 0 first, e.g. ``[-1, 1]`` or, for 32 frames,
    ``[-1, 1, -2, 2, 3]``; default: ``zeroi2v.default_temporal_heads``. ``flow_only`` builds the
    flow-only diagnostic of ``model.py`` (vanilla or aligned); ``flow_norm`` is ``"none"`` (the
    papers) or ``"clip"`` (``flow.py``)."""

    num_classes: int
    backbone: str = "vit_base_patch14_dinov2.lvd142m"
    pretrained: bool = False
    checkpoint_path: str | None = None
    backbone_kwargs: dict = field(default_factory=lambda: {"img_size": 224})
    variant: str = "vanilla"
    tpm: str = "lstm"
    adapter_dim: int | None = None
    adapter_activation: str = "relu"
    adapter_blocks: list[int] | None = None
    flow_blocks: list[int] | None = None
    tpm_blocks: list[int] | None = None
    temporal_heads: list[int] | None = None
    offset: int = 1
    max_frames: int = 32
    aligner_dim: int = 96
    aligner_depth: int = 1
    flow_only: bool = False
    flow_norm: str = "none"
    backend: str = "auto"

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}; known: {sorted(known)}")
        # configs written before the activation was a setting used GELU
        return cls(**{"adapter_activation": "gelu", **values})

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
        if config.flow_only:
            raise ValueError("flow_only is an AM flow diagnostic; variant 'zeroi2v' has no AM flow")
        heads = dict(enumerate(config.temporal_heads)) if config.temporal_heads is not None else None
        return ZeroI2V(backbone, config.num_classes, temporal_heads=heads, adapter_dim=config.adapter_dim,
                       adapter_blocks=config.adapter_blocks)
    if config.temporal_heads is not None:
        raise ValueError(f"temporal_heads is a ZeroI2V setting; variant {config.variant!r} has no STDHA")
    return AMFlowVideoModel(
        backbone, config.num_classes, flow=config.variant, flow_blocks=config.flow_blocks,
        adapter_blocks=config.adapter_blocks, tpm_blocks=config.tpm_blocks, tpm=config.tpm,
        adapter_dim=config.adapter_dim or 64, adapter_activation=config.adapter_activation, offset=config.offset,
        max_frames=config.max_frames, aligner_dim=config.aligner_dim, aligner_depth=config.aligner_depth,
        flow_only=config.flow_only, flow_norm=config.flow_norm, backend=config.backend,
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
