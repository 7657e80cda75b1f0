// Torch-free CUDA kernels for amflow::linear_attention_fwd / _bwd (see csrc/amflow.cpp).
//
// For one (batch, head), with φ(x) = elu(x) + 1 formed as tiles are loaded:
//   KV = Σ_j φ(k_j) v_jᵀ (D × Dv),  z = Σ_j φ(k_j),  out_i = KVᵀ φ(q_i) / (φ(q_i)·z + eps).
// Backward, with g_i = ∂L/∂out_i, den_i = φ(q_i)·z + eps, u_i = g_i/den_i and t_i = KV g_i,
// w_i = −(g_i·out_i)/den_i = −(φ(q_i)·t_i)/den_i² (out_i is not formed: one product with KV):
//   dq_i = (t_i/den_i + w_i z) ⊙ φ'(q_i),  dKV = Σ_i φ(q_i) u_iᵀ,  dz = Σ_i w_i φ(q_i),
//   dk_j = (dKV v_j + dz) ⊙ φ'(k_j),       dv_j = dKVᵀ φ(k_j).
// φ'(x) is read off φ(x), so no tile of it is kept: 1 where x > 0 (φ = x + 1 ≥ 1), φ(x) = eˣ ≤ 1
// elsewhere.
//
// The algorithm is that of the Triton kernels (amflow_kernels/ops/linear_attention_triton.py):
// every kernel runs on a grid (B·H, chunks) and a block walks the 32-token tiles of one chunk;
// state sums are fp32 partials per chunk, reduced in chunk order by the next kernel, so no
// atomics are used and results are bitwise reproducible. Blocks have 256 threads. A D × Dv
// accumulator is spread over them as a 16 × 16 grid (thread (r, c) owns rows r + 16a and
// columns c + 16b); a per-token product uses 8 threads per token row (lane owning entries lane + 8i).
// Tiles and the state live in shared memory, in fp32: at D = Dv = 128, 97.4 KiB in the backward,
// within the 99 KiB per block of sm_86/sm_89 GPUs.

#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "elements.cuh"
#include "kernel_limits.h"

namespace amflow::cuda::linear {

constexpr int kThreads = 256;
constexpr int kTokens = 32;       // tokens per tile
constexpr int kMaxHeadDim = limits::kLinearAttentionMaxHeadDim;  // D and Dv
// Blocks per SM the kernels are compiled for: an explicit 1 where not stated, since without a
// minimum ptxas aims its register allocation at more resident blocks and spills
// (tests/test_cuda_registers.py); two for bwd_q on sm_90 (see there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kBwdQBlocksPerSM = 1;
#else
constexpr int kBwdQBlocksPerSM = 2;
#endif

struct Params {
  const void* q;  // (B, H, Nq, D), any strides
  const void* k;  // (B, H, Nk, D)
  const void* v;  // (B, H, Nk, Dv)
  int64_t q_stride[4], k_stride[4], v_stride[4];
  int64_t B, H, Nq, Nk, D, Dv;
  float eps;
  int64_t parts;        // chunks of the kernel that wrote the partial sums
  int64_t chunk;        // tokens per chunk of the kernel being launched (a multiple of kTokens)
  float* part_kv;       // (parts, B·H, D, Dv) fp32 partial sums (of KV, or of dKV)
  float* part_z;        // (parts, B·H, D)
  // forward
  void* out;            // (B, H, Nq, Dv), contiguous
  float* kv;            // (B·H, D, Dv) final state
  float* z;             // (B·H, D)
  // backward
  const void* grad;     // (B, H, Nq, Dv), contiguous
  void* dq;             // contiguous, like q
  void* dk;
  void* dv;
};

__device__ __forceinline__ float phi(float x) { return x > 0.f ? x + 1.f : __expf(x); }
// φ'(x) from φ(x); NaN stays NaN (the comparison is false).
__device__ __forceinline__ float phi_slope(float phi_x) { return phi_x > 1.f ? 1.f : phi_x; }

// Shared-memory row pitch of a tile with `cols` columns (odd: no bank conflicts on columns).
__host__ __device__ constexpr int pitch(int cols) { return cols + 1; }

// tile[t][c] = x[n0 + t][c] (φ(x) if kPhi) in fp32, zeros past N and C. `base` is one (N, C)
// slice read through its row and column strides.
template <typename T, bool kPhi>
__device__ void load_tile(const T* base, int64_t stride_n, int64_t stride_c, int64_t n0, int64_t N, int C,
                          float* tile) {
  for (int idx = threadIdx.x; idx < kTokens * C; idx += kThreads) {
    const int t = idx / C, c = idx % C;
    const int64_t n = n0 + t;
    float value = 0.f;
    if (n < N) {
      const float x = to_float(base[n * stride_n + c * stride_c]);
      value = kPhi ? phi(x) : x;
    }
    tile[t * pitch(C) + c] = value;
  }
}

template <typename T>
__device__ const T* head_slice(const void* x, const int64_t* stride, int64_t bh, int64_t H) {
  return static_cast<const T*>(x) + (bh / H) * stride[0] + (bh % H) * stride[1];
}

// A D × Dv fp32 accumulator spread over the block: thread (r, c) = (tid / 16, tid % 16) owns
// entries (r + 16a, c + 16b), a, b < kTiles.
template <int kTiles>
struct SpreadState {
  float kv[kTiles][kTiles];
  float z[kTiles];

