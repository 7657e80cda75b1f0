"""linear_attention: every fused backend against the float64 reference, values and gradients."""

from __future__ import annotations

import pytest
import torch
from cases import (
    LINEAR_GPU_PARAMS,
    LINEAR_GRID,
    LINEAR_GRID_IDS,
    LINEAR_SHAPE_IDS,
    LINEAR_SHAPES,
    grid_eps,
)
from helpers import (
    BACKEND_TARGETS,
    check_against_reference,
    gpu_grid_lead,
    make_qkv,
    require_backend,
    target_params,
    through_autograd,
)

import amflow_kernels
from amflow_kernels import reference
from amflow_kernels.ops import linear_attention_triton


def la_params(device: str):
    """(target, dtype) params. The Triton kernels multiply in fp32, so unlike the colsum
    kernels they run bfloat16 correctly under the interpreter too."""
    params = []
    for param in target_params(device, targets=BACKEND_TARGETS):
        (target,) = param.values
        dtypes = target.dtypes
        if target.backend == "triton" and torch.bfloat16 not in dtypes:
            dtypes = [*dtypes, torch.bfloat16]
        params += [
            pytest.param(target, dt, id=f"{target.id}-{str(dt).removeprefix('torch.')}", marks=param.marks)
            for dt in dtypes
        ]
    return params


def _check(q, k, v, backend, eps=1e-6, with_lowp=True):
    """Fused values and q/k/v gradients against the float64 reference (and, in 16-bit dtypes,
    no more than twice the error of the reference run in that dtype)."""
    check_against_reference(
        through_autograd(lambda q, k, v: amflow_kernels.linear_attention(q, k, v, eps=eps, backend=backend), q, k, v),
        lambda q, k, v: reference.linear_attention(q, k, v, eps=eps), (q, k, v), ("out", "dq", "dk", "dv"),
        with_lowp=with_lowp,
    )


@pytest.mark.parametrize("target, dtype", la_params("cpu"))
@pytest.mark.parametrize("n, d, dv, layout", LINEAR_GRID, ids=LINEAR_GRID_IDS)
def test_grid_cpu(n, d, dv, layout, target, dtype, monkeypatch):
    """Batch 2 × 3 heads, but 1 × 2 at the longest N: there the interpreter's time, three
    quarters of this grid's at 2 × 3, goes on programs that repeat the shorter Ns' indexing."""
    device = target.activate(monkeypatch)
    lead = (2, 3) if n <= 197 else (1, 2)
    _check(*make_qkv(layout, lead, n, n, d, dv, dtype, device), target.backend, grid_eps(n))


@pytest.mark.parametrize("target, dtype", la_params("cuda"))
@pytest.mark.parametrize("case", LINEAR_GPU_PARAMS)
def test_grid_cuda(case, target, dtype, monkeypatch):
    device = target.activate(monkeypatch)
    n, d, dv, layout = case
    _check(*make_qkv(layout, gpu_grid_lead(4, 12), n, n, d, dv, dtype, device), target.backend, grid_eps(n))


@pytest.mark.parametrize("lead, nq, nk, d, dv, eps", LINEAR_SHAPES, ids=LINEAR_SHAPE_IDS)
@pytest.mark.parametrize("target", target_params(targets=BACKEND_TARGETS))
def test_shapes(lead, nq, nk, d, dv, eps, target, monkeypatch):
    device = target.activate(monkeypatch)
    _check(*make_qkv("contiguous", lead, nq, nk, d, dv, torch.float32, device), target.backend, eps)


