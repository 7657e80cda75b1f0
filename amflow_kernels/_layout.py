"""How the ops view their inputs: the shapes the kernels take, as views of what users pass
(timm's permuted qkv views included), and the one layout the Triton kernels read. Used by
the input checks, the reference and the backends alike."""

from __future__ import annotations

import torch


def as_frames(x: torch.Tensor, num_frames: int | None) -> torch.Tensor:
    """(B·T, H, N, D) with ``num_frames=T`` → a (B, T, H, N, D) view; 5-D input unchanged."""
    if num_frames is None:
        return x
    return x.unflatten(0, (x.shape[0] // num_frames, num_frames))


def as_single_frames(x: torch.Tensor) -> torch.Tensor:
    """(..., N, D) → (A, 1, L, N, D): the last leading dim as heads, the others merged."""
    heads = x.shape[-3] if x.dim() >= 3 else 1
    return x.reshape(-1, 1, heads, *x.shape[-2:])


def as_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., N, C) → (B, H, N, C): a view for every layout whose leading dims except the last
    merge (always for 2–4 dims; timm's permuted qkv views included)."""
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    return x.flatten(0, -4) if x.dim() > 4 else x


def unit_stride_last_dim(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has unit stride (every layout timm produces, views of a fused
    qkv included), else a copy. The Triton kernels take no stride for it: their loads of a row
    are contiguous and vectorise, and what ``tests/triton_aot.py`` compiles is what runs."""
    return x if x.stride(-1) == 1 else x.contiguous()
