"""linear_attention and the AligningEncoder, side by side in one run: fused triton and cuda vs
the eager einsum (what fast-transformers runs for non-causal linear attention) vs
torch.compile of it, with SDPA (softmax attention on the same q, k, v) for scale, on CUDA in
bf16; fused cpu vs eager vs torch.compile on CPU in fp32.

flash-bidirectional-linear-attention, the fastest public fused non-causal kernel, is git-only
and not installable on the benchmark machine; its H100 figures at (128, 12, 261, 64) bf16 are
0.27 ms forward and 1.16 ms forward+backward (φ applied by the caller).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_RMS_TOL, make_qkv, rel_rms, require_backend
from workloads import DTYPE, MODES, step

import amflow_kernels
from amflow_kernels import reference
from amflow_kernels.nn import AligningEncoder

# (B, H, N, D): DINOv2-B/14 with registers on 128 frames, and at 518 px on 16 frames.
SHAPES = {
    "cuda": {"B128 H12 N261 D64": (128, 12, 261, 64), "B16 H12 N1370 D64": (16, 12, 1370, 64)},
    "cpu": {"B8 H12 N261 D64": (8, 12, 261, 64), "B2 H12 N1370 D64": (2, 12, 1370, 64)},
}
FUSED = ("triton", "cuda", "cpu")
PROVIDERS = {"cuda": ("triton", "cuda", "reference", "compile", "sdpa"), "cpu": ("cpu", "reference", "compile")}
WORKLOADS = [
    (device, name, provider) for device in ("cuda", "cpu") for name in SHAPES[device] for provider in PROVIDERS[device]
]
_compiled_reference = torch.compile(reference.linear_attention)


def _skip_unavailable(provider: str, device: str) -> None:
    require_backend(provider if provider in FUSED else "reference", device)


def _qkv(shape, mode, device):
    """q, k, v: (B, H, N, D) views of one fused projection, as multi-head layers make them."""
    B, H, N, D = shape
    inputs = make_qkv("projection", (B, H), N, N, D, D, DTYPE[device], device)
    for t in inputs:
        t.requires_grad_(mode != "fwd")
    return inputs


def _forward(provider, q, k, v):
    if provider in FUSED:
        return lambda: amflow_kernels.linear_attention(q, k, v, backend=provider)
    if provider == "reference":
        return lambda: reference.linear_attention(q, k, v)
    if provider == "compile":
        return lambda: _compiled_reference(q, k, v)
    return lambda: F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device, shape_name, provider", WORKLOADS)
def test_linear_attention(device, shape_name, provider, mode, measure):
    _skip_unavailable(provider, device)
    q, k, v = _qkv(SHAPES[device][shape_name], mode, device)
    if provider in FUSED:
        with torch.no_grad():
            err = rel_rms(_forward(provider, q, k, v)(), reference.linear_attention(q.double(), k.double(), v.double()))
        assert err <= REL_RMS_TOL[q.dtype], f"{provider} linear attention is off: relative RMS error {err:.3g}"
    run = step(_forward(provider, q, k, v), mode, (q, k, v))
    measure("linear_attention", device, shape_name, mode, provider, run, (q, k, v), fused=provider in FUSED)


ENCODER_PROVIDERS = {"cuda": ("triton", "cuda", "reference", "compile"), "cpu": ("cpu", "reference", "compile")}
ENCODER_WORKLOADS = [
    (device, name, provider)
    for device in ("cuda", "cpu")
    for name in SHAPES[device]
    for provider in ENCODER_PROVIDERS[device]
]


@pytest.mark.parametrize("device, shape_name, provider", ENCODER_WORKLOADS)
def test_aligning_encoder(device, shape_name, provider, measure):
    """One encoder layer of width H·D (12 heads of D) over B frames of N tokens, each token
    carrying the 12 per-head attention column sums: forward + backward."""
    _skip_unavailable(provider, device)
    B, H, N, D = SHAPES[device][shape_name]
    backend = provider if provider in FUSED else "reference"
    encoder = AligningEncoder(in_features=12, dim=H * D, depth=1, num_heads=H, backend=backend)
    encoder = encoder.to(device=device, dtype=DTYPE[device])
    module = torch.compile(encoder) if provider == "compile" else encoder
    features = torch.rand(B, N, 12, device=device, dtype=DTYPE[device], requires_grad=True)
    run = step(lambda: module(features), "fwd+bwd", (features, *encoder.parameters()))
    measure("AligningEncoder", device, shape_name, "fwd+bwd", provider, run, (features, *encoder.parameters()),
            fused=provider in FUSED)
