"""Registers of the Triton kernels on sm_80 and sm_90, compiled ahead of time on this machine.

A thread that needs more than the register file gives it (255 registers) spills to local
memory, a silent slowdown on every tile. Triton compiles for any GPU without one and its
bundled ptxas reports registers and spills (tests/triton_aot.py), so this holds every config
that the autotuners and launchers can choose to no spill, on the code a launch compiles
(tensors 16-byte aligned, strides multiples of 16, unit stride along the head dim):

- colsum (AM flow, attention colsum), resident forward: every (BLOCK_M, warps) candidate at the
  widest rows that ``resident_registers_fit`` admits it for, per head-dim tile and dtype;
- colsum, blocked kernels (stats, cols, rowdot, dq, dk): every candidate tile and warp count
  that ``blocked_registers_fit`` admits, per head-dim tile and dtype; where none is left, the
  fallbacks (``BLOCKED_FALLBACKS``), which run and may spill as much as ``FALLBACK_SPILLS`` lists;
- linear attention: all five kernels (the state kernel forward and weighted, as the backward
  runs it) at every pair of head-dim tiles 16–128, as the launcher configures them: a program
  holds a D × BLOCK_E slice of the state (``state_slice_width``), not the whole D × Dv state,
  which spilled at D or Dv = 128 at every tile size tried (up to 2 KB per thread in bf16), on
  warps by the slice's size (``launch_config``);
- attention (out and colsum): all five kernels with a key bias at the launcher's tiles
  (``launch_tiles``) for head-dim tiles 64 and 128, the widest of each of its tile shapes.

Register allocation grows with a tile, so a config checked at its largest admitted tile holds
at the smaller ones. Paired (AM flow) only: attention colsum runs the same code with the second
frame's loads and products left out. Head-dim tiles 32, 64, 128 and 256 cover every supported
head dim (80 runs on 128). bfloat16 and float32 everywhere; float16, whose code differs from
bfloat16's only in its conversions, at the common head dim 64.
"""

from __future__ import annotations

import pytest
import torch
import triton
from triton_aot import attention_cases, case_id, colsum_case, compile_cases_once, linear_cases

from amflow_kernels.ops import softmax_colsum_tiles

ARCHS = (80, 90)
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCK_DS = (32, 64, 128, 256)
# The blocked kernels by name: the kernel, the constexprs that select its code, and the
# autotuned kernel whose config it runs with.
BLOCKED_KERNELS = {
    "stats": ("colsum_fwd_stats_kernel", {}, "colsum_fwd_stats_kernel"),
    "cols": ("colsum_fwd_cols_kernel", {}, "colsum_fwd_stats_kernel"),
    "rowdot": ("colsum_bwd_rowdot_kernel", {}, "colsum_bwd_rowdot_kernel"),
    "dq": ("colsum_bwd_dqk_kernel", {"FOR_K": False}, "colsum_bwd_rowdot_kernel"),
    "dk": ("colsum_bwd_dqk_kernel", {"FOR_K": True}, "colsum_bwd_rowdot_kernel"),
}


def _dtypes(block_d: int) -> tuple[str, ...]:
    return ("bfloat16", "float32", "float16") if block_d == 64 else ("bfloat16", "float32")


def _blocked_fits(cc: int, block_d: int, dtype: str) -> list[tuple[int, int, int]]:
    return [(bm, bn, w) for bm, bn, w in softmax_colsum_tiles.BLOCKED_CONFIGS
            if softmax_colsum_tiles.blocked_registers_fit(bm, bn, block_d, w, ITEMSIZE[dtype], cc // 10)]


def _widest_resident_rows(block_m: int, block_d: int, num_warps: int, dtype: str) -> int | None:
    itemsize = ITEMSIZE[dtype]
    widths = [2**i for i in range(4, 12)
              if softmax_colsum_tiles.resident_registers_fit(block_m, 2**i, block_d, num_warps, itemsize)]
    return widths[-1] if widths else None


RESIDENT_CASES = [
    colsum_case("colsum_fwd_resident_kernel", dtype, cc, warps, PAIRED=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    for cc in ARCHS
    for bd in BLOCK_DS
    for dtype in _dtypes(bd)
    for bm, warps in softmax_colsum_tiles.RESIDENT_CONFIGS
    if (bn := _widest_resident_rows(bm, bd, warps, dtype)) is not None
]
BLOCKED_CASES = [
    colsum_case(kernel, dtype, cc, warps, PAIRED=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **selectors)
    for cc in ARCHS
    for bd in BLOCK_DS
    for dtype in _dtypes(bd)
    for kernel, selectors, tuned in BLOCKED_KERNELS.values()
    for bm, bn, warps in _blocked_fits(cc, bd, dtype) or [softmax_colsum_tiles.BLOCKED_FALLBACKS[tuned]]
]
# Where no candidate is left, fp32 at D = 128 and 256, the fallbacks run and may spill: the most
# bytes of spill stores per thread measured over the five kernels with Triton 3.6 and 3.8 (fp32's
# products run on FMAs, and a 16 × 16 tile is Triton's smallest). Anything else must not spill.
FALLBACK_SPILLS = {(90, 128): 16, (90, 256): 28, (80, 128): 0, (80, 256): 0}
LINEAR_CASES = linear_cases(ARCHS, _dtypes)
ATTENTION_CASES = attention_cases(ARCHS, _dtypes)
CASES = RESIDENT_CASES + BLOCKED_CASES + LINEAR_CASES + ATTENTION_CASES


@pytest.fixture(scope="module")
def usage(session_dir):
    """Registers and spills per case id."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip(reason="this Triton has no NVIDIA backend to compile for")
    try:
        return compile_cases_once(CASES, session_dir)
    except RuntimeError as error:
        if "no ptxas report" not in str(error):
            raise
        pytest.skip(reason=f"Triton {triton.__version__} does not print ptxas' report (TRITON_DUMP_PTXAS_LOG)")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_register_spills(usage, case):
    result = usage[case_id(case)]
    c = case["constexprs"]
    fallback = case["kernel"] in {kernel for kernel, _, _ in BLOCKED_KERNELS.values()} and not _blocked_fits(
        case["cc"], c["BLOCK_D"], case["dtype"]
    )
    allowed = FALLBACK_SPILLS[(case["cc"], c["BLOCK_D"])] if fallback else 0
    assert result["spill_stores"] <= allowed and result["spill_loads"] <= max(allowed, result["spill_stores"]), (
        f"{result['registers']} registers and {result['spill_stores']} bytes of spill stores "
        f"({result['spill_loads']} of loads) per thread; {allowed} allowed"
    )


@pytest.mark.parametrize("cc", ARCHS, ids=lambda cc: f"sm{cc}")
def test_every_head_dim_keeps_a_config(cc):
    """Pruning by registers leaves every head-dim tile a blocked config in 16 bits, and fp32 but
    where FALLBACK_SPILLS lists it; and the resident forward rows of at least 64 tokens in 16
    bits, 32 in fp32."""
    for bd in BLOCK_DS:
        assert _blocked_fits(cc, bd, "bfloat16")
        assert _blocked_fits(cc, bd, "float32") or (cc, bd) in FALLBACK_SPILLS
        assert softmax_colsum_tiles.resident_fits(64, bd, torch.bfloat16)
        assert softmax_colsum_tiles.resident_fits(32, bd, torch.float32)
