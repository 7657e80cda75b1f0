"""Fused Triton kernels for column sums of row softmaxes: AM flow and attention colsum.

Both ops are one computation. For a (clip, head) and an output index p, let

    z = scale · (S_p − S_{p+Δ})    and  x = |z|     (PAIRED: AM flow, p = 0 … T−1−Δ)
    z = scale · S_p                and  x = z       (not PAIRED: attention colsum, p = frame)

with S_t = Q_t K_tᵀ. The op returns out[p, j] = Σ_i softmax_j(x)[i, j]. Scores stay in natural
units, as PyTorch forms them; exponentials are 2^{(x − m_i)·log2 e} with the row max m_i
subtracted first, so nothing is rounded at the magnitude of the scores (which reaches the
thousands in real fp16 ViTs). The state kept for the backward is two fp32 row statistics,
stats[p, i] = (m_i, l_i) with l_i = log2 Σ_j 2^{(x_ij − m_i)·log2 e}: O(B·T·H·N), and no N×N
tile ever leaves the chip.

Backward, with P = softmax_j(x), g = ∂L/∂out and c_i = Σ_j P_ij g_j:

    ∂L/∂z_ij = sign(z_ij)^[PAIRED] · P_ij · (g_j − c_i)                        (natural units)

A frame t belongs to pair t (as first frame, S_t enters with +) and to pair t−Δ (as second
frame, with −), so its score gradient is E_t = ∂L/∂z^(t) − ∂L/∂z^(t−Δ) (a missing pair is 0)
and, as in a FlashAttention backward, dQ_t = scale · E_t K_t and dK_t = scale · E_tᵀ Q_t. The
score tiles of frames t−Δ, t, t+Δ are recomputed, S_t once for both pairs.

Kernels (every program owns disjoint outputs, so nothing uses atomics and every result is
bitwise reproducible):
- ``colsum_fwd_resident_kernel``: a program owns one (b, p, h) and loops over row blocks
  with whole rows on chip (N ≤ 512): one exp per score, exact row softmax, no second pass.
- ``colsum_fwd_stats_kernel`` then ``colsum_fwd_cols_kernel``: any N. Row statistics with an
  online max, then a program per column block sums P over row blocks (same tiles, so the
  recomputed scores agree bit for bit).
- ``colsum_bwd_rowdot_kernel`` (c and the backward's row normaliser), then
  ``colsum_bwd_dq_kernel`` and ``colsum_bwd_dk_kernel`` on the same tiles.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_device import INTERPRET, shared_memory_limit

LOG2E = tl.constexpr(math.log2(math.e))
MAX_HEAD_DIM = 256
# The resident forward keeps BLOCK_N (all columns) × BLOCK_D keys of two frames on chip
# (at most 64 KiB each) and two BLOCK_M × BLOCK_N fp32 score tiles in registers.
RESIDENT_MAX_BLOCK_N = 512
RESIDENT_MAX_KEY_TILE_BYTES = 64 * 1024
# Blocked kernels. A dependent kernel (cols after stats, dq and dk after rowdot) runs with its
# partner's tuned tiles, so both recompute bitwise-identical scores, outside the autotuner that
# would skip a config that does not fit; so the partners' candidates are pruned to those whose
# dependents fit the device's shared memory. The dq/dk kernels need the most: they hold three
# frames' q (or k) tiles and stream three more. Bound, measured on Triton's sm_80 and sm_90
# code for these kernels and checked by tests/test_triton_shared_memory.py: bytes per element
# of the larger q/k tile, max(BLOCK_M, BLOCK_N) × BLOCK_D, by the inputs' element size.
SHARED_BYTES_PER_TILE_ELEMENT = {2: 18, 4: 24}


def blocked_shared_memory_bound(block_m: int, block_n: int, block_d: int, itemsize: int) -> int:
    """Bytes of shared memory that any blocked kernel needs at most for these tiles."""
    return max(block_m, block_n) * block_d * SHARED_BYTES_PER_TILE_ELEMENT[itemsize]


def _configs(block_pairs, warps, stages):
    """Autotune candidates, largest tiles first and smallest last. Under the interpreter,
    where timing means nothing, only the first and the last (for large head dims)."""
    if INTERPRET:
        block_pairs, warps, stages = [block_pairs[0], block_pairs[-1]], warps[:1], stages[:1]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in block_pairs
        for w in warps
        for s in stages
    ]


def _fit_shared_memory(configs, named_args, **kwargs):
    """Drop tiles whose blocked kernels would overflow the device's shared memory; if none
    fits, the smallest runs and Triton reports OutOfResources."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    q = named_args["Q"]
    limit = shared_memory_limit(q.device)
    fits = [
        c for c in configs
        if blocked_shared_memory_bound(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, q.element_size()) <= limit
    ]
    return fits or configs[-1:]


