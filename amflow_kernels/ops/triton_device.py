"""What the Triton kernels' launches depend on besides the shapes: whether Triton's
interpreter runs them, how much shared memory a program may take on the device, which device
is current."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
H100_SHARED_MEMORY = 227 * 1024  # what configs are chosen for under the interpreter


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """The device's shared memory per block (opt-in maximum); an H100's under the interpreter."""
    if device.type != "cuda":
        return H100_SHARED_MEMORY
    import triton  # here, not at import: the dispatcher reads INTERPRET where triton may be missing

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for the colsum kernels' products, whose operands are the
    inputs in their own dtype: true fp32 ("ieee") for fp32 inputs, since TF32 would lose the
    small differences S_t − S_{t+Δ} of two large score maps; for fp16/bf16 operands the
    setting is moot (they multiply exactly, accumulating in fp32) and "tf32" is Triton's
    default. Kernels whose operands are fp32 tiles made on chip (linear attention) pass "ieee"."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_guard(x: torch.Tensor):
    """A context in which x's GPU is the current one: Triton launches on the current device and
    stream whatever device the tensors are on (the CUDA glue's CUDAGuard does this for the
    extension). Nothing for CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

