"""Non-causal linear attention (Katharopoulos et al. 2020), the aligning encoder's attention.

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps),    φ(x) = elu(x) + 1.

The public function validates, dispatches and reshapes any leading dims to (B, H, N, ·)
views. Both fused implementations return (out, KV, z), with the fp32 state KV = Σ φ(k) vᵀ and
z = Σ φ(k) saved for the backward; this module registers their fake kernels and autograd:
the Triton op ``amflow::linear_attention_fwd_triton`` (kernels in
:mod:`amflow_kernels.ops.linear_attention_triton`) and the extension's
``amflow::linear_attention_fwd`` (csrc/, CPU and CUDA).
"""

from __future__ import annotations

import torch

from .. import reference
from .._dispatch import select
from .._validate import check_linear_attention
from . import cext, linear_attention_triton


@torch.library.custom_op("amflow::linear_attention_fwd_triton", mutates_args=())
def linear_attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, kv, z) for q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) of any strides."""
    return linear_attention_triton.linear_attention_fwd(q, k, v, eps)


@torch.library.custom_op("amflow::linear_attention_bwd_triton", mutates_args=())
def linear_attention_bwd_triton(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv: torch.Tensor, z: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`linear_attention_fwd_triton`, contiguous."""
    return linear_attention_triton.linear_attention_bwd(grad, q, k, v, kv, z, eps)


def _fake_fwd(q, k, v, eps):
    b, h, nq, d = q.shape
    dv = v.shape[-1]
    state = dict(dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return q.new_empty((b, h, nq, dv)), q.new_empty((b, h, d, dv), **state), q.new_empty((b, h, d), **state)


def _fake_bwd(grad, q, k, v, kv, z, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, eps = inputs
    _, kv, z = output
    ctx.save_for_backward(q, k, v, kv, z)
    ctx.eps = eps


def _autograd_through(bwd_op):
    """The backward of a fused forward whose backward op is ``bwd_op``."""

    def backward(ctx, grad, _grad_kv, _grad_z):
        if not any(ctx.needs_input_grad[:3]):
            return None, None, None, None
        q, k, v, kv, z = ctx.saved_tensors
        dq, dk, dv = bwd_op(grad, q, k, v, kv, z, ctx.eps)
        return dq, dk, dv, None

    return backward


linear_attention_fwd_triton.register_fake(_fake_fwd)
linear_attention_bwd_triton.register_fake(_fake_bwd)
linear_attention_fwd_triton.register_autograd(
    _autograd_through(linear_attention_bwd_triton), setup_context=_setup_context
)
if cext.EXTENSION_ERROR is None:
    torch.library.register_fake("amflow::linear_attention_fwd", _fake_fwd)
    torch.library.register_fake("amflow::linear_attention_bwd", _fake_bwd)
    torch.library.register_autograd(
        "amflow::linear_attention_fwd",
        _autograd_through(torch.ops.amflow.linear_attention_bwd),
        setup_context=_setup_context,
    )


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., N, C) → (B, H, N, C): a view for every layout whose leading dims except the last
    merge (always for 2–4 dims; timm's permuted qkv views included)."""
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    return x.flatten(0, -4) if x.dim() > 4 else x


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
    fwd = linear_attention_fwd_triton if chosen == "triton" else torch.ops.amflow.linear_attention_fwd
    out = fwd(_as_heads(q), _as_heads(k), _as_heads(v), eps)[0]
    return out.reshape(*q.shape[:-1], v.shape[-1])
