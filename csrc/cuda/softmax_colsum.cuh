// Torch-free CUDA kernels for amflow::softmax_colsum_fwd / _bwd (see csrc/amflow.cpp).
//
// For a (clip b, head h) and output index p:
//   paired:     z = scale·(S_p − S_{p+Δ}), x = |z|;   not paired: z = scale·S_p, x = z
//   out[p, j] = Σ_i P_ij,  P = softmax_j(x),  stats[p, i] = (m_i, l_i = log2 Σ_j 2^{(x_ij − m_i)·log2 e})
// Backward, with g = ∂L/∂out[p], c_i = Σ_j P_ij g_j / Σ_j P_ij:
//   ∂L/∂z_ij = sign(z_ij)^[paired]·P_ij·(g_j − c_i),  E_t = ∂L/∂z^(t) − ∂L/∂z^(t−Δ),
//   dQ_t = scale·E_t K_t,  dK_t = scale·E_tᵀ Q_t.
//
// The algorithm is that of the Triton kernels (amflow_kernels/ops/softmax_colsum_triton.py): row
// statistics with an online max, then a program per column block for the column sums; a
// rowdot pass for c (normalised by the recomputed row mass) and the backward's row
// statistics, then dQ per row block and dK per column block. Every block owns disjoint
// outputs: no atomics, bitwise reproducible. Tiles are 32 × 32 scores on 256 threads (thread
// (r, c0) holds row r, columns c0 + 8·i for the softmax arithmetic), q/k read through their
// strides in 32-wide chunks of D into shared memory. fp16/bf16 products run on tensor cores
// (WMMA 16×16×16, fp32 accumulation; E is rounded to the input dtype for dQ/dK, as in the
// Triton kernels and FlashAttention); fp32 products stay in fp32 on CUDA cores (the Triton
// kernels' "ieee" dots). Softmax statistics are fp32 everywhere.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "elements.cuh"
#include "kernel_limits.h"

