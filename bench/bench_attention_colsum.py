"""attention_colsum, side by side in one run: fused triton and cuda vs eager reference vs
torch.compile(reference) vs SDPA vs flash-colreduce (the nearest public peer: forward-only,
atomics-based) on CUDA in bf16; fused cpu vs eager vs torch.compile(reference) on CPU."""

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
FUSED = ("triton", "cuda", "cpu")
PROVIDERS = {
    "cuda": ("triton", "cuda", "reference", "compile", "sdpa", "flash_colreduce"),
    "cpu": ("cpu", "reference", "compile"),
}
_compiled_reference = torch.compile(reference.attention_colsum)


def _forward(provider, q, k, v):
    """The provider's forward on the same q/k (SDPA: q/k/v)."""
    if provider in FUSED:
        return lambda: amflow_kernels.attention_colsum(q, k, backend=provider)
    if provider == "reference":
        return lambda: reference.attention_colsum(q, k)
    if provider == "compile":
        return lambda: _compiled_reference(q, k)
    if provider == "flash_colreduce":
        from flash_colreduce import flash_colreduce

        return lambda: flash_colreduce(q, k, reduction="sum")
    return lambda: F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device, shape_name, provider", workloads(PROVIDERS))
def test_attention_colsum(device, shape_name, provider, mode, measure):
    require_backend(provider if provider in FUSED else "reference", device)
    if provider == "flash_colreduce" and not HAS_FLASH_COLREDUCE:
        pytest.skip(reason="flash-colreduce is not installed (pip install flash-colreduce)")
    if provider == "flash_colreduce" and mode != "fwd":
        pytest.skip(reason="flash-colreduce has no backward")
    q, k, v = qkv_inputs(shape_of(device, shape_name), mode, device)
    if provider in FUSED or provider == "flash_colreduce":
        with torch.no_grad():
            fused = _forward(provider, q, k, v)()
            ref = reference.attention_colsum(q.double(), k.double())
        err = rel_rms(fused, ref)
        assert err <= REL_RMS_TOL[q.dtype], f"{provider} colsum is off: relative RMS error {err:.3g}"
    run = step(_forward(provider, q, k, v), mode, (q, k, v))
    measure("attention_colsum", device, shape_name, mode, provider, run, (q, k, v), fused=provider in FUSED)
