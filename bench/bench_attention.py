"""attention (out and the attention each key receives, one fused pass) side by side in one run
against what a user assembles today: SDPA followed by a separate column-sum pass (this package's
attention_colsum, the eager formula, or flash-colreduce, forward only), and SDPA alone (out only:
the GPU target is out + colsum within 1.2× its forward and 1.3× its forward+backward). CUDA in
bf16; CPU in float32, where the fused op is the cpu backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_RMS_TOL, rel_rms, require_backend
from workloads import MODES, qkv_inputs, shape_of, step, workloads

import amflow_kernels
from amflow_kernels import reference

HAS_FLASH_COLREDUCE = importlib.util.find_spec("flash_colreduce") is not None
FUSED = ("triton", "cpu")
PROVIDERS = {
    "cuda": ("triton", "sdpa+triton_colsum", "sdpa+cuda_colsum", "sdpa+eager_colsum", "sdpa+flash_colreduce", "sdpa"),
    "cpu": ("cpu", "sdpa+cpu_colsum", "sdpa+eager_colsum", "sdpa"),
}


def _forward(provider, q, k, v):
    """The provider's (out, colsum), or SDPA's out alone."""
    if provider in FUSED:
        return lambda: amflow_kernels.attention(q, k, v, backend=provider)
    if provider == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    colsum_backend = provider.removeprefix("sdpa+").removesuffix("_colsum")
    if colsum_backend == "eager":
        colsum = reference.attention_colsum
    elif colsum_backend == "flash_colreduce":
        from flash_colreduce import flash_colreduce

        def colsum(q, k):
            return flash_colreduce(q, k, reduction="sum")
    else:
        def colsum(q, k):
            return amflow_kernels.attention_colsum(q, k, backend=colsum_backend)
    return lambda: (F.scaled_dot_product_attention(q, k, v), colsum(q, k))


def _colsum_backend(provider: str) -> str:
    name = provider.removeprefix("sdpa+").removesuffix("_colsum")
    return name if name in ("triton", "cuda", "cpu") else "reference"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device, shape_name, provider", workloads(PROVIDERS))
def test_attention(device, shape_name, provider, mode, measure):
    require_backend(provider if provider in FUSED else _colsum_backend(provider), device)
    if provider == "sdpa+flash_colreduce" and not HAS_FLASH_COLREDUCE:
        pytest.skip(reason="flash-colreduce is not installed (pip install flash-colreduce)")
    if provider == "sdpa+flash_colreduce" and mode != "fwd":
        pytest.skip(reason="flash-colreduce has no backward")
    q, k, v = qkv_inputs(shape_of(device, shape_name), mode, device)
    if provider in FUSED:
        with torch.no_grad():
            out, colsum = _forward(provider, q, k, v)()
            out64, colsum64 = reference.attention(q.double(), k.double(), v.double())
        for name, got, want in (("out", out, out64), ("colsum", colsum, colsum64)):
            err = rel_rms(got, want)
            assert err <= REL_RMS_TOL[q.dtype], f"{provider} {name} is off: relative RMS error {err:.3g}"
    run = step(_forward(provider, q, k, v), mode, (q, k, v))
    measure("attention", device, shape_name, mode, provider, run, (q, k, v), fused=provider in FUSED)