namespace amflow::cuda {

constexpr int kTile = 32;                      // rows and columns of a score tile
constexpr int kThreads = 256;                  // 32 rows × 8 column lanes
constexpr int kColsPerThread = kTile / 8;      // 4
constexpr int kMaxHeadDim = limits::kSoftmaxColsumMaxHeadDim;
constexpr int kDimsPerThread = kMaxHeadDim / 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = kThreads / 32;
constexpr int kFragment = 16;                  // WMMA tile edge

// Kernels are declared __launch_bounds__(kThreads, 1): without an explicit minimum of blocks per
// SM, ptxas aims its register allocation at more resident blocks and spills (20 bytes per thread
// in the rowdot kernel on sm_80), as tests/test_cuda_registers.py reads from ptxas.

// Tensor cores for fp16/bf16 on sm_80+ (bf16 WMMA needs sm_80); CUDA cores on older GPUs, and
// everywhere in a build with AMFLOW_CUDA_CORES_ONLY defined (how the tests' CUDA emulator runs
// the older GPUs' path).
#if !defined(AMFLOW_CUDA_CORES_ONLY) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
constexpr bool kArchHasWmma = true;
#else
constexpr bool kArchHasWmma = false;
#endif
template <typename T>
constexpr bool kTensorCores = kArchHasWmma && !std::is_same_v<T, float>;

struct ColsumParams {
  const void* q;
  const void* k;
  int64_t q_stride[5];  // (b, t, h, n, d)
  int64_t k_stride[5];
  int64_t B, T, H, N, D, P, offset;
  bool paired;
  float scale;
  // forward
  void* out;       // (B, P, H, N), q's dtype
  float* stats;    // (B, P, H, N, 2)
  // backward
  const void* grad;  // (B, P, H, N), q's dtype, contiguous
  float* rowdot;     // (B, P, H, N)
  float* stats_bwd;  // (B, P, H, N, 2)
  void* dq;          // (B, T, H, N, D), contiguous
  void* dk;
};

// Reductions over the 8 lanes that share a row (consecutive lanes of one warp).
__device__ __forceinline__ float row_max8(float v) {
  for (int m = 1; m < 8; m <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ __forceinline__ float row_sum8(float v) {
  for (int m = 1; m < 8; m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

struct TileIndex {
  int row;  // 0..31: the tile row of this thread
  int lane; // 0..7: its columns are lane + 8·i
};

__device__ __forceinline__ TileIndex tile_index() { return {int(threadIdx.x) / 8, int(threadIdx.x) % 8}; }

// Base offset of frame t of (b, h) in a tensor with strides s.
__device__ __forceinline__ int64_t frame_base(const int64_t* s, int64_t b, int64_t t, int64_t h) {
  return b * s[0] + t * s[1] + h * s[2];
}

// Shared memory of a score tile: q/k chunks of the (up to) two frames as stored (rows padded
// to keep WMMA pointers 32-byte aligned, or bank-conflict free on CUDA cores) and, on tensor
// cores, the fp32 products Q_f K_fᵀ of each frame.
template <typename T>
struct ScoreTiles {
  static constexpr int kPad = kTensorCores<T> ? kTile + 8 : kTile + 1;
  alignas(32) T q[2][kTile][kPad];
  alignas(32) T k[2][kTile][kPad];
  alignas(32) float s[kTensorCores<T> ? 2 : 1][kTile][kTile + 4];
};

// Rows row0.. of q and col0.. of k, dims d0..d0+31, of `frames` frames into shared memory;
// zeros past N and D.
template <typename T>
__device__ void load_score_chunk(const ColsumParams& p, ScoreTiles<T>& sm, int64_t b, int64_t h, int64_t fa,
                                 int64_t fb, int frames, int64_t row0, int64_t col0, int64_t d0) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T zero = from_float<T>(0.f);
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, d = e % kTile;
    const bool d_ok = d0 + d < p.D;
    for (int f = 0; f < frames; ++f) {
      const int64_t frame = f == 0 ? fa : fb;
      const int64_t qn = row0 + r, kn = col0 + r;
      sm.q[f][r][d] = (d_ok && qn < p.N)
          ? q[frame_base(p.q_stride, b, frame, h) + qn * p.q_stride[3] + (d0 + d) * p.q_stride[4]]
          : zero;
      sm.k[f][r][d] = (d_ok && kn < p.N)
          ? k[frame_base(p.k_stride, b, frame, h) + kn * p.k_stride[3] + (d0 + d) * p.k_stride[4]]
          : zero;
    }
  }
}

// s[i] = Σ_d Q_a[row0 + r][d] · K_a[col0 + lane + 8i][d]  (− the same for frames b when
// paired) for this thread's tile entries, over D in chunks of 32. On tensor cores warp w
// computes the 16 × 16 fragment (w/2 mod 2, w mod 2) of frame w/4; the two frames' fp32
// products meet in shared memory.
template <typename T>
__device__ void accumulate_scores(const ColsumParams& p, int64_t b, int64_t h, int64_t fa, int64_t fb,
                                  bool two_frames, int64_t row0, int64_t col0, float (&s)[kColsPerThread]) {
  __shared__ ScoreTiles<T> sm;
  const TileIndex ti = tile_index();
  const int frames = two_frames ? 2 : 1;
  if constexpr (kTensorCores<T>) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, f = warp / 4;
    const int frag_row = (warp / 2) % 2 * kFragment, frag_col = warp % 2 * kFragment;
    wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int64_t d0 = 0; d0 < p.D; d0 += kTile) {
      load_score_chunk<T>(p, sm, b, h, fa, fb, frames, row0, col0, d0);
      __syncthreads();
      if (f < frames) {
        for (int kk = 0; kk < kTile; kk += kFragment) {
          wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, wmma::row_major> qf;
          wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::col_major> kf;  // Kᵀ
          wmma::load_matrix_sync(qf, &sm.q[f][frag_row][kk], ScoreTiles<T>::kPad);
          wmma::load_matrix_sync(kf, &sm.k[f][frag_col][kk], ScoreTiles<T>::kPad);
          wmma::mma_sync(acc, qf, kf, acc);
        }
      }
      __syncthreads();
    }
    if (f < frames) wmma::store_matrix_sync(&sm.s[f][frag_row][frag_col], acc, kTile + 4, wmma::mem_row_major);
    __syncthreads();
    for (int i = 0; i < kColsPerThread; ++i) {
      const int c = ti.lane + 8 * i;
      s[i] = two_frames ? sm.s[0][ti.row][c] - sm.s[1][ti.row][c] : sm.s[0][ti.row][c];
    }
    __syncthreads();  // sm.s is rewritten by the next tile
  } else {
    // Each frame's product in its own accumulator, subtracted at the end (as on tensor cores
    // and in the reference): one running difference would round twice as often, at larger
    // magnitudes, and lose accuracy on large scores.
    float sa[kColsPerThread] = {0.f, 0.f, 0.f, 0.f}, sb[kColsPerThread] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t d0 = 0; d0 < p.D; d0 += kTile) {
      load_score_chunk<T>(p, sm, b, h, fa, fb, frames, row0, col0, d0);
      __syncthreads();
      for (int d = 0; d < kTile; ++d) {
        const float qa = to_float(sm.q[0][ti.row][d]);
        const float qb = two_frames ? to_float(sm.q[1][ti.row][d]) : 0.f;
        for (int i = 0; i < kColsPerThread; ++i) {
          const int c = ti.lane + 8 * i;
          sa[i] += qa * to_float(sm.k[0][c][d]);
          if (two_frames) sb[i] += qb * to_float(sm.k[1][c][d]);
        }
      }
      __syncthreads();
    }
    for (int i = 0; i < kColsPerThread; ++i) s[i] = sa[i] - sb[i];
  }
}

