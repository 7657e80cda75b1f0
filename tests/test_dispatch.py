"""Backend choice: which backends exist on a device, that ``auto`` never falls back silently,
that a GPU machine has the compiled cuda backend, and that each fused backend's declared limits,
which the dispatcher reads (amflow_kernels/_dispatch.py), are exactly what its kernels accept:
the extension's as it reports them from the constants its own checks use
(csrc/*/kernel_limits.h), Triton's as its kernel modules declare them. At a head-dim limit the
kernels run and one past it they refuse; the extension's kernels take every dtype they declare
and refuse every other. (Triton's dtypes are the dispatcher's to enforce: its launchers take
what tl.dot takes.)"""

from __future__ import annotations

import pytest
import torch
from helpers import require_backend, target_params

import amflow_kernels
from amflow_kernels import reference
from amflow_kernels._dispatch import BACKENDS


@pytest.mark.parametrize("target", target_params())
def test_auto_refuses_silent_fallback(target, monkeypatch):
    """Where fused backends exist but all reject the inputs, auto raises instead of using the reference."""
    device = target.activate(monkeypatch)
    q = torch.zeros(1, 3, 2, 4, 300, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=rf"no fused backend on {device.type} accepts .*backend='reference'"):
        amflow_kernels.am_flow(q, q)


def test_backends_on_cpu(monkeypatch):
    from amflow_kernels import _dispatch
    from amflow_kernels.ops import extension

    assert "reference" in amflow_kernels.available_backends("cpu")
    monkeypatch.setattr(_dispatch, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run .*TRITON_INTERPRET=1"):
        amflow_kernels.am_flow(torch.zeros(1, 2, 1, 3, 8), torch.zeros(1, 2, 1, 3, 8), backend="triton")
    if extension.EXTENSION_ERROR is None:
        assert amflow_kernels.available_backends("cpu") == ["reference", "cpu"]
    monkeypatch.setattr(extension, "EXTENSION_ERROR", "the compiled extension was not built")
    assert amflow_kernels.available_backends("cpu") == ["reference"]
    # No fused backend on this device: auto runs the reference.
    q = torch.randn(1, 2, 1, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(amflow_kernels.am_flow(q, q), reference.am_flow(q, q))


@pytest.mark.gpu
@pytest.mark.smoke
def test_cuda_extension_loaded():
    """Where CUDA is available the compiled cuda backend must be too, so that a GPU run can
    never skip every ``cuda`` case quietly (as it did from a source checkout, which shadows the
    installed package and its extension)."""
    if not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA device; none is present on this machine")
    from amflow_kernels.ops import extension

    assert extension.EXTENSION_ERROR is None, extension.EXTENSION_ERROR
    assert "cuda" in extension.KERNEL_DEVICES, "amflow_kernels._C was built without CUDA kernels"


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EXTENSION_DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _softmax_colsum(launch, device, dtype, d):
    q, k = (torch.randn(1, 2, 1, 3, d, device=device, dtype=dtype) for _ in range(2))
    return launch(q, k, d**-0.5)


def _linear_attention(launch, device, dtype, d):
    q, k, v = (torch.randn(1, 1, 3, d, device=device, dtype=dtype).abs() for _ in range(3))
    return launch(q, k, v)


def _attention(launch, device, dtype, d):
    q, k, v = (torch.randn(1, 2, 3, d, device=device, dtype=dtype) for _ in range(3))
    return launch(q, k, v, d**-0.5)


EXTENSION_LAUNCHES = {
    "am_flow": lambda *a: _softmax_colsum(
        lambda q, k, s: torch.ops.amflow.softmax_colsum_fwd(q, k, 1, True, s), *a
    ),
    "linear_attention": lambda *a: _linear_attention(
        lambda q, k, v: torch.ops.amflow.linear_attention_fwd(q, k, v, 1e-6), *a
    ),
    "attention": lambda *a: _attention(lambda q, k, v, s: torch.ops.amflow.attention_fwd(q, k, v, None, 2, s), *a),
}


def _require_kernels(op: str, device: str) -> None:
    require_backend(device, device)
    if (lacking := BACKENDS[device].lacks(op)) is not None:
        pytest.skip(reason=lacking)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("op", EXTENSION_LAUNCHES)
def test_extension_takes_exactly_its_declared_dtypes(op, device):
    _require_kernels(op, device)
    declared = BACKENDS[device].dtypes(op)
    assert declared, f"the extension declares no dtypes for {device}"
    for dtype in FLOAT_DTYPES:
        if dtype in declared:
            EXTENSION_LAUNCHES[op](device, dtype, 8)
        else:
            with pytest.raises(RuntimeError, match=f"q.dtype must be one of .*, got {dtype}".replace("torch.", "")):
                EXTENSION_LAUNCHES[op](device, dtype, 8)


@pytest.mark.parametrize("device", EXTENSION_DEVICES)
@pytest.mark.parametrize("op", EXTENSION_LAUNCHES)
def test_extension_takes_exactly_its_declared_head_dims(op, device):
    _require_kernels(op, device)
    limit = BACKENDS[device].max_head_dim(op)
    if limit is None:  # any head dim: one past the GPU kernels' largest runs
        EXTENSION_LAUNCHES[op](device, torch.float32, 257)
        return
    EXTENSION_LAUNCHES[op](device, torch.float32, limit)
    with pytest.raises(RuntimeError, match=f"must be ≤ {limit}"):
        EXTENSION_LAUNCHES[op](device, torch.float32, limit + 1)


def _triton_ops():
    from amflow_kernels.ops import attention_triton, linear_attention_triton, softmax_colsum_triton

    return {
        "am_flow": lambda *a: _softmax_colsum(
            lambda q, k, s: softmax_colsum_triton.colsum_fwd(q, k, offset=1, paired=True, scale=s), *a
        ),
        "linear_attention": lambda *a: _linear_attention(
            lambda q, k, v: linear_attention_triton.linear_attention_fwd(q, k, v, 1e-6), *a
        ),
        "attention": lambda *a: _attention(lambda q, k, v, s: attention_triton.attention_fwd(q, k, v, None, 2, s), *a),
    }


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op", ["am_flow", "linear_attention", "attention"])
def test_triton_takes_exactly_its_declared_head_dims(op, device):
    require_backend("triton", device)
    limit = BACKENDS["triton"].max_head_dim(op)
    launch = _triton_ops()[op]
    launch(device, torch.float32, limit)
    with pytest.raises(ValueError, match=f"must be ≤ {limit}"):
        launch(device, torch.float32, limit + 1)
