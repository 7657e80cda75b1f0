"""attention: every fused backend against the float64 reference, both outputs (out and colsum)
and the gradients of q, k, v and key_bias through both; the contracts every op shares are in
test_op_contracts.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import ATTENTION_CASES, ATTENTION_GPU_PARAMS, attention_case_id
from helpers import (
    ATTENTION_TARGETS,
    as_float64_leaves,
    assert_as_accurate_as_pytorch,
    assert_close,
    gpu_grid_lead,
    make_qkv,
    pytorch_in_dtype,
    round_scores,
    target_params,
)

import amflow_kernels
from amflow_kernels import reference

NAMES = ("out", "colsum", "dq", "dk", "dv", "dbias")
# Large scores on each attention backend in its dtypes but float64 (exact enough that PyTorch's
# own error is no yardstick; the grids cover it).
LARGE_SCORE_TARGETS = [
    p for p in target_params(with_dtypes=True, targets=ATTENTION_TARGETS) if p.values[1] != torch.float64
]


def _key_bias(lead, nk, device, masked: bool):
    """A per-key bias of ToMe's size (log of a merged token's size, here 0 to ~2), with key 1
    masked (−inf) where ``masked``."""
    bias = torch.rand(*lead, nk, device=device) * 2
    if masked:
        bias[..., 1] = float("-inf")
    return bias.requires_grad_()


def _term_scales(q, k, v, grad_out, grad_colsum, scale):
    """The size of the terms dq, dk and db sum, for the exactly-zero references (Nk = 1): each
    score gradient is P (dP − δ) with P ≤ 1 and |dP|, |δ| ≤ ‖dO‖∞ ‖v‖∞ Dv + ‖g‖∞."""
    ds = 2 * (grad_out.abs().max().item() * v.abs().max().item() * v.shape[-1] + grad_colsum.abs().max().item())
    return {"dq": scale * ds * k.abs().max().item(), "dk": scale * ds * q.abs().max().item(), "dbias": ds}


def check_attention(q, k, v, bias, rows, backend, scale=None):
    """out, colsum and every input's gradient against the reference in float64, and against the
    reference in the inputs' dtype ("PyTorch's own error"), as ``check_against_reference``."""
    inputs = [q, k, v] + ([bias] if bias is not None else [])

    def run(fn, xs):
        return fn(*xs[:3], key_bias=xs[3] if len(xs) > 3 else None, colsum_rows=rows, scale=scale)

    def grads(outputs, xs):
        return torch.autograd.grad(outputs, xs, (grad_out.to(outputs[0].dtype), grad_colsum.to(outputs[1].dtype)))

    inputs64 = as_float64_leaves(*inputs)
    out64, colsum64 = run(reference.attention, inputs64)
    grad_out = torch.randn(out64.shape, dtype=q.dtype, device=q.device)
    grad_colsum = torch.randn(colsum64.shape, device=q.device)
    expected = [out64, colsum64, *grads((out64, colsum64), inputs64)]
    outputs = run(lambda *a, **kw: amflow_kernels.attention(*a, **kw, backend=backend), inputs)
    state = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert outputs[0].dtype == q.dtype and outputs[1].dtype == state
    results = [*outputs, *grads(outputs, inputs)]
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    same_dtype = run(reference.attention, leaves)
    lowp = [*same_dtype, *grads(same_dtype, leaves)]
    d = q.shape[-1]
    scales = _term_scales(q, k, v, grad_out, grad_colsum, d**-0.5 if scale is None else scale)
    for name, result, reference64, reference_lowp in zip(NAMES, results, expected, lowp):
        assert_close(name, result, reference64, reference_lowp, scales.get(name))


def _check_case(case, target, dtype, monkeypatch, lead=None):
    lead_dims, nq, nk, d, dv, rows, masked, layout = case
    device = target.activate(monkeypatch)
    q, k, v = make_qkv(layout, lead or lead_dims, nq, nk, d, dv, dtype, device)
    bias = _key_bias(lead or lead_dims, nk, device, masked) if masked is not None else None
    check_attention(q, k, v, bias, rows, target.backend)


@pytest.mark.parametrize("target, dtype", target_params("cpu", with_dtypes=True, targets=ATTENTION_TARGETS))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=attention_case_id)
def test_matches_reference_cpu(case, target, dtype, monkeypatch):
    _check_case(case, target, dtype, monkeypatch)


@pytest.mark.parametrize("target, dtype", target_params("cuda", with_dtypes=True, targets=ATTENTION_TARGETS))
@pytest.mark.parametrize("case", ATTENTION_GPU_PARAMS)
def test_matches_reference_cuda(case, target, dtype, monkeypatch):
    _check_case(case, target, dtype, monkeypatch, lead=gpu_grid_lead(*case[0]))


