"""attention_colsum: every fused backend against the float64 reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from cases import LARGE_SCORE_TARGETS, gpu_grid_params
from helpers import (
    check_against_reference,
    check_large_scores,
    gpu_grid_lead,
    large_scores_through_autograd,
    make_single_frame_qk,
    score_gradient_scales,
    target_params,
    through_autograd,
)

import amflow_kernels
from amflow_kernels import reference

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


def _case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + f"-{layout}"


def _check_against_reference(shape, layout, backend, dtype, device):
    q, k = make_single_frame_qk(shape, layout, dtype, device)
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
    q, k = make_single_frame_qk((2, 3, 50, 24), "qkv", torch.float32, device)
    out = amflow_kernels.attention_colsum(q, k, backend=backend)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.full_like(out[..., 0], 50), rtol=1e-5, atol=0)


@pytest.mark.parametrize("target, dtype", LARGE_SCORE_TARGETS)
def test_large_scores(target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    op = large_scores_through_autograd(lambda q, k: amflow_kernels.attention_colsum(q, k, backend=target.backend))
    check_large_scores(op, False, dtype, device)


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
