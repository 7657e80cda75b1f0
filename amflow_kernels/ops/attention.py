"""Attention that also returns the attention each key receives:

    out = softmax(scale · Q Kᵀ + key_bias) V,      colsum[..., j] = Σ_{i < R} softmax(…)[i, j].

The public function validates, dispatches to the fused ``attention`` ops of
:mod:`amflow_kernels.ops.registration` or to the reference, and maps any leading dims onto the
kernels' (B, H, N, ·) layout (views for every layout timm produces). ``colsum`` is what token
pruning ranks tokens by (EViT: the attention the CLS query pays each token, ``colsum_rows=1``)
and what the aligning encoder reads (every query's): computed in the same fused pass as
``out``, and differentiable through both.
"""

from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from .._layout import as_heads
from .._validate import check_attention
from . import registration


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    key_bias: torch.Tensor | None = None, colsum_rows: int | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal softmax attention and the column sums of its attention map.

    Args:
        q: ``[..., Nq, D]``; k: ``[..., Nk, D]``; v: ``[..., Nk, Dv]`` with the same leading
            dims (e.g. batch and heads), any strides (timm's fused-qkv views without a copy).
        scale: score scale, default ``D ** -0.5``.
        key_bias: optional additive bias per key, broadcastable to ``[..., Nk]`` (ToMe's
            ``log(size)``; ``-inf`` masks a key); differentiable.
        colsum_rows: sum the attention of the first ``colsum_rows`` queries only (the CLS or
            prefix tokens); default: every query.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"`` (see
            ``available_backends``).

    Returns:
        ``(out, colsum)``: ``out`` ``[..., Nq, Dv]`` in q's dtype, as
        ``F.scaled_dot_product_attention`` gives it; ``colsum`` ``[..., Nk]`` in float32
        (float64 for float64 inputs), summing to ``colsum_rows``. Both differentiable in q, k, v
        and key_bias; fused backends never allocate the Nq × Nk map.
    """
    scale, rows = check_attention(q, k, v, scale, key_bias, colsum_rows)
    chosen = select("attention", backend, q, {"D": q.shape[-1], "Dv": v.shape[-1]})
    if chosen == "reference":
        return reference.attention(q, k, v, scale=scale, key_bias=key_bias, colsum_rows=rows)
    bias = None
    if key_bias is not None:
        nk = k.shape[-2]
        state = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = key_bias.to(state).expand(*q.shape[:-2], nk).reshape(-1, nk).contiguous()
    out, colsum, _ = registration.op("attention", chosen)(as_heads(q), as_heads(k), as_heads(v), bias, rows, scale)
    return out.reshape(*q.shape[:-1], v.shape[-1]), colsum.reshape(k.shape[:-1])
