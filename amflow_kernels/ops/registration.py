"""The fused ops as ``torch.library`` ops: one scheme of names, one registration path.

Every backend exposes the same op families, a forward and a backward each:

    amflow::softmax_colsum_fwd{s}(q, k, offset, paired, scale) -> (out, stats)
    amflow::softmax_colsum_bwd{s}(grad, q, k, stats, offset, paired, scale) -> (dq, dk)
    amflow::linear_attention_fwd{s}(q, k, v, eps) -> (out, kv, z)
    amflow::linear_attention_bwd{s}(grad, q, k, v, kv, z, eps) -> (dq, dk, dv)
    amflow::attention_fwd{s}(q, k, v, bias?, colsum_rows, scale) -> (out, colsum, stats)
    amflow::attention_bwd{s}(grad_out, grad_colsum, q, k, v, bias?, out, stats, colsum_rows, scale)
        -> (dq, dk, dv, dbias)

with the suffix ``s`` "" for the compiled extension (csrc/: its CPU and CUDA kernels register
under one schema) and "_triton" for the Triton kernels, defined below. ``softmax_colsum`` is
AM flow when ``paired`` (frame t against t + offset, q and k (B, T, H, N, D)), the attention
colsum otherwise; ``stats``, ``kv`` and ``z`` are what the backward needs: the fp32 row
statistics (B, P, H, N, 2) of the GPU kernels, none (an empty tensor) from the CPU kernels.
``attention`` takes q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) and an optional key bias
(B·H, Nk) in fp32 (fp64 for fp64 inputs), and is differentiable through both ``out`` and
``colsum``; its ``dbias`` is empty without a bias. :func:`register` gives each (family,
backend) its fake kernels and autograd; the Triton kernel modules, and
triton itself, are imported when a Triton op first runs, so the package imports without it.
"""

from __future__ import annotations

import torch

from . import extension
from .triton_device import device_guard

TRITON_SUFFIX = "_triton"
# Leading tensor inputs of each family's forward that are differentiable (an optional one may
# be None), the leading outputs that are, and the outputs its backward takes: the backward takes
# the gradients of the differentiable outputs, those inputs, the saved outputs, then the forward's
# other args.
DIFFERENTIABLE_INPUTS = {"softmax_colsum": 2, "linear_attention": 3, "attention": 4}
DIFFERENTIABLE_OUTPUTS = {"softmax_colsum": 1, "linear_attention": 1, "attention": 2}
SAVED_OUTPUTS = {"softmax_colsum": (1,), "linear_attention": (1, 2), "attention": (0, 2)}


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


@torch.library.custom_op("amflow::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, colsum_rows: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import attention_triton

    with device_guard(q):
        return attention_triton.attention_fwd(q, k, v, bias, colsum_rows, scale)


@torch.library.custom_op("amflow::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(
    grad_out: torch.Tensor, grad_colsum: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    bias: torch.Tensor | None, out: torch.Tensor, stats: torch.Tensor, colsum_rows: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import attention_triton

    with device_guard(q):
        dq, dk, dv, dbias = attention_triton.attention_bwd(
            grad_out, grad_colsum, q, k, v, bias, out, stats, colsum_rows, scale
        )
    return dq, dk, dv, dbias if dbias is not None else q.new_empty((0,), dtype=torch.float32)


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


def _attention_fwd_fake(q, k, v, bias, colsum_rows, scale):
    b, h, nq, _ = q.shape
    nk, dv = v.shape[-2:]
    state = dict(dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return q.new_empty((b, h, nq, dv)), q.new_empty((b, h, nk), **state), q.new_empty((b, h, nq, 2), **state)


def _attention_bwd_fake(grad_out, grad_colsum, q, k, v, bias, out, stats, colsum_rows, scale):
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


FORWARD_FAKES = {  # by (family, suffix)
    ("softmax_colsum", TRITON_SUFFIX): _softmax_colsum_fwd_fake,
    ("softmax_colsum", ""): _extension_softmax_colsum_fwd_fake,
    ("linear_attention", TRITON_SUFFIX): _linear_attention_fwd_fake,
    ("linear_attention", ""): _linear_attention_fwd_fake,
    ("attention", TRITON_SUFFIX): _attention_fwd_fake,
    ("attention", ""): _attention_fwd_fake,
}
BACKWARD_FAKES = {"attention": _attention_bwd_fake}  # others: one gradient like each differentiable input


def op(family: str, backend: str, direction: str = "fwd"):
    """The op of ``family`` (a key of ``DIFFERENTIABLE_INPUTS``) for a fused ``backend``
    ("triton", "cuda" or "cpu"); ``direction`` "fwd" or "bwd"."""
    suffix = TRITON_SUFFIX if backend == "triton" else ""
    return getattr(torch.ops.amflow, f"{family}_{direction}{suffix}").default


def register(family: str, suffix: str) -> None:
    """Fake kernels for the forward and backward of ``family`` + ``suffix``, and the forward's
    autograd through the backward: saved are the differentiable inputs and the forward's
    ``SAVED_OUTPUTS``, and the non-tensor args are passed on."""
    name = f"amflow::{family}_fwd{suffix}"
    backward_op = getattr(torch.ops.amflow, f"{family}_bwd{suffix}")
    differentiable, graded = DIFFERENTIABLE_INPUTS[family], DIFFERENTIABLE_OUTPUTS[family]
    torch.library.register_fake(name, FORWARD_FAKES[family, suffix])

    def gradients_fake(*args):  # one contiguous gradient like each differentiable input
        return tuple(x.new_empty(x.shape) for x in args[graded:graded + differentiable])

    torch.library.register_fake(f"amflow::{family}_bwd{suffix}", BACKWARD_FAKES.get(family, gradients_fake))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:differentiable], *(output[i] for i in SAVED_OUTPUTS[family]))
        ctx.given = [x is not None for x in inputs[:differentiable]]
        ctx.args = inputs[differentiable:]

    def backward(ctx, *grads):
        if not any(ctx.needs_input_grad[:differentiable]):
            return (None,) * (differentiable + len(ctx.args))
        grads = backward_op(*grads[:graded], *ctx.saved_tensors, *ctx.args)
        grads = [grad if given else None for grad, given in zip(grads, ctx.given)]
        return (*grads, *(None,) * len(ctx.args))

    torch.library.register_autograd(name, backward, setup_context=setup_context)


for _family in DIFFERENTIABLE_INPUTS:
    register(_family, TRITON_SUFFIX)
    if extension.EXTENSION_ERROR is None and extension.has_family(_family):
        register(_family, "")