// z = scale·(S_fa − S_fb) (two_frames) or scale·S_fa for this thread's tile entries.
template <typename T>
__device__ void score_tile(const ColsumParams& p, int64_t b, int64_t h, int64_t fa, int64_t fb, bool two_frames,
                           int64_t row0, int64_t col0, float (&z)[kColsPerThread]) {
  accumulate_scores<T>(p, b, h, fa, fb, two_frames, row0, col0, z);
  for (int i = 0; i < kColsPerThread; ++i) z[i] *= p.scale;
}

__device__ __forceinline__ float logit(float z, bool paired, bool col_ok) {
  return col_ok ? (paired ? fabsf(z) : z) : -INFINITY;
}

// Index of row/column n of output slot (b, pair, h) in the (B, P, H, N) tensors.
__device__ __forceinline__ int64_t slot(const ColsumParams& p, int64_t b, int64_t pair, int64_t h) {
  return ((b * p.P + pair) * p.H + h) * p.N;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

// stats of a row block of pair (b, pair, h), online over column blocks. Grid (B·P·H, ⌈N/32⌉).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) colsum_fwd_stats_kernel(ColsumParams p) {
  const int64_t id = blockIdx.x, h = id % p.H, pair = (id / p.H) % p.P, b = id / (p.H * p.P);
  const TileIndex ti = tile_index();
  const int64_t row0 = int64_t(blockIdx.y) * kTile;
  float m = -INFINITY, l = 0.f;
  for (int64_t col0 = 0; col0 < p.N; col0 += kTile) {
    float z[kColsPerThread];
    score_tile<T>(p, b, h, pair, pair + p.offset, p.paired, row0, col0, z);
    float x[kColsPerThread], tile_max = -INFINITY;
    for (int i = 0; i < kColsPerThread; ++i) {
      x[i] = logit(z[i], p.paired, col0 + ti.lane + 8 * i < p.N);
      tile_max = fmaxf(tile_max, x[i]);
    }
    const float m_new = fmaxf(m, row_max8(tile_max));
    float sum = 0.f;
    for (int i = 0; i < kColsPerThread; ++i) sum += exp2f((x[i] - m_new) * kLog2e);
    l = l * exp2f((m - m_new) * kLog2e) + row_sum8(sum);
    m = m_new;
  }
  const int64_t row = row0 + ti.row;
  if (ti.lane == 0 && row < p.N) {
    const int64_t at = slot(p, b, pair, h) + row;
    p.stats[2 * at] = m;
    p.stats[2 * at + 1] = log2f(l);
  }
}

