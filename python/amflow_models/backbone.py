"""The frozen image backbone: a timm ViT whose blocks the video models run one at a time.

Any timm ``VisionTransformer`` with pre-norm blocks works: plain ViT/DeiT, DINOv2 (register
tokens, LayerScale), CLIP ViT. The backbone keeps timm's module tree and state dict, so its
weights load exactly as timm loads them (``pretrained=True`` for a hub tag, or a local
``checkpoint_path``); the video models only change how its blocks are called.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import amflow_kernels
from amflow_kernels.nn import timm_attention_output, timm_qkv

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")
_MODEL_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head")


def create_backbone(
    name: str, *, pretrained: bool = False, checkpoint_path: str | None = None,
    num_classes: int | None = None, **kwargs,
) -> nn.Module:
    """A frozen timm ViT.

    Args:
        name: a timm model name, e.g. ``vit_base_patch14_reg4_dinov2.lvd142m``,
            ``vit_base_patch16_clip_224.openai`` or ``vit_tiny_patch16_224``.
        pretrained: load timm's pretrained weights for the tag (a hub download, cached).
        checkpoint_path: a local weights file loaded after creation (timm's ``load_checkpoint``);
            use it for weights fetched elsewhere or for an image model fine-tuned on frames.
        num_classes: the classifier width (0 for none); timm's default when ``None``.
        kwargs: further ``timm.create_model`` arguments (``img_size``, ``depth``, …).

    Every parameter has ``requires_grad=False`` and the model is in eval mode.
    """
    import timm

    if checkpoint_path and not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"create_backbone: checkpoint_path {checkpoint_path!r} is not a file")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"create_backbone: name {name!r} is not a timm model; see timm.list_models('vit_*')")
    try:
        model = timm.create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path or "", **kwargs)
    except (OSError, RuntimeError) as error:  # no network, no such weights, an unreadable file
        if not pretrained:
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"create_backbone: timm's pretrained weights for {name!r} cannot be loaded ({reason}); without "
            "network access, download them on another machine and pass their file as checkpoint_path "
            "(--checkpoint-path) instead of pretrained (--pretrained)"
        ) from error
    check_backbone(model, name)
    return freeze(model)


def check_backbone(model: nn.Module, name: str = "backbone") -> None:
    """Raise ``ValueError`` unless ``model`` is a timm ViT whose blocks the video models can run."""
    missing = [part for part in _MODEL_PARTS if not hasattr(model, part)]
    blocks = getattr(model, "blocks", ())
    for block in blocks:
        missing += [f"blocks[i].{p}" for p in _BLOCK_PARTS if not hasattr(block, p)]
        missing += [f"blocks[i].attn.{p}" for p in _ATTENTION_PARTS if not hasattr(getattr(block, "attn", None), p)]
    if missing or not len(blocks):
        raise ValueError(
            f"backbone {name!r} ({type(model).__name__}) is not a timm VisionTransformer with pre-norm "
            f"attention blocks (missing: {', '.join(sorted(set(missing))) or 'blocks'}); supported: ViT, "
            "DeiT, DINOv2 and CLIP ViT models of timm.models.vision_transformer"
        )


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def embed_frames(backbone: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Tokens ``(F, N, C)`` entering the first block, for images ``(F, 3, H, W)``."""
    x = backbone.patch_embed(frames)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    return backbone.norm_pre(x)


def attention_qk(
    attn: nn.Module, x: torch.Tensor, shift_kv=None, colsum_backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm's ``Attention.forward`` for ``x`` ``(F, N, C)``, also returning its q and k and, with
    ``colsum_backend``, the attention each token receives.

    q and k are ``(F, H, N, D)`` strided views of the fused qkv projection (after timm's
    optional q/k norms): no recomputation and no copy. The output is computed with SDPA as in
    timm, or, with ``colsum_backend``, by ``amflow_kernels.attention`` on that backend, whose
    column sums ``(F, H, N)`` come from the same pass (else None). ``shift_kv``, if given, maps
    ``(k, v)`` to the keys and values the heads attend to (ZeroI2V's temporal heads); q and the
    returned k are unshifted.
    """
    q, k, v = timm_qkv(attn, x)
    k_seen, v_seen = shift_kv(k, v) if shift_kv is not None else (k, v)
    dropout = attn.attn_drop.p if attn.training else 0.0
    colsums = None
    if colsum_backend is None:
        out = F.scaled_dot_product_attention(q, k_seen, v_seen, dropout_p=dropout, scale=attn_scale(attn))
    elif dropout:
        raise ValueError(f"attention_qk: attention dropout ({dropout}) with column sums; the frozen backbone has none")
    else:
        out, colsums = amflow_kernels.attention(q, k_seen, v_seen, scale=attn_scale(attn), backend=colsum_backend)
    return timm_attention_output(attn, out, x), q, k, colsums


def attn_scale(attn: nn.Module) -> float:
    return float(getattr(attn, "scale", attn.head_dim**-0.5))

