"""Fused Triton kernels for non-causal linear attention (Katharopoulos et al. 2020).

For one (batch, head), with φ(x) = elu(x) + 1 formed on chip from the loaded tiles:

    KV = Σ_j φ(k_j) v_jᵀ   (D × Dv),      z = Σ_j φ(k_j)   (D),
    out_i = a_i / den_i,    a_i = KVᵀ φ(q_i),    den_i = φ(q_i) · z + eps.

Backward, with g_i = ∂L/∂out_i, u_i = g_i / den_i, t_i = KV g_i and
w_i = −(g_i · out_i) / den_i = −(φ(q_i) · t_i) / den_i²:

    ∂φ(q_i) = t_i / den_i + w_i z,   dKV = Σ_i φ(q_i) u_iᵀ,      dz = Σ_i w_i φ(q_i),
    ∂φ(k_j) = dKV v_j + dz,          dv_j = dKVᵀ φ(k_j),
    dq = ∂φ(q) ⊙ φ'(q),   dk = ∂φ(k) ⊙ φ'(k),   φ'(x) = 1 if x > 0 else eˣ = min(φ(x), 1).

out_i is never formed in the backward: w_i comes from t_i, so a query tile meets the state in
one product, not two, and the op keeps only KV and z: O(B·H·D·Dv) fp32.

Every kernel runs on a grid (B·H, chunks): a program walks the BLOCK_N-token blocks of one
contiguous chunk of tokens, so short sequences of many heads and long sequences of few
heads both fill the GPU. Sums over tokens are fp32 and reduced in a fixed order (partials
per chunk, then chunk 0, 1, …), so results are bitwise reproducible and fp16 inputs with
thousands of tokens do not overflow.

- ``linear_attention_state_kernel``: partial KV, z of a chunk of keys.
- ``linear_attention_out_kernel``: sums the partials and writes a chunk of outputs; chunk 0
  also stores the summed KV, z for the backward.
- ``linear_attention_bwd_q_kernel``: dq of a chunk of queries, and its partial dKV, dz.
- ``linear_attention_bwd_kv_kernel``: sums the partials and writes dk, dv of a chunk of keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_device import input_precision, shared_memory_limit, unit_stride_last_dim

MAX_HEAD_DIM = 128  # D and Dv: the D × Dv fp32 state lives in registers


def shared_memory_bound(block_n: int, block_d: int, block_dv: int, num_stages: int) -> int:
    """Bytes of shared memory that any of the kernels needs at most per program: the D × Dv fp32
    state as a dot operand, and at most 1 + 2·num_stages token tiles of BLOCK_N × max(D, Dv),
    staged in fp32 (loads are pipelined num_stages deep). Measured on Triton's sm_80 code (sm_90's
    needs no more at the candidate configs) and checked by tests/test_triton_shared_memory.py."""
    return 4 * (block_d * block_dv + (1 + 2 * num_stages) * block_n * max(block_d, block_dv))


def launch_candidates(block_d: int, block_dv: int, itemsize: int) -> list[tuple[int, int, int]]:
    """(BLOCK_N, num_warps, num_stages) by preference.

    D, Dv ≤ 64: one candidate, which spills no registers on sm_80 or sm_90 and fits any of them
    (tests/test_triton_registers.py): 64-token tiles on 8 warps for 16-bit inputs (loaded into
    fp32, which Triton does not pipeline: one stage), 16-token tiles three stages deep for fp32,
    whose products run on FMAs. Larger states: Hopper's choice first, then fewer stages, then the
    smallest tiles, which fit a 99 KiB sm_86/sm_89 GPU at D = Dv = 128; all of these spill (the
    D × Dv fp32 state is held whole in each program's registers, twice in the dq kernel).
    """
    if max(block_d, block_dv) <= 64:
        return [(16, 8, 3)] if itemsize == 4 else [(64, 8, 1)]
    return [(32, 8, stages) for stages in (3, 2, 1)] + [(16, 4, 1)]


@triton.jit
def _phi(x):
    """elu(x) + 1; NaN propagates (the comparison is false and exp(NaN) is NaN)."""
    return tl.where(x > 0, x + 1.0, tl.exp(x))


@triton.jit
def _phi_slope(phi):
    """φ' read off φ (no second exponential): φ = x + 1 ≥ 1 where x > 0, eˣ ≤ 1 elsewhere;
    NaN propagates (the comparison is false)."""
    return tl.where(phi > 1.0, 1.0, phi)


@triton.jit
def _head_base(X, bh, H, stride_b, stride_h):
    return X + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _load_tile(base, rows, row_mask, stride_n, cols, col_mask):
    """Rows of one (N, C) slice with unit stride along C, in fp32; zeros past N and C."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + cols[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _state_offsets(index, D, DV, dims, vdims):
    return index.to(tl.int64) * D * DV + dims[:, None] * DV + vdims[None, :]


@triton.jit
def _sum_partials(KV_PART, Z_PART, bh, BH, PARTS, D, DV, dims, d_mask, vdims, e_mask,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Σ over the PARTS chunk partials of (KV, z) for head bh, in chunk order."""
    kv = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    z = tl.zeros((BLOCK_D,), tl.float32)
    for part in range(0, PARTS):
        index = part * BH + bh
        kv += tl.load(KV_PART + _state_offsets(index, D, DV, dims, vdims),
                      mask=d_mask[:, None] & e_mask[None, :], other=0.0)
        z += tl.load(Z_PART + index.to(tl.int64) * D + dims, mask=d_mask, other=0.0)
    return kv, z


@triton.jit
def linear_attention_state_kernel(
    K, V, KV_PART, Z_PART,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, NK, D, DV, BH, CHUNK,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """KV_PART[c, bh] = Σ_{j ∈ chunk c} φ(k_j) v_jᵀ and Z_PART[c, bh] = Σ_{j ∈ chunk c} φ(k_j)."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    k_base = _head_base(K, bh, H, stride_kb, stride_kh)
    v_base = _head_base(V, bh, H, stride_vb, stride_vh)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    vdims = tl.arange(0, BLOCK_DV)
    e_mask = vdims < DV
    kv = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    z = tl.zeros((BLOCK_D,), tl.float32)
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, NK), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NK
        k = _load_tile(k_base, rows, row_mask, stride_kn, dims, d_mask)
        phi_k = tl.where(row_mask[:, None] & d_mask[None, :], _phi(k), 0.0)
        v = _load_tile(v_base, rows, row_mask, stride_vn, vdims, e_mask)
        kv += tl.dot(tl.trans(phi_k), v, input_precision=PRECISION)
        z += tl.sum(phi_k, axis=0)
    index = chunk * BH + bh
    tl.store(KV_PART + _state_offsets(index, D, DV, dims, vdims), kv, mask=d_mask[:, None] & e_mask[None, :])
    tl.store(Z_PART + index.to(tl.int64) * D + dims, z, mask=d_mask)


@triton.jit
def linear_attention_out_kernel(
    Q, KV_PART, Z_PART, OUT, KV, Z,
    stride_qb, stride_qh, stride_qn,
    H, NQ, D, DV, BH, PARTS, CHUNK, eps,
    STORE_STATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out_i = KVᵀ φ(q_i) / (φ(q_i)·z + eps) for the queries of one chunk; OUT is (B·H, NQ, DV)."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    vdims = tl.arange(0, BLOCK_DV)
    e_mask = vdims < DV
    kv, z = _sum_partials(KV_PART, Z_PART, bh, BH, PARTS, D, DV, dims, d_mask, vdims, e_mask, BLOCK_D, BLOCK_DV)
    if STORE_STATE:
        if chunk == 0:
            tl.store(KV + _state_offsets(bh, D, DV, dims, vdims), kv, mask=d_mask[:, None] & e_mask[None, :])
            tl.store(Z + bh.to(tl.int64) * D + dims, z, mask=d_mask)
    q_base = _head_base(Q, bh, H, stride_qb, stride_qh)
    out_base = OUT + bh.to(tl.int64) * NQ * DV
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, NQ), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NQ
        q = _load_tile(q_base, rows, row_mask, stride_qn, dims, d_mask)
        phi_q = tl.where(row_mask[:, None] & d_mask[None, :], _phi(q), 0.0)
        numerator = tl.dot(phi_q, kv, input_precision=PRECISION)
        den = tl.where(row_mask, tl.sum(phi_q * z[None, :], axis=1) + eps, 1.0)
        out = numerator / den[:, None]
        ptrs = out_base + rows.to(tl.int64)[:, None] * DV + vdims[None, :]
        tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=row_mask[:, None] & e_mask[None, :])


