"""The CUDA backend's kernels (csrc/cuda/*.cuh) on this CPU, through the CUDA emulator of
tests/cuda_emulator, against the float64 reference in float32, float16 and bfloat16.

The emulator runs every CUDA thread of a block as a fiber that yields only at barriers and
warp collectives, and emulates WMMA on fp32 arithmetic, so these tests check what a GPU-less
machine can: the kernels' arithmetic and indexing, tile edges, strided reads, launch
configurations, barrier placement (a divergent __syncthreads is an error, a missing one gives
wrong sums or results that change with the scheduling order) and the WMMA API's alignment
rules, in every dtype the kernels take. They do not check speed, the memory model's weaker
orderings or register limits: the tests with backend "cuda" in the
other files run the same kernels on a GPU where one exists. The parameters are filled as the
CUDA glue fills them: the emulator compiles csrc/cuda/*_glue.h too, and only the validation
and device lookups of the .cu files stay out (they are tested through the extension).

The softmax-colsum kernels have two builds, and both run here: that of sm_80 and later
(fp16/bf16 products on tensor cores), and that of older GPUs (on CUDA cores, as fp32 is on
every GPU), which no GPU test covers where the lent GPUs are Hopper.
"""

from __future__ import annotations

import cuda_emulator
import pytest
import torch
from cases import (
    AM_FLOW_CPU_CASES,
    LINEAR_GRID,
    LINEAR_SHAPE_IDS,
    LINEAR_SHAPES,
    am_flow_case_id,
    grid_eps,
)
from helpers import (
    assert_close,
    check_against_reference,
    check_large_scores,
    make_qk,
    make_qkv,
)

from amflow_kernels import reference
from amflow_kernels._layout import as_frames

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (build, dtype): the sm_80+ build in every dtype, and the pre-sm_80 build in the dtypes whose
# path differs from it (fp32 runs the same code in both).
COLSUM_BUILDS = [("sm80", d) for d in DTYPES] + [("pre_sm80", d) for d in (torch.float16, torch.bfloat16)]
COLSUM_BUILD_IDS = [f"{build}-{str(d).removeprefix('torch.')}" for build, d in COLSUM_BUILDS]
H100_SMS = 132  # the linear-attention glue sizes its chunks by the device's multiprocessors


@pytest.fixture(scope="module")
def emulated():
    """cuda_emulator.load: the emulated kernels of the sm_80+ build, or with
    ``cuda_cores_only=True`` of the pre-sm_80 build."""
    if torch.cuda.is_available():
        pytest.skip(reason="a GPU is present: the tests with backend 'cuda' run these kernels on it")
    if cuda_emulator.cuda_headers() is None:
        pytest.skip(reason="the CUDA emulator compiles against CUDA's cuda_fp16.h: set CUDA_HOME to a CUDA toolkit")
    return cuda_emulator.load


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _colsum_reference(q, k, offset, paired, scale):
    if paired:
        return reference.am_flow(q, k, offset=offset, scale=scale)
    return reference.attention_colsum(q, k, scale=scale)


def _colsum_kernels(emulated, build, **variant):
    return emulated(cuda_cores_only=build == "pre_sm80", **variant)


def _colsum_emulated(emulated, build, q, k, grad, offset, paired, scale, **variant):
    kernels = _colsum_kernels(emulated, build, **variant)
    out, stats = kernels.softmax_colsum_fwd(q, k, offset, paired, scale)
    dq, dk = kernels.softmax_colsum_bwd(grad, q, k, stats, offset, paired, scale)
    return out, dq, dk


def _frames(layout, B, T, H, N, D, dtype):
    """(B, T, H, N, D) q, k in the layout's strides (views, not copies)."""
    q, k, kw = make_qk(layout, B, T, H, N, D, dtype, "cpu")
    return [as_frames(x.detach(), kw.get("num_frames")) for x in (q, k)]


def _check_colsum(emulated, case, paired, build, dtype, **variant):
    B, T, H, N, D, offset, layout = case
    q, k = _frames(layout, B, T, H, N, D, dtype)
    scale = D**-0.5
    check_against_reference(
        lambda grad: _colsum_emulated(emulated, build, q, k, grad, offset, paired, scale, **variant),
        lambda q, k: _colsum_reference(q, k, offset, paired, scale), (q, k), ("out", "dq", "dk"),
    )


@pytest.mark.parametrize("build, dtype", COLSUM_BUILDS, ids=COLSUM_BUILD_IDS)
@pytest.mark.parametrize("paired", [True, False], ids=["am_flow", "attention_colsum"])
@pytest.mark.parametrize("case", AM_FLOW_CPU_CASES, ids=am_flow_case_id)
def test_softmax_colsum(emulated, case, paired, build, dtype):
    _check_colsum(emulated, case, paired, build, dtype)