  __device__ void zero() {
    for (int a = 0; a < kTiles; ++a) {
      z[a] = 0.f;
      for (int b = 0; b < kTiles; ++b) kv[a][b] = 0.f;
    }
  }

  // kv += Σ_t left[t][d] right[t][e] and z += Σ_t left[t][d]·weight[t] (weight = 1 if null).
  __device__ void accumulate(const float* left, int D, const float* right, int Dv, const float* weight) {
    const int r = threadIdx.x / 16, c = threadIdx.x % 16;
    for (int t = 0; t < kTokens; ++t) {
      float l[kTiles], rr[kTiles];
      for (int a = 0; a < kTiles; ++a) l[a] = r + 16 * a < D ? left[t * pitch(D) + r + 16 * a] : 0.f;
      for (int b = 0; b < kTiles; ++b) rr[b] = c + 16 * b < Dv ? right[t * pitch(Dv) + c + 16 * b] : 0.f;
      const float wt = weight == nullptr ? 1.f : weight[t];
      for (int a = 0; a < kTiles; ++a) {
        z[a] += l[a] * wt;
        for (int b = 0; b < kTiles; ++b) kv[a][b] += l[a] * rr[b];
      }
    }
  }

  // Writes this block's accumulator to state (D, Dv) and z (D).
  __device__ void store(float* state, float* zs, int D, int Dv) const {
    const int r = threadIdx.x / 16, c = threadIdx.x % 16;
    for (int a = 0; a < kTiles; ++a) {
      const int d = r + 16 * a;
      if (d >= D) continue;
      if (c == 0) zs[d] = z[a];
      for (int b = 0; b < kTiles; ++b) {
        const int e = c + 16 * b;
        if (e < Dv) state[d * Dv + e] = kv[a][b];
      }
    }
  }
};

// Σ over p.parts partials of head bh, in chunk order, into shared kv_s (D × pitch(Dv)) and z_s.
__device__ void sum_partials(const Params& p, int64_t bh, float* kv_s, float* z_s) {
  const int D = int(p.D), Dv = int(p.Dv);
  const int64_t heads = p.B * p.H;
  for (int idx = threadIdx.x; idx < D * Dv; idx += kThreads) {
    float acc = 0.f;
    for (int64_t part = 0; part < p.parts; ++part) acc += p.part_kv[(part * heads + bh) * D * Dv + idx];
    kv_s[(idx / Dv) * pitch(Dv) + idx % Dv] = acc;
  }
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    for (int64_t part = 0; part < p.parts; ++part) acc += p.part_z[(part * heads + bh) * D + d];
    z_s[d] = acc;
  }
}

// Token range [n0, n1) of chunk blockIdx.y of N tokens.
struct ChunkRange {
  int64_t n0, n1;
};
__device__ __forceinline__ ChunkRange chunk_range(const Params& p, int64_t N) {
  const int64_t n0 = int64_t(blockIdx.y) * p.chunk;
  return {n0, n0 + p.chunk < N ? n0 + p.chunk : N};
}

