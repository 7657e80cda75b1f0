"""Which tiles the Triton softmax-colsum kernels (AM flow, attention colsum) may run: the
autotuners' candidates, the model of the registers and shared memory each needs, measured
with ptxas and held by tests/test_triton_registers.py and tests/test_triton_shared_memory.py,
and the pruning that keeps a launch within the device's."""

from __future__ import annotations

import torch
import triton

from . import autotune
from .triton_device import INTERPRET, shared_memory_limit

MAX_HEAD_DIM = 256
# Registers. Triton keeps the fp32 score and accumulator tiles in registers, and with them the
# operands of a product: on mma.sync (every sm_80 tile, sm_90 tiles under 64 rows) the loaded
# key tile too, and for fp32 inputs, whose products run on FMAs, whole operand rows per thread
# (so those products take D in chunks of FP32_BLOCK_K). Past 255 registers a thread spills to
# local memory on every tile. Bounds in tile elements per thread, by the inputs' element size,
# measured with ptxas on sm_80 and sm_90 code and held to no spill at every config they admit by
# tests/test_triton_registers.py:
# - resident forward: the query and key tiles, (BLOCK_M + BLOCK_N) × BLOCK_D, and the score
#   tile, BLOCK_M × BLOCK_N ≤ 32. Whole rows stay on chip for N ≤ 256 at D = 64 in 16 bits
#   (N ≤ 128 in fp32); longer rows take the blocked kernels.
# - blocked kernels (the dq/dk kernels hold the most: three frames' score tiles, the fp32
#   accumulator and the other operand of its product): max(BLOCK_M, BLOCK_N) × BLOCK_D +
#   BLOCK_M × BLOCK_N, by architecture (sm_90's wgmma reads large tiles' keys from shared memory).
#   Below the bound, ptxas still spills a few bytes in some configs to fit more blocks per SM;
#   those are excluded by name (OCCUPANCY_SPILLS, and RESIDENT_OCCUPANCY_SPILLS for the resident
#   forward), as measured with Triton 3.8 and with the GPU machine's 3.6. In fp32 at D = 128
#   and 256 no candidate is left: the smallest tile runs (BLOCKED_FALLBACKS) and may spill, as
#   the test lists with its measured bytes.
RESIDENT_INPUT_ELEMENTS_PER_THREAD = {2: 80, 4: 56}
RESIDENT_SCORE_ELEMENTS_PER_THREAD = 32
RESIDENT_OCCUPANCY_SPILLS = {  # (itemsize, BLOCK_N, BLOCK_D) → (BLOCK_M, warps) that spill 8 bytes
    (2, 512, 32): [(16, 8)],
}
BLOCKED_TILE_ELEMENTS_PER_THREAD = {8: {2: 40, 4: 18}, 9: {2: 64, 4: 18}}  # by arch, then itemsize
OCCUPANCY_SPILLS = {  # (arch, itemsize, BLOCK_D) → (BLOCK_M, BLOCK_N, warps) that spill 4–24 bytes
    (9, 2, 64): [(64, 64, 4)],
    (9, 2, 128): [(32, 32, 4)],
    (8, 2, 256): [(32, 32, 8)],
    (8, 4, 64): [(16, 16, 4)],
    (8, 4, 128): [(16, 16, 4)],
    (9, 4, 128): [(16, 16, 4)],
}
FP32_BLOCK_K = 16
# Shared memory. A dependent kernel (cols after stats, dq and dk after rowdot) runs with its
# partner's tuned tiles, so both recompute bitwise-identical scores, outside the autotuner that
# would skip a config that does not fit; so the partners' candidates are pruned to those whose
# dependents fit the device's shared memory. The dq/dk kernels need the most: they hold three
# frames' q (or k) tiles and stream three more. Bound, measured on Triton's sm_80 and sm_90
# code for these kernels and checked by tests/test_triton_shared_memory.py: bytes per element
# of the larger q/k tile, max(BLOCK_M, BLOCK_N) × BLOCK_D, by the inputs' element size.
SHARED_BYTES_PER_TILE_ELEMENT = {2: 18, 4: 24}
# Candidates: (BLOCK_M, BLOCK_N, warps) of the blocked kernels, largest tiles first and the
# smallest last; BLOCK_M × warps of the resident forward. Loads are masked pointer loads that
# Triton does not pipeline, so one stage: more would only multiply the autotuner's compiles.
BLOCKED_CONFIGS = [(128, 64, 8), (64, 128, 8), (64, 64, 8), (64, 64, 4), (32, 64, 4), (32, 32, 8), (32, 32, 4),
                   (16, 16, 4)]
RESIDENT_CONFIGS = [(64, 8), (32, 8), (32, 4), (16, 8), (16, 4)]
# Where no candidate fits, each autotuned kernel runs the smallest tile with its partners, on
# the warps that spill least across the pair: the forward's (stats, cols) on 2, as ptxas
# spills ~7 KB per thread in the stats kernel at D = 256 on 4 warps under Triton 3.6; the
# backward's (rowdot, dq, dk) on 4, as dq and dk spill ~26 KB at D = 256 on 2 warps.
BLOCKED_FALLBACKS = {"colsum_fwd_stats_kernel": (16, 16, 2), "colsum_bwd_rowdot_kernel": (16, 16, 4)}


def blocked_shared_memory_bound(block_m: int, block_n: int, block_d: int, itemsize: int) -> int:
    """Bytes of shared memory that any blocked kernel needs at most for these tiles."""
    return max(block_m, block_n) * block_d * SHARED_BYTES_PER_TILE_ELEMENT[itemsize]