// out[b, pair, h, cols] = Σ_i P_ij over row blocks, for a column block. Grid (B·P·H, ⌈N/32⌉).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) colsum_fwd_cols_kernel(ColsumParams p) {
  __shared__ float partial[kTile][kTile + 1];
  const int64_t id = blockIdx.x, h = id % p.H, pair = (id / p.H) % p.P, b = id / (p.H * p.P);
  const TileIndex ti = tile_index();
  const int64_t col0 = int64_t(blockIdx.y) * kTile;
  const int64_t base = slot(p, b, pair, h);
  float acc[kColsPerThread] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t row0 = 0; row0 < p.N; row0 += kTile) {
    float z[kColsPerThread];
    score_tile<T>(p, b, h, pair, pair + p.offset, p.paired, row0, col0, z);
    const int64_t row = row0 + ti.row;
    if (row < p.N) {
      const float m = p.stats[2 * (base + row)], l = p.stats[2 * (base + row) + 1];
      for (int i = 0; i < kColsPerThread; ++i) {
        const float x = logit(z[i], p.paired, col0 + ti.lane + 8 * i < p.N);
        acc[i] += exp2f((x - m) * kLog2e - l);
      }
    }
  }
  for (int i = 0; i < kColsPerThread; ++i) partial[ti.row][ti.lane + 8 * i] = acc[i];
  __syncthreads();
  if (threadIdx.x < kTile && col0 + threadIdx.x < p.N) {
    float sum = 0.f;
    for (int r = 0; r < kTile; ++r) sum += partial[r][threadIdx.x];  // fixed order: deterministic
    static_cast<T*>(p.out)[base + col0 + threadIdx.x] = from_float<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// c = Σ_j P g / Σ_j P and stats_bwd = (m, l + log2 Σ_j P) of a row block. Grid (B·P·H, ⌈N/32⌉).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) colsum_bwd_rowdot_kernel(ColsumParams p) {
  const int64_t id = blockIdx.x, h = id % p.H, pair = (id / p.H) % p.P, b = id / (p.H * p.P);
  const TileIndex ti = tile_index();
  const int64_t row0 = int64_t(blockIdx.y) * kTile, row = row0 + ti.row;
  const int64_t base = slot(p, b, pair, h);
  const bool row_ok = row < p.N;
  const float m = row_ok ? p.stats[2 * (base + row)] : 0.f;
  const float l = row_ok ? p.stats[2 * (base + row) + 1] : 0.f;
  const T* grad = static_cast<const T*>(p.grad);
  float pg = 0.f, mass = 0.f;
  for (int64_t col0 = 0; col0 < p.N; col0 += kTile) {
    float z[kColsPerThread];
    score_tile<T>(p, b, h, pair, pair + p.offset, p.paired, row0, col0, z);
    for (int i = 0; i < kColsPerThread; ++i) {
      const int64_t col = col0 + ti.lane + 8 * i;
      if (col < p.N) {
        const float prob = exp2f((logit(z[i], p.paired, true) - m) * kLog2e - l);
        pg += prob * to_float(grad[base + col]);
        mass += prob;
      }
    }
  }
  pg = row_sum8(pg);
  mass = row_sum8(mass);
  if (ti.lane == 0 && row_ok) {
    p.rowdot[base + row] = pg / mass;
    p.stats_bwd[2 * (base + row)] = m;
    p.stats_bwd[2 * (base + row) + 1] = l + log2f(mass);
  }
}

// ∂L/∂z of pair `pair` for this thread's tile entries, added with sign `sign` into e.
template <typename T>
__device__ void add_pair_dscores(const ColsumParams& p, int64_t b, int64_t h, int64_t pair, float sign,
                                 int64_t row0, int64_t col0, float (&e)[kColsPerThread]) {
  const TileIndex ti = tile_index();
  float z[kColsPerThread];
  score_tile<T>(p, b, h, pair, pair + p.offset, p.paired, row0, col0, z);
  const int64_t row = row0 + ti.row, base = slot(p, b, pair, h);
  if (row >= p.N) return;
  const float m = p.stats_bwd[2 * (base + row)], l = p.stats_bwd[2 * (base + row) + 1];
  const float c = p.rowdot[base + row];
  const T* grad = static_cast<const T*>(p.grad);
  for (int i = 0; i < kColsPerThread; ++i) {
    const int64_t col = col0 + ti.lane + 8 * i;
    if (col >= p.N) continue;
    const float prob = exp2f((logit(z[i], p.paired, true) - m) * kLog2e - l);
    float ds = prob * (to_float(grad[base + col]) - c);
    if (p.paired) ds = z[i] > 0.f ? ds : (z[i] < 0.f ? -ds : 0.f);
    e[i] += sign * ds;
  }
}