// part_kv[chunk, bh] = Σ_{j ∈ chunk} φ(k_j) v_jᵀ, part_z[chunk, bh] = Σ_{j ∈ chunk} φ(k_j).
template <typename T, int kTiles>
__global__ void __launch_bounds__(kThreads, 1) linear_attention_state_kernel(Params p) {
  extern __shared__ float smem[];
  const int D = int(p.D), Dv = int(p.Dv);
  float* k_tile = smem;                            // kTokens × pitch(D)
  float* v_tile = k_tile + kTokens * pitch(D);     // kTokens × pitch(Dv)
  const int64_t bh = blockIdx.x;
  const T* k = head_slice<T>(p.k, p.k_stride, bh, p.H);
  const T* v = head_slice<T>(p.v, p.v_stride, bh, p.H);
  SpreadState<kTiles> state;
  state.zero();
  const ChunkRange range = chunk_range(p, p.Nk);
  for (int64_t n0 = range.n0; n0 < range.n1; n0 += kTokens) {
    load_tile<T, true>(k, p.k_stride[2], p.k_stride[3], n0, range.n1, D, k_tile);
    load_tile<T, false>(v, p.v_stride[2], p.v_stride[3], n0, range.n1, Dv, v_tile);
    __syncthreads();
    state.accumulate(k_tile, D, v_tile, Dv, nullptr);
    __syncthreads();
  }
  const int64_t index = int64_t(blockIdx.y) * p.B * p.H + bh;
  state.store(p.part_kv + index * D * Dv, p.part_z + index * D, D, Dv);
}

// out_i = KVᵀ φ(q_i) / (φ(q_i)·z + eps) for the queries of one chunk; chunk 0 also writes the
// summed state when there were several partials.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) linear_attention_out_kernel(Params p) {
  extern __shared__ float smem[];
  const int D = int(p.D), Dv = int(p.Dv);
  float* kv_s = smem;                          // D × pitch(Dv)
  float* z_s = kv_s + D * pitch(Dv);           // D
  float* q_tile = z_s + D;                     // kTokens × pitch(D)
  const int64_t bh = blockIdx.x;
  sum_partials(p, bh, kv_s, z_s);
  __syncthreads();
  if (p.parts > 1 && blockIdx.y == 0) {
    for (int idx = threadIdx.x; idx < D * Dv; idx += kThreads) p.kv[bh * D * Dv + idx] = kv_s[(idx / Dv) * pitch(Dv) + idx % Dv];
    for (int d = threadIdx.x; d < D; d += kThreads) p.z[bh * D + d] = z_s[d];
  }
  const T* q = head_slice<T>(p.q, p.q_stride, bh, p.H);
  T* out = static_cast<T*>(p.out) + bh * p.Nq * Dv;
  const int t = threadIdx.x / 8, lane = threadIdx.x % 8;
  const ChunkRange range = chunk_range(p, p.Nq);
  for (int64_t n0 = range.n0; n0 < range.n1; n0 += kTokens) {
    load_tile<T, true>(q, p.q_stride[2], p.q_stride[3], n0, range.n1, D, q_tile);
    __syncthreads();
    const float* phi_q = q_tile + t * pitch(D);
    float den = p.eps;
    for (int d = 0; d < D; ++d) den += phi_q[d] * z_s[d];
    if (n0 + t < range.n1) {
      for (int e = lane; e < Dv; e += 8) {
        float acc = 0.f;
        for (int d = 0; d < D; ++d) acc += phi_q[d] * kv_s[d * pitch(Dv) + e];
        out[(n0 + t) * Dv + e] = from_float<T>(acc / den);
      }
    }
    __syncthreads();
  }
}