def _untimed(kernel_call, quantiles):
    """The interpreter's benchmark: every config ties, so the first left by pruning runs
    (Triton before 3.8 would time even a single config, on a GPU driver it lacks)."""
    return [0.0] * len(quantiles)


def _blocked_autotune():
    """The autotune arguments shared by the blocked (any-N) kernels."""
    return dict(
        configs=_configs([(64, 64), (128, 64), (64, 128), (32, 64), (32, 32), (16, 16)], [4, 8], [1, 2]),
        key=["N", "BLOCK_D", "PAIRED"],
        prune_configs_by={"early_config_prune": _fit_shared_memory},
        do_bench=_untimed if INTERPRET else None,
    )


def _resident_configs():
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
        for bm in ((16,) if INTERPRET else (16, 32, 64))
        for w in ((4,) if INTERPRET else (4, 8))
    ]


def _fit_resident(configs, named_args, **kwargs):
    """Keep the two fp32 BLOCK_M × BLOCK_N score tiles within the register file."""
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_n <= 16384]
    return kept or configs[:1]


# --------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, idx, idx_mask, stride_n, dims, dim_mask, stride_d):
    """Rows ``idx`` of one (N, D) slice read through its strides; zeros past N and D."""
    ptrs = base + idx.to(tl.int64)[:, None] * stride_n + dims[None, :] * stride_d
    return tl.load(ptrs, mask=idx_mask[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def _logits(z, col_mask, PAIRED: tl.constexpr):
    """x = |z| (PAIRED) or z, set to −inf on columns past N."""
    if PAIRED:
        z = tl.abs(z)
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def _probs(x, row_max, row_log2sum):
    """P_ij = 2^{(x_ij − m_i)·log2 e − l_i} from the saved row statistics."""
    return tl.exp2((x - row_max[:, None]) * LOG2E - row_log2sum[:, None])


@triton.jit
def _load_stats(STATS, base, rows, row_mask):
    """(m, l) of ``rows`` from a (…, N, 2) fp32 stats tensor; (0, 0) past N."""
    ptrs = STATS + 2 * (base + rows)
    return tl.load(ptrs, mask=row_mask, other=0.0), tl.load(ptrs + 1, mask=row_mask, other=0.0)


@triton.jit
def _store_stats(STATS, base, rows, row_mask, row_max, row_log2sum):
    ptrs = STATS + 2 * (base + rows)
    tl.store(ptrs, row_max, mask=row_mask)
    tl.store(ptrs + 1, row_log2sum, mask=row_mask)


@triton.jit
def _dscores(z, row_max, row_log2sum, c, g, row_mask, col_mask, PAIRED: tl.constexpr):
    """∂L/∂z of one tile: sign(z)·P·(g_j − c_i), zero outside N × N."""
    prob = _probs(_logits(z, col_mask, PAIRED), row_max, row_log2sum)
    ds = prob * (g[None, :] - c[:, None])
    if PAIRED:
        ds = tl.where(z > 0, ds, tl.where(z < 0, -ds, 0.0))
    return tl.where(row_mask[:, None] & col_mask[None, :], ds, 0.0)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.autotune(
    configs=_resident_configs(),
    key=["N", "BLOCK_N", "BLOCK_D", "PAIRED"],
    prune_configs_by={"early_config_prune": _fit_resident},
)
@triton.jit(do_not_specialize=["N", "offset"])
def colsum_fwd_resident_kernel(
    Q, K, OUT, STATS,
    stride_qb, stride_qt, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kn, stride_kd,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, p, h, :] = Σ_i softmax_j(x)[i, :] for one (b, p, h), all N columns on chip.

    Grid: (B·P·H,). Each row block's scores z = scale·(Q_p K_pᵀ − Q_{p+Δ} K_{p+Δ}ᵀ)
    (or scale·Q_p K_pᵀ) span every column, so the row softmax is exact in one pass;
    its column sums accumulate in registers across row blocks.
    """
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    p = (pid // H) % P
    b = pid // (H * P)
    q_a = Q + b * stride_qb + p * stride_qt + h * stride_qh
    k_a = K + b * stride_kb + p * stride_kt + h * stride_kh
    q_b = q_a + offset * stride_qt
    k_b = k_a + offset * stride_kt

    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        q = _load_tile(q_a, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
        k = _load_tile(k_a, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if PAIRED:
            q = _load_tile(q_b, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
            k = _load_tile(k_b, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
            s -= tl.dot(q, tl.trans(k), input_precision=PRECISION)
        x = _logits(s * scale, col_mask, PAIRED)
        row_max = tl.max(x, 1)
        e = tl.exp2((x - row_max[:, None]) * LOG2E)
        row_sum = tl.sum(e, 1)
        prob = e * (1.0 / row_sum)[:, None]
        colsum += tl.sum(tl.where(row_mask[:, None], prob, 0.0), 0)
        _store_stats(STATS, pid * N, rows, row_mask, row_max, tl.log2(row_sum))
    tl.store(OUT + pid * N + cols, colsum.to(OUT.dtype.element_ty), mask=col_mask)


@triton.autotune(**_blocked_autotune())
@triton.jit(do_not_specialize=["N", "offset"])
def colsum_fwd_stats_kernel(
    Q, K, STATS,
    stride_qb, stride_qt, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kn, stride_kd,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """stats[b, p, h, i] = (m_i, log2 Σ_j 2^{(x_ij − m_i)·log2 e}) for a row block.

    Grid: (B·P·H, ⌈N / BLOCK_M⌉). Online over column blocks with a running max m and sum
    s: s ← s·2^{(m − m')·log2 e} + Σ_j 2^{(x_ij − m')·log2 e}.
    """
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    p = (pid // H) % P
    b = pid // (H * P)
    q_a = Q + b * stride_qb + p * stride_qt + h * stride_qh
    k_a = K + b * stride_kb + p * stride_kt + h * stride_kh
    q_b = q_a + offset * stride_qt
    k_b = k_a + offset * stride_kt

    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    qa = _load_tile(q_a, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
    qb = qa
    if PAIRED:
        qb = _load_tile(q_b, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k = _load_tile(k_a, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
        s = tl.dot(qa, tl.trans(k), input_precision=PRECISION)
        if PAIRED:
            k = _load_tile(k_b, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
            s -= tl.dot(qb, tl.trans(k), input_precision=PRECISION)
        x = _logits(s * scale, col_mask, PAIRED)
        new_max = tl.maximum(row_max, tl.max(x, 1))
        row_sum = row_sum * tl.exp2((row_max - new_max) * LOG2E) + tl.sum(
            tl.exp2((x - new_max[:, None]) * LOG2E), 1
        )
        row_max = new_max
    _store_stats(STATS, pid * N, rows, row_mask, row_max, tl.log2(row_sum))


@triton.jit(do_not_specialize=["N", "offset"])
def colsum_fwd_cols_kernel(
    Q, K, STATS, OUT,
    stride_qb, stride_qt, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kn, stride_kd,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, p, h, j] = Σ_i P_ij for a column block, over row blocks, from the saved stats.

    Grid: (B·P·H, ⌈N / BLOCK_N⌉). The program owns its columns: a deterministic reduction.
    Launched with the tile config the stats kernel was tuned to, so both passes recompute
    bitwise-identical scores and every row of P sums to 1 even when |S| is large.
    """
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    p = (pid // H) % P
    b = pid // (H * P)
    q_a = Q + b * stride_qb + p * stride_qt + h * stride_qh
    k_a = K + b * stride_kb + p * stride_kt + h * stride_kh
    q_b = q_a + offset * stride_qt
    k_b = k_a + offset * stride_kt

    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    ka = _load_tile(k_a, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
    kb = ka
    if PAIRED:
        kb = _load_tile(k_b, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        q = _load_tile(q_a, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
        s = tl.dot(q, tl.trans(ka), input_precision=PRECISION)
        if PAIRED:
            q = _load_tile(q_b, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
            s -= tl.dot(q, tl.trans(kb), input_precision=PRECISION)
        row_max, row_log2sum = _load_stats(STATS, pid * N, rows, row_mask)
        prob = _probs(_logits(s * scale, col_mask, PAIRED), row_max, row_log2sum)
        colsum += tl.sum(tl.where(row_mask[:, None], prob, 0.0), 0)
    tl.store(OUT + pid * N + cols, colsum.to(OUT.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.autotune(**_blocked_autotune())
@triton.jit(do_not_specialize=["N", "offset"])
def colsum_bwd_rowdot_kernel(
    Q, K, STATS, GRAD, C, STATS_BWD,
    stride_qb, stride_qt, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kn, stride_kd,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """c[b, p, h, i] = Σ_j P_ij g_j / Σ_j P_ij, the softmax-backward row term, for a row block.

    Grid: (B·P·H, ⌈N / BLOCK_M⌉). P is recomputed from the forward's stats; its row mass
    Σ_j P_ij is 1 only up to the rounding of recomputed scores, which differ from the
    forward's by ulps of |S| (thousands in real ViTs). Nearly one-hot rows make g_j − c_i
    cancel and would let that error swamp the gradient, so c is divided by the mass, and
    stats_bwd = (m, l + log2 mass) is what the dq/dk kernels (launched with these tiles, so
    recomputing the same scores) normalise by.
    """
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    p = (pid // H) % P
    b = pid // (H * P)
    q_a = Q + b * stride_qb + p * stride_qt + h * stride_qh
    k_a = K + b * stride_kb + p * stride_kt + h * stride_kh
    q_b = q_a + offset * stride_qt
    k_b = k_a + offset * stride_kt

    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    qa = _load_tile(q_a, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
    qb = qa
    if PAIRED:
        qb = _load_tile(q_b, rows, row_mask, stride_qn, dims, dim_mask, stride_qd)
    row_max, row_log2sum = _load_stats(STATS, pid * N, rows, row_mask)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k = _load_tile(k_a, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
        s = tl.dot(qa, tl.trans(k), input_precision=PRECISION)
        if PAIRED:
            k = _load_tile(k_b, cols, col_mask, stride_kn, dims, dim_mask, stride_kd)
            s -= tl.dot(qb, tl.trans(k), input_precision=PRECISION)
        prob = _probs(_logits(s * scale, col_mask, PAIRED), row_max, row_log2sum)
        g = tl.load(GRAD + pid * N + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(col_mask[None, :], prob * g[None, :], 0.0), 1)
        mass += tl.sum(prob, 1)
    tl.store(C + pid * N + rows, acc / mass, mask=row_mask)
    _store_stats(STATS_BWD, pid * N, rows, row_mask, row_max, row_log2sum + tl.log2(mass))


@triton.jit
def _pair_dscores(z, base, STATS, C, GRAD, rows, row_mask, cols, col_mask, PAIRED: tl.constexpr):
    """∂L/∂z of the (b, p, h) whose stats, c and g rows start at ``base``."""
    row_max, row_log2sum = _load_stats(STATS, base, rows, row_mask)
    c = tl.load(C + base + rows, mask=row_mask, other=0.0)
    g = tl.load(GRAD + base + cols, mask=col_mask, other=0.0).to(tl.float32)
    return _dscores(z, row_max, row_log2sum, c, g, row_mask, col_mask, PAIRED)


@triton.jit
def _frame_tiles(base, stride_t, idx, idx_mask, stride_n, dims, dim_mask, stride_d, t, P, offset,
                 PAIRED: tl.constexpr):
    """Tiles of frames t−Δ, t and t+Δ (the frames paired with t); ``cur`` stands in for a
    frame that does not exist (its pair is skipped by ``_frame_dscores``)."""
    cur = _load_tile(base, idx, idx_mask, stride_n, dims, dim_mask, stride_d)
    prev = cur
    succ = cur
    if PAIRED:
        if t >= offset:
            prev = _load_tile(base - offset * stride_t, idx, idx_mask, stride_n, dims, dim_mask, stride_d)
        if t < P:
            succ = _load_tile(base + offset * stride_t, idx, idx_mask, stride_n, dims, dim_mask, stride_d)
    return prev, cur, succ


@triton.jit
def _frame_dscores(
    q_prev, q_cur, q_next, k_prev, k_cur, k_next, t, P, offset, stat_prev, stat_cur,
    STATS, C, GRAD, rows, row_mask, cols, col_mask, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
):
    """E_t tile = ∂L/∂z^(t) − ∂L/∂z^(t−Δ) of frame t (rows × cols), scores recomputed.

    S_t is formed once for both pairs. ``stat_cur``/``stat_prev`` index the (b, p, h) rows
    of stats, c and g for pairs t and t−Δ. Not PAIRED: E_t = ∂L/∂z^(t), the plain
    softmax-colsum score gradient.
    """
    s_cur = tl.dot(q_cur, tl.trans(k_cur), input_precision=PRECISION)
    if PAIRED:
        e = tl.zeros(s_cur.shape, dtype=tl.float32)
        if t < P:
            s_next = tl.dot(q_next, tl.trans(k_next), input_precision=PRECISION)
            e += _pair_dscores(
                (s_cur - s_next) * scale, stat_cur, STATS, C, GRAD, rows, row_mask, cols, col_mask, True
            )
        if t >= offset:
            s_prev = tl.dot(q_prev, tl.trans(k_prev), input_precision=PRECISION)
            e -= _pair_dscores(
                (s_prev - s_cur) * scale, stat_prev, STATS, C, GRAD, rows, row_mask, cols, col_mask, True
            )
    else:
        e = _pair_dscores(s_cur * scale, stat_cur, STATS, C, GRAD, rows, row_mask, cols, col_mask, False)
    return e


@triton.jit(do_not_specialize=["N", "offset"])
def colsum_bwd_dq_kernel(
    Q, K, STATS, GRAD, C, DQ,
    stride_qb, stride_qt, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kn, stride_kd,
    H, T, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ_t[rows] = scale · Σ_j E_t[rows, j] K_t[j] for a row block of frame t.

    Grid: (B·T·H, ⌈N / BLOCK_M⌉). DQ is contiguous (B, T, H, N, D).
    """
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    t = (pid // H) % T
    b = pid // (H * T)
    q_t = Q + b * stride_qb + t * stride_qt + h * stride_qh
    k_t = K + b * stride_kb + t * stride_kt + h * stride_kh
    stat_cur = ((b * P + t) * H + h) * N
    stat_prev = ((b * P + t - offset) * H + h) * N

    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    q_prev, q_cur, q_next = _frame_tiles(
        q_t, stride_qt, rows, row_mask, stride_qn, dims, dim_mask, stride_qd, t, P, offset, PAIRED
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k_prev, k_cur, k_next = _frame_tiles(
            k_t, stride_kt, cols, col_mask, stride_kn, dims, dim_mask, stride_kd, t, P, offset, PAIRED
        )
        e = _frame_dscores(
            q_prev, q_cur, q_next, k_prev, k_cur, k_next, t, P, offset, stat_prev, stat_cur,
            STATS, C, GRAD, rows, row_mask, cols, col_mask, scale, PAIRED, PRECISION,
        )
        acc += tl.dot(e.to(k_cur.dtype), k_cur, input_precision=PRECISION)
    dq = DQ + pid * N * D + rows.to(tl.int64)[:, None] * D + dims[None, :]
    tl.store(dq, (acc * scale).to(DQ.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit(do_not_specialize=["N", "offset"])
def colsum_bwd_dk_kernel(
    Q, K, STATS, GRAD, C, DK,
    stride_qb, stride_qt, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kn, stride_kd,
    H, T, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK_t[cols] = scale · Σ_i E_t[i, cols]ᵀ Q_t[i] for a column block of frame t.

    Grid: (B·T·H, ⌈N / BLOCK_N⌉). DK is contiguous (B, T, H, N, D).
    """
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    t = (pid // H) % T
    b = pid // (H * T)
    q_t = Q + b * stride_qb + t * stride_qt + h * stride_qh
    k_t = K + b * stride_kb + t * stride_kt + h * stride_kh
    stat_cur = ((b * P + t) * H + h) * N
    stat_prev = ((b * P + t - offset) * H + h) * N

    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    k_prev, k_cur, k_next = _frame_tiles(
        k_t, stride_kt, cols, col_mask, stride_kn, dims, dim_mask, stride_kd, t, P, offset, PAIRED
    )
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        q_prev, q_cur, q_next = _frame_tiles(
            q_t, stride_qt, rows, row_mask, stride_qn, dims, dim_mask, stride_qd, t, P, offset, PAIRED
        )
        e = _frame_dscores(
            q_prev, q_cur, q_next, k_prev, k_cur, k_next, t, P, offset, stat_prev, stat_cur,
            STATS, C, GRAD, rows, row_mask, cols, col_mask, scale, PAIRED, PRECISION,
        )
        acc += tl.dot(tl.trans(e).to(q_cur.dtype), q_cur, input_precision=PRECISION)
    dk = DK + pid * N * D + cols.to(tl.int64)[:, None] * D + dims[None, :]
    tl.store(dk, (acc * scale).to(DK.dtype.element_ty), mask=col_mask[:, None] & dim_mask[None, :])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head dim must be ≤ {MAX_HEAD_DIM}, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products: TF32 would lose the small differences
    # S_t − S_{t+Δ} of two large score maps.
    return "ieee" if dtype == torch.float32 else "tf32"


def resident_fits(n: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether whole score rows of an (N, D) problem fit on chip for the one-pass forward."""
    block_n = max(16, triton.next_power_of_2(n))
    key_tile_bytes = block_n * _block_d(head_dim) * dtype.itemsize
    return block_n <= RESIDENT_MAX_BLOCK_N and key_tile_bytes <= RESIDENT_MAX_KEY_TILE_BYTES


def _prefer_resident(q: torch.Tensor, programs: int) -> bool:
    """One-pass forward when it fits and its B·P·H programs fill the GPU; else two passes."""
    _, _, _, n, d = q.shape
    if not resident_fits(n, d, q.dtype):
        return False
    if q.device.type != "cuda":
        return True
    return programs >= 2 * torch.cuda.get_device_properties(q.device).multi_processor_count


def _shape_args(q, k, offset, scale, paired):
    """The keyword arguments every kernel takes after its strides."""
    _, _, h, n, d = q.shape
    return dict(
        H=h, N=n, D=d, offset=offset if paired else 0, scale=scale,
        PAIRED=paired, PRECISION=_precision(q.dtype), BLOCK_D=_block_d(d),
    )


def colsum_fwd(
    q: torch.Tensor, k: torch.Tensor, *, offset: int, paired: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of both ops on (B, T, H, N, D) q, k of any strides.

    Returns ``out`` (B, P, H, N) in q's dtype and the row statistics ``stats`` (B, P, H, N, 2)
    fp32, P = T − offset if ``paired`` else T. The one-pass (resident) or the two-pass
    kernels run as ``_prefer_resident`` decides.
    """
    b, t, h, n, _ = q.shape
    p = t - offset if paired else t
    out = torch.empty((b, p, h, n), dtype=q.dtype, device=q.device)
    stats = torch.empty((b, p, h, n, 2), dtype=torch.float32, device=q.device)
    programs = b * p * h
    if programs == 0:
        return out, stats
    strides = (*q.stride(), *k.stride())
    c = _shape_args(q, k, offset, scale, paired)
    if _prefer_resident(q, programs):
        block_n = max(16, triton.next_power_of_2(n))
        colsum_fwd_resident_kernel[(programs,)](q, k, out, stats, *strides, P=p, BLOCK_N=block_n, **c)
        return out, stats
    colsum_fwd_stats_kernel[lambda meta: (programs, triton.cdiv(n, meta["BLOCK_M"]))](
        q, k, stats, *strides, P=p, **c
    )
    tuned = colsum_fwd_stats_kernel.best_config
    colsum_fwd_cols_kernel[(programs, triton.cdiv(n, tuned.kwargs["BLOCK_N"]))](
        q, k, stats, out, *strides, P=p, **c, **tuned.kwargs,
        num_warps=tuned.num_warps, num_stages=tuned.num_stages,
    )
    return out, stats


def colsum_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor, *,
    offset: int, paired: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`colsum_fwd`: (dq, dk), contiguous (B, T, H, N, D) in q's dtype."""
    b, t, h, n, _ = q.shape
    p = stats.shape[1]
    grad = grad.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    rowdot = torch.empty(stats.shape[:-1], dtype=torch.float32, device=q.device)
    stats_bwd = torch.empty_like(stats)
    if b * p * h == 0:
        return dq.zero_(), dk.zero_()
    strides = (*q.stride(), *k.stride())
    c = _shape_args(q, k, offset, scale, paired)
    pairs = b * p * h
    frames = b * t * h
    colsum_bwd_rowdot_kernel[lambda meta: (pairs, triton.cdiv(n, meta["BLOCK_M"]))](
        q, k, stats, grad, rowdot, stats_bwd, *strides, P=p, **c
    )
    tuned = colsum_bwd_rowdot_kernel.best_config
    launch = dict(**c, **tuned.kwargs, num_warps=tuned.num_warps, num_stages=tuned.num_stages)
    colsum_bwd_dq_kernel[(frames, triton.cdiv(n, tuned.kwargs["BLOCK_M"]))](
        q, k, stats_bwd, grad, rowdot, dq, *strides, T=t, P=p, **launch
    )
    colsum_bwd_dk_kernel[(frames, triton.cdiv(n, tuned.kwargs["BLOCK_N"]))](
        q, k, stats_bwd, grad, rowdot, dk, *strides, T=t, P=p, **launch
    )
    return dq, dk
