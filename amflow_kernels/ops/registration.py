"""The fused ops as ``torch.library`` ops: one scheme of names, one registration path.

Every backend exposes the same two op families, a forward and a backward each:

    amflow::softmax_colsum_fwd{s}(q, k, offset, paired, scale) -> (out, stats)
    amflow::softmax_colsum_bwd{s}(grad, q, k, stats, offset, paired, scale) -> (dq, dk)
    amflow::linear_attention_fwd{s}(q, k, v, eps) -> (out, kv, z)
    amflow::linear_attention_bwd{s}(grad, q, k, v, kv, z, eps) -> (dq, dk, dv)

with the suffix ``s`` "" for the compiled extension (csrc/: its CPU and CUDA kernels register
under one schema) and "_triton" for the Triton kernels, defined below. ``softmax_colsum`` is
AM flow when ``paired`` (frame t against t + offset, q and k (B, T, H, N, D)), the attention
colsum otherwise; ``stats``, ``kv`` and ``z`` are what the backward needs: the fp32 row
statistics (B, P, H, N, 2) of the GPU kernels, none (an empty tensor) from the CPU kernels. :func:`register`
gives each (family, backend) its fake kernels and autograd; the Triton kernel modules, and
triton itself, are imported when a Triton op first runs, so the package imports without it.
"""

from __future__ import annotations

import torch

from . import extension
from .triton_device import device_guard

TRITON_SUFFIX = "_triton"
# Leading tensor inputs of each family's forward that are differentiable; the backward takes
# the gradient of the first output, those inputs, the other outputs, then the non-tensor args.
DIFFERENTIABLE_INPUTS = {"softmax_colsum": 2, "linear_attention": 3}


@torch.library.custom_op("amflow::softmax_colsum_fwd_triton", mutates_args=())
def softmax_colsum_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, offset: int, paired: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import softmax_colsum_triton

    with device_guard(q):
        return softmax_colsum_triton.colsum_fwd(q, k, offset=offset, paired=paired, scale=scale)


@torch.library.custom_op("amflow::softmax_colsum_bwd_triton", mutates_args=())
def softmax_colsum_bwd_triton(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor,
    offset: int, paired: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import softmax_colsum_triton

    with device_guard(q):
        return softmax_colsum_triton.colsum_bwd(grad, q, k, stats, offset=offset, paired=paired, scale=scale)


@torch.library.custom_op("amflow::linear_attention_fwd_triton", mutates_args=())
def linear_attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import linear_attention_triton

    with device_guard(q):
        return linear_attention_triton.linear_attention_fwd(q, k, v, eps)


@torch.library.custom_op("amflow::linear_attention_bwd_triton", mutates_args=())
def linear_attention_bwd_triton(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv: torch.Tensor, z: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import linear_attention_triton

    with device_guard(q):
        return linear_attention_triton.linear_attention_bwd(grad, q, k, v, kv, z, eps)


def _softmax_colsum_fwd_fake(q, k, offset, paired, scale):
    b, t, h, n, _ = q.shape
    torch._check(t > offset)
    pairs = t - offset if paired else t
    return q.new_empty((b, pairs, h, n)), q.new_empty((b, pairs, h, n, 2), dtype=torch.float32)


def _extension_softmax_colsum_fwd_fake(q, k, offset, paired, scale):
    """The extension's: its CPU kernels return no statistics (an empty tensor), since their
    backward recomputes whole rows exactly in the input precision."""
    out, stats = _softmax_colsum_fwd_fake(q, k, offset, paired, scale)
    return out, (stats.new_empty((0,)) if q.device.type == "cpu" else stats)


def _linear_attention_fwd_fake(q, k, v, eps):
    b, h, nq, d = q.shape
    dv = v.shape[-1]
    state = dict(dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return q.new_empty((b, h, nq, dv)), q.new_empty((b, h, d, dv), **state), q.new_empty((b, h, d), **state)


FORWARD_FAKES = {  # by (family, suffix)
    ("softmax_colsum", TRITON_SUFFIX): _softmax_colsum_fwd_fake,
    ("softmax_colsum", ""): _extension_softmax_colsum_fwd_fake,
    ("linear_attention", TRITON_SUFFIX): _linear_attention_fwd_fake,
    ("linear_attention", ""): _linear_attention_fwd_fake,
}


def op(family: str, backend: str, direction: str = "fwd"):
    """The op of ``family`` ("softmax_colsum" or "linear_attention") for a fused ``backend``
    ("triton", "cuda" or "cpu"); ``direction`` "fwd" or "bwd"."""
    suffix = TRITON_SUFFIX if backend == "triton" else ""
    return getattr(torch.ops.amflow, f"{family}_{direction}{suffix}").default


def register(family: str, suffix: str) -> None:
    """Fake kernels for the forward and backward of ``family`` + ``suffix``, and the forward's
    autograd through the backward: saved are the differentiable inputs and the forward's other
    outputs, and the non-tensor args are passed on."""
    name = f"amflow::{family}_fwd{suffix}"
    backward_op = getattr(torch.ops.amflow, f"{family}_bwd{suffix}")
    differentiable = DIFFERENTIABLE_INPUTS[family]
    torch.library.register_fake(name, FORWARD_FAKES[family, suffix])

    @torch.library.register_fake(f"amflow::{family}_bwd{suffix}")
    def _(grad, *args):  # one contiguous gradient like each differentiable input
        return tuple(x.new_empty(x.shape) for x in args[:differentiable])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:differentiable], *output[1:])
        ctx.args = inputs[differentiable:]

    def backward(ctx, grad, *_grad_saved_outputs):
        if not any(ctx.needs_input_grad[:differentiable]):
            return (None,) * (differentiable + len(ctx.args))
        grads = backward_op(grad, *ctx.saved_tensors, *ctx.args)
        return (*grads, *(None,) * len(ctx.args))

    torch.library.register_autograd(name, backward, setup_context=setup_context)


for _family in DIFFERENTIABLE_INPUTS:
    register(_family, TRITON_SUFFIX)
    if extension.EXTENSION_ERROR is None:
        register(_family, "")
