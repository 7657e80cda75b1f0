"""AM flow: a per-token motion signal taken from two frames' attention maps.

    flow[b, t, h, j] = Σ_i softmax_j( |S_t − S_{t+Δ}| )[i, j],   S_t = scale · Q_t K_tᵀ,

for t = 0 … T−1−Δ (eq. 2–3 of the AM Flow paper, "softmax(|X_t − X_{t+1}|)ᵀ · 1"). The
public function validates and dispatches to the fused ``softmax_colsum`` ops of
:mod:`amflow_kernels.ops.registration` (paired frames) or to the reference.
"""

from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from .._validate import check_am_flow
from . import registration


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
    return registration.op("softmax_colsum", chosen)(q, k, offset, True, scale)[0]
