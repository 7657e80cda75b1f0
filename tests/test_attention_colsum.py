"""attention_colsum: every fused backend against the float64 reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import as_float64_leaves, assert_as_accurate_as_pytorch, assert_close, assert_deterministic, opcheck_pair, pytorch_in_dtype, round_scores, target_params

import amflow_kernels
from amflow_kernels import reference
from amflow_kernels.ops import fused
from amflow_kernels.ops.attention_colsum import as_single_frames

# (shape of q, layout). Leading dims of every rank; "qkv" is timm's strided projection view
# and "transposed" a view whose last stride is not 1.
CPU_CASES = [
    ((1, 8), "contiguous"),
    ((5, 16), "contiguous"),
    ((3, 17, 40), "contiguous"),
    ((2, 3, 64, 64), "qkv"),
    ((2, 2, 65, 80), "transposed"),
    ((2, 2, 2, 33, 128), "contiguous"),
    ((1, 20, 256), "contiguous"),
    ((2, 1, 150, 4), "qkv"),  # several 128-row blocks, on the kernel's own GEMM
    ((1, 2, 200, 32), "transposed"),  # several row blocks, on ATen's GEMM
]
GPU_CASES = [
    ((B, H, N, D), layout)
    for (B, H) in ((2, 3),)
    for N in (1, 2, 5, 17, 64, 65, 197, 261, 1370, 2048)
    for D in (8, 40, 64, 128, 256)
    for layout in ("qkv", "transposed")
]


def _make(shape, layout, dtype, device):
    *lead, N, D = shape
    if layout == "contiguous":
        q, k = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    elif layout == "qkv":
        B, H = lead
        qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype)
        q, k, _ = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    elif layout == "transposed":
        q, k = (torch.randn(*lead, D, N, device=device, dtype=dtype).transpose(-1, -2) for _ in range(2))
    return q.detach().requires_grad_(), k.detach().requires_grad_()


def _case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + f"-{layout}"


def _check_against_reference(shape, layout, backend, dtype, device):
    q, k = _make(shape, layout, dtype, device)
    out = amflow_kernels.attention_colsum(q, k, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64 = as_float64_leaves(q, k)
    ref = reference.attention_colsum(q64, k64)
    ref.backward(grad.double())
    ql, kl = (t.detach().requires_grad_() for t in (q, k))
    ref_lowp = reference.attention_colsum(ql, kl)
    ref_lowp.backward(grad)
    assert out.dtype == dtype and out.shape == shape[:-1]
    assert_close("colsum", out, ref, ref_lowp)
    assert_close("dq", q.grad, q64.grad, ql.grad)
    assert_close("dk", k.grad, k64.grad, kl.grad)


@pytest.mark.parametrize("target, dtype", target_params("cpu", with_dtypes=True))
@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_matches_reference_cpu(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    _check_against_reference(*case, target.backend, dtype, device)


@pytest.mark.parametrize("target, dtype", target_params("cuda", with_dtypes=True))
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_matches_reference_cuda(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    _check_against_reference(*case, target.backend, dtype, device)


def test_sums_to_n(target):
    backend, device = target
    q, k = _make((2, 3, 50, 24), "qkv", torch.float32, device)
    out = amflow_kernels.attention_colsum(q, k, backend=backend)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.full_like(out[..., 0], 50), rtol=1e-5, atol=0)


def test_deterministic(target):
    backend, device = target
    q, k = _make((2, 3, 70, 32), "qkv", torch.float32, device)
    assert_deterministic(amflow_kernels.attention_colsum, q, k, backend=backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_stays_in_its_slice(target):
    backend, device = target
    q, k = _make((3, 2, 21, 16), "contiguous", torch.float32, device)
    q, k = q.detach().clone(), k.detach().clone()
    q[1, 0, 4] = float("nan")
    out = amflow_kernels.attention_colsum(q, k, backend=backend)
    ref = reference.attention_colsum(q.double(), k.double())
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any() and not ref.isnan().all()
    finite = ~ref.isnan()
    torch.testing.assert_close(out[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


def test_large_scores(target):
    backend, device = target
    """|S| in the thousands: finite, and as accurate as PyTorch (see test_am_flow)."""
    q, k = _make((2, 40, 64), "contiguous", torch.float32, device)
    q = (q.detach() * 20).requires_grad_()
    k = (k.detach() * 20).requires_grad_()
    q64, k64 = as_float64_leaves(q, k)
    ref = reference.attention_colsum(q64, k64)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    lowp_out, lowp_dq, lowp_dk = zip(*pytorch_in_dtype(reference.attention_colsum, (q, k), grad.float()))
    qr, kr = as_float64_leaves(q, k)
    scores = round_scores(64**-0.5 * qr @ kr.transpose(-1, -2), torch.float32)
    ref_rounded = scores.softmax(-1).sum(-2)
    ref_rounded.backward(grad)
    out = amflow_kernels.attention_colsum(q, k, backend=backend)
    out.backward(grad.float())
    assert_as_accurate_as_pytorch("colsum", out, ref, lowp_out, ref_rounded)
    assert_as_accurate_as_pytorch("dq", q.grad, q64.grad, lowp_dq, qr.grad)
    assert_as_accurate_as_pytorch("dk", k.grad, k64.grad, lowp_dk, kr.grad)


def test_opcheck(target):
    backend, device = target
    for layout, shape in (("qkv", (2, 2, 17, 16)), ("contiguous", (9, 16))):
        q, k = (t.detach() for t in _make(shape, layout, torch.float32, device))
        fwd, bwd = (fused.op("softmax_colsum", backend, direction) for direction in ("fwd", "bwd"))
        opcheck_pair(fwd, bwd, as_single_frames(q), as_single_frames(k), (0, False, 0.3))


def test_compile_fullgraph(target):
    backend, device = target
    torch._dynamo.reset()
    q, k = _make((2, 2, 17, 16), "qkv", torch.float32, device)

    def loss(q, k):
        out = amflow_kernels.attention_colsum(q, k, backend=backend)
        return (out * out).sum(), out

    value, out = torch.compile(loss, fullgraph=True)(q, k)
    value.backward()
    dq, dk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    eager_value, eager_out = loss(q, k)
    eager_value.backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dq, q.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dk, k.grad, rtol=1e-5, atol=1e-6)


BAD_INPUTS = [
    (dict(q=torch.zeros(8)), ValueError, r"attention_colsum: q must have shape \(\.\.\., N, D\) with at least 2 dims, got shape \(8,\)"),
    (dict(k=torch.zeros(2, 5, 8)), ValueError, r"k.shape must equal q.shape \(2, 4, 8\), got \(2, 5, 8\)"),
    (dict(k=torch.zeros(2, 4, 8, dtype=torch.float16)), TypeError, r"k.dtype must equal q.dtype"),
    (dict(scale="0.1"), ValueError, r"scale must be a finite float or None, got '0.1'"),
    (dict(backend="fast"), ValueError, r"backend must be one of .*got 'fast'"),
    (dict(q=torch.zeros(2, 4, 257), backend="triton"), RuntimeError, r"head dim 257 exceeds its maximum 256"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input(bad, error, message):
    q = bad.pop("q", torch.zeros(2, 4, 8))
    k = bad.pop("k", torch.zeros_like(q))
    with pytest.raises(error, match=message):
        amflow_kernels.attention_colsum(q, k, **bad)
