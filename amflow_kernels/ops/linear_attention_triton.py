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

A program holds at most ``STATE_SLICE_ELEMENTS`` of the fp32 state in registers: a D × BLOCK_E
slice of its Dv columns (all of them up to D·Dv = 64·64 and Dv = 2·D), so D or Dv of 128
spills no registers. The kernels that sum over tokens into the state take the Dv slices as a
grid dim; those whose products sum over Dv (t_i = KV g_i, dKV v_j) walk the slices in order.

Kernels run on a grid (B·H, chunks[, Dv slices]): a program walks the BLOCK_N-token blocks of
one contiguous chunk of tokens, so short sequences of many heads and long sequences of few
heads both fill the GPU. Sums over tokens are fp32: partials per chunk, then summed over the
chunks by one deterministic reduction, so results are bitwise reproducible and fp16 inputs
with thousands of tokens do not overflow.

- ``linear_attention_state_kernel``: a chunk's partial Σ φ(x_j) (y_j / s_j)ᵀ and Σ r_j φ(x_j),
  one Dv slice: KV, z from keys and values (s = r = 1), and dKV, dz from queries and
  gradients (s = den, r = w).
- ``linear_attention_out_kernel``: a chunk of outputs, one Dv slice.
- ``linear_attention_bwd_q_kernel``: dq of a chunk of queries, and their den_i and w_i.
- ``linear_attention_bwd_kv_kernel``: dk and dv of a chunk of keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import unit_stride_last_dim

# What these kernels accept, read by the dispatcher (amflow_kernels/_dispatch.py).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # D and Dv
STATE_SLICE_ELEMENTS = 64 * 64  # of the D × Dv fp32 state, per program
MAX_SLICE_WIDTH = 64
# A program's warps, by the elements of its state slice: 4 up to FOUR_WARP_SLICE_ELEMENTS, 8
# above. Measured with ptxas on sm_80 and sm_90 code of Triton 3.6 (the GPU machine's) and 3.8:
# 8 warps on the small slices spill 4–12 bytes in the dk, dv kernel under 3.6, 4 warps on
# 4096-element slices spill 56–550 bytes in both backward kernels, 2 warps spill nearly
# everywhere; and a slice wider than twice its depth (16 × 64) spills on either warp count.
FOUR_WARP_SLICE_ELEMENTS = 2048