@triton.jit
def linear_attention_bwd_q_kernel(
    Q, GRAD, KV, Z, DQ, DKV_PART, DZ_PART,
    stride_qb, stride_qh, stride_qn,
    H, NQ, D, DV, BH, CHUNK, eps,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq of one chunk of queries, and that chunk's partial dKV = Σ φ(q_i) u_iᵀ, dz = Σ w_i φ(q_i).
    GRAD is (B·H, NQ, DV) and DQ (B·H, NQ, D), contiguous."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    vdims = tl.arange(0, BLOCK_DV)
    e_mask = vdims < DV
    state_mask = d_mask[:, None] & e_mask[None, :]
    kv = tl.load(KV + _state_offsets(bh, D, DV, dims, vdims), mask=state_mask, other=0.0)
    z = tl.load(Z + bh.to(tl.int64) * D + dims, mask=d_mask, other=0.0)
    q_base = _head_base(Q, bh, H, stride_qb, stride_qh)
    grad_base = GRAD + bh.to(tl.int64) * NQ * DV
    dq_base = DQ + bh.to(tl.int64) * NQ * D
    dkv = tl.zeros((BLOCK_D, BLOCK_DV), tl.float32)
    dz = tl.zeros((BLOCK_D,), tl.float32)
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, NQ), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NQ
        q = _load_tile(q_base, rows, row_mask, stride_qn, dims, d_mask)
        phi_q = tl.where(row_mask[:, None] & d_mask[None, :], _phi(q), 0.0)
        g = _load_tile(grad_base, rows, row_mask, DV, vdims, e_mask)
        den = tl.where(row_mask, tl.sum(phi_q * z[None, :], axis=1) + eps, 1.0)
        kv_g = tl.dot(g, tl.trans(kv), input_precision=PRECISION)
        u = g / den[:, None]
        w = -(tl.sum(phi_q * kv_g, axis=1) / den) / den
        dphi_q = kv_g / den[:, None] + w[:, None] * z[None, :]
        dq = dphi_q * _phi_slope(phi_q)
        ptrs = dq_base + rows.to(tl.int64)[:, None] * D + dims[None, :]
        tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
        dkv += tl.dot(tl.trans(phi_q), u, input_precision=PRECISION)
        dz += tl.sum(phi_q * w[:, None], axis=0)
    index = chunk * BH + bh
    tl.store(DKV_PART + _state_offsets(index, D, DV, dims, vdims), dkv, mask=state_mask)
    tl.store(DZ_PART + index.to(tl.int64) * D + dims, dz, mask=d_mask)


