"""AM flow: a per-token motion signal taken from two frames' attention maps.

    flow[b, t, h, j] = Σ_i softmax_j( |S_t − S_{t+Δ}| )[i, j],   S_t = scale · Q_t K_tᵀ,

for t = 0 … T−1−Δ (eq. 2–3 of the AM Flow paper, "softmax(|X_t − X_{t+1}|)ᵀ · 1"). The
public function validates, dispatches and reshapes; the Triton op is registered here with
its fake and autograd, the kernels live in :mod:`amflow_kernels.ops.colsum_triton`.
"""

from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from .._validate import check_am_flow
from . import cext, colsum_triton


@torch.library.custom_op("amflow::am_flow_fwd_triton", mutates_args=())
def am_flow_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, offset: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flow, stats) for (B, T, H, N, D) q, k; stats (B, T−Δ, H, N, 2) fp32 are the softmax
    row statistics saved for the backward."""
    return colsum_triton.colsum_fwd(q, k, offset=offset, paired=True, scale=scale)


@am_flow_fwd_triton.register_fake
def _(q, k, offset, scale):
    b, t, h, n, _ = q.shape
    torch._check(t > offset)
    flow = q.new_empty((b, t - offset, h, n))
    return flow, q.new_empty((b, t - offset, h, n, 2), dtype=torch.float32)


@torch.library.custom_op("amflow::am_flow_bwd_triton", mutates_args=())
def am_flow_bwd_triton(
    grad_flow: torch.Tensor, q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor,
    offset: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) of :func:`am_flow_fwd_triton`, contiguous (B, T, H, N, D)."""
    return colsum_triton.colsum_bwd(grad_flow, q, k, stats, offset=offset, paired=True, scale=scale)


@am_flow_bwd_triton.register_fake
def _(grad_flow, q, k, stats, offset, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, offset, scale = inputs
    ctx.save_for_backward(q, k, output[1])
    ctx.offset, ctx.scale = offset, scale


def _backward(ctx, grad_flow, _grad_stats):
    if not any(ctx.needs_input_grad[:2]):
        return None, None, None, None
    q, k, stats = ctx.saved_tensors
    dq, dk = am_flow_bwd_triton(grad_flow, q, k, stats, ctx.offset, ctx.scale)
    return dq, dk, None, None


am_flow_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


def am_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_frames: int | None = None,
    offset: int = 1,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """AM flow of consecutive frame pairs: ``softmax(|S_t − S_{t+Δ}|)ᵀ · 1``.

    Args:
        q, k: ``[B, T, H, N, D]``, or ``[B·T, H, N, D]`` with ``num_frames=T`` (timm's
            attention layout). Any strides: views of a fused qkv projection go in uncopied.
        num_frames: T when q, k are ``[B·T, H, N, D]``.
        offset: Δ ≥ 1, the frame distance of each pair (the paper uses 1).
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"`` (see
            ``available_backends``).

    Returns:
        ``[B, T−Δ, H, N]`` in q's dtype; each ``flow[b, t, h, :]`` sums to N. Differentiable
        in q and k; fused backends keep O(B·T·H·N) extra memory, never an N×N map.
    """
    q, k, scale = check_am_flow(q, k, num_frames, offset, scale)
    chosen = select("am_flow", backend, q)
    if chosen == "reference":
        return reference.am_flow(q, k, offset=offset, scale=scale)
    if chosen == "triton":
        return am_flow_fwd_triton(q, k, offset, scale)[0]
    return cext.softmax_colsum(q, k, offset, True, scale)