def state_slice_width(block_d: int, block_dv: int) -> int:
    """BLOCK_E, the Dv columns of the state one program holds: all of them up to
    STATE_SLICE_ELEMENTS, MAX_SLICE_WIDTH columns and twice BLOCK_D (wider slices spill in the
    dk, dv kernel)."""
    return min(block_dv, MAX_SLICE_WIDTH, 2 * block_d, max(16, STATE_SLICE_ELEMENTS // block_d))


def launch_config(block_d: int, block_e: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for every kernel and dtype at a D × BLOCK_E state slice:
    16-token tiles, 4 or 8 warps (FOUR_WARP_SLICE_ELEMENTS), one stage. Every tile is fp32 on
    chip (φ(x), the normalised gradients, the state), and every product runs as a true fp32
    product (``input_precision="ieee"``, on FMAs): TF32 would truncate those fp32 operands to 10
    mantissa bits (fp16 dk then errs by 3.7e-3 relative RMS, twice the suite's tolerance; the
    CUDA backend uses fp32 FMAs too). With these slices and warps, no kernel spills registers on
    sm_80 or sm_90 at any head dims, and each fits a 99 KiB sm_86/sm_89 GPU
    (tests/test_triton_registers.py, tests/test_triton_shared_memory.py); deeper pipelines spill
    in the backward's kernels, and Triton does not pipeline the 16-bit loads, which it converts
    to fp32."""
    return 16, 4 if block_d * block_e <= FOUR_WARP_SLICE_ELEMENTS else 8, 1


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
def _load_phi(base, rows, row_mask, stride_n, dims, d_mask):
    """φ of a token tile, zero past N and D."""
    x = _load_tile(base, rows, row_mask, stride_n, dims, d_mask)
    return tl.where(row_mask[:, None] & d_mask[None, :], _phi(x), 0.0)


@triton.jit
def _state_slice(STATE, index, D, DV, dims, d_mask, vdims, e_mask):
    """Pointers to, and the mask of, the D × BLOCK_E slice ``vdims`` of state ``index``."""
    offsets = index.to(tl.int64) * D * DV + dims[:, None] * DV + vdims[None, :]
    return STATE + offsets, d_mask[:, None] & e_mask[None, :]


@triton.jit
def _load_state_slice(STATE, index, D, DV, dims, d_mask, vdims, e_mask):
    """The D × BLOCK_E slice ``vdims`` of state ``index``, zero past D and DV."""
    ptrs, mask = _state_slice(STATE, index, D, DV, dims, d_mask, vdims, e_mask)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def linear_attention_state_kernel(
    X, Y, DEN, W, S_PART, R_PART,
    stride_xb, stride_xh, stride_xn,
    stride_yb, stride_yh, stride_yn,
    H, N, D, DV, BH, CHUNK,
    WEIGHTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """S_PART[c, bh][:, slice] = Σ_{j ∈ chunk c} φ(x_j) (y_j[slice] / s_j)ᵀ and, from slice 0,
    R_PART[c, bh] = Σ_{j ∈ chunk c} r_j φ(x_j); s_j = DEN[bh, j] and r_j = W[bh, j] if WEIGHTED,
    else 1. X is (B, H, N, D), Y (B, H, N, DV), DEN and W (B·H, N)."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    vdims = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = vdims < DV
    x_base = _head_base(X, bh, H, stride_xb, stride_xh)
    y_base = _head_base(Y, bh, H, stride_yb, stride_yh)
    s = tl.zeros((BLOCK_D, BLOCK_E), tl.float32)
    r = tl.zeros((BLOCK_D,), tl.float32)
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, N), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        phi_x = _load_phi(x_base, rows, row_mask, stride_xn, dims, d_mask)
        y = _load_tile(y_base, rows, row_mask, stride_yn, vdims, e_mask)
        if WEIGHTED:
            row_offsets = bh.to(tl.int64) * N + rows
            y = y / tl.load(DEN + row_offsets, mask=row_mask, other=1.0)[:, None]
            r += tl.sum(phi_x * tl.load(W + row_offsets, mask=row_mask, other=0.0)[:, None], axis=0)
        else:
            r += tl.sum(phi_x, axis=0)
        s += tl.dot(tl.trans(phi_x), y, input_precision="ieee")
    index = chunk * BH + bh
    s_ptrs, s_mask = _state_slice(S_PART, index, D, DV, dims, d_mask, vdims, e_mask)
    tl.store(s_ptrs, s, mask=s_mask)
    if tl.program_id(2) == 0:
        tl.store(R_PART + index.to(tl.int64) * D + dims, r, mask=d_mask)


@triton.jit
def linear_attention_out_kernel(
    Q, KV, Z, OUT,
    stride_qb, stride_qh, stride_qn,
    H, NQ, D, DV, CHUNK, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out_i[slice] = KV[:, slice]ᵀ φ(q_i) / (φ(q_i)·z + eps) for the queries of one chunk; KV is
    (B·H, D, DV), Z (B·H, D) and OUT (B·H, NQ, DV)."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    vdims = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = vdims < DV
    kv = _load_state_slice(KV, bh, D, DV, dims, d_mask, vdims, e_mask)
    z = tl.load(Z + bh.to(tl.int64) * D + dims, mask=d_mask, other=0.0)
    q_base = _head_base(Q, bh, H, stride_qb, stride_qh)
    out_base = OUT + bh.to(tl.int64) * NQ * DV
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, NQ), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NQ
        phi_q = _load_phi(q_base, rows, row_mask, stride_qn, dims, d_mask)
        den = tl.where(row_mask, tl.sum(phi_q * z[None, :], axis=1) + eps, 1.0)
        out = tl.dot(phi_q, kv, input_precision="ieee") / den[:, None]
        ptrs = out_base + rows.to(tl.int64)[:, None] * DV + vdims[None, :]
        tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=row_mask[:, None] & e_mask[None, :])


@triton.jit
def linear_attention_bwd_q_kernel(
    Q, GRAD, KV, Z, DQ, DEN, W,
    stride_qb, stride_qh, stride_qn,
    H, NQ, D, DV, CHUNK, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dq of one chunk of queries, t_i = KV g_i summed over the Dv slices in order; also stores
    den_i and w_i for the dKV, dz sums. GRAD is (B·H, NQ, DV), DQ (B·H, NQ, D), DEN and W
    (B·H, NQ), contiguous."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    z = tl.load(Z + bh.to(tl.int64) * D + dims, mask=d_mask, other=0.0)
    q_base = _head_base(Q, bh, H, stride_qb, stride_qh)
    grad_base = GRAD + bh.to(tl.int64) * NQ * DV
    dq_base = DQ + bh.to(tl.int64) * NQ * D
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, NQ), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NQ
        phi_q = _load_phi(q_base, rows, row_mask, stride_qn, dims, d_mask)
        t = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for e0 in range(0, DV, BLOCK_E):
            vdims = e0 + tl.arange(0, BLOCK_E)
            e_mask = vdims < DV
            g = _load_tile(grad_base, rows, row_mask, DV, vdims, e_mask)
            kv = _load_state_slice(KV, bh, D, DV, dims, d_mask, vdims, e_mask)
            t += tl.dot(g, tl.trans(kv), input_precision="ieee")
        den = tl.where(row_mask, tl.sum(phi_q * z[None, :], axis=1) + eps, 1.0)
        w = -(tl.sum(phi_q * t, axis=1) / den) / den
        dq = (t / den[:, None] + w[:, None] * z[None, :]) * _phi_slope(phi_q)
        ptrs = dq_base + rows.to(tl.int64)[:, None] * D + dims[None, :]
        tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
        row_offsets = bh.to(tl.int64) * NQ + rows
        tl.store(DEN + row_offsets, den, mask=row_mask)
        tl.store(W + row_offsets, w, mask=row_mask)


@triton.jit
def linear_attention_bwd_kv_kernel(
    K, V, DKV, DZ, DK, DV_OUT,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, NK, D, DV, CHUNK,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dk_j = (dKV v_j + dz) ⊙ φ'(k_j), dKV v_j summed over the Dv slices in order, and
    dv_j = dKVᵀ φ(k_j) a slice at a time, for one chunk of keys; DKV is (B·H, D, DV), DZ
    (B·H, D), DK (B·H, NK, D) and DV_OUT (B·H, NK, DV), contiguous."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    d_mask = dims < D
    dz = tl.load(DZ + bh.to(tl.int64) * D + dims, mask=d_mask, other=0.0)
    k_base = _head_base(K, bh, H, stride_kb, stride_kh)
    v_base = _head_base(V, bh, H, stride_vb, stride_vh)
    dk_base = DK + bh.to(tl.int64) * NK * D
    dv_base = DV_OUT + bh.to(tl.int64) * NK * DV
    start = chunk * CHUNK
    for n0 in range(start, tl.minimum(start + CHUNK, NK), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < NK
        rows64 = rows.to(tl.int64)[:, None]
        phi_k = _load_phi(k_base, rows, row_mask, stride_kn, dims, d_mask)
        dphi_k = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for e0 in range(0, DV, BLOCK_E):
            vdims = e0 + tl.arange(0, BLOCK_E)
            e_mask = vdims < DV
            v = _load_tile(v_base, rows, row_mask, stride_vn, vdims, e_mask)
            dkv = _load_state_slice(DKV, bh, D, DV, dims, d_mask, vdims, e_mask)
            dphi_k += tl.dot(v, tl.trans(dkv), input_precision="ieee")
            dv = tl.dot(phi_k, dkv, input_precision="ieee")
            tl.store(dv_base + rows64 * DV + vdims[None, :], dv.to(DV_OUT.dtype.element_ty),
                     mask=row_mask[:, None] & e_mask[None, :])
        dk = (dphi_k + dz[None, :]) * _phi_slope(phi_k)
        tl.store(dk_base + rows64 * D + dims[None, :], dk.to(DK.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


class _Launch:
    """Tile sizes, the Dv slices of the state, and the chunking of N tokens over B·H heads."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor):
        b, h, _, d = q.shape
        dv = v.shape[-1]
        if max(d, dv) > MAX_HEAD_DIM:
            raise ValueError(f"triton backend: D and Dv must be ≤ {MAX_HEAD_DIM}, got D={d}, Dv={dv}")
        self.heads = b * h
        self.block_d = max(16, triton.next_power_of_2(d))
        self.block_e = state_slice_width(self.block_d, max(16, triton.next_power_of_2(dv)))
        self.slices = triton.cdiv(dv, self.block_e)
        self.block_n, self.num_warps, self.num_stages = launch_config(self.block_d, self.block_e)
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
            BLOCK_N=self.block_n, BLOCK_D=self.block_d,
            BLOCK_E=self.block_e, num_warps=self.num_warps, num_stages=self.num_stages,
        )


def _token_sums(
    launch: _Launch, x: torch.Tensor, y: torch.Tensor, den: torch.Tensor | None, w: torch.Tensor | None,
    s: torch.Tensor, r: torch.Tensor,
) -> None:
    """s = Σ_j φ(x_j) (y_j / den_j)ᵀ and r = Σ_j w_j φ(x_j) (den = w = 1 where None), into the
    fp32 (B·H, D, DV) and (B·H, D) buffers: per-chunk partials summed in chunk order."""
    h, n, d = x.shape[1], x.shape[2], x.shape[3]
    dv = y.shape[-1]
    parts, chunk = launch.chunks(n)
    s_part, r_part = (s, r) if parts == 1 else _state_buffers((parts, launch.heads), d, dv, x.device)
    weighted = den is not None
    linear_attention_state_kernel[(launch.heads, parts, launch.slices)](
        x, y, den if weighted else x, w if weighted else x, s_part, r_part,
        *x.stride()[:3], *y.stride()[:3], h, n, d, dv, launch.heads, chunk, WEIGHTED=weighted, **launch.meta(),
    )
    if parts > 1:
        torch.sum(s_part, 0, out=s)
        torch.sum(r_part, 0, out=r)


def _state_buffers(lead: tuple[int, ...], d: int, dv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised fp32 (*lead, D, DV) and (*lead, D) buffers."""
    return (
        torch.empty((*lead, d, dv), dtype=torch.float32, device=device),
        torch.empty((*lead, d), dtype=torch.float32, device=device),
    )


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, kv, z) for q, k (B, H, N, D) and v (B, H, Nk, Dv) of any strides: out (B, H, Nq, Dv)
    in q's dtype, and the fp32 state kv (B, H, D, Dv), z (B, H, D) saved for the backward."""
    q, k, v = unit_stride_last_dim(q), unit_stride_last_dim(k), unit_stride_last_dim(v)
    b, h, nq, d = q.shape
    dv = v.shape[-1]
    launch = _Launch(q, v)
    out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)
    kv, z = _state_buffers((launch.heads,), d, dv, q.device)
    if launch.heads == 0:
        return out, kv.view(b, h, d, dv), z.view(b, h, d)
    _token_sums(launch, k, v, None, None, kv, z)
    chunks, chunk = launch.chunks(nq)
    linear_attention_out_kernel[(launch.heads, chunks, launch.slices)](
        q, kv, z, out, *q.stride()[:3], h, nq, d, dv, chunk, eps, **launch.meta()
    )
    return out, kv.view(b, h, d, dv), z.view(b, h, d)


def linear_attention_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv: torch.Tensor, z: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`linear_attention_fwd`, contiguous, in q's dtype."""
    q, k, v = unit_stride_last_dim(q), unit_stride_last_dim(k), unit_stride_last_dim(v)
    _, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    launch = _Launch(q, v)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv_out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if launch.heads == 0:
        return dq, dk, dv_out
    grad, kv, z = grad.contiguous(), kv.contiguous(), z.contiguous()
    den, w = (torch.empty((launch.heads, nq), dtype=torch.float32, device=q.device) for _ in range(2))
    chunks, chunk = launch.chunks(nq)
    linear_attention_bwd_q_kernel[(launch.heads, chunks)](
        q, grad, kv, z, dq, den, w, *q.stride()[:3], h, nq, d, dv, chunk, eps, **launch.meta()
    )
    dkv, dz = _state_buffers((launch.heads,), d, dv, q.device)
    _token_sums(launch, q, grad, den, w, dkv, dz)
    chunks, chunk = launch.chunks(nk)
    linear_attention_bwd_kv_kernel[(launch.heads, chunks)](
        k, v, dkv, dz, dk, dv_out, *k.stride()[:3], *v.stride()[:3], h, nk, d, dv, chunk, **launch.meta()
    )
    return dq, dk, dv_out
