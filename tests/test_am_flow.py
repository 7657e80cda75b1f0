"""am_flow: every fused backend against the float64 reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from cases import AM_FLOW_CPU_CASES, AM_FLOW_GPU_PARAMS, LARGE_SCORE_TARGETS, am_flow_case_id
from helpers import (
    assert_close,
    check_against_reference,
    check_large_scores,
    large_scores_through_autograd,
    make_qk,
    require_backend,
    score_gradient_scales,
    target_params,
    through_autograd,
)

import amflow_kernels
from amflow_kernels import reference


def _check_against_reference(case, backend, dtype, device):
    B, T, H, N, D, offset, layout = case
    q, k, kw = make_qk(layout, B, T, H, N, D, dtype, device)
    check_against_reference(
        through_autograd(lambda q, k: amflow_kernels.am_flow(q, k, offset=offset, backend=backend, **kw), q, k),
        lambda q, k: reference.am_flow(q, k, offset=offset, **kw), (q, k), ("flow", "dq", "dk"),
        term_scales=lambda grad: score_gradient_scales(q, k, grad, D**-0.5),
    )


@pytest.mark.parametrize("target, dtype", target_params("cpu", with_dtypes=True))
@pytest.mark.parametrize("case", AM_FLOW_CPU_CASES, ids=am_flow_case_id)
def test_matches_reference_cpu(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    _check_against_reference(case, target.backend, dtype, device)


@pytest.mark.parametrize("target, dtype", target_params("cuda", with_dtypes=True))
@pytest.mark.parametrize("case", AM_FLOW_GPU_PARAMS)
def test_matches_reference_cuda(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    _check_against_reference(case, target.backend, dtype, device)


def test_one_token_gradient_is_zero_to_rounding():
    """With N = 1 every score gradient cancels (the softmax over one key is 1), so dq is exactly
    0 in float64 and has no relative error. The H200's Triton backward left ulp-sized terms
    there (c = Σ P g / Σ P through an approximate division): such a dq must pass, and one
    wrong by a thousandth of the terms' size must not."""
    q, k, _ = make_qk("contiguous", 2, 3, 2, 1, 64, torch.float64, "cpu")
    grad = torch.randn(2, 2, 2, 1, dtype=torch.float64)
    reference.am_flow(q, k).backward(grad)
    assert not q.grad.any()
    term = score_gradient_scales(q, k, grad, 64**-0.5)["dq"]
    ulps = 2 * torch.finfo(torch.float32).eps * term * torch.rand(q.shape, dtype=torch.float64)
    assert_close("dq", ulps.float(), q.grad, term_scale=term)
    with pytest.raises(AssertionError, match="the reference is exactly zero"):
        assert_close("dq", (1e-3 * term * torch.rand(q.shape, dtype=torch.float64)).float(), q.grad, term_scale=term)


@pytest.mark.parametrize("target", target_params())
def test_invariants(target, monkeypatch):
    """flow ≥ 0, Σ_j flow = N, and identical frames give flow ≡ 1."""
    backend, device = target.backend, target.activate(monkeypatch)
    B, T, H, N, D = 2, 4, 3, 37, 32
    q, k, _ = make_qk("contiguous", B, T, H, N, D, torch.float32, device)
    flow = amflow_kernels.am_flow(q, k, backend=backend)
    assert (flow >= 0).all()
    torch.testing.assert_close(flow.sum(-1), torch.full_like(flow[..., 0], N), rtol=1e-5, atol=0)
    still_q = q.detach()[:, :1].expand(B, T, H, N, D)
    still_k = k.detach()[:, :1].expand(B, T, H, N, D)
    still = amflow_kernels.am_flow(still_q, still_k, backend=backend)
    torch.testing.assert_close(still, torch.ones_like(still), rtol=0, atol=1e-6)


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("target", target_params())
def test_frames_layout_equals_5d(target, offset, monkeypatch):
    """(B·T, H, N, D) with num_frames=T gives the (B, T, H, N, D) answer, bit for bit."""
    backend, device = target.backend, target.activate(monkeypatch)
    q, k, kw = make_qk("qkv", 2, 5, 2, 19, 24, torch.float32, device)
    flat = amflow_kernels.am_flow(q, k, offset=offset, backend=backend, **kw)
    five = amflow_kernels.am_flow(
        q.unflatten(0, (2, 5)), k.unflatten(0, (2, 5)), offset=offset, backend=backend
    )
    assert torch.equal(flat, five)