@pytest.mark.parametrize("build, dtype", COLSUM_BUILDS, ids=COLSUM_BUILD_IDS)
@pytest.mark.parametrize("paired", [True, False], ids=["am_flow", "attention_colsum"])
def test_softmax_colsum_large_scores(emulated, paired, build, dtype):
    """|S| in the thousands: finite, and as accurate as PyTorch (the fused backends' twin)."""
    check_large_scores(
        lambda q, k, grad: _colsum_emulated(emulated, build, q, k, grad, 1 if paired else 0, paired, 64**-0.5),
        paired, dtype, "cpu",
    )


def _check_linear_attention(emulated, q, k, v, eps, sms, **variant):
    q, k, v = (x.detach() for x in (q, k, v))
    kernels = emulated(**variant)
    state = {}

    def run(grad):
        out, kv, z = kernels.linear_attention_fwd(q, k, v, eps, sms)
        state.update(kv=kv, z=z)
        return (out, *kernels.linear_attention_bwd(grad, q, k, v, kv, z, eps, sms))

    check_against_reference(
        run, lambda q, k, v: reference.linear_attention(q, k, v, eps=eps), (q, k, v), ("out", "dq", "dk", "dv")
    )
    phi_k = torch.nn.functional.elu(k.double()) + 1
    assert_close("kv", state["kv"], phi_k.transpose(-1, -2) @ v.double())
    assert_close("z", state["z"], phi_k.sum(-2))


# Every token count, head dim and layout of the linear-attention grid, each head dim pair once.
EMULATED_LINEAR_GRID = [case for case in LINEAR_GRID if case[0] <= 197 or case[1] == case[2]]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize(
    "n, d, dv, layout", EMULATED_LINEAR_GRID, ids=[f"N{n}-D{d}-Dv{dv}-{lay}" for n, d, dv, lay in EMULATED_LINEAR_GRID]
)
def test_linear_attention_grid(emulated, n, d, dv, layout, dtype):
    _check_linear_attention(emulated, *make_qkv(layout, (2, 3), n, n, d, dv, dtype, "cpu"), grid_eps(n), H100_SMS)


# Cross attention and head dims up to the kernels' 128 (the 8 × 16 accumulator tiling), with
# the chunking of an H100 (a chunk per 32-token tile here: many partial states to sum) and of
# a one-multiprocessor device (few chunks, each looping over several tiles).
@pytest.mark.parametrize("sms", [H100_SMS, 1])
@pytest.mark.parametrize("lead, nq, nk, d, dv, eps", LINEAR_SHAPES, ids=LINEAR_SHAPE_IDS)
def test_linear_attention_shapes(emulated, lead, nq, nk, d, dv, eps, sms):
    q, k, v = make_qkv("contiguous", lead, nq, nk, d, dv, torch.float32, "cpu")
    q, k, v = (x.reshape(-1, 1, *x.shape[-2:]) for x in (q, k, v))  # the kernels take (B, H, N, D)
    _check_linear_attention(emulated, q, k, v, eps, sms)


def _in_both_schedules(kernels, run):
    """``run()``'s tensors with the emulator's threads and blocks scheduled in ascending, then
    in descending order."""
    first = run()
    kernels.set_reverse_schedule(True)
    try:
        second = run()
    finally:
        kernels.set_reverse_schedule(False)
    return first, second


