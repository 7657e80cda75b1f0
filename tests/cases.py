"""Case lists shared by the tests of one op on several backends (the fused backends, the
CUDA emulator): shapes, layouts and their ids, defined once."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import LAYOUTS, gpu_grid_lead, target_params

# -- am_flow ---------------------------------------------------------------------------------
# (B, T, H, N, D, offset, layout). The CPU grid runs through Triton's interpreter, so it is
# a covering subset: every N, D, T, offset and layout of the grid appears, N crosses
# the 16/64-wide block boundaries, and D takes non-powers of two and the maximum 256.
AM_FLOW_CPU_CASES = [
    (1, 2, 1, 1, 8, 1, "contiguous"),
    (2, 3, 2, 2, 16, 1, "frames"),
    (1, 3, 2, 5, 40, 2, "qkv"),
    (2, 2, 3, 17, 64, 1, "qkv"),
    (1, 5, 1, 17, 80, 2, "strided"),
    (1, 3, 2, 64, 16, 1, "frames"),
    (2, 3, 1, 65, 64, 2, "contiguous"),
    (1, 5, 2, 65, 40, 1, "qkv"),
    (1, 2, 1, 33, 128, 1, "strided"),
    (1, 3, 1, 20, 256, 1, "contiguous"),
    # N above the kernel's 128-row block: several row blocks, on its own GEMM and on ATen's.
    (1, 2, 1, 150, 4, 1, "qkv"),
    (1, 3, 2, 200, 32, 1, "strided"),
]
# On a GPU: the whole grid of the issue plus real ViT token counts, in every dtype.
_GPU_B, _GPU_H = gpu_grid_lead(2, 3)
AM_FLOW_GPU_CASES = [
    (_GPU_B, T, _GPU_H, N, D, offset, layout)
    for (N, D), (T, offset, layout) in zip(
        itertools.product((1, 2, 5, 17, 64, 65, 197, 261, 1370, 2048), (8, 16, 40, 64, 80, 128, 256)),
        itertools.cycle(
            [(t, o, lay) for t in (2, 3, 5) for o in (1, 2) for lay in LAYOUTS if t > o]
        ),
    )
]


# Large scores, every target in its dtypes but float64, which is exact enough that "PyTorch's
# own error" is no yardstick (the grids cover it).
LARGE_SCORE_TARGETS = [p for p in target_params(with_dtypes=True) if p.values[1] != torch.float64]


def am_flow_case_id(case) -> str:
    B, T, H, N, D, offset, layout = case
    return f"B{B}-T{T}-H{H}-N{N}-D{D}-off{offset}-{layout}"


# -- attention_colsum -----------------------------------------------------------------------
# (shape of q, layout). Leading dims of every rank; "qkv" is timm's strided projection view
# and "transposed" a view whose last stride is not 1.
ATTENTION_COLSUM_CPU_CASES = [
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
ATTENTION_COLSUM_GPU_CASES = [
    ((B, H, N, D), layout)
    for (B, H) in (gpu_grid_lead(2, 3),)
    for N in (1, 2, 5, 17, 64, 65, 197, 261, 1370, 2048)
    for D in (8, 40, 64, 128, 256)
    for layout in ("qkv", "transposed")
]


def attention_colsum_case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + f"-{layout}"


# -- attention -------------------------------------------------------------------------------
# (lead, Nq, Nk, D, Dv, colsum_rows, key bias: None, True (key 1 masked with −inf) or False, layout).
# ViT token counts (197: ViT-B/16 at 224; 1370: DINOv2 at 518, colsum_rows 5 its CLS and four
# registers), one token, cross attention both ways, D 80 and the maximum 128, Dv ≠ D.
ATTENTION_CASES = [
    ((2, 3), 17, 17, 64, 64, None, None, "projection"),
    ((1, 2), 1, 1, 64, 64, None, False, "contiguous"),
    ((2,), 33, 70, 80, 48, 5, True, "contiguous"),
    ((1, 2), 197, 197, 64, 64, 1, True, "projection"),
    ((1, 1), 1370, 1370, 64, 64, 5, None, "transposed"),
    ((3,), 70, 20, 16, 100, None, True, "transposed"),
    ((2, 2, 2), 5, 9, 8, 8, 2, None, "contiguous"),
    ((1,), 2, 130, 128, 128, None, True, "contiguous"),
]
_ATTENTION_GPU_LAYOUTS = itertools.cycle(["projection", "transposed"])
_ATTENTION_GPU_OPTIONS = itertools.cycle([(None, None), (1, True), (5, False)])
ATTENTION_GPU_CASES = [
    ((2, 3), n, n, d, d, *next(_ATTENTION_GPU_OPTIONS), next(_ATTENTION_GPU_LAYOUTS))
    for n in (1, 2, 17, 64, 197, 261, 1370, 2048)
    for d in (40, 64, 80, 128)
] + [((2, 3), nq, nk, 64, 32, 1, True, "contiguous") for nq, nk in ((1, 197), (197, 50), (300, 1370))]


def attention_case_id(case) -> str:
    lead, nq, nk, d, dv, rows, bias, layout = case
    masked = {None: "", True: "-masked-bias", False: "-bias"}[bias]
    return f"{'x'.join(map(str, lead))}-Nq{nq}-Nk{nk}-D{d}-Dv{dv}-rows{rows or 'all'}{masked}-{layout}"


# -- linear attention -----------------------------------------------------------------------
TOKENS = (1, 3, 17, 64, 197, 1370)
HEAD_DIMS = (8, 12, 32, 64)
LINEAR_LAYOUTS = ("contiguous", "projection", "transposed")
# The full grid N × D × Dv, the layouts taking turns so each meets every size.
LINEAR_GRID = [
    (n, d, dv, LINEAR_LAYOUTS[i % len(LINEAR_LAYOUTS)])
    for i, (n, d, dv) in enumerate(itertools.product(TOKENS, HEAD_DIMS, HEAD_DIMS))
]
LINEAR_GRID_IDS = [f"N{n}-D{d}-Dv{dv}-{lay}" for n, d, dv, lay in LINEAR_GRID]


def grid_eps(n: int) -> float:
    """The default eps, but 10 for a single token. There dq and dk are exactly
    φ'(q)⊙φ(k)·(g·v)·eps/den², a difference of terms den/eps times larger: at eps = 1e-6 they
    are below fp32 (and near float64) resolution and every implementation's dq, dk, PyTorch's
    included, is rounding noise. With eps = 10 (den ~ 1.3·D + eps) they are well conditioned."""
    return 10.0 if n == 1 else 1e-6


# (leading dims, Nq, Nk, D, Dv, eps): every rank, cross attention (Nq ≠ Nk), head dims up to
# the kernels' maximum, and the normaliser's eps at 0 and large (one key: see grid_eps).
LINEAR_SHAPES = [
    ((), 5, 9, 8, 16, 1e-6),
    ((3,), 33, 7, 16, 8, 1e-6),
    ((2, 2), 70, 130, 40, 24, 0.0),
    ((2, 1, 3), 20, 20, 128, 128, 1e-6),
    ((1, 2, 1, 2), 65, 1, 96, 100, 50.0),
]
LINEAR_SHAPE_IDS = [f"{s[0]}-{s[1]}x{s[2]}-{s[3]}x{s[4]}" for s in LINEAR_SHAPES]


# -- GPU grids: a smoke subset to run first, the rest marked slow ---------------------------
def gpu_grid_params(cases, ids, smoke) -> list:
    """pytest params of a GPU grid: the cases for which ``smoke(case)`` holds marked ``smoke``
    (a covering subset that runs in seconds), the others ``slow``."""
    return [
        pytest.param(case, id=case_id, marks=pytest.mark.smoke if smoke(case) else pytest.mark.slow)
        for case, case_id in zip(cases, ids)
    ]


# Every head dim of each grid at a short and a ViT-sized token count.
AM_FLOW_GPU_PARAMS = gpu_grid_params(
    AM_FLOW_GPU_CASES, [am_flow_case_id(c) for c in AM_FLOW_GPU_CASES], lambda case: case[3] in (17, 261)
)
ATTENTION_COLSUM_GPU_PARAMS = gpu_grid_params(
    ATTENTION_COLSUM_GPU_CASES, [attention_colsum_case_id(c) for c in ATTENTION_COLSUM_GPU_CASES],
    lambda case: case[0][2] in (17, 261),
)
ATTENTION_GPU_PARAMS = gpu_grid_params(
    ATTENTION_GPU_CASES, [attention_case_id(c) for c in ATTENTION_GPU_CASES], lambda case: case[1] in (17, 261)
)
LINEAR_GPU_PARAMS = gpu_grid_params(
    LINEAR_GRID, LINEAR_GRID_IDS, lambda case: case[0] == 17 or (case[0] == 1370 and case[1] == case[2])
)
