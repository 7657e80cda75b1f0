"""amflow_kernels.nn: the layers on fused backends equal the same layers on the reference ops."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_qk

from amflow_kernels.nn import AligningEncoder, LinearAttention


def _twins(module: torch.nn.Module, backend: str, dtype):
    """(fused, eager): the module on ``backend`` and an identical copy on the reference ops."""
    fused = module.to(dtype)
    eager = copy.deepcopy(fused)
    for m in fused.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    for m in eager.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"
    return fused, eager


def _assert_same_training_step(fused, eager, run, rtol):
    """Outputs and every input and parameter gradient of ``run(module)`` agree."""
    out, inputs = run(fused)
    grad = torch.randn_like(out)
    out.backward(grad)
    eager_out, eager_inputs = run(eager)
    eager_out.backward(grad)
    torch.testing.assert_close(out, eager_out, rtol=rtol, atol=rtol)
    for x, y in zip(inputs, eager_inputs):
        torch.testing.assert_close(x.grad, y.grad, rtol=rtol, atol=rtol)
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        assert p.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def _dtype_for(backend):
    # float64 where the backend takes it (the comparison is then exact to rounding); else fp32.
    return torch.float64 if backend in ("cpu",) else torch.float32


@pytest.mark.parametrize("shape", [(2, 50, 96), (3, 2, 17, 96), (9, 96)])
def test_linear_attention_layer_matches_reference(shape, backend_target):
    backend, device = backend_target
    dtype = _dtype_for(backend)
    fused, eager = _twins(LinearAttention(96, num_heads=12).to(device), backend, dtype)
    x = torch.randn(shape, device=device, dtype=dtype)

    def run(module):
        leaf = x.clone().requires_grad_()
        return module(leaf), [leaf]

    _assert_same_training_step(fused, eager, run, 1e-10 if dtype == torch.float64 else 2e-5)


def test_aligning_encoder_matches_reference(backend_target):
    """aligned_flow from q, k through attention_colsum and two linear-attention layers."""
    backend, device = backend_target
    dtype = _dtype_for(backend)
    encoder = AligningEncoder(in_features=4, dim=48, depth=2, num_heads=12, num_tokens=33).to(device)
    fused, eager = _twins(encoder, backend, dtype)
    q, k, kw = make_qk("qkv", 2, 3, 4, 33, 16, dtype, device)

    def run(module):
        ql, kl = (t.detach().requires_grad_() for t in (q, k))
        return module.aligned_flow(ql, kl, **kw), [ql, kl]

    flow, _ = run(fused)
    assert flow.shape == (2, 2, 33, 48)
    _assert_same_training_step(fused, eager, run, 1e-10 if dtype == torch.float64 else 5e-5)


def test_aligning_encoder_shares_weights_across_frames(backend_target):
    """Each frame is encoded on its own: a clip's encoding is that of its frames one by one."""
    backend, device = backend_target
    encoder = AligningEncoder(in_features=3, dim=24, depth=1, num_heads=12, backend=backend).to(device)
    q, k, _ = make_qk("contiguous", 1, 3, 3, 20, 16, torch.float32, device)
    with torch.no_grad():
        clip = encoder.frame_features(q, k)
        frames = [encoder.frame_features(q[:, t : t + 1], k[:, t : t + 1]) for t in range(3)]
    torch.testing.assert_close(clip, torch.cat(frames, dim=1))


def test_aligning_encoder_compiles(backend_target):
    backend, device = backend_target
    torch._dynamo.reset()
    encoder = AligningEncoder(in_features=4, dim=24, depth=1, num_heads=12, backend=backend).to(device)
    q, k, kw = make_qk("qkv", 1, 3, 4, 17, 16, torch.float32, device)
    compiled = torch.compile(encoder.aligned_flow, fullgraph=True)
    flow = compiled(q, k, **kw)
    flow.sum().backward()
    dq = q.grad.clone()
    q.grad = k.grad = None
    eager = encoder.aligned_flow(q, k, **kw)
    eager.sum().backward()
    torch.testing.assert_close(flow, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, q.grad, rtol=1e-5, atol=1e-5)


BAD_CONFIGS = [
    (lambda: LinearAttention(100, num_heads=12),
     r"LinearAttention: dim must be divisible by num_heads .* got dim=100, num_heads=12"),
    (lambda: LinearAttention(96, num_heads=0), r"LinearAttention: num_heads must be an int ≥ 1, got 0"),
    (lambda: AligningEncoder(depth=0), r"AligningEncoder: depth must be an int ≥ 1, got 0"),
    (lambda: AligningEncoder(num_tokens=2.5), r"AligningEncoder: num_tokens must be an int ≥ 1, got 2.5"),
    (lambda: AligningEncoder(in_features=4, dim=24)(torch.zeros(2, 5, 3)),
     r"features must have shape \(..., N, 4\), got \(2, 5, 3\)"),
    (lambda: AligningEncoder(in_features=4, dim=24, num_tokens=6)(torch.zeros(2, 5, 4)),
     r"position embedding is for N=6 tokens, got N=5"),
    (lambda: AligningEncoder(in_features=2, dim=24).aligned_flow(*torch.zeros(2, 1, 1, 2, 5, 8)),
     r"am_flow: the number of frames T must exceed offset \(T > 1\), got T=1"),
    (lambda: AligningEncoder(in_features=2, dim=24).frame_features(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8)),
     r"AligningEncoder.frame_features: q must have shape \(B, T, H, N, D\)"),
]


@pytest.mark.parametrize("make, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config(make, message):
    with pytest.raises(ValueError, match=message):
        make()
