// Stands in for CUDA's <mma.h> when csrc/cuda/*.cuh is compiled for the emulator: the WMMA API
// (nvcuda::wmma) for 16 × 16 × 16 tiles, each fragment holding its lane's 8 elements of the
// tile in row-major order. Loads and stores check the API's alignment rules (256-bit pointers,
// leading dimensions a multiple of 16 bytes) and, like mma_sync, are collectives of the warp.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../emulator.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16 x 16 x 16 WMMA tiles only");
  static constexpr int num_elements = 256 / int(::emu::kWarpSize);
  T x[num_elements];
};

namespace detail {

// Row and column of element i of this lane's share of a 16 × 16 tile.
inline int row_of(int i) { return (int(::emu::lane()) * 8 + i) / 16; }
inline int col_of(int i) { return (int(::emu::lane()) * 8 + i) % 16; }

template <typename T>
void check_access(const char* op, const T* ptr, unsigned ldm) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % 32 != 0)
    ::emu::fail(std::string(op) + ": pointer not 256-bit aligned");
  if (ldm * sizeof(T) % 16 != 0) ::emu::fail(std::string(op) + ": ldm not a multiple of 16 bytes");
}

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  detail::check_access("wmma::load_matrix_sync", ptr, ldm);
  ::emu::warp_collective("wmma::load_matrix_sync");
  for (int i = 0; i < 8; ++i) {
    const int r = detail::row_of(i), c = detail::col_of(i);
    f.x[i] = std::is_same_v<Layout, row_major> ? ptr[r * ldm + c] : ptr[c * ldm + r];
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T value) {
  for (T& v : f.x) v = value;
}

template <typename T>
void store_matrix_sync(T* ptr, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  detail::check_access("wmma::store_matrix_sync", ptr, ldm);
  ::emu::warp_collective("wmma::store_matrix_sync");
  for (int i = 0; i < 8; ++i) {
    const int r = detail::row_of(i), c = detail::col_of(i);
    (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.x[i];
  }
}

// d = a · b + c over the whole warp: the lanes' shares meet in the warp's scratch.
template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  auto& scratch = ::emu::current().warps[::emu::warp()];
  const unsigned slot = ::emu::warp_slot();
  for (int i = 0; i < 8; ++i) {
    const int at = detail::row_of(i) * 16 + detail::col_of(i);
    scratch.a[slot][at] = detail::as_float(a.x[i]);
    scratch.b[slot][at] = detail::as_float(b.x[i]);
    scratch.c[slot][at] = c.x[i];
  }
  ::emu::warp_collective("wmma::mma_sync");
  for (int i = 0; i < 8; ++i) {
    const int r = detail::row_of(i), n = detail::col_of(i);
    float acc = scratch.c[slot][r * 16 + n];
    for (int kk = 0; kk < 16; ++kk) acc += scratch.a[slot][r * 16 + kk] * scratch.b[slot][kk * 16 + n];
    d.x[i] = acc;
  }
}

}  // namespace nvcuda::wmma
