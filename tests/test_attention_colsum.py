"""attention_colsum: every fused backend against the float64 reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from cases import LARGE_SCORE_TARGETS, gpu_grid_params
from helpers import (
    assert_deterministic,
    check_against_reference,
    check_large_scores,
    gpu_grid_lead,
    large_scores_through_autograd,
    opcheck_pair,
    score_gradient_scales,
    target_params,
    through_autograd,
)

import amflow_kernels
from amflow_kernels import reference
from amflow_kernels._layout import as_single_frames
from amflow_kernels.ops import registration

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
    for (B, H) in (gpu_grid_lead(2, 3),)
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
    check_against_reference(
        through_autograd(lambda q, k: amflow_kernels.attention_colsum(q, k, backend=backend), q, k),
        reference.attention_colsum, (q, k), ("colsum", "dq", "dk"),
        term_scales=lambda grad: score_gradient_scales(q, k, grad, q.shape[-1] ** -0.5),
    )


@pytest.mark.parametrize("target, dtype", target_params("cpu", with_dtypes=True))
@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_matches_reference_cpu(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    _check_against_reference(*case, target.backend, dtype, device)


@pytest.mark.parametrize("target, dtype", target_params("cuda", with_dtypes=True))
@pytest.mark.parametrize(
    "case", gpu_grid_params(GPU_CASES, [_case_id(c) for c in GPU_CASES], lambda case: case[0][2] in (17, 261))
)
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


@pytest.mark.parametrize("target, dtype", LARGE_SCORE_TARGETS)
def test_large_scores(target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    op = large_scores_through_autograd(lambda q, k: amflow_kernels.attention_colsum(q, k, backend=target.backend))
    check_large_scores(op, False, dtype, device)


def test_opcheck(target):
    backend, device = target
    for layout, shape in (("qkv", (2, 2, 17, 16)), ("contiguous", (9, 16))):
        q, k = (t.detach() for t in _make(shape, layout, torch.float32, device))
        fwd, bwd = (registration.op("softmax_colsum", backend, direction) for direction in ("fwd", "bwd"))
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
    (dict(q=torch.zeros(8)), ValueError,
     r"attention_colsum: q must have shape \(\.\.\., N, D\) with at least 2 dims, got shape \(8,\)"),
    (dict(k=torch.zeros(2, 5, 8)), ValueError, r"k.shape must equal q.shape \(2, 4, 8\), got \(2, 5, 8\)"),
    (dict(k=torch.zeros(2, 4, 8, dtype=torch.float16)), TypeError, r"k.dtype must equal q.dtype"),
    (dict(scale="0.1"), ValueError, r"scale must be a finite float or None, got '0.1'"),
    (dict(backend="fast"), ValueError, r"backend must be one of .*got 'fast'"),
    (dict(q=torch.zeros(2, 4, 257), backend="triton"), RuntimeError, r"head dim 257 exceeds its maximum 256"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input(bad, error, message):
    bad = dict(bad)  # the case's own copy: the list is shared by every run
    q = bad.pop("q", torch.zeros(2, 4, 8))
    k = bad.pop("k", torch.zeros_like(q))
    with pytest.raises(error, match=message):
        amflow_kernels.attention_colsum(q, k, **bad)
