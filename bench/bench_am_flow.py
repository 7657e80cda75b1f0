"""am_flow: fused Triton vs eager reference vs torch.compile(reference) vs SDPA, bf16, CUDA.

SDPA runs on the same (B·T, H, N, D) q/k (and a v of that shape): the cost of the
attention a ViT block computes anyway, the yardstick for the fused motion signal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_RMS_TOL, rel_rms
from workloads import MODES, SHAPES, qkv_inputs, step

import amflow_kernels
from amflow_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device; none is present on this machine")

PROVIDERS = ("triton", "reference", "compile", "sdpa")
_compiled_reference = torch.compile(reference.am_flow)


def _forward(provider, q, k, v, T):
    """The provider's forward on the same q/k (SDPA: q/k/v)."""
    if provider == "triton":
        return lambda: amflow_kernels.am_flow(q, k, num_frames=T, backend="triton")
    if provider == "reference":
        return lambda: reference.am_flow(q, k, num_frames=T)
    if provider == "compile":
        return lambda: _compiled_reference(q, k, num_frames=T)
    return lambda: F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_am_flow(shape_name, mode, provider, measure, record_failure):
    T = SHAPES[shape_name][1]
    q, k, v = qkv_inputs(SHAPES[shape_name], mode)
    if provider == "triton":
        with torch.no_grad():
            fused = amflow_kernels.am_flow(q, k, num_frames=T, backend="triton")
            ref = reference.am_flow(q.float(), k.float(), num_frames=T)
        err = rel_rms(fused, ref)
        assert err <= REL_RMS_TOL[torch.bfloat16], f"fused am_flow is off: relative RMS error {err:.3g}"
    try:
        measure("am_flow", shape_name, mode, provider, step(_forward(provider, q, k, v, T), mode, (q, k, v)))
    except Exception as error:  # a baseline that cannot run this shape is a result too
        if provider == "triton":
            raise
        record_failure("am_flow", shape_name, mode, provider, error)
        pytest.xfail(f"{provider} cannot run this shape: {type(error).__name__}")