// E_t tile of frame t: pair t (first frame, +) and pair t − Δ (second frame, −).
template <typename T>
__device__ void frame_dscores(const ColsumParams& p, int64_t b, int64_t h, int64_t t, int64_t row0, int64_t col0,
                              float (&e)[kColsPerThread]) {
  for (int i = 0; i < kColsPerThread; ++i) e[i] = 0.f;
  if (t < p.P) add_pair_dscores<T>(p, b, h, t, 1.f, row0, col0, e);
  if (p.paired && t >= p.offset) add_pair_dscores<T>(p, b, h, t - p.offset, -1.f, row0, col0, e);
}

// A block of the dQ/dK pass: 32 owned rows (dQ_t) or columns (dK_t) of frame t of (b, h),
// the other operand (K_t for dQ, Q_t for dK) and where frame t's gradient starts.
template <typename T>
struct GradBlock {
  int64_t b, h, t, own0;
  const T* other;
  const int64_t* other_stride;
  int64_t other_base;
  T* dst;  // frame t of (b, h) in the contiguous (B, T, H, N, D) gradient
};

// The E_t tile at `step0` of the other axis, owned index first: tile[own][other].
template <typename T, bool kTranspose, typename Elem, int kPad>
__device__ void write_dscores(const ColsumParams& p, const GradBlock<T>& g, int64_t step0, Elem (&tile)[kTile][kPad]) {
  const TileIndex ti = tile_index();
  float e[kColsPerThread];
  const int64_t row0 = kTranspose ? step0 : g.own0, col0 = kTranspose ? g.own0 : step0;
  frame_dscores<T>(p, g.b, g.h, g.t, row0, col0, e);
  for (int i = 0; i < kColsPerThread; ++i) {
    const int c = ti.lane + 8 * i;
    const Elem v = from_float<Elem>(e[i]);
    if (kTranspose) tile[c][ti.row] = v;
    else tile[ti.row][c] = v;
  }
}

// acc (32 owned × D) += E (32 × 32) · Other (32 × D) on CUDA cores: thread (r, lane)
// accumulates owned index r, dims lane + 8·i, reading Other through its strides.
template <typename T, bool kTranspose>
__device__ void dqdk_cuda_cores(const ColsumParams& p, const GradBlock<T>& g) {
  __shared__ float e_tile[kTile][kTile + 1];
  const TileIndex ti = tile_index();
  float acc[kDimsPerThread];
  for (int i = 0; i < kDimsPerThread; ++i) acc[i] = 0.f;
  for (int64_t step0 = 0; step0 < p.N; step0 += kTile) {
    write_dscores<T, kTranspose>(p, g, step0, e_tile);
    __syncthreads();
    for (int j = 0; j < kTile && step0 + j < p.N; ++j) {
      const float w = e_tile[ti.row][j];
      const int64_t at = g.other_base + (step0 + j) * g.other_stride[3];
      for (int i = 0; i < kDimsPerThread; ++i) {
        const int64_t d = ti.lane + 8 * i;
        if (d < p.D) acc[i] += w * to_float(g.other[at + d * g.other_stride[4]]);
      }
    }
    __syncthreads();
  }
  const int64_t own = g.own0 + ti.row;
  if (own < p.N) {
    for (int i = 0; i < kDimsPerThread; ++i) {
      const int64_t d = ti.lane + 8 * i;
      if (d < p.D) g.dst[own * p.D + d] = from_float<T>(acc[i] * p.scale);
    }
  }
}