@pytest.mark.parametrize("target", target_params(targets=BACKEND_TARGETS))
def test_fp16_long_sequence_large_activations(target, monkeypatch):
    """fp16, N = 4096, activations of ±30: the fp16 reference overflows its D × Dv state (fast-
    transformers' NaN under AMP), the fused kernels' fp32 state does not."""
    device = target.activate(monkeypatch)
    if torch.float16 not in target.dtypes:
        pytest.skip(reason=f"the {target.backend} backend does not take float16 (accepted: {target.dtypes})")
    q, k, v = make_qkv("contiguous", (1, 2), 4096, 4096, 64, 64, torch.float16, device, scale=30.0)
    with torch.no_grad():
        assert not torch.isfinite(reference.linear_attention(q, k, v)).all(), "the fp16 reference no longer overflows"
    _check(q, k, v, target.backend, with_lowp=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("target", target_params(targets=[t for t in BACKEND_TARGETS if t.backend == "triton"]))
def test_triton_state_slices(target, dtype, monkeypatch):
    """D = 128, Dv = 100: the state in four Dv slices of 32, the last one partly past Dv, the
    tokens in several chunks, so the slices meet the partial sums over chunks."""
    device = target.activate(monkeypatch)
    q, k, v = make_qkv("projection", (1, 2), 70, 70, 128, 100, dtype, device)
    launch = linear_attention_triton._Launch(q, v)
    assert (launch.block_e, launch.slices) == (32, 4) and launch.chunks(70)[0] > 1
    _check(q, k, v, "triton")


@pytest.mark.parametrize("target", target_params(targets=BACKEND_TARGETS))
def test_large_activations_fp32(target, monkeypatch):
    """|q|, |k| ~ 100: φ(x) = x + 1 and e^x for large |x| stay exact in fp32."""
    backend, device = target.backend, target.activate(monkeypatch)
    _check(*make_qkv("contiguous", (2, 2), 97, 97, 32, 16, torch.float32, device, scale=100.0), backend)


def test_cpu_backend_independent_of_threads():
    require_backend("cpu", "cpu")
    q, k, v = make_qkv("projection", (2, 3), 300, 300, 24, 40, torch.float32, "cpu")
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for t in (q, k, v):
                t.grad = None
            out = amflow_kernels.linear_attention(q, k, v, backend="cpu")
            out.backward(torch.ones_like(out).cumsum(-2))
            runs.append((out, q.grad, k.grad, v.grad))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def _qkv(nq=4, nk=4, d=8, dv=8, dtype=torch.float32, lead=(1, 2)):
    return dict(
        q=torch.zeros(*lead, nq, d, dtype=dtype), k=torch.zeros(*lead, nk, d, dtype=dtype),
        v=torch.zeros(*lead, nk, dv, dtype=dtype),
    )


# bad values of the op's own arguments; those every op refuses alike: test_op_contracts.py
BAD_INPUTS = [
    (dict(v=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), TypeError,
     r"v.dtype must equal q.dtype \(torch.float32\), got torch.float64"),
    (dict(q=torch.zeros(8)), ValueError, r"must have shapes \(..., Nq, D\), \(..., Nk, D\), \(..., Nk, Dv\)"),
    (dict(k=torch.zeros(1, 3, 4, 8)), ValueError,
     r"k.shape must be \(..., Nk, D\) = \(1, 2, Nk, 8\) to match q \(1, 2, 4, 8\), got \(1, 3, 4, 8\)"),
    (dict(k=torch.zeros(1, 2, 4, 9)), ValueError, r"k.shape must be .* got \(1, 2, 4, 9\)"),
    (dict(v=torch.zeros(1, 2, 5, 8)), ValueError, r"v.shape must be \(..., Nk, Dv\) .* got \(1, 2, 5, 8\)"),
    (dict(_qkv(nk=0)), ValueError, r"at least one token and one channel"),
    (dict(eps=-1e-3), ValueError, r"eps must be a finite float ≥ 0, got -0.001"),
    (dict(eps=float("inf")), ValueError, r"eps must be a finite float ≥ 0, got inf"),
    (dict(_qkv(dv=200), backend="triton"), RuntimeError, r"Dv 200 exceeds its maximum 128 for linear_attention"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input(bad, error, message):
    args = {**_qkv(), **bad}
    with pytest.raises(error, match=message):
        amflow_kernels.linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


EXTENSION_BAD_INPUTS = [
    ((torch.zeros(2, 4, 8),) * 3, r"q, k, v must have shapes \(B, H, Nq, D\)"),
    ((torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 4, 8)),
     r"k.shape must be \(B, H, Nk, D\) matching q"),
    ((torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 5, 8)),
     r"v.shape must be \(B, H, Nk, Dv\) matching k"),
    ((torch.zeros(1, 2, 4, 8, dtype=torch.float16),) * 3, r"q.dtype must be one of float32, float64, got float16"),
]


@pytest.mark.parametrize("args, message", EXTENSION_BAD_INPUTS, ids=[m[:30] for _, m in EXTENSION_BAD_INPUTS])
def test_extension_bad_input(args, message):
    """Called directly, the compiled op checks its inputs too (the public API checks first)."""
    require_backend("cpu", "cpu")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.amflow.linear_attention_fwd(*args, 1e-6)