// dq of one chunk of queries, and the chunk's partial dKV = Σ φ(q_i) u_iᵀ, dz = Σ w_i φ(q_i).
// Two blocks per SM on sm_90, whose 228 KiB of shared memory holds two at any kTiles: ≤ 128
// registers (the spread dKV takes 72 at kTiles = 8, t_i 16 more), which sm_90 code fits. One
// elsewhere: an A100's 164 KiB holds one block at kTiles = 8 anyway, and sm_80 code needs 158
// registers there (it spilled under the cap of two blocks).
template <typename T, int kTiles>
__global__ void __launch_bounds__(kThreads, kBwdQBlocksPerSM) linear_attention_bwd_q_kernel(Params p) {
  extern __shared__ float smem[];
  const int D = int(p.D), Dv = int(p.Dv);
  float* kv_s = smem;                            // D × pitch(Dv)
  float* z_s = kv_s + D * pitch(Dv);             // D
  float* q_tile = z_s + D;                       // φ(q): kTokens × pitch(D)
  float* u_tile = q_tile + kTokens * pitch(D);   // g, then u: kTokens × pitch(Dv)
  float* w_tile = u_tile + kTokens * pitch(Dv);  // kTokens
  const int64_t bh = blockIdx.x;
  for (int idx = threadIdx.x; idx < D * Dv; idx += kThreads) kv_s[(idx / Dv) * pitch(Dv) + idx % Dv] = p.kv[bh * D * Dv + idx];
  for (int d = threadIdx.x; d < D; d += kThreads) z_s[d] = p.z[bh * D + d];
  const T* q = head_slice<T>(p.q, p.q_stride, bh, p.H);
  const T* grad = static_cast<const T*>(p.grad) + bh * p.Nq * Dv;
  T* dq = static_cast<T*>(p.dq) + bh * p.Nq * D;
  const int t = threadIdx.x / 8, lane = threadIdx.x % 8;
  SpreadState<kTiles> dstate;
  dstate.zero();
  const ChunkRange range = chunk_range(p, p.Nq);
  for (int64_t n0 = range.n0; n0 < range.n1; n0 += kTokens) {
    load_tile<T, true>(q, p.q_stride[2], p.q_stride[3], n0, range.n1, D, q_tile);
    load_tile<T, false>(grad, Dv, 1, n0, range.n1, Dv, u_tile);
    __syncthreads();
    // Row t, 8 lanes, lane owning d = lane + 8i: den, t_d = (KV g)_d, w, dq; then u = g/den.
    const float* phi_q = q_tile + t * pitch(D);
    float* u = u_tile + t * pitch(Dv);
    float den = p.eps;
    for (int d = 0; d < D; ++d) den += phi_q[d] * z_s[d];
    const bool valid = n0 + t < range.n1;
    if (!valid) den = 1.f;  // padded rows: φ(q) = g = 0, keep u, w finite
    float kv_g[2 * kTiles] = {};  // D ≤ 16·kTiles
#pragma unroll 2
    for (int e = 0; e < Dv; ++e) {
      const float g = u[e];
#pragma unroll
      for (int i = 0; i < 2 * kTiles; ++i) {
        const int d = lane + 8 * i;
        if (d < D) kv_g[i] += g * kv_s[d * pitch(Dv) + e];
      }
    }
    float phi_dot_kv_g = 0.f;
#pragma unroll
    for (int i = 0; i < 2 * kTiles; ++i) {
      const int d = lane + 8 * i;
      if (d < D) phi_dot_kv_g += phi_q[d] * kv_g[i];
    }
    for (int m = 1; m < 8; m <<= 1) phi_dot_kv_g += __shfl_xor_sync(0xffffffffu, phi_dot_kv_g, m);
    const float w = -(phi_dot_kv_g / den) / den;
    if (valid) {
#pragma unroll
      for (int i = 0; i < 2 * kTiles; ++i) {
        const int d = lane + 8 * i;
        if (d < D) dq[(n0 + t) * D + d] = from_float<T>((kv_g[i] / den + w * z_s[d]) * phi_slope(phi_q[d]));
      }
    }
    __syncwarp();  // every lane of the row has read g
    for (int e = lane; e < Dv; e += 8) u[e] /= den;
    if (lane == 0) w_tile[t] = w;
    __syncthreads();
    dstate.accumulate(q_tile, D, u_tile, Dv, w_tile);
    __syncthreads();
  }
  const int64_t index = int64_t(blockIdx.y) * p.B * p.H + bh;
  dstate.store(p.part_kv + index * D * Dv, p.part_z + index * D, D, Dv);
}

