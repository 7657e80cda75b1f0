"""TF32 products in Triton's interpreter as an NVIDIA GPU computes them.

The interpreter computes every ``tl.dot`` as a plain fp32 (numpy) product whatever its
``input_precision``, so a kernel that feeds fp32 tiles to a ``"tf32"`` dot passes every test
here and loses half its digits on a GPU: tensor cores read only the top 10 mantissa bits of
each raw fp32 operand (the low 13 are ignored, which truncates). :func:`install` makes the
interpreter do the same: fp32 operands of ``tf32`` dots are truncated to TF32, and ``tf32x3``
dots are formed as Triton forms them, from the TF32 parts big = tf32(x) and
small = tf32(x − big): big_a·big_b + big_a·small_b + small_a·big_b. fp16/bf16 operands (and
``ieee`` dots) are left as they are: the tensor cores multiply those exactly.
"""

from __future__ import annotations

import numpy as np
from triton._C.libtriton import ir
from triton.runtime import interpreter

TF32_MASK = np.uint32(0xFFFFE000)  # sign, exponent and the top 10 of fp32's 23 mantissa bits
_plain_dot = interpreter.InterpreterBuilder.create_dot


def to_tf32(x: np.ndarray) -> np.ndarray:
    """fp32 values as a tensor core reads them in a TF32 product: the low 13 mantissa bits cleared."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & TF32_MASK).view(np.float32)


def tf32_matmul(a: np.ndarray, b: np.ndarray, precision) -> np.ndarray:
    """a @ b in fp32 from TF32 operands (``ir.INPUT_PRECISION.TF32``) or their three-term split (``TF32x3``)."""
    big_a, big_b = to_tf32(a), to_tf32(b)
    if precision == ir.INPUT_PRECISION.TF32:
        return np.matmul(big_a, big_b)
    small_a, small_b = to_tf32(a - big_a), to_tf32(b - big_b)
    return np.matmul(big_a, small_b) + np.matmul(small_a, big_b) + np.matmul(big_a, big_b)


def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    tf32 = input_precision in (ir.INPUT_PRECISION.TF32, ir.INPUT_PRECISION.TF32x3)
    if tf32 and a.data.dtype == np.float32 and b.data.dtype == np.float32:
        product = tf32_matmul(a.data, b.data, input_precision)
        return interpreter.TensorHandle((product + d.data).astype(d.data.dtype), d.dtype.scalar)
    return _plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


def install() -> None:
    """Route the interpreter's dots through the TF32 emulation (idempotent)."""
    interpreter.InterpreterBuilder.create_dot = _dot