def register_arch(device: torch.device) -> int:
    """Which measured register bounds hold for a device: 8 (sm_80 and the other sm_8x) or 9
    (sm_90 and later, and the interpreter)."""
    if device.type != "cuda":
        return 9
    return 8 if torch.cuda.get_device_capability(device)[0] < 9 else 9


def blocked_registers_fit(block_m: int, block_n: int, block_d: int, num_warps: int, itemsize: int,
                          arch: int) -> bool:
    """Whether every blocked kernel keeps these tiles in registers without spilling."""
    if (block_m, block_n, num_warps) in OCCUPANCY_SPILLS.get((arch, itemsize, block_d), ()):
        return False
    elements = max(block_m, block_n) * block_d + block_m * block_n
    return elements <= BLOCKED_TILE_ELEMENTS_PER_THREAD[arch][itemsize] * 32 * num_warps


def resident_registers_fit(block_m: int, block_n: int, block_d: int, num_warps: int, itemsize: int) -> bool:
    """Whether the resident forward keeps its input and score tiles in registers without spilling."""
    if (block_m, num_warps) in RESIDENT_OCCUPANCY_SPILLS.get((itemsize, block_n, block_d), ()):
        return False
    threads = 32 * num_warps
    return (
        (block_m + block_n) * block_d <= RESIDENT_INPUT_ELEMENTS_PER_THREAD[itemsize] * threads
        and block_m * block_n <= RESIDENT_SCORE_ELEMENTS_PER_THREAD * threads
    )


def _blocked_config(block_m: int, block_n: int, num_warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=1)


def blocked_configs(interpret: bool = INTERPRET):
    """Autotune candidates; under the interpreter, where timing means nothing, the largest
    tiles, the largest fp32 ones and the smallest (for large head dims)."""
    candidates = [BLOCKED_CONFIGS[0], (32, 32, 8), BLOCKED_CONFIGS[-1]] if interpret else BLOCKED_CONFIGS
    return [_blocked_config(bm, bn, w) for bm, bn, w in candidates]


def _fit_blocked(kernel: str):
    """The pruning of ``kernel``'s candidates: drop tiles whose blocked kernels would spill
    registers or overflow the device's shared memory; if none fits, its fallback runs (and
    Triton reports OutOfResources where even that overflows)."""

    def fit(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        q = named_args["Q"]
        limit, arch = shared_memory_limit(q.device), register_arch(q.device)
        itemsize = q.element_size()
        fits = [
            c for c in configs
            if blocked_registers_fit(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, c.num_warps, itemsize, arch)
            and blocked_shared_memory_bound(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, itemsize) <= limit
        ]
        return fits or [_blocked_config(*BLOCKED_FALLBACKS[kernel])]

    return fit


BLOCKED_AUTOTUNE_KEY = ("N", "BLOCK_D", "PAIRED")


def blocked_autotune(kernel: str) -> dict:
    """``triton.autotune``'s arguments for the blocked (any-N) kernel ``kernel``."""
    return dict(
        configs=blocked_configs(),
        key=list(BLOCKED_AUTOTUNE_KEY),
        prune_configs_by={"early_config_prune": autotune.choose(_fit_blocked(kernel), kernel, BLOCKED_AUTOTUNE_KEY)},
        do_bench=autotune.do_bench(),
    )


def resident_configs(interpret: bool = INTERPRET):
    """Autotune candidates; under the interpreter 16 rows on 8 warps, which every resident tile fits."""
    candidates = [(16, 8)] if interpret else RESIDENT_CONFIGS
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1) for bm, w in candidates]


def _fit_resident(configs, named_args, **kwargs):
    """Keep the configs whose tiles fit the registers (``resident_fits`` made sure one does)."""
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    itemsize = named_args["Q"].element_size()
    return [c for c in configs if resident_registers_fit(c.kwargs["BLOCK_M"], block_n, block_d, c.num_warps, itemsize)]


RESIDENT_AUTOTUNE_KEY = ("N", "BLOCK_N", "BLOCK_D", "PAIRED")


def resident_autotune(kernel: str) -> dict:
    """``triton.autotune``'s arguments for the resident forward."""
    return dict(
        configs=resident_configs(),
        key=list(RESIDENT_AUTOTUNE_KEY),
        prune_configs_by={"early_config_prune": autotune.choose(_fit_resident, kernel, RESIDENT_AUTOTUNE_KEY)},
        do_bench=autotune.do_bench(),
    )


def block_d(head_dim: int) -> int:
    """BLOCK_D, the head-dim tile: D rounded up to a power of two, at least 16."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head dim must be ≤ {MAX_HEAD_DIM}, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def block_k(head_dim: int, dtype: torch.dtype) -> int:
    """The chunk of D a score product loads and multiplies at a time: all of it on tensor cores
    (16-bit inputs), FP32_BLOCK_K on FMAs (fp32)."""
    tile = block_d(head_dim)
    return min(tile, FP32_BLOCK_K) if dtype == torch.float32 else tile


def resident_fits(n: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether whole score rows of an (N, D) problem fit on chip for the one-pass forward."""
    block_n, tile = max(16, triton.next_power_of_2(n)), block_d(head_dim)
    return any(resident_registers_fit(bm, block_n, tile, w, dtype.itemsize) for bm, w in RESIDENT_CONFIGS)