@pytest.mark.parametrize("target, dtype", LARGE_SCORE_TARGETS)
def test_large_scores(target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    op = large_scores_through_autograd(lambda q, k: amflow_kernels.am_flow(q, k, backend=target.backend))
    check_large_scores(op, True, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_64bit_offsets(backend):
    """q and k beyond 2³¹ elements: the last frames, past every 32-bit offset, are right."""
    require_backend(backend, "cuda")
    H, N, D = 12, 197, 64
    T = 2**31 // (H * N * D) + 3
    q = torch.randn(1, T, H, N, D, device="cuda", dtype=torch.float16)
    k = torch.randn_like(q)
    flow = amflow_kernels.am_flow(q, k, backend=backend)
    ref = reference.am_flow(q[:, -3:].double(), k[:, -3:].double())
    assert_close("flow[-2:]", flow[:, -2:], ref)


def _frames_apart(stride: int, T: int, N: int, D: int) -> torch.Tensor:
    """(1, T, 1, N, D) fp32 frames ``stride`` elements apart in one untouched allocation (pages
    never written take no memory), the frames themselves random."""
    storage = torch.UntypedStorage(((T - 1) * stride + N * D) * 4)  # no NaN fill: that would touch it all
    x = torch.tensor([], dtype=torch.float32).set_(storage, 0, (1, T, 1, N, D), (T * stride, stride, stride, D, 1))
    for t in range(T):
        x[:, t] = torch.randn(1, 1, N, D)
    return x


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_64bit_offsets_on_cpu(backend):
    """Frames 2³⁰ elements apart, offset 2: offset · stride passes 2³¹ (int32 in a kernel that
    does not widen it: the interpreter wraps as a GPU does)."""
    require_backend(backend, "cpu")
    q, k = (_frames_apart(2**30 + 16, 3, 9, 16) for _ in range(2))
    flow = amflow_kernels.am_flow(q, k, offset=2, backend=backend)
    assert_close("flow", flow, reference.am_flow(q.double(), k.double(), offset=2))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: inputs on cuda:1 while cuda:0 is current")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_second_gpu(backend):
    require_backend(backend, "cuda")
    q, k, _ = make_qk("qkv", 2, 3, 2, 40, 64, torch.float16, "cuda:1")
    with torch.cuda.device(0):
        flow = amflow_kernels.am_flow(q, k, num_frames=3, backend=backend)
    assert flow.device == q.device
    assert_close("flow", flow, reference.am_flow(q.double(), k.double(), num_frames=3))


# bad values of the op's own arguments; those every op refuses alike: test_op_contracts.py
BAD_INPUTS = [
    (dict(q=torch.zeros(2, 3, 4, 5)), ValueError, r"am_flow: q must have shape \(B, T, H, N, D\).*got 4 dims"),
    (dict(q=torch.zeros(6, 2, 4, 8), num_frames=4), ValueError, r"divisible by num_frames, got 6 and num_frames=4"),
    (dict(q=torch.zeros(6, 2, 4, 8), num_frames=0), ValueError, r"num_frames must be an int ≥ 1 or None, got 0"),
    (dict(q=torch.zeros(1, 3, 2, 4, 8), num_frames=3), ValueError,
     r"with num_frames, q must have shape \(B·T, H, N, D\)"),
    (dict(offset=0), ValueError, r"offset must be an int ≥ 1, got 0"),
    (dict(offset=1.0), ValueError, r"offset must be an int ≥ 1, got 1.0"),
    (dict(offset=3), ValueError, r"T must exceed offset \(T > 3\), got T=3"),
    (dict(k=torch.zeros(1, 3, 2, 5, 8)), ValueError,
     r"k.shape must equal q.shape \(1, 3, 2, 4, 8\), got \(1, 3, 2, 5, 8\)"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite float or None, got nan"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input(bad, error, message):
    bad = dict(bad)  # the case's own copy: the list is shared by every run
    q = bad.pop("q", torch.zeros(1, 3, 2, 4, 8))
    k = bad.pop("k", torch.zeros_like(q) if isinstance(q, torch.Tensor) else q)
    with pytest.raises(error, match=message):
        amflow_kernels.am_flow(q, k, **bad)


def test_cpu_backend_independent_of_threads():
    """Tasks own their outputs: 1 and 2 threads give bitwise-equal values and gradients."""
    require_backend("cpu", "cpu")
    q, k, kw = make_qk("qkv", 2, 4, 3, 45, 24, torch.float32, "cpu")
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            q.grad = k.grad = None
            flow = amflow_kernels.am_flow(q, k, backend="cpu", **kw)
            flow.backward(torch.ones_like(flow).cumsum(-1))
            runs.append((flow, q.grad, k.grad))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_cpu_kernels_record_no_autograd():
    """The CPU kernels call ATen ops in their worker threads: there they must stay below
    autograd, as in the calling thread. On inputs that require grad, the backward op returns
    plain tensors under no_grad (as autograd calls it: no history, nothing kept alive), and in
    grad mode it runs and gives the same values."""
    require_backend("cpu", "cpu")
    q, k = (torch.randn(1, 3, 2, 70, 16, requires_grad=True) for _ in range(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out, stats = torch.ops.amflow.softmax_colsum_fwd(q.detach(), k.detach(), 1, True, 0.25)
        grad = torch.ones_like(out)
        with torch.no_grad():
            expected = torch.ops.amflow.softmax_colsum_bwd(grad, q, k, stats, 1, True, 0.25)
        assert all(not t.requires_grad and t.grad_fn is None for t in expected)
        for got, want in zip(torch.ops.amflow.softmax_colsum_bwd(grad, q, k, stats, 1, True, 0.25), expected):
            assert torch.equal(got.detach(), want)
    finally:
        torch.set_num_threads(threads)


EXTENSION_BAD_INPUTS = [
    ((torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4, 8), 1, True),
     r"q must have shape \(B, T, H, N, D\), got \[2, 3, 4, 8\]"),
    ((torch.zeros(1, 3, 2, 4, 8), torch.zeros(1, 3, 2, 5, 8), 1, True),
     r"k.shape must equal q.shape \[1, 3, 2, 4, 8\], got \[1, 3, 2, 5, 8\]"),
    ((torch.zeros(1, 3, 2, 4, 8), torch.zeros(1, 3, 2, 4, 8), 3, True), r"T must exceed offset \(3\), got T=3"),
    ((torch.zeros(1, 3, 2, 4, 8), torch.zeros(1, 3, 2, 4, 8), 0, True), r"offset must be ≥ 1, got 0"),
    ((torch.zeros(1, 3, 2, 4, 8, dtype=torch.float16),) * 2 + (1, True),
     r"q.dtype must be one of float32, float64, got float16"),
]


@pytest.mark.parametrize("args, message", EXTENSION_BAD_INPUTS, ids=[m[:30] for _, m in EXTENSION_BAD_INPUTS])
def test_extension_bad_input(args, message):
    """Called directly, the compiled ops check their inputs too (the public API checks first)."""
    require_backend("cpu", "cpu")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.amflow.softmax_colsum_fwd(*args, 0.25)