@triton.jit
def linear_attention_bwd_kv_kernel(
    K, V, DKV_PART, DZ_PART, DK, DV_OUT,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, NK, D, DV, BH, PARTS, CHUNK,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk_j = (dKV v_j + dz) ⊙ φ'(k_j) and dv_j = dKVᵀ φ(k_j) for one chunk of keys; DK is
    (B·H, NK, D) and DV_OUT (B·H, NK, DV), contiguous."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    vdims = tl.arange(0, BLOCK_DV)
    e_mask = vdims < DV
    dkv, dz = _sum_partials(DKV_PART, DZ_PART, bh, BH, PARTS, D, DV, dims, d_mask, vdims, e_mask, BLOCK_D, BLOCK_DV)
    k_base = _head_base(K, bh, H, stride_kb, stride_kh)
    v_base = _head_base(V, bh, H, stride_vb, stride_vh)
    dk_base = DK + bh.to(tl.int64) * NK * D
    dv_base = DV_OUT + bh.to(tl.int64) * NK * DV
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, NK), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NK
        k = _load_tile(k_base, rows, row_mask, stride_kn, dims, d_mask)
        phi_k = tl.where(row_mask[:, None] & d_mask[None, :], _phi(k), 0.0)
        v = _load_tile(v_base, rows, row_mask, stride_vn, vdims, e_mask)
        dk = (tl.dot(v, tl.trans(dkv), input_precision=PRECISION) + dz[None, :]) * _phi_slope(phi_k)
        dv = tl.dot(phi_k, dkv, input_precision=PRECISION)
        rows64 = rows.to(tl.int64)[:, None]
        tl.store(dk_base + rows64 * D + dims[None, :], dk.to(DK.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])
        tl.store(dv_base + rows64 * DV + vdims[None, :], dv.to(DV_OUT.dtype.element_ty),
                 mask=row_mask[:, None] & e_mask[None, :])


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