@pytest.mark.parametrize("target, dtype", LARGE_SCORE_TARGETS)
def test_large_scores(target, dtype, monkeypatch):
    """|scores| in the thousands (real fp16 ViTs): rows of P nearly one-hot, so out, colsum, dq and
    dk are held to the data-driven bound (twice PyTorch's own error in the dtype, floored by that
    of rounding the scores to it); float64 is exact enough that the grids cover it."""
    device = target.activate(monkeypatch)
    q, k, v = make_qkv("contiguous", (1, 2), 40, 40, 64, 64, dtype, device, scale=20.0)
    bias = _key_bias((1, 2), 40, device, True).detach()
    scale = 64**-0.5

    def joined(out, colsum):
        return torch.cat([out.flatten(-2), colsum.to(out.dtype)], dim=-1)

    def formula(q, k, scores=None):  # the reference on q, k (v, bias fixed), or on given scores
        vv, bb = v.detach().to(q.dtype), bias.to(q.dtype)
        if scores is None:
            return joined(*reference.attention(q, k, vv, key_bias=bb, colsum_rows=5, scale=scale))
        probs = (scores + bb.unsqueeze(-2)).softmax(-1)
        return joined(probs @ vv, probs[..., :5, :].sum(-2))

    q64, k64 = as_float64_leaves(q, k)
    assert (q64 @ k64.transpose(-1, -2)).abs().max() * scale > 1000, "scores must be large"
    ref = formula(q64, k64)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    lowp = list(zip(*pytorch_in_dtype(formula, (q, k), grad.to(dtype))))
    qr, kr = as_float64_leaves(q, k)
    rounded = formula(qr, kr, round_scores(scale * qr @ kr.transpose(-1, -2), dtype))
    rounded.backward(grad)
    qf, kf = (x.detach().requires_grad_() for x in (q, k))
    fused = joined(*amflow_kernels.attention(qf, kf, v.detach(), key_bias=bias, colsum_rows=5, scale=scale,
                                             backend=target.backend))
    fused.backward(grad.to(dtype))
    n_out = 40 * 64
    for name, part in (("out", slice(0, n_out)), ("colsum", slice(n_out, None))):
        assert_as_accurate_as_pytorch(name, fused[..., part], ref[..., part], [x[..., part] for x in lowp[0]],
                                      rounded[..., part])
    assert_as_accurate_as_pytorch("dq", qf.grad, q64.grad, lowp[1], qr.grad)
    assert_as_accurate_as_pytorch("dk", kf.grad, k64.grad, lowp[2], kr.grad)


@pytest.mark.parametrize("target", target_params(targets=ATTENTION_TARGETS))
def test_out_is_sdpa_and_colsum_sums_to_the_rows(target, monkeypatch):
    """out is what F.scaled_dot_product_attention gives with the bias as its mask; each colsum
    sums to colsum_rows, and colsum_rows = Nq is the default."""
    device = target.activate(monkeypatch)
    q, k, v = make_qkv("projection", (2, 3), 50, 50, 32, 32, torch.float32, device)
    bias = _key_bias((2, 3), 50, device, True)
    with torch.no_grad():
        out, colsum = amflow_kernels.attention(q, k, v, key_bias=bias, colsum_rows=7, backend=target.backend)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(-2))
        _, every = amflow_kernels.attention(q, k, v, backend=target.backend)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    assert (colsum >= 0).all() and not colsum[..., 1].any(), "the masked key receives nothing"
    torch.testing.assert_close(colsum.sum(-1), torch.full((2, 3), 7.0, device=device), rtol=1e-5, atol=0)
    torch.testing.assert_close(every.sum(-1), torch.full((2, 3), 50.0, device=device), rtol=1e-5, atol=0)


@pytest.mark.parametrize("target", target_params(targets=ATTENTION_TARGETS))
def test_key_bias_broadcasts_and_its_gradient_reduces(target, monkeypatch):
    """A bias shared by the heads, (B, 1, Nk), or by everything, (Nk,), gets its gradient summed
    over what it was broadcast to, as the reference's autograd does."""
    device = target.activate(monkeypatch)
    q, k, v = make_qkv("contiguous", (2, 3), 19, 23, 16, 8, torch.float32, device)
    for shape in ((2, 1, 23), (23,)):
        check_attention(q, k, v, torch.randn(shape, device=device).requires_grad_(), 3, target.backend)


# bad values of the op's own arguments; those every op refuses alike: test_op_contracts.py
BAD_INPUTS = [
    (dict(key_bias=torch.zeros(2, 3, 6)), ValueError,
     r"attention: key_bias.shape must be \(..., Nk\) with Nk = 5, broadcastable to q's leading dims \(2, 3\), "
     r"got \(2, 3, 6\)"),
    (dict(key_bias=torch.zeros(4, 5)), ValueError, r"key_bias.shape must be .* got \(4, 5\)"),
    (dict(key_bias=torch.zeros(5, dtype=torch.int64)), TypeError,
     r"key_bias.dtype must be one of float16, bfloat16, float32, float64, got torch.int64"),
    (dict(key_bias=torch.zeros(5, device="meta")), ValueError,
     r"key_bias.device must equal q.device \(cpu\), got meta"),
    (dict(key_bias=[0.0] * 5), TypeError, r"key_bias must be a torch.Tensor or None, got list"),
    (dict(colsum_rows=0), ValueError, r"colsum_rows must be an int in \[1, Nq = 4\] or None, got 0"),
    (dict(colsum_rows=5), ValueError, r"colsum_rows must be an int in \[1, Nq = 4\] or None, got 5"),
    (dict(colsum_rows=2.0), ValueError, r"colsum_rows must be an int in \[1, Nq = 4\] or None, got 2.0"),
    (dict(scale=float("inf")), ValueError, r"scale must be a finite float or None, got inf"),
    (dict(v=torch.zeros(2, 3, 6, 8)), ValueError, r"v.shape must be \(..., Nk, Dv\) .* got \(2, 3, 6, 8\)"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input(bad, error, message):
    args = {"q": torch.zeros(2, 3, 4, 8), "k": torch.zeros(2, 3, 5, 8), "v": torch.zeros(2, 3, 5, 8), **bad}
    with pytest.raises(error, match=message):
        amflow_kernels.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
