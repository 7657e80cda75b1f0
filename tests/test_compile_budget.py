"""The Triton compilations a GPU session triggers, held to what its window affords.

bench/gpu_session.sh has one device call of at most 9 minutes for everything. Its correctness
stage runs the GPU smoke grid with AMFLOW_AUTOTUNE=first (one config per autotune key); its
bench stage times every candidate that fits, as users' runs do. Each compilation takes the
Triton compiler about a second of one CPU core, and a cold cache compiles them all. The
launches are made here under the interpreter without running the kernels (triton_compiles.py),
with the candidates, the shared-memory limit and the forward-path choice of an H200.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cases import AM_FLOW_GPU_CASES, ATTENTION_COLSUM_GPU_CASES, ATTENTION_GPU_PARAMS, LINEAR_GPU_PARAMS
from helpers import Target, make_qk, make_qkv, make_single_frame_qk
from triton_compiles import recording

import amflow_kernels
from amflow_kernels.ops import autotune, softmax_colsum_tiles, softmax_colsum_triton, triton_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from workloads import SHAPES, qkv_inputs

pytestmark = pytest.mark.skipif(not triton_device.INTERPRET, reason="counts launches under Triton's interpreter")

# Compilations per stage (measured: 453 and 94 at this revision, 30 and 10 of them attention's).
# On the GPU machine's 16 cores, pytest-xdist spreads the smoke grid's over 16 workers (the H200
# ran 423 of them, with the whole smoke grid, in 62 s of the stage's 180 on 2026-12-04); the bench
# compiles in one process, inside its own timeouts.
SMOKE_BUDGET = 480
BENCH_BUDGET = 110
H200_MULTIPROCESSORS = 132
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUTOTUNED = ("colsum_fwd_resident_kernel", "colsum_fwd_stats_kernel", "colsum_bwd_rowdot_kernel")


def _fwd_bwd(outputs):
    """Backward through one output, or through each of several."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [torch.ones_like(x) for x in outputs])


def _smoke_grid(monkeypatch):
    """Every launch of the GPU smoke grid (tests marked smoke), both Triton forward paths."""
    smoke = lambda case: case[3] in (17, 261)  # noqa: E731  (cases.py's rule for the colsum grids)
    for path in ("resident", "blocked"):
        Target("triton", "cpu", path).activate(monkeypatch)
        for dtype in GPU_DTYPES:
            for B, T, H, N, D, offset, layout in filter(smoke, AM_FLOW_GPU_CASES):
                q, k, kw = make_qk(layout, B, T, H, N, D, dtype, "cpu")
                _fwd_bwd(amflow_kernels.am_flow(q, k, offset=offset, backend="triton", **kw))
            for shape, layout in ATTENTION_COLSUM_GPU_CASES:
                if shape[2] in (17, 261):
                    _fwd_bwd(amflow_kernels.attention_colsum(*make_single_frame_qk(shape, layout, dtype, "cpu"),
                                                             backend="triton"))
    for dtype in GPU_DTYPES:
        for param in LINEAR_GPU_PARAMS:
            if any(mark.name == "smoke" for mark in param.marks):
                n, d, dv, layout = param.values[0]
                _fwd_bwd(amflow_kernels.linear_attention(*make_qkv(layout, (4, 12), n, n, d, dv, dtype, "cpu"),
                                                         backend="triton"))
        for param in ATTENTION_GPU_PARAMS:
            if any(mark.name == "smoke" for mark in param.marks):
                lead, nq, nk, d, dv, rows, bias, layout = param.values[0]
                q, k, v = make_qkv(layout, lead, nq, nk, d, dv, dtype, "cpu")
                key_bias = torch.zeros(*lead, nk, requires_grad=True) if bias is not None else None
                _fwd_bwd(amflow_kernels.attention(q, k, v, key_bias=key_bias, colsum_rows=rows, backend="triton"))


def _bench(monkeypatch):
    """Every Triton launch of the benchmarks' GPU workloads, forward and backward, with the
    forward path an H200 takes (resident only with two programs per multiprocessor)."""
    monkeypatch.setattr(softmax_colsum_triton, "_prefer_resident", lambda q, programs: (
        softmax_colsum_tiles.resident_fits(q.shape[-2], q.shape[-1], q.dtype) and programs >= 2 * H200_MULTIPROCESSORS))
    for B, T, H, N, D in SHAPES.values():
        q, k, v = qkv_inputs((B, T, H, N, D), "fwd+bwd", "cpu")
        q, k, v = (x.detach().to(torch.bfloat16).requires_grad_() for x in (q, k, v))
        _fwd_bwd(amflow_kernels.am_flow(q, k, num_frames=T, backend="triton"))
        _fwd_bwd(amflow_kernels.attention_colsum(q, k, backend="triton"))
        _fwd_bwd(amflow_kernels.linear_attention(q, k, v, backend="triton"))
        _fwd_bwd(amflow_kernels.attention(q, k, v, backend="triton"))


def _fresh_autotuners(monkeypatch, compile_every_candidate: bool):
    """The autotuners with empty caches and an H200's candidates; each candidate that fits is
    launched (so compiled) when ``compile_every_candidate``, as timing them would."""
    for name in AUTOTUNED:
        kernel = getattr(softmax_colsum_triton, name)
        monkeypatch.setattr(kernel, "cache", {})
        resident = name == "colsum_fwd_resident_kernel"
        tiles = softmax_colsum_tiles
        configs = tiles.resident_configs(False) if resident else tiles.blocked_configs(False)
        monkeypatch.setattr(kernel, "configs", configs)
        if compile_every_candidate:
            monkeypatch.setattr(kernel, "_do_bench", lambda call, quantiles: (call(), [0.0] * len(quantiles))[1])


# (stage, its launches, autotune mode, budget): the smoke grid at one config per key, the bench
# timing every candidate that fits.
STAGES = [("smoke grid", _smoke_grid, "first", SMOKE_BUDGET), ("bench", _bench, "time", BENCH_BUDGET)]


@pytest.mark.parametrize("stage, launches, mode, budget", STAGES, ids=[stage[0] for stage in STAGES])
def test_compile_budget(stage, launches, mode, budget, monkeypatch):
    monkeypatch.setattr(autotune, "MODE", mode)
    _fresh_autotuners(monkeypatch, compile_every_candidate=mode == "time")
    with recording(execute=False) as keys:
        launches(monkeypatch)
    print(f"{stage}: {len(keys)} compilations")
    assert len(keys) <= budget, f"the {stage} compiles {len(keys)} kernels, over its budget {budget}"
