"""Fused Triton kernels for attention that also returns the attention each key receives.

For one (batch, head), with x = scale · Q Kᵀ + 1 bᵀ (b: the per-key bias, −inf masking a key)
and P = softmax_j(x):

    out = P V,        colsum_j = Σ_{i < R} P_ij        (R = colsum_rows ≤ Nq)

Forward, FlashAttention's online softmax: a program owns a block of query rows and walks the
key blocks with a running max m and sum s (s ← s·2^{(m − m')·log2 e} + Σ_j 2^{(x_ij − m')·log2 e},
the output rescaled alike), then stores out = acc / s and the fp32 row statistics
stats_i = (m_i, l_i = log2 s_i). P is never written: ``attention_colsum_kernel`` owns a block of
keys and sums P_ij = 2^{(x_ij − m_i)·log2 e − l_i} over the first R rows, recomputing the scores.

Backward. With g = ∂L/∂colsum and dO = ∂L/∂out, the two outputs meet in one score gradient:

    dP_ij = dO_i · v_j + g_j [i < R],      δ_i = Σ_j P_ij dP_ij = dO_i · out_i + [i < R] Σ_j P_ij g_j,
    dS_ij = P_ij (dP_ij − δ_i),

(the softmax's Jacobian applied to dP) and then, as in any attention backward,

    dQ = scale · dS K,    dK = scale · dSᵀ Q,    dV = Pᵀ dO,    db_j = Σ_i dS_ij.

``attention_bwd_rowdot_kernel`` forms δ (its colsum term is a pass over the keys, only for row
blocks below R), ``attention_bwd_dkv_kernel`` dK, dV and db by key blocks and
``attention_bwd_dq_kernel`` dQ by query blocks. Every program owns disjoint outputs, so there are
no atomics and every result is bitwise reproducible; all kernels of a call form each score tile
Q[rows] K[cols]ᵀ with the same tile shapes, so they recompute the forward's scores bit for bit
and the recomputed rows of P sum to 1 as the forward's statistics say.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._layout import unit_stride_last_dim
from .triton_device import input_precision

# What these kernels accept, read by the dispatcher (amflow_kernels/_dispatch.py): each of D and Dv.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def _head_base(X, stride_b, stride_h, H):
    """X's (N, C) slice of the (batch, head) of program axis 0."""
    zh = tl.program_id(0).to(tl.int64)
    return X + (zh // H) * stride_b + (zh % H) * stride_h


@triton.jit
def _load_rows(base, idx, idx_mask, stride_n, C, BLOCK_C: tl.constexpr):
    """Rows ``idx`` of an (N, C) slice with unit stride along C; zeros past N and C."""
    dims = tl.arange(0, BLOCK_C)
    ptrs = base + idx.to(tl.int64)[:, None] * stride_n + dims[None, :]
    return tl.load(ptrs, mask=idx_mask[:, None] & (dims < C)[None, :], other=0.0)


@triton.jit
def _logits(q, k, BIAS, cols, col_mask, scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """x = scale · q kᵀ (+ b_j) of a (rows, cols) tile, −inf on columns past Nk."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_BIAS:
        x += tl.load(BIAS + cols, mask=col_mask, other=0.0)[None, :]
    return tl.where(col_mask[None, :], x, float("-inf"))


@triton.jit
def _probs(x, STATS, rows, row_mask, cols, col_mask):
    """P of a tile from the saved (m, l), zero outside Nq × Nk."""
    row_max = tl.load(STATS + 2 * rows, mask=row_mask, other=0.0)
    row_log2sum = tl.load(STATS + 2 * rows + 1, mask=row_mask, other=0.0)
    prob = tl.exp2((x - row_max[:, None]) * LOG2E - row_log2sum[:, None])
    return tl.where(row_mask[:, None] & col_mask[None, :], prob, 0.0)


@triton.jit(do_not_specialize=["NQ", "NK", "ROWS"])
def attention_fwd_kernel(
    Q, K, V, BIAS, OUT, STATS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, NQ, NK, D, DV, scale,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out[rows] = Σ_j P_ij v_j and stats[rows] = (m, log2 Σ_j 2^{(x_ij − m)·log2 e}) for a block
    of query rows, online over the key blocks. Grid: (B·H, ⌈Nq / BLOCK_M⌉); OUT is contiguous
    (B, H, Nq, Dv), STATS (B, H, Nq, 2), BIAS (B·H, Nk)."""
    zh = tl.program_id(0).to(tl.int64)
    q_base = _head_base(Q, stride_qb, stride_qh, H)
    k_base = _head_base(K, stride_kb, stride_kh, H)
    v_base = _head_base(V, stride_vb, stride_vh, H)
    bias = BIAS + zh * NK
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NQ
    q = _load_rows(q_base, rows, row_mask, stride_qn, D, BLOCK_D)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < NK
        k = _load_rows(k_base, cols, col_mask, stride_kn, D, BLOCK_D)
        x = _logits(q, k, bias, cols, col_mask, scale, HAS_BIAS, PRECISION)
        new_max = tl.maximum(row_max, tl.max(x, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row masked so far stays 0
        prob = tl.exp2((x - shift[:, None]) * LOG2E)
        rescale = tl.exp2((row_max - shift) * LOG2E)
        row_sum = row_sum * rescale + tl.sum(prob, 1)
        v = _load_rows(v_base, cols, col_mask, stride_vn, DV, BLOCK_DV)
        acc = acc * rescale[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    row_sum = tl.where(row_mask, row_sum, 1.0)  # rows past Nq: no 0 / 0 (a row every key masks is NaN, as in SDPA)
    dvs = tl.arange(0, BLOCK_DV)
    out = OUT + (zh * NQ + rows.to(tl.int64))[:, None] * DV + dvs[None, :]
    tl.store(out, (acc / row_sum[:, None]).to(OUT.dtype.element_ty), mask=row_mask[:, None] & (dvs < DV)[None, :])
    stats = STATS + 2 * (zh * NQ + rows)
    tl.store(stats, row_max, mask=row_mask)
    tl.store(stats + 1, tl.log2(row_sum), mask=row_mask)


@triton.jit(do_not_specialize=["NQ", "NK", "ROWS"])
def attention_colsum_kernel(
    Q, K, BIAS, STATS, COLSUM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    H, NQ, NK, D, ROWS, scale,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """colsum[cols] = Σ_{i < ROWS} P_ij for a block of keys, from the forward's stats.
    Grid: (B·H, ⌈Nk / BLOCK_N⌉); COLSUM is contiguous (B, H, Nk) fp32."""
    zh = tl.program_id(0).to(tl.int64)
    q_base = _head_base(Q, stride_qb, stride_qh, H)
    k_base = _head_base(K, stride_kb, stride_kh, H)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < NK
    k = _load_rows(k_base, cols, col_mask, stride_kn, D, BLOCK_D)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < ROWS
        q = _load_rows(q_base, rows, row_mask, stride_qn, D, BLOCK_D)
        x = _logits(q, k, BIAS + zh * NK, cols, col_mask, scale, HAS_BIAS, PRECISION)
        colsum += tl.sum(_probs(x, STATS + 2 * zh * NQ, rows, row_mask, cols, col_mask), 0)
    tl.store(COLSUM + zh * NK + cols, colsum, mask=col_mask)


@triton.jit(do_not_specialize=["NQ", "NK", "ROWS"])
def attention_bwd_rowdot_kernel(
    Q, K, BIAS, OUT, GRAD_OUT, GRAD_COLSUM, STATS, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    H, NQ, NK, D, DV, ROWS, scale,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """δ_i = dO_i · out_i + [i < ROWS] Σ_j P_ij g_j for a block of query rows.
    Grid: (B·H, ⌈Nq / BLOCK_M⌉); OUT and GRAD_OUT contiguous (B, H, Nq, Dv), DELTA (B, H, Nq)."""
    zh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NQ
    out = _load_rows(OUT + zh * NQ * DV, rows, row_mask, DV, DV, BLOCK_DV).to(tl.float32)
    grad = _load_rows(GRAD_OUT + zh * NQ * DV, rows, row_mask, DV, DV, BLOCK_DV).to(tl.float32)
    delta = tl.sum(out * grad, 1)
    if tl.program_id(1) * BLOCK_M < ROWS:
        q_base = _head_base(Q, stride_qb, stride_qh, H)
        k_base = _head_base(K, stride_kb, stride_kh, H)
        colsum_rows = rows < ROWS
        q = _load_rows(q_base, rows, colsum_rows, stride_qn, D, BLOCK_D)
        for start in range(0, NK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < NK
            k = _load_rows(k_base, cols, col_mask, stride_kn, D, BLOCK_D)
            x = _logits(q, k, BIAS + zh * NK, cols, col_mask, scale, HAS_BIAS, PRECISION)
            prob = _probs(x, STATS + 2 * zh * NQ, rows, colsum_rows, cols, col_mask)
            g = tl.load(GRAD_COLSUM + zh * NK + cols, mask=col_mask, other=0.0)
            delta += tl.sum(prob * g[None, :], 1)
    tl.store(DELTA + zh * NQ + rows, delta, mask=row_mask)


@triton.jit
def _dscores(q, k, v, grad, BIAS, STATS, DELTA, GRAD_COLSUM, rows, row_mask, cols, col_mask, ROWS, scale,
             HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """(P, dS) of a (rows, cols) tile: dS = P (dO vᵀ + g [i < ROWS] − δ)."""
    x = _logits(q, k, BIAS, cols, col_mask, scale, HAS_BIAS, PRECISION)
    prob = _probs(x, STATS, rows, row_mask, cols, col_mask)
    dprob = tl.dot(grad, tl.trans(v), input_precision=PRECISION)
    g = tl.load(GRAD_COLSUM + cols, mask=col_mask, other=0.0)
    dprob += tl.where((rows < ROWS)[:, None], g[None, :], 0.0)
    delta = tl.load(DELTA + rows, mask=row_mask, other=0.0)
    return prob, prob * (dprob - delta[:, None])


@triton.jit(do_not_specialize=["NQ", "NK", "ROWS"])
def attention_bwd_dkv_kernel(
    Q, K, V, BIAS, GRAD_OUT, GRAD_COLSUM, STATS, DELTA, DK, DV_OUT, DBIAS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, NQ, NK, D, DV, ROWS, scale,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK[cols] = scale · Σ_i dS_ij q_i, dV[cols] = Σ_i P_ij dO_i and db[cols] = Σ_i dS_ij for a
    block of keys, over the query blocks. Grid: (B·H, ⌈Nk / BLOCK_N⌉); DK, DV_OUT contiguous
    (B, H, Nk, ·), DBIAS (B·H, Nk) fp32."""
    zh = tl.program_id(0).to(tl.int64)
    q_base = _head_base(Q, stride_qb, stride_qh, H)
    k_base = _head_base(K, stride_kb, stride_kh, H)
    v_base = _head_base(V, stride_vb, stride_vh, H)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < NK
    k = _load_rows(k_base, cols, col_mask, stride_kn, D, BLOCK_D)
    v = _load_rows(v_base, cols, col_mask, stride_vn, DV, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, NQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < NQ
        q = _load_rows(q_base, rows, row_mask, stride_qn, D, BLOCK_D)
        grad = _load_rows(GRAD_OUT + zh * NQ * DV, rows, row_mask, DV, DV, BLOCK_DV)
        prob, dscores = _dscores(q, k, v, grad, BIAS + zh * NK, STATS + 2 * zh * NQ, DELTA + zh * NQ,
                                 GRAD_COLSUM + zh * NK, rows, row_mask, cols, col_mask, ROWS, scale,
                                 HAS_BIAS, PRECISION)
        dv += tl.dot(tl.trans(prob).to(grad.dtype), grad, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dscores).to(q.dtype), q, input_precision=PRECISION)
        dbias += tl.sum(dscores, 0)
    dims, dvs = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    key_rows = (zh * NK + cols.to(tl.int64))[:, None]
    tl.store(DK + key_rows * D + dims[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=col_mask[:, None] & (dims < D)[None, :])
    tl.store(DV_OUT + key_rows * DV + dvs[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=col_mask[:, None] & (dvs < DV)[None, :])
    if HAS_BIAS:
        tl.store(DBIAS + zh * NK + cols, dbias, mask=col_mask)


@triton.jit(do_not_specialize=["NQ", "NK", "ROWS"])
def attention_bwd_dq_kernel(
    Q, K, V, BIAS, GRAD_OUT, GRAD_COLSUM, STATS, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, NQ, NK, D, DV, ROWS, scale,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ[rows] = scale · Σ_j dS_ij k_j for a block of query rows, over the key blocks.
    Grid: (B·H, ⌈Nq / BLOCK_M⌉); DQ contiguous (B, H, Nq, D)."""
    zh = tl.program_id(0).to(tl.int64)
    q_base = _head_base(Q, stride_qb, stride_qh, H)
    k_base = _head_base(K, stride_kb, stride_kh, H)
    v_base = _head_base(V, stride_vb, stride_vh, H)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NQ
    q = _load_rows(q_base, rows, row_mask, stride_qn, D, BLOCK_D)
    grad = _load_rows(GRAD_OUT + zh * NQ * DV, rows, row_mask, DV, DV, BLOCK_DV)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < NK
        k = _load_rows(k_base, cols, col_mask, stride_kn, D, BLOCK_D)
        v = _load_rows(v_base, cols, col_mask, stride_vn, DV, BLOCK_DV)
        _, dscores = _dscores(q, k, v, grad, BIAS + zh * NK, STATS + 2 * zh * NQ, DELTA + zh * NQ,
                              GRAD_COLSUM + zh * NK, rows, row_mask, cols, col_mask, ROWS, scale,
                              HAS_BIAS, PRECISION)
        dq += tl.dot(dscores.to(k.dtype), k, input_precision=PRECISION)
    dims = tl.arange(0, BLOCK_D)
    tl.store(DQ + (zh * NQ + rows.to(tl.int64))[:, None] * D + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & (dims < D)[None, :])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def launch_tiles(d: int, dv: int, dtype: torch.dtype) -> dict:
    """The one tile shape and warp count every kernel of a call runs at head dims (d, dv), so that
    they all form the same score tiles: the largest measured to spill in no kernel on sm_80 or
    sm_90 under Triton 3.6 and 3.8 (tests/test_triton_registers.py; 3.6 spilled fp32's 64 × 32
    on 8 warps, which 3.8 did not). Past head-dim tiles of 64 the q, dO and accumulator tiles
    grow with D; fp32's products run on FMAs, whose operands Triton keeps whole per thread, so
    fp32 tiles are smaller."""
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    wide = max(block_d, block_dv) > 64
    if dtype == torch.float32:
        block_m, block_n, num_warps = (16, 16, 4) if wide else (32, 32, 4)
    else:
        block_m, block_n, num_warps = (64, 32, 8) if wide else (64, 32, 4)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=num_warps)


def _strides(*xs: torch.Tensor) -> tuple[int, ...]:
    return tuple(s for x in xs for s in x.stride()[:3])


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, colsum_rows: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) of any strides, bias (B·H, Nk) fp32 or
    None → out (B, H, Nq, Dv) in q's dtype, colsum (B, H, Nk) fp32, stats (B, H, Nq, 2) fp32."""
    q, k, v = (unit_stride_last_dim(x) for x in (q, k, v))
    b, h, nq, d = q.shape
    nk, dv = v.shape[-2:]
    if max(d, dv) > MAX_HEAD_DIM:
        raise ValueError(f"triton backend: attention's D and Dv must be ≤ {MAX_HEAD_DIM}, got D={d}, Dv={dv}")
    out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)
    colsum = torch.empty((b, h, nk), dtype=torch.float32, device=q.device)
    stats = torch.empty((b, h, nq, 2), dtype=torch.float32, device=q.device)
    if b * h == 0:
        return out, colsum, stats
    tiles = launch_tiles(q.shape[-1], v.shape[-1], q.dtype)
    shape = dict(H=h, NQ=nq, NK=nk, D=d, scale=scale, HAS_BIAS=bias is not None,
                 PRECISION=input_precision(q.dtype))
    bias = bias if bias is not None else colsum  # never read without HAS_BIAS
    attention_fwd_kernel[(b * h, triton.cdiv(nq, tiles["BLOCK_M"]))](
        q, k, v, bias, out, stats, *_strides(q, k, v), DV=dv, **shape, **tiles
    )
    attention_colsum_kernel[(b * h, triton.cdiv(nk, tiles["BLOCK_N"]))](
        q, k, bias, stats, colsum, *_strides(q, k), ROWS=colsum_rows, **shape,
        **{name: tiles[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps")},
    )
    return out, colsum, stats


def attention_bwd(
    grad_out: torch.Tensor, grad_colsum: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    bias: torch.Tensor | None, out: torch.Tensor, stats: torch.Tensor, colsum_rows: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`attention_fwd`: (dq, dk, dv) contiguous in q's dtype and dbias
    (B·H, Nk) fp32, None without a bias."""
    q, k, v = (unit_stride_last_dim(x) for x in (q, k, v))
    b, h, nq, d = q.shape
    nk, dv_dim = v.shape[-2:]
    grad_out, grad_colsum, out = grad_out.contiguous(), grad_colsum.float().contiguous(), out.contiguous()
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    dbias = torch.empty((b * h, nk), dtype=torch.float32, device=q.device) if bias is not None else None
    if b * h == 0:
        return dq, dk, dv, dbias
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    tiles = launch_tiles(q.shape[-1], v.shape[-1], q.dtype)
    shape = dict(H=h, NQ=nq, NK=nk, D=d, DV=dv_dim, ROWS=colsum_rows, scale=scale, HAS_BIAS=bias is not None,
                 PRECISION=input_precision(q.dtype))
    bias_arg = bias if bias is not None else delta  # never read without HAS_BIAS
    row_blocks, key_blocks = triton.cdiv(nq, tiles["BLOCK_M"]), triton.cdiv(nk, tiles["BLOCK_N"])
    attention_bwd_rowdot_kernel[(b * h, row_blocks)](
        q, k, bias_arg, out, grad_out, grad_colsum, stats, delta, *_strides(q, k), **shape, **tiles
    )
    common = (q, k, v, bias_arg, grad_out, grad_colsum, stats, delta)
    attention_bwd_dkv_kernel[(b * h, key_blocks)](
        *common, dk, dv, dbias if dbias is not None else delta, *_strides(q, k, v), **shape, **tiles
    )
    attention_bwd_dq_kernel[(b * h, row_blocks)](*common, dq, *_strides(q, k, v), **shape, **tiles)
    return dq, dk, dv, dbias
