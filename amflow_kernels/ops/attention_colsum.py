"""Column sums of ordinary attention, the aligning encoder's input (eq. 4):

    colsum[..., j] = Σ_i softmax_j(S)[i, j],   S = scale · Q Kᵀ.

The public function validates, dispatches to the fused ``softmax_colsum`` ops of
:mod:`amflow_kernels.ops.registration` (unpaired) or to the reference, and maps any leading dims onto
the kernels' (B, T, H, N, D) layout (a view unless the leading dims cannot be merged).
"""

from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from .._layout import as_single_frames
from .._validate import check_attention_colsum
from . import registration


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
    out = registration.op("softmax_colsum", chosen)(as_single_frames(q), as_single_frames(k), 0, False, scale)[0]
    return out.view(q.shape[:-1])
