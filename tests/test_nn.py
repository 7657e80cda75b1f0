"""amflow_kernels.nn: the layers on fused backends equal the same layers on the reference ops; a
timm ViT patched with ColsumAttention computes what it did and gives the attention received."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ATTENTION_TARGETS, BACKEND_TARGETS, make_qk, target_params

from amflow_kernels import attention, reference
from amflow_kernels.nn import AligningEncoder, ColsumAttention, LinearAttention, timm_qkv


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
@pytest.mark.parametrize("target", target_params(targets=BACKEND_TARGETS))
def test_linear_attention_layer_matches_reference(shape, target, monkeypatch):
    backend, device = target.backend, target.activate(monkeypatch)
    dtype = _dtype_for(backend)
    fused, eager = _twins(LinearAttention(96, num_heads=12).to(device), backend, dtype)
    x = torch.randn(shape, device=device, dtype=dtype)

    def run(module):
        leaf = x.clone().requires_grad_()
        return module(leaf), [leaf]

    _assert_same_training_step(fused, eager, run, 1e-10 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("target", target_params(targets=BACKEND_TARGETS))
def test_aligning_encoder_matches_reference(target, monkeypatch):
    """aligned_flow from q, k through attention_colsum and two linear-attention layers."""
    backend, device = target.backend, target.activate(monkeypatch)
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


@pytest.mark.parametrize("target", target_params(targets=BACKEND_TARGETS))
def test_aligning_encoder_shares_weights_across_frames(target, monkeypatch):
    """Each frame is encoded on its own: a clip's encoding is that of its frames one by one."""
    backend, device = target.backend, target.activate(monkeypatch)
    encoder = AligningEncoder(in_features=3, dim=24, depth=1, num_heads=12, backend=backend).to(device)
    q, k, _ = make_qk("contiguous", 1, 3, 3, 20, 16, torch.float32, device)
    with torch.no_grad():
        clip = encoder.frame_features(q, k)
        frames = [encoder.frame_features(q[:, t : t + 1], k[:, t : t + 1]) for t in range(3)]
    torch.testing.assert_close(clip, torch.cat(frames, dim=1))


@pytest.mark.parametrize("target", target_params(targets=BACKEND_TARGETS))
def test_aligning_encoder_compiles(target, monkeypatch):
    backend, device = target.backend, target.activate(monkeypatch)
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
    (lambda: AligningEncoder(in_features=2, dim=24).flow_from_colsums(torch.zeros(2, 3, 4, 5)),
     r"flow_from_colsums: colsums must have shape \(B, T, 2, N\), got \(2, 3, 4, 5\)"),
    (lambda: AligningEncoder(in_features=2, dim=24).flow_from_colsums(torch.zeros(2, 3, 2, 5), offset=3),
     r"flow_from_colsums: offset must be an int in \[1, T = 3\), got 3"),
]


@pytest.mark.parametrize("make, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("target", target_params(targets=ATTENTION_TARGETS))
def test_flow_from_colsums_is_aligned_flow(target, monkeypatch):
    """The column sums attention returns give the aligned flow that aligned_flow makes from q, k."""
    backend, device = target.backend, target.activate(monkeypatch)
    encoder = AligningEncoder(in_features=4, dim=24, depth=1, num_heads=12, backend=backend).to(device)
    q, k, kw = make_qk("qkv", 2, 3, 4, 17, 16, torch.float32, device)
    v = torch.randn_like(q)
    _, colsums = attention(q, k, v, backend=backend)
    flow = encoder.flow_from_colsums(colsums.unflatten(0, (2, 3)), offset=2)
    torch.testing.assert_close(flow, encoder.aligned_flow(q, k, offset=2, **kw), rtol=1e-5, atol=1e-5)


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=4, num_heads=4, num_classes=5).eval()


@pytest.mark.parametrize("target", target_params(targets=ATTENTION_TARGETS))
def test_colsum_attention_keeps_the_vit_and_gives_the_attention_received(target, monkeypatch):
    """A patched timm ViT computes what it did, and each patched block's colsum is the attention
    its tokens receive (every query, or the class token's with colsum_rows=1)."""
    backend, device = target.backend, target.activate(monkeypatch)
    vit = _tiny_vit().to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        expected = vit(images)
        captured = {}
        hook = vit.blocks[1].norm1.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
        patched = ColsumAttention.patch(vit, [2, 4], backend=backend)
        cls_only = ColsumAttention.patch(vit, [3], colsum_rows=1, backend=backend)[0]
        got = vit(images)
        hook.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    attn = patched[0].attn
    q, k, _ = timm_qkv(attn, captured["x"])
    torch.testing.assert_close(patched[0].colsum, reference.attention_colsum(q, k, scale=attn.scale),
                               rtol=1e-5, atol=1e-5)
    assert cls_only.colsum.shape == (2, 4, 17)
    torch.testing.assert_close(cls_only.colsum.sum(-1), torch.ones(2, 4, device=device), rtol=1e-5, atol=0)


def test_evit_style_pruning_example_runs():
    """The docs' example (docs/kernels.md): keep the patch tokens the class token attends to most."""
    vit = _tiny_vit()
    ColsumAttention.patch(vit, blocks=[2], colsum_rows=1)
    images, keep = torch.randn(2, 3, 32, 32), 8
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for number, block in enumerate(vit.blocks, start=1):
            x = block(x)
            if number == 2:
                received = block.attn.colsum.mean(1)[:, 1:]  # (B, N − 1): what the class token pays each patch
                kept = received.topk(keep, dim=-1).indices + 1
                x = torch.cat([x[:, :1], x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
        logits = vit.forward_head(vit.norm(x))
    assert x.shape == (2, 1 + keep, 48) and logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_colsum_attention_refuses_what_it_cannot_do():
    vit = _tiny_vit()
    with pytest.raises(ValueError, match=r"blocks must be 1-based block numbers in 1..4, got \[5\]"):
        ColsumAttention.patch(vit, [5])
    with pytest.raises(ValueError, match="Linear is not a timm Attention"):
        ColsumAttention(torch.nn.Linear(2, 2))
    layer = ColsumAttention(vit.blocks[0].attn)
    x = torch.randn(1, 17, 48)
    with pytest.raises(ValueError, match="attention masks and causal attention are not supported"):
        layer(x, attn_mask=torch.zeros(17, 17))
    layer.attn.attn_drop.p = 0.1
    with pytest.raises(ValueError, match=r"attention dropout \(0.1\) is not supported"):
        layer.train()(x)
