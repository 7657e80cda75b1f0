"""attention_colsum: fused Triton vs eager reference vs torch.compile(reference) vs SDPA vs
flash-colreduce (the nearest public peer: forward-only, atomics-based), bf16, CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_RMS_TOL, rel_rms
from workloads import MODES, SHAPES, qkv_inputs, step

import amflow_kernels
from amflow_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device; none is present on this machine")

HAS_FLASH_COLREDUCE = importlib.util.find_spec("flash_colreduce") is not None
PROVIDERS = ("triton", "reference", "compile", "sdpa", "flash_colreduce")
_compiled_reference = torch.compile(reference.attention_colsum)


def _forward(provider, q, k, v):
    """The provider's forward on the same q/k (SDPA: q/k/v)."""
    if provider == "triton":
        return lambda: amflow_kernels.attention_colsum(q, k, backend="triton")
    if provider == "reference":
        return lambda: reference.attention_colsum(q, k)
    if provider == "compile":
        return lambda: _compiled_reference(q, k)
    if provider == "flash_colreduce":
        from flash_colreduce import flash_colreduce

        return lambda: flash_colreduce(q, k, reduction="sum")
    return lambda: F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_attention_colsum(shape_name, mode, provider, measure, record_failure):
    if provider == "flash_colreduce" and not HAS_FLASH_COLREDUCE:
        pytest.skip("flash-colreduce is not installed (pip install flash-colreduce)")
    if provider == "flash_colreduce" and mode != "fwd":
        pytest.skip("flash-colreduce has no backward")
    q, k, v = qkv_inputs(SHAPES[shape_name], mode)
    if provider in ("triton", "flash_colreduce"):
        with torch.no_grad():
            fused = _forward(provider, q, k, v)()
            ref = reference.attention_colsum(q.float(), k.float())
        err = rel_rms(fused, ref)
        assert err <= REL_RMS_TOL[torch.bfloat16], f"{provider} colsum is off: relative RMS error {err:.3g}"
    try:
        measure("attention_colsum", shape_name, mode, provider, step(_forward(provider, q, k, v), mode, (q, k, v)))
    except Exception as error:
        if provider == "triton":
            raise
        record_failure("attention_colsum", shape_name, mode, provider, error)
        pytest.xfail(f"{provider} cannot run this shape: {type(error).__name__}")