// The same product on tensor cores, E rounded to T: Other's 32 × D tile is staged in shared
// memory (D zero-padded to a multiple of 16), and warp w accumulates the 16 owned indices
// 16·(w mod 2).. for the D fragments w/2 + 4·i; fp32 fragments go out through shared memory.
template <typename T, bool kTranspose>
__device__ void dqdk_tensor_cores(const ColsumParams& p, const GradBlock<T>& g) {
  namespace wmma = nvcuda::wmma;
  constexpr int kPad = kTile + 8, kOtherPad = kMaxHeadDim + 8;
  constexpr int kRowGroups = kTile / kFragment;                              // 2
  constexpr int kFragsPerWarp = kMaxHeadDim / kFragment / (kWarps / kRowGroups);  // 4
  struct OtherOrStaging {
    union {
      alignas(32) T other[kTile][kOtherPad];                   // during the loop
      alignas(32) float staging[kWarps][kFragment * kFragment];  // after it
    };
  };
  __shared__ __align__(32) T e_tile[kTile][kPad];
  __shared__ OtherOrStaging sm;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int frag_row = warp % kRowGroups * kFragment, first_frag = warp / kRowGroups;
  const int frags = int((p.D + kFragment - 1) / kFragment), dpad = frags * kFragment;
  const T zero = from_float<T>(0.f);
  wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float> acc[kFragsPerWarp];
#pragma unroll
  for (int i = 0; i < kFragsPerWarp; ++i) wmma::fill_fragment(acc[i], 0.f);
  for (int64_t step0 = 0; step0 < p.N; step0 += kTile) {
    write_dscores<T, kTranspose>(p, g, step0, e_tile);
    for (int e = threadIdx.x; e < kTile * dpad; e += kThreads) {
      const int j = e / dpad, d = e % dpad;
      sm.other[j][d] = (step0 + j < p.N && d < p.D)
          ? g.other[g.other_base + (step0 + j) * g.other_stride[3] + d * g.other_stride[4]]
          : zero;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kFragsPerWarp; ++i) {
      const int frag = first_frag + (kWarps / kRowGroups) * i;
      if (frag >= frags) continue;
      for (int kk = 0; kk < kTile; kk += kFragment) {
        wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, wmma::row_major> ef;
        wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::row_major> of;
        wmma::load_matrix_sync(ef, &e_tile[frag_row][kk], kPad);
        wmma::load_matrix_sync(of, &sm.other[kk][frag * kFragment], kOtherPad);
        wmma::mma_sync(acc[i], ef, of, acc[i]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kFragsPerWarp; ++i) {
    const int frag = first_frag + (kWarps / kRowGroups) * i;
    if (frag >= frags) continue;
    wmma::store_matrix_sync(sm.staging[warp], acc[i], kFragment, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < kFragment * kFragment; e += 32) {
      const int64_t own = g.own0 + frag_row + e / kFragment, d = frag * kFragment + e % kFragment;
      if (own < p.N && d < p.D) g.dst[own * p.D + d] = from_float<T>(sm.staging[warp][e] * p.scale);
    }
    __syncwarp();
  }
}

// dQ_t[rows] (transpose = false) or dK_t[cols] (transpose = true) of one 32-wide block of
// frame t: Σ over the other axis of E_t · K_t (resp. E_tᵀ · Q_t). Grid (B·T·H, ⌈N/32⌉).
template <typename T, bool kTranspose>
__global__ void __launch_bounds__(kThreads, 1) colsum_bwd_dqdk_kernel(ColsumParams p) {
  GradBlock<T> g;
  const int64_t id = blockIdx.x;
  g.h = id % p.H;
  g.t = (id / p.H) % p.T;
  g.b = id / (p.H * p.T);
  g.own0 = int64_t(blockIdx.y) * kTile;
  g.other = static_cast<const T*>(kTranspose ? p.q : p.k);
  g.other_stride = kTranspose ? p.q_stride : p.k_stride;
  g.other_base = frame_base(g.other_stride, g.b, g.t, g.h);
  g.dst = static_cast<T*>(kTranspose ? p.dk : p.dq) + ((g.b * p.T + g.t) * p.H + g.h) * p.N * p.D;
  if constexpr (kTensorCores<T>) dqdk_tensor_cores<T, kTranspose>(p, g);
  else dqdk_cuda_cores<T, kTranspose>(p, g);
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

inline unsigned blocks_for(int64_t n) { return unsigned((n + kTile - 1) / kTile); }

template <typename T>
cudaError_t launch_forward(const ColsumParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.B * p.P * p.H), blocks_for(p.N));
  colsum_fwd_stats_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  colsum_fwd_cols_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const ColsumParams& p, cudaStream_t stream) {
  colsum_bwd_rowdot_kernel<T><<<dim3(unsigned(p.B * p.P * p.H), blocks_for(p.N)), kThreads, 0, stream>>>(p);
  const dim3 frames(unsigned(p.B * p.T * p.H), blocks_for(p.N));
  colsum_bwd_dqdk_kernel<T, false><<<frames, kThreads, 0, stream>>>(p);
  colsum_bwd_dqdk_kernel<T, true><<<frames, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace amflow::cuda
