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
  with whole rows on chip (``resident_fits``: N ≤ 256 at D = 64 in 16 bits): one exp per
  score, exact row softmax, no second pass.
- ``colsum_fwd_stats_kernel`` then ``colsum_fwd_cols_kernel``: any N. Row statistics with an
  online max, then a program per column block sums P over row blocks (same tiles, so the
  recomputed scores agree bit for bit).
- ``colsum_bwd_rowdot_kernel`` (c and the backward's row normaliser), then
  ``colsum_bwd_dqk_kernel`` twice on the same tiles: dQ by row blocks, dK by column blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._layout import unit_stride_last_dim
from . import softmax_colsum_tiles as tiles
from .triton_device import input_precision

# What these kernels accept, read by the dispatcher (amflow_kernels/_dispatch.py).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = tiles.MAX_HEAD_DIM

LOG2E = tl.constexpr(math.log2(math.e))


# --------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, idx, idx_mask, stride_n, dims, dim_mask):
    """Rows ``idx`` of one (N, D) slice with unit stride along D; zeros past N and D."""
    ptrs = base + idx.to(tl.int64)[:, None] * stride_n + dims[None, :]
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


@triton.jit
def _frame_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, H, F):
    """(program id, b, f, h, q and k of frame f) of the program for (b, f, h), F frames a clip."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    f = (pid // H) % F
    b = pid // (H * F)
    q_base = Q + b * stride_qb + f * stride_qt + h * stride_qh
    return pid, b, f, h, q_base, K + b * stride_kb + f * stride_kt + h * stride_kh


@triton.jit
def _pair_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, H, P, offset):
    """(program id, q and k of frame p, q and k of frame p + Δ) of the program for (b, p, h)."""
    pid, _, _, _, q_a, k_a = _frame_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, H, P)
    offset = offset.to(tl.int64)  # int32 args: offset · stride would wrap past 2³¹ elements
    return pid, q_a, k_a, q_a + offset * stride_qt, k_a + offset * stride_kt


@triton.jit
def _product(acc, q, rows, row_mask, stride_qn, k, cols, col_mask, stride_kn, D,
             NEGATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc ± Q[rows] · K[cols]ᵀ in fp32, over D in chunks of BLOCK_K, each loaded as it is
    multiplied: an operand row holds BLOCK_K values in registers, not D (fp32 products run on
    FMAs, whose operands Triton keeps whole per thread)."""
    for d0 in tl.static_range(0, BLOCK_D, BLOCK_K):
        dims = d0 + tl.arange(0, BLOCK_K)
        dim_mask = dims < D
        q_tile = _load_tile(q, rows, row_mask, stride_qn, dims, dim_mask)
        if NEGATE:
            q_tile = -q_tile
        k_tile = _load_tile(k, cols, col_mask, stride_kn, dims, dim_mask)
        acc = tl.dot(q_tile, tl.trans(k_tile), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _scores(q, k, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D,
            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """S = Q[rows] · K[cols]ᵀ of one frame, fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return _product(acc, q, rows, row_mask, stride_qn, k, cols, col_mask, stride_kn, D, False, PRECISION,
                    BLOCK_D, BLOCK_K)


@triton.jit
def _pair_scores(q_a, k_a, q_b, k_b, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D,
                 PAIRED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """S_p − S_{p+Δ} (PAIRED) or S_p of a tile, each frame's product formed on its own, as the
    backward forms them to share a frame's product between its two pairs: every blocked kernel
    recomputes bitwise the same scores."""
    s = _scores(q_a, k_a, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D, PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    if PAIRED:
        s -= _scores(q_b, k_b, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D, PRECISION,
                     BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    return s


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.autotune(**tiles.resident_autotune("colsum_fwd_resident_kernel"))
@triton.jit(do_not_specialize=["N", "offset"])
def colsum_fwd_resident_kernel(
    Q, K, OUT, STATS,
    stride_qb, stride_qt, stride_qh, stride_qn,
    stride_kb, stride_kt, stride_kh, stride_kn,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, p, h, :] = Σ_i softmax_j(x)[i, :] for one (b, p, h), all N columns on chip.

    Grid: (B·P·H,). Each row block's scores z = scale·(Q_p K_pᵀ − Q_{p+Δ} K_{p+Δ}ᵀ)
    (or scale·Q_p K_pᵀ) span every column, so the row softmax is exact in one pass;
    its column sums accumulate in registers across row blocks. The paired difference is one
    product accumulated over both frames, [Q_p, −Q_{p+Δ}]·[K_p, K_{p+Δ}]ᵀ: a single fp32 score
    tile is live.
    """
    pid, q_a, k_a, q_b, k_b = _pair_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                                          H, P, offset)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        s = _scores(q_a, k_a, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
        if PAIRED:
            s = _product(s, q_b, rows, row_mask, stride_qn, k_b, cols, col_mask, stride_kn, D, True, PRECISION,
                         BLOCK_D, BLOCK_K)
        x = _logits(s * scale, col_mask, PAIRED)
        row_max = tl.max(x, 1)
        e = tl.exp2((x - row_max[:, None]) * LOG2E)
        row_sum = tl.sum(e, 1)
        colsum += tl.sum(e * tl.where(row_mask, 1.0 / row_sum, 0.0)[:, None], 0)
        _store_stats(STATS, pid * N, rows, row_mask, row_max, tl.log2(row_sum))
    tl.store(OUT + pid * N + cols, colsum.to(OUT.dtype.element_ty), mask=col_mask)


@triton.autotune(**tiles.blocked_autotune("colsum_fwd_stats_kernel"))
@triton.jit(do_not_specialize=["N", "offset"])
def colsum_fwd_stats_kernel(
    Q, K, STATS,
    stride_qb, stride_qt, stride_qh, stride_qn,
    stride_kb, stride_kt, stride_kh, stride_kn,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """stats[b, p, h, i] = (m_i, log2 Σ_j 2^{(x_ij − m_i)·log2 e}) for a row block.

    Grid: (B·P·H, ⌈N / BLOCK_M⌉). Online over column blocks with a running max m and sum
    s: s ← s·2^{(m − m')·log2 e} + Σ_j 2^{(x_ij − m')·log2 e}.
    """
    pid, q_a, k_a, q_b, k_b = _pair_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                                          H, P, offset)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        s = _pair_scores(q_a, k_a, q_b, k_b, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D, PAIRED,
                         PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
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
    stride_qb, stride_qt, stride_qh, stride_qn,
    stride_kb, stride_kt, stride_kh, stride_kn,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, p, h, j] = Σ_i P_ij for a column block, over row blocks, from the saved stats.

    Grid: (B·P·H, ⌈N / BLOCK_N⌉). The program owns its columns: a deterministic reduction.
    Launched with the tile config the stats kernel was tuned to, so both passes recompute
    bitwise-identical scores and every row of P sums to 1 even when |S| is large.
    """
    pid, q_a, k_a, q_b, k_b = _pair_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                                          H, P, offset)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        s = _pair_scores(q_a, k_a, q_b, k_b, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D, PAIRED,
                         PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
        row_max, row_log2sum = _load_stats(STATS, pid * N, rows, row_mask)
        prob = _probs(_logits(s * scale, col_mask, PAIRED), row_max, row_log2sum)
        colsum += tl.sum(tl.where(row_mask[:, None], prob, 0.0), 0)
    tl.store(OUT + pid * N + cols, colsum.to(OUT.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.autotune(**tiles.blocked_autotune("colsum_bwd_rowdot_kernel"))
@triton.jit(do_not_specialize=["N", "offset"])
def colsum_bwd_rowdot_kernel(
    Q, K, STATS, GRAD, C, STATS_BWD,
    stride_qb, stride_qt, stride_qh, stride_qn,
    stride_kb, stride_kt, stride_kh, stride_kn,
    H, P, N, D, offset, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[b, p, h, i] = Σ_j P_ij g_j / Σ_j P_ij, the softmax-backward row term, for a row block.

    Grid: (B·P·H, ⌈N / BLOCK_M⌉). P is recomputed from the forward's stats; its row mass
    Σ_j P_ij is 1 only up to the rounding of recomputed scores, which differ from the
    forward's by ulps of |S| (thousands in real ViTs). Nearly one-hot rows make g_j − c_i
    cancel and would let that error swamp the gradient, so c is divided by the mass, and
    stats_bwd = (m, l + log2 mass) is what the dq/dk kernels (launched with these tiles, so
    recomputing the same scores) normalise by.
    """
    pid, q_a, k_a, q_b, k_b = _pair_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                                          H, P, offset)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    row_max, row_log2sum = _load_stats(STATS, pid * N, rows, row_mask)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        s = _pair_scores(q_a, k_a, q_b, k_b, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D, PAIRED,
                         PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
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
def _frame_dscores(
    q_t, k_t, stride_qt, stride_kt, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D,
    t, P, offset, stat_prev, stat_cur, STATS, C, GRAD, scale,
    PAIRED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """E_t tile = ∂L/∂z^(t) − ∂L/∂z^(t−Δ) of frame t (rows × cols), scores recomputed.

    S_t is formed once for both pairs, S_{t+Δ} and S_{t−Δ} where the pairs exist.
    ``stat_cur``/``stat_prev`` index the (b, p, h) rows of stats, c and g for pairs t and t−Δ.
    Not PAIRED: E_t = ∂L/∂z^(t), the plain softmax-colsum score gradient.
    """
    s_cur = _scores(q_t, k_t, rows, row_mask, stride_qn, cols, col_mask, stride_kn, D, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    if PAIRED:
        e = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if t < P:
            s_next = _scores(q_t + offset * stride_qt, k_t + offset * stride_kt, rows, row_mask, stride_qn,
                             cols, col_mask, stride_kn, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
            e += _pair_dscores(
                (s_cur - s_next) * scale, stat_cur, STATS, C, GRAD, rows, row_mask, cols, col_mask, True
            )
        if t >= offset:
            s_prev = _scores(q_t - offset * stride_qt, k_t - offset * stride_kt, rows, row_mask, stride_qn,
                             cols, col_mask, stride_kn, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
            e -= _pair_dscores(
                (s_prev - s_cur) * scale, stat_prev, STATS, C, GRAD, rows, row_mask, cols, col_mask, True
            )
    else:
        e = _pair_dscores(s_cur * scale, stat_cur, STATS, C, GRAD, rows, row_mask, cols, col_mask, False)
    return e


@triton.jit(do_not_specialize=["N", "offset"])
def colsum_bwd_dqk_kernel(
    Q, K, STATS, GRAD, C, DQK,
    stride_qb, stride_qt, stride_qh, stride_qn,
    stride_kb, stride_kt, stride_kh, stride_kn,
    H, T, P, N, D, offset, scale,
    FOR_K: tl.constexpr, PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dQ_t[rows] = scale · Σ_j E_t[rows, j] K_t[j] for a block of BLOCK_M rows of frame t, or,
    FOR_K, dK_t[cols] = scale · Σ_i E_t[i, cols]ᵀ Q_t[i] for a block of BLOCK_N columns: the
    same E_t tiles, walked along the other axis.

    Grid: (B·T·H, ⌈N / block⌉). DQK is contiguous (B, T, H, N, D).
    """
    pid, b, t, h, q_t, k_t = _frame_bases(Q, K, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, H, T)
    offset = offset.to(tl.int64)  # int32 args: offset · stride would wrap past 2³¹ elements
    stat_cur = ((b * P + t) * H + h) * N  # the (b, p, h) rows of pairs t and t − Δ
    stat_prev = stat_cur - offset * H * N
    OWN: tl.constexpr = BLOCK_N if FOR_K else BLOCK_M  # the block this program writes
    WALKED: tl.constexpr = BLOCK_M if FOR_K else BLOCK_N
    own = tl.program_id(1) * OWN + tl.arange(0, OWN)
    own_mask = own < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    acc = tl.zeros([OWN, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, WALKED):
        walked = start + tl.arange(0, WALKED)
        walked_mask = walked < N
        if FOR_K:
            e = _frame_dscores(
                q_t, k_t, stride_qt, stride_kt, walked, walked_mask, stride_qn, own, own_mask, stride_kn, D,
                t, P, offset, stat_prev, stat_cur, STATS, C, GRAD, scale,
                PAIRED, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K,
            )
            q = _load_tile(q_t, walked, walked_mask, stride_qn, dims, dim_mask)
            acc += tl.dot(tl.trans(e).to(q.dtype), q, input_precision=PRECISION)
        else:
            e = _frame_dscores(
                q_t, k_t, stride_qt, stride_kt, own, own_mask, stride_qn, walked, walked_mask, stride_kn, D,
                t, P, offset, stat_prev, stat_cur, STATS, C, GRAD, scale,
                PAIRED, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K,
            )
            k = _load_tile(k_t, walked, walked_mask, stride_kn, dims, dim_mask)
            acc += tl.dot(e.to(k.dtype), k, input_precision=PRECISION)
    out = DQK + pid * N * D + own.to(tl.int64)[:, None] * D + dims[None, :]
    tl.store(out, (acc * scale).to(DQK.dtype.element_ty), mask=own_mask[:, None] & dim_mask[None, :])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _prefer_resident(q: torch.Tensor, programs: int) -> bool:
    """One-pass forward when it fits and its B·P·H programs fill the GPU; else two passes."""
    _, _, _, n, d = q.shape
    if not tiles.resident_fits(n, d, q.dtype):
        return False
    if q.device.type != "cuda":
        return True
    return programs >= 2 * torch.cuda.get_device_properties(q.device).multi_processor_count


def _strides(q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
    """The (b, t, h, n) strides of q and k that every kernel takes."""
    return (*q.stride()[:4], *k.stride()[:4])


def _shape_args(q, offset, scale, paired):
    """The keyword arguments every kernel takes after its strides."""
    _, _, h, n, d = q.shape
    return dict(
        H=h, N=n, D=d, offset=offset if paired else 0, scale=scale,
        PAIRED=paired, PRECISION=input_precision(q.dtype),
        BLOCK_D=tiles.block_d(d), BLOCK_K=tiles.block_k(d, q.dtype),
    )


def colsum_fwd(
    q: torch.Tensor, k: torch.Tensor, *, offset: int, paired: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of both ops on (B, T, H, N, D) q, k of any strides.

    Returns ``out`` (B, P, H, N) in q's dtype and the row statistics ``stats`` (B, P, H, N, 2)
    fp32, P = T − offset if ``paired`` else T. The one-pass (resident) or the two-pass
    kernels run as ``_prefer_resident`` decides.
    """
    q, k = unit_stride_last_dim(q), unit_stride_last_dim(k)
    b, t, h, n, _ = q.shape
    p = t - offset if paired else t
    out = torch.empty((b, p, h, n), dtype=q.dtype, device=q.device)
    stats = torch.empty((b, p, h, n, 2), dtype=torch.float32, device=q.device)
    programs = b * p * h
    if programs == 0:
        return out, stats
    strides = _strides(q, k)
    c = _shape_args(q, offset, scale, paired)
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
    q, k = unit_stride_last_dim(q), unit_stride_last_dim(k)
    b, t, h, n, _ = q.shape
    p = stats.shape[1]
    grad = grad.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    rowdot = torch.empty(stats.shape[:-1], dtype=torch.float32, device=q.device)
    stats_bwd = torch.empty_like(stats)
    if b * p * h == 0:
        return dq.zero_(), dk.zero_()
    strides = _strides(q, k)
    c = _shape_args(q, offset, scale, paired)
    pairs = b * p * h
    frames = b * t * h
    colsum_bwd_rowdot_kernel[lambda meta: (pairs, triton.cdiv(n, meta["BLOCK_M"]))](
        q, k, stats, grad, rowdot, stats_bwd, *strides, P=p, **c
    )
    tuned = colsum_bwd_rowdot_kernel.best_config
    launch = dict(**c, **tuned.kwargs, num_warps=tuned.num_warps, num_stages=tuned.num_stages)
    for out, for_k, block in ((dq, False, "BLOCK_M"), (dk, True, "BLOCK_N")):
        colsum_bwd_dqk_kernel[(frames, triton.cdiv(n, tuned.kwargs[block]))](
            q, k, stats_bwd, grad, rowdot, out, *strides, T=t, P=p, FOR_K=for_k, **launch
        )
    return dq, dk
