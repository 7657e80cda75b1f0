"""Column sums of ordinary attention, the aligning encoder's input (eq. 4):

    colsum[..., j] = Σ_i softmax_j(S)[i, j],   S = scale · Q Kᵀ.

The public function validates, dispatches and maps any leading dims onto the kernels'
(B, T, H, N, D) layout (a view unless the leading dims cannot be merged); the Triton op is
registered here, the kernels live in :mod:`amflow_kernels.ops.colsum_triton`.
"""

from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from .._validate import check_attention_colsum
from . import cext, colsum_triton


def _as_frames(x: torch.Tensor) -> torch.Tensor:
    """(..., N, D) → (A, 1, L, N, D): the last leading dim as heads, the others merged."""
    heads = x.shape[-3] if x.dim() >= 3 else 1
    return x.reshape(-1, 1, heads, *x.shape[-2:])


@torch.library.custom_op("amflow::attention_colsum_fwd_triton", mutates_args=())
def attention_colsum_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colsum, stats) for (..., N, D) q, k; stats (..., N, 2) fp32 are the softmax row
    statistics saved for the backward."""
    out, stats = colsum_triton.colsum_fwd(
        _as_frames(q), _as_frames(k), offset=0, paired=False, scale=scale
    )
    return out.view(q.shape[:-1]), stats.view(*q.shape[:-1], 2)


@attention_colsum_fwd_triton.register_fake
def _(q, k, scale):
    return q.new_empty(q.shape[:-1]), q.new_empty((*q.shape[:-1], 2), dtype=torch.float32)


@torch.library.custom_op("amflow::attention_colsum_bwd_triton", mutates_args=())
def attention_colsum_bwd_triton(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) of :func:`attention_colsum_fwd_triton`, contiguous, shaped like q."""
    frames = _as_frames(q)
    dq, dk = colsum_triton.colsum_bwd(
        grad.reshape(frames.shape[:-1]), frames, _as_frames(k), stats.view(*frames.shape[:-1], 2),
        offset=0, paired=False, scale=scale,
    )
    return dq.view(q.shape), dk.view(k.shape)


@attention_colsum_bwd_triton.register_fake
def _(grad, q, k, stats, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, scale = inputs
    ctx.save_for_backward(q, k, output[1])
    ctx.scale = scale


def _backward(ctx, grad, _grad_stats):
    if not any(ctx.needs_input_grad[:2]):
        return None, None, None
    q, k, stats = ctx.saved_tensors
    dq, dk = attention_colsum_bwd_triton(grad, q, k, stats, ctx.scale)
    return dq, dk, None


attention_colsum_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


def attention_colsum(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Column sums of the row-softmaxed attention map ``softmax(scale · Q Kᵀ)ᵀ · 1``.

    Args:
        q, k: ``[..., N, D]`` with any leading dims and strides.
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"`` (see
            ``available_backends``).

    Returns:
        ``[..., N]`` in q's dtype; each row sums to N. Differentiable in q and k; fused
        backends never allocate the N×N map.
    """
    scale = check_attention_colsum(q, k, scale)
    chosen = select("attention_colsum", backend, q)
    if chosen == "reference":
        return reference.attention_colsum(q, k, scale=scale)
    if chosen == "triton":
        return attention_colsum_fwd_triton(q, k, scale)[0]
    return cext.softmax_colsum(_as_frames(q), _as_frames(k), 0, False, scale).view(q.shape[:-1])