class _Launch:
    """Tile sizes and the chunking of N tokens over B·H heads."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor):
        b, h, _, d = q.shape
        dv = v.shape[-1]
        if max(d, dv) > MAX_HEAD_DIM:
            raise ValueError(f"triton backend: D and Dv must be ≤ {MAX_HEAD_DIM}, got D={d}, Dv={dv}")
        self.heads = b * h
        self.block_d = max(16, triton.next_power_of_2(d))
        self.block_dv = max(16, triton.next_power_of_2(dv))
        # The first candidate that fits the device; if none does, the smallest runs and Triton
        # reports OutOfResources.
        candidates = launch_candidates(self.block_d, self.block_dv, q.element_size())
        limit = shared_memory_limit(q.device)
        fits = [c for c in candidates if shared_memory_bound(c[0], self.block_d, self.block_dv, c[2]) <= limit]
        self.block_n, self.num_warps, self.num_stages = (fits or candidates[-1:])[0]
        self.precision = input_precision(q.dtype)
        if q.device.type == "cuda":
            self.target_programs = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
        else:  # the interpreter: a few chunks, so the partial sums are exercised
            self.target_programs = 8

    def chunks(self, n: int) -> tuple[int, int]:
        """(number of chunks, tokens per chunk) for n tokens: enough programs to fill the
        device, whole blocks per chunk."""
        blocks = triton.cdiv(n, self.block_n)
        wanted = min(blocks, max(1, triton.cdiv(self.target_programs, self.heads)))
        per_chunk = triton.cdiv(blocks, wanted)
        return triton.cdiv(blocks, per_chunk), per_chunk * self.block_n

    def meta(self) -> dict:
        return dict(
            PRECISION=self.precision, BLOCK_N=self.block_n, BLOCK_D=self.block_d,
            BLOCK_DV=self.block_dv, num_warps=self.num_warps, num_stages=self.num_stages,
        )


def _state_buffers(parts: int, heads: int, d: int, dv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty((parts, heads, d, dv), dtype=torch.float32, device=device),
        torch.empty((parts, heads, d), dtype=torch.float32, device=device),
    )


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, kv, z) for q, k (B, H, N, D) and v (B, H, Nk, Dv) of any strides: out (B, H, Nq, Dv)
    in q's dtype, and the fp32 state kv (B, H, D, Dv), z (B, H, D) saved for the backward."""
    q, k, v = unit_stride_last_dim(q), unit_stride_last_dim(k), unit_stride_last_dim(v)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    launch = _Launch(q, v)
    out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)
    kv, z = _state_buffers(1, launch.heads, d, dv, q.device)
    if launch.heads == 0:
        return out, kv.view(b, h, d, dv), z.view(b, h, d)
    parts, chunk = launch.chunks(nk)
    kv_part, z_part = (kv, z) if parts == 1 else _state_buffers(parts, launch.heads, d, dv, q.device)
    linear_attention_state_kernel[(launch.heads, parts)](
        k, v, kv_part, z_part, *k.stride()[:3], *v.stride()[:3], h, nk, d, dv, launch.heads, chunk, **launch.meta()
    )
    out_chunks, out_chunk = launch.chunks(nq)
    linear_attention_out_kernel[(launch.heads, out_chunks)](
        q, kv_part, z_part, out, kv, z, *q.stride()[:3], h, nq, d, dv, launch.heads, parts, out_chunk, eps,
        STORE_STATE=parts > 1, **launch.meta(),
    )
    return out, kv.view(b, h, d, dv), z.view(b, h, d)


def linear_attention_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv: torch.Tensor, z: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`linear_attention_fwd`, contiguous, in q's dtype."""
    q, k, v = unit_stride_last_dim(q), unit_stride_last_dim(k), unit_stride_last_dim(v)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    launch = _Launch(q, v)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv_out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if launch.heads == 0:
        return dq, dk, dv_out
    grad, kv, z = grad.contiguous(), kv.contiguous(), z.contiguous()
    parts, chunk = launch.chunks(nq)
    dkv_part, dz_part = _state_buffers(parts, launch.heads, d, dv, q.device)
    linear_attention_bwd_q_kernel[(launch.heads, parts)](
        q, grad, kv, z, dq, dkv_part, dz_part, *q.stride()[:3], h, nq, d, dv, launch.heads, chunk, eps,
        **launch.meta(),
    )
    kv_chunks, kv_chunk = launch.chunks(nk)
    linear_attention_bwd_kv_kernel[(launch.heads, kv_chunks)](
        k, v, dkv_part, dz_part, dk, dv_out, *k.stride()[:3], *v.stride()[:3], h, nk, d, dv, launch.heads, parts,
        kv_chunk, **launch.meta(),
    )
    return dq, dk, dv_out