// dk_j = (dKV v_j + dz) ⊙ φ'(k_j) and dv_j = dKVᵀ φ(k_j) for one chunk of keys.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) linear_attention_bwd_kv_kernel(Params p) {
  extern __shared__ float smem[];
  const int D = int(p.D), Dv = int(p.Dv);
  float* dkv_s = smem;                             // D × pitch(Dv)
  float* dz_s = dkv_s + D * pitch(Dv);             // D
  float* k_tile = dz_s + D;                     // φ(k): kTokens × pitch(D)
  float* v_tile = k_tile + kTokens * pitch(D);  // kTokens × pitch(Dv)
  const int64_t bh = blockIdx.x;
  sum_partials(p, bh, dkv_s, dz_s);
  const T* k = head_slice<T>(p.k, p.k_stride, bh, p.H);
  const T* v = head_slice<T>(p.v, p.v_stride, bh, p.H);
  T* dk = static_cast<T*>(p.dk) + bh * p.Nk * D;
  T* dv = static_cast<T*>(p.dv) + bh * p.Nk * Dv;
  const int t = threadIdx.x / 8, lane = threadIdx.x % 8;
  const ChunkRange range = chunk_range(p, p.Nk);
  for (int64_t n0 = range.n0; n0 < range.n1; n0 += kTokens) {
    load_tile<T, true>(k, p.k_stride[2], p.k_stride[3], n0, range.n1, D, k_tile);
    load_tile<T, false>(v, p.v_stride[2], p.v_stride[3], n0, range.n1, Dv, v_tile);
    __syncthreads();
    if (n0 + t < range.n1) {
      const float* vt = v_tile + t * pitch(Dv);
      const float* phi_k = k_tile + t * pitch(D);
      for (int d = lane; d < D; d += 8) {
        float acc = dz_s[d];
        for (int e = 0; e < Dv; ++e) acc += vt[e] * dkv_s[d * pitch(Dv) + e];
        dk[(n0 + t) * D + d] = from_float<T>(acc * phi_slope(phi_k[d]));
      }
      for (int e = lane; e < Dv; e += 8) {
        float acc = 0.f;
        for (int d = 0; d < D; ++d) acc += phi_k[d] * dkv_s[d * pitch(Dv) + e];
        dv[(n0 + t) * Dv + e] = from_float<T>(acc);
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

// A kernel's dynamic shared memory: a D-wide token tile, a Dv-wide one if with_v_tile, kTokens
// floats, and the D × Dv state with z if with_state.
inline size_t tile_bytes(const Params& p, bool with_v_tile, bool with_state) {
  const size_t D = size_t(p.D), Dv = size_t(p.Dv);
  size_t floats = size_t(kTokens) * (pitch(int(D)) + (with_v_tile ? pitch(int(Dv)) : 0)) + kTokens;
  if (with_state) floats += D * pitch(int(Dv)) + D;
  return floats * sizeof(float);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, const Params& p, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (error != cudaSuccess) return error;
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Calls f with the spread accumulator's tiling for max(D, Dv): 4 × 16 (≤ 64) or 8 × 16 (≤ 128).
template <typename F>
cudaError_t with_tiles(const Params& p, F&& f) {
  if (p.D <= 64 && p.Dv <= 64) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 8>{});
}

// p.parts and p.chunk: the key chunks of the state kernel; out_chunk: the query chunks'.
template <typename T>
cudaError_t launch_forward(Params p, int64_t out_chunk, cudaStream_t stream) {
  return with_tiles(p, [&](auto tiling) {
    constexpr int tiles = decltype(tiling)::value;
    const dim3 state_grid(unsigned(p.B * p.H), unsigned(p.parts));
    cudaError_t error = launch(linear_attention_state_kernel<T, tiles>, state_grid, tile_bytes(p, true, false), p, stream);
    if (error != cudaSuccess) return error;
    p.chunk = out_chunk;
    const dim3 out_grid(unsigned(p.B * p.H), unsigned((p.Nq + out_chunk - 1) / out_chunk));
    return launch(linear_attention_out_kernel<T>, out_grid, tile_bytes(p, false, true), p, stream);
  });
}

// p.parts and p.chunk: the query chunks of the dq kernel; kv_chunk: the key chunks'.
template <typename T>
cudaError_t launch_backward(Params p, int64_t kv_chunk, cudaStream_t stream) {
  return with_tiles(p, [&](auto tiling) {
    constexpr int tiles = decltype(tiling)::value;
    const dim3 q_grid(unsigned(p.B * p.H), unsigned(p.parts));
    cudaError_t error = launch(linear_attention_bwd_q_kernel<T, tiles>, q_grid, tile_bytes(p, true, true), p, stream);
    if (error != cudaSuccess) return error;
    p.chunk = kv_chunk;
    const dim3 kv_grid(unsigned(p.B * p.H), unsigned((p.Nk + kv_chunk - 1) / kv_chunk));
    return launch(linear_attention_bwd_kv_kernel<T>, kv_grid, tile_bytes(p, true, true), p, stream);
  });
}

}  // namespace amflow::cuda::linear
