"""am_flow, side by side in one run.

CUDA (bf16): fused triton and cuda vs eager reference vs torch.compile(reference) vs SDPA on
the same (B·T, H, N, D) q/k (and a v of that shape): the attention a ViT block computes
anyway, the yardstick for the fused motion signal. CPU (float32): fused cpu vs eager vs
torch.compile(reference).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_RMS_TOL, rel_rms, require_backend
from workloads import MODES, qkv_inputs, shape_of, step, workloads

import amflow_kernels
from amflow_kernels import reference

FUSED = ("triton", "cuda", "cpu")
PROVIDERS = {"cuda": ("triton", "cuda", "reference", "compile", "sdpa"), "cpu": ("cpu", "reference", "compile")}
_compiled_reference = torch.compile(reference.am_flow)


def _forward(provider, q, k, v, T):
    """The provider's forward on the same q/k (SDPA: q/k/v)."""
    if provider in FUSED:
        return lambda: amflow_kernels.am_flow(q, k, num_frames=T, backend=provider)
    if provider == "reference":
        return lambda: reference.am_flow(q, k, num_frames=T)
    if provider == "compile":
        return lambda: _compiled_reference(q, k, num_frames=T)
    return lambda: F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device, shape_name, provider", workloads(PROVIDERS))
def test_am_flow(device, shape_name, provider, mode, measure):
    require_backend(provider if provider in FUSED else "reference", device)
    shape = shape_of(device, shape_name)
    T = shape[1]
    q, k, v = qkv_inputs(shape, mode, device)
    if provider in FUSED:
        with torch.no_grad():
            fused = amflow_kernels.am_flow(q, k, num_frames=T, backend=provider)
            ref = reference.am_flow(q.double(), k.double(), num_frames=T)
        err = rel_rms(fused, ref)
        assert err <= REL_RMS_TOL[q.dtype], f"fused am_flow is off: relative RMS error {err:.3g}"
    run = step(_forward(provider, q, k, v, T), mode, (q, k, v))
    measure("am_flow", device, shape_name, mode, provider, run, (q, k, v), fused=provider in FUSED)
