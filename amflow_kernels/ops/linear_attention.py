"""Non-causal linear attention (Katharopoulos et al. 2020), the aligning encoder's attention.

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps),    φ(x) = elu(x) + 1.

The public function validates, dispatches to the fused ``linear_attention`` ops of
:mod:`amflow_kernels.ops.registration` or to the reference, and reshapes any leading dims to
(B, H, N, ·) views. The fused forwards return (out, KV, z), with the fp32 state KV = Σ φ(k) vᵀ
and z = Σ φ(k) saved for the backward.
"""

from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from .._layout import as_heads
from .._validate import check_linear_attention
from . import registration


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """Non-causal linear attention with the feature map φ(x) = elu(x) + 1.

    Args:
        q: ``[..., Nq, D]``; k: ``[..., Nk, D]``; v: ``[..., Nk, Dv]`` with the same leading
            dims (e.g. batch and heads), any strides. Nq ≠ Nk (cross attention) and Dv ≠ D are
            allowed.
        eps: added to the normaliser φ(q_i)ᵀ Σ_j φ(k_j), ≥ 0.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"`` (see
            ``available_backends``).

    Returns:
        ``[..., Nq, Dv]`` in q's dtype, differentiable in q, k and v. Fused backends keep the
        D × Dv state in fp32 and never write φ(q), φ(k) or per-token products to memory.
    """
    eps = check_linear_attention(q, k, v, eps)
    head_dims = {"D": q.shape[-1], "Dv": v.shape[-1]}
    chosen = select("linear_attention", backend, q, head_dims)
    if chosen == "reference":
        return reference.linear_attention(q, k, v, eps=eps)
    out = registration.op("linear_attention", chosen)(as_heads(q), as_heads(k), as_heads(v), eps)[0]
    return out.reshape(*q.shape[:-1], v.shape[-1])
