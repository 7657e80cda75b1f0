"""Each fused backend's declared limits, which the dispatcher reads (amflow_kernels/_dispatch.py),
are exactly what its kernels accept: the extension's as it reports them from the constants its
own checks use (csrc/*/kernel_limits.h), Triton's as its kernel modules declare them. At a
head-dim limit the kernels run and one past it they refuse; the extension's kernels take
every dtype they declare and refuse every other. (Triton's dtypes are the dispatcher's to
enforce: its launchers take what tl.dot takes.)"""

from __future__ import annotations

import pytest
import torch
from helpers import require_backend

from amflow_kernels._dispatch import BACKENDS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EXTENSION_DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _softmax_colsum(launch, device, dtype, d):
    q, k = (torch.randn(1, 2, 1, 3, d, device=device, dtype=dtype) for _ in range(2))
    return launch(q, k, d**-0.5)


def _linear_attention(launch, device, dtype, d):
    q, k, v = (torch.randn(1, 1, 3, d, device=device, dtype=dtype).abs() for _ in range(3))
    return launch(q, k, v)


EXTENSION_OPS = {
    "am_flow": lambda *a: _softmax_colsum(
        lambda q, k, s: torch.ops.amflow.softmax_colsum_fwd(q, k, 1, True, s), *a
    ),
    "linear_attention": lambda *a: _linear_attention(
        lambda q, k, v: torch.ops.amflow.linear_attention_fwd(q, k, v, 1e-6), *a
    ),
}


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("op", EXTENSION_OPS)
def test_extension_takes_exactly_its_declared_dtypes(op, device):
    require_backend(device, device)
    declared = BACKENDS[device].dtypes(op)
    assert declared, f"the extension declares no dtypes for {device}"
    for dtype in FLOAT_DTYPES:
        if dtype in declared:
            EXTENSION_OPS[op](device, dtype, 8)
        else:
            with pytest.raises(RuntimeError, match=f"q.dtype must be one of .*, got {dtype}".replace("torch.", "")):
                EXTENSION_OPS[op](device, dtype, 8)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("op", EXTENSION_OPS)
def test_extension_takes_exactly_its_declared_head_dims(op, device):
    require_backend(device, device)
    limit = BACKENDS[device].max_head_dim(op)
    if limit is None:  # any head dim: one past the GPU kernels' largest runs
        EXTENSION_OPS[op](device, torch.float32, 257)
        return
    EXTENSION_OPS[op](device, torch.float32, limit)
    with pytest.raises(RuntimeError, match=f"must be ≤ {limit}"):
        EXTENSION_OPS[op](device, torch.float32, limit + 1)


def _triton_ops():
    from amflow_kernels.ops import linear_attention_triton, softmax_colsum_triton

    return {
        "am_flow": lambda *a: _softmax_colsum(
            lambda q, k, s: softmax_colsum_triton.colsum_fwd(q, k, offset=1, paired=True, scale=s), *a
        ),
        "linear_attention": lambda *a: _linear_attention(
            lambda q, k, v: linear_attention_triton.linear_attention_fwd(q, k, v, 1e-6), *a
        ),
    }


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op", EXTENSION_OPS)
def test_triton_takes_exactly_its_declared_head_dims(op, device):
    require_backend("triton", device)
    limit = BACKENDS["triton"].max_head_dim(op)
    launch = _triton_ops()[op]
    launch(device, torch.float32, limit)
    with pytest.raises(ValueError, match=f"must be ≤ {limit}"):
        launch(device, torch.float32, limit + 1)
