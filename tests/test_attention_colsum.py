"""attention_colsum: every fused backend against the float64 reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from cases import (
    ATTENTION_COLSUM_CPU_CASES,
    ATTENTION_COLSUM_GPU_PARAMS,
    LARGE_SCORE_TARGETS,
    attention_colsum_case_id,
)
from helpers import (
    check_against_reference,
    check_large_scores,
    large_scores_through_autograd,
    make_single_frame_qk,
    score_gradient_scales,
    target_params,
    through_autograd,
)

import amflow_kernels
from amflow_kernels import reference


def _check_against_reference(shape, layout, backend, dtype, device):
    q, k = make_single_frame_qk(shape, layout, dtype, device)
    check_against_reference(
        through_autograd(lambda q, k: amflow_kernels.attention_colsum(q, k, backend=backend), q, k),
        reference.attention_colsum, (q, k), ("colsum", "dq", "dk"),
        term_scales=lambda grad: score_gradient_scales(q, k, grad, q.shape[-1] ** -0.5),
    )


@pytest.mark.parametrize("target, dtype", target_params("cpu", with_dtypes=True))
@pytest.mark.parametrize("case", ATTENTION_COLSUM_CPU_CASES, ids=attention_colsum_case_id)
def test_matches_reference_cpu(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    _check_against_reference(*case, target.backend, dtype, device)


@pytest.mark.parametrize("target, dtype", target_params("cuda", with_dtypes=True))
@pytest.mark.parametrize("case", ATTENTION_COLSUM_GPU_PARAMS)
def test_matches_reference_cuda(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    _check_against_reference(*case, target.backend, dtype, device)


@pytest.mark.parametrize("target", target_params())
def test_sums_to_n(target, monkeypatch):
    backend, device = target.backend, target.activate(monkeypatch)
    q, k = make_single_frame_qk((2, 3, 50, 24), "qkv", torch.float32, device)
    out = amflow_kernels.attention_colsum(q, k, backend=backend)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.full_like(out[..., 0], 50), rtol=1e-5, atol=0)


@pytest.mark.parametrize("target, dtype", LARGE_SCORE_TARGETS)
def test_large_scores(target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    op = large_scores_through_autograd(lambda q, k: amflow_kernels.attention_colsum(q, k, backend=target.backend))
    check_large_scores(op, False, dtype, device)


# bad values of the op's own arguments; those every op refuses alike: test_op_contracts.py
BAD_INPUTS = [
    (dict(q=torch.zeros(8)), ValueError,
     r"attention_colsum: q must have shape \(\.\.\., N, D\) with at least 2 dims, got shape \(8,\)"),
    (dict(k=torch.zeros(2, 5, 8)), ValueError, r"k.shape must equal q.shape \(2, 4, 8\), got \(2, 5, 8\)"),
    (dict(scale="0.1"), ValueError, r"scale must be a finite float or None, got '0.1'"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input(bad, error, message):
    bad = dict(bad)  # the case's own copy: the list is shared by every run
    q = bad.pop("q", torch.zeros(2, 4, 8))
    k = bad.pop("k", torch.zeros_like(q))
    with pytest.raises(error, match=message):
        amflow_kernels.attention_colsum(q, k, **bad)
