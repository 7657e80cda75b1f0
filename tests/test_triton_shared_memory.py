"""Shared memory of the Triton kernels on GPUs, compiled ahead of time on this machine.

A Triton launch that needs more shared memory than its GPU has fails with OutOfResources.
Triton compiles for any GPU without one (tests/triton_aot.py), so this checks, on sm_80 code,
whose shared memory needs are the larger (sm_90 code measured no more at these configs), the
bounds by which configs are chosen for the device:

- colsum: the autotuner skips configs that do not fit, but the blocked kernels that run with
  their partner's tuned tiles do not go through it (see
  ``softmax_colsum_tiles.blocked_shared_memory_bound``, by which the partners' candidates are pruned).
  The bound holds at the largest tiles the candidates reach, with one stage (more stages
  measured no more, the warp count made no difference); the resident forward's smallest
  candidates fit the smallest sm_80-class GPU (99 KiB per block on sm_86 and sm_89), and so
  does the bound of the smallest blocked tiles, so every head dim keeps a config.
- linear attention: no autotuner and one launch config per dtype; every kernel at every pair
  of head-dim tiles fits the smallest sm_80-class GPU.
- attention: no autotuner, one tile shape per dtype and head-dim tile; every kernel at head-dim
  tiles 64 and 128 fits it too.
"""

from __future__ import annotations

import pytest
import torch
import triton
from triton_aot import attention_cases, case_id, colsum_case, compile_cases_once, linear_cases

from amflow_kernels.ops import softmax_colsum_tiles

SM86_SHARED_MEMORY = 99 * 1024
ITEMSIZE = {"float32": 4, "bfloat16": 2}

# The dependents of the blocked kernels, at the largest tiles per head dim that an H100 admits.
BOUND_CASES = [
    colsum_case("colsum_bwd_dqk_kernel", dtype, 80, 4, PAIRED=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, FOR_K=for_k)
    for for_k in (False, True)
    for dtype in ITEMSIZE
    for bm, bn, bd in ((128, 64, 64), (64, 128, 64), (64, 64, 128), (32, 32, 256))
]
# The resident forward at the widest rows resident_fits allows per head dim.
def _widest_resident_rows(dtype: str, block_d: int) -> int:
    return max(2**i for i in range(4, 11) if softmax_colsum_tiles.resident_fits(2**i, block_d, getattr(torch, dtype)))


FIT_CASES = [
    colsum_case("colsum_fwd_resident_kernel", dtype, 80, 8, PAIRED=True, BLOCK_M=16,
                BLOCK_N=_widest_resident_rows(dtype, bd), BLOCK_D=bd)
    for dtype in ITEMSIZE
    for bd in (32, 64, 128, 256)
]

LINEAR_CASES = linear_cases((80,), lambda block_d: tuple(ITEMSIZE))
ATTENTION_CASES = attention_cases((80,), lambda block_d: tuple(ITEMSIZE))


@pytest.fixture(scope="module")
def shared_memory(session_dir):
    """Bytes of shared memory per case id."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip(reason="this Triton has no NVIDIA backend to compile for")
    cases = BOUND_CASES + FIT_CASES + LINEAR_CASES + ATTENTION_CASES
    return {key: r["shared"] for key, r in compile_cases_once(cases, session_dir).items()}


@pytest.mark.parametrize("case", BOUND_CASES, ids=case_id)
def test_blocked_bound_holds(shared_memory, case):
    c = case["constexprs"]
    bound = softmax_colsum_tiles.blocked_shared_memory_bound(
        c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], ITEMSIZE[case["dtype"]]
    )
    needed = shared_memory[case_id(case)]
    assert needed <= bound, f"needs {needed} bytes of shared memory, above the bound configs are pruned by ({bound})"


@pytest.mark.parametrize("dtype", ITEMSIZE)
def test_smallest_blocked_tiles_fit_sm86(dtype):
    """Every head dim keeps at least the 16 × 16 tiles on an sm_86 GPU."""
    bound = softmax_colsum_tiles.blocked_shared_memory_bound(16, 16, softmax_colsum_tiles.MAX_HEAD_DIM, ITEMSIZE[dtype])
    assert bound <= SM86_SHARED_MEMORY


@pytest.mark.parametrize("case", FIT_CASES + LINEAR_CASES + ATTENTION_CASES, ids=case_id)
def test_fits_sm86(shared_memory, case):
    needed = shared_memory[case_id(case)]
    assert needed <= SM86_SHARED_MEMORY, f"needs {needed} bytes of shared memory; an sm_86 GPU has {SM86_SHARED_MEMORY}"