# Races: between two barriers every pair of threads (and every pair of blocks) runs in one
# order in the first schedule and in the other in the second, so a shared-memory race or two
# blocks writing one output would make the results differ. Bitwise equality also holds the
# kernels to their promise of results that do not depend on scheduling.
@pytest.mark.parametrize("build, dtype", COLSUM_BUILDS, ids=COLSUM_BUILD_IDS)
@pytest.mark.parametrize("paired", [True, False], ids=["am_flow", "attention_colsum"])
@pytest.mark.parametrize("case", [(2, 3, 2, 65, 40, 1, "qkv"), (1, 3, 1, 33, 128, 2, "strided")], ids=am_flow_case_id)
def test_softmax_colsum_race_free(emulated, case, paired, build, dtype):
    B, T, H, N, D, offset, layout = case
    q, k = _frames(layout, B, T, H, N, D, dtype)
    grad = torch.randn(B, T - offset if paired else T, H, N, dtype=dtype)
    first, second = _in_both_schedules(
        _colsum_kernels(emulated, build), lambda: _colsum_emulated(emulated, build, q, k, grad, offset, paired, D**-0.5)
    )
    for name, a, b in zip(("out", "dq", "dk"), first, second):
        assert torch.equal(a, b), f"{name} depends on the order threads run between barriers: a race"


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("sms", [H100_SMS, 1])
def test_linear_attention_race_free(emulated, sms, dtype):
    q, k, v = (x.detach() for x in make_qkv("projection", (2, 3), 70, 70, 40, 72, dtype, "cpu"))
    grad = torch.randn(*q.shape[:-1], v.shape[-1], dtype=dtype)

    def run():
        out, kv, z = emulated().linear_attention_fwd(q, k, v, 1e-6, sms)
        return (out, kv, z, *emulated().linear_attention_bwd(grad, q, k, v, kv, z, 1e-6, sms))

    first, second = _in_both_schedules(emulated(), run)
    for name, a, b in zip(("out", "kv", "z", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} depends on the order threads run between barriers: a race"


# -- The checked build (cuda_emulator/checks.h): memcheck, racecheck and initcheck -------------
# On a covering subset: every build and dtype, both ops, a tile edge (N = 33: two 32-row tiles,
# the second nearly empty) and a head dim off the 32-wide chunks (D = 40, 80), where padding
# and masking are; and linear attention with several chunks and Dv off the 16-wide tiles.
CHECKED_COLSUM_CASES = [(1, 3, 2, 33, 40, 1, "qkv"), (1, 2, 1, 17, 80, 1, "strided")]


@pytest.mark.parametrize("build, dtype", COLSUM_BUILDS, ids=COLSUM_BUILD_IDS)
@pytest.mark.parametrize("paired", [True, False], ids=["am_flow", "attention_colsum"])
@pytest.mark.parametrize("case", CHECKED_COLSUM_CASES, ids=am_flow_case_id)
def test_softmax_colsum_checked(emulated, case, paired, build, dtype):
    _check_colsum(emulated, case, paired, build, dtype, checked=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_linear_attention_checked(emulated, dtype):
    q, k, v = make_qkv("projection", (1, 2), 40, 40, 24, 40, dtype, "cpu")
    _check_linear_attention(emulated, q, k, v, 1e-6, 1, checked=True)


# -- The fast-math build (cuda_emulator/fast_math.h): nvcc's --use_fast_math arithmetic --------
@pytest.mark.parametrize("build, dtype", COLSUM_BUILDS, ids=COLSUM_BUILD_IDS)
@pytest.mark.parametrize("paired", [True, False], ids=["am_flow", "attention_colsum"])
def test_softmax_colsum_fast_math(emulated, paired, build, dtype):
    _check_colsum(emulated, (2, 3, 2, 65, 40, 1, "qkv"), paired, build, dtype, fast_math=True)
    check_large_scores(
        lambda q, k, grad: _colsum_emulated(emulated, build, q, k, grad, 1 if paired else 0, paired, 64**-0.5,
                                            fast_math=True),
        paired, dtype, "cpu",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("n, d, dv, layout", [(197, 64, 64, "projection"), (17, 12, 32, "transposed")],
                         ids=["N197-D64-Dv64", "N17-D12-Dv32"])
def test_linear_attention_fast_math(emulated, n, d, dv, layout, dtype):
    q, k, v = make_qkv(layout, (2, 3), n, n, d, dv, dtype, "cpu")
    _check_linear_attention(emulated, q, k, v, grid_eps(n), H100_SMS, fast_math=True)


# -- Planted bugs that only the checked build sees ----------------------------------------------
# Each is a small edit of a copy of csrc/cuda whose results the other tests cannot tell from
# the real kernels' by value or by schedule: the checked build must stop it.
LOAD_LOOP = "for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {"
PLANTED = {
    # two threads store each element of a score chunk: the same value, so both schedules agree
    "race": (LOAD_LOOP, "for (int e = threadIdx.x % (kThreads / 2); e < kTile * kTile; e += kThreads / 2) {",
             r"race on shared sm\[byte \d+ of \d+\]: thread \d+ wrote it and thread \d+ writes it"),
    # the backward's row statistics read for the padding rows of the last tile too (unused)
    "out_of_bounds": ("const float m = row_ok ? p.stats[2 * (base + row)] : 0.f;",
                      "const float m = p.stats[2 * (base + row)];",
                      r"reads 4 bytes out of bounds, \d+ bytes past the end of global tensor"),
    # query rows past N left as the previous tile or block left them (their scores are masked)
    "uninitialised": ("sm.q[f][r][d] = (d_ok && qn < p.N)", "if (qn < p.N) sm.q[f][r][d] = d_ok",
                      r"reads shared sm\[byte \d+ of \d+\], which no thread of this block has written"),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_checked_build_catches_planted_bug(emulated, bug, tmp_path):
    original, planted, message = PLANTED[bug]
    source = (cuda_emulator.CSRC_CUDA / "softmax_colsum.cuh").read_text()
    assert source.count(original) == 1, f"the planted bug's site is gone from softmax_colsum.cuh: {original!r}"
    for path in cuda_emulator.CSRC_CUDA.iterdir():
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "softmax_colsum.cuh").write_text(source.replace(original, planted))
    kernels = emulated(checked=True, sources=tmp_path, tag=f"planted_{bug}")
    q, k = _frames("contiguous", 1, 2, 1, 33, 40, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        out, stats = kernels.softmax_colsum_fwd(q, k, 1, True, 0.2)
        kernels.softmax_colsum_bwd(torch.randn_like(out), q, k, stats, 1, True, 0.2)
