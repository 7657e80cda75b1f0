// A small register-blocked GEMM (at::vec) for the CPU kernels, called inside their parallel
// tasks. It is ours rather than ATen's: the kernels run thousands of small heads and row blocks
// (head dims of 4 to 64, a few dozen tokens), where a dispatched call per product would cost
// more than the arithmetic; and it makes no allocation and no dispatcher round trip in a worker.
// Sums run in k order, so results do not depend on the thread count. ``gemm`` picks between it
// and ATen's GEMM by the product's size.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace amflow {

// A matrix operand read as data[r · row_stride + k · k_stride]: a dense matrix, or its transpose.
template <typename scalar_t>
struct Operand {
  const scalar_t* data;
  int64_t row_stride, k_stride;
  scalar_t operator()(int64_t r, int64_t k) const { return data[r * row_stride + k * k_stride]; }
};

// Row-major data with `cols` columns, and its transpose.
template <typename scalar_t>
Operand<scalar_t> dense(const scalar_t* data, int64_t cols) { return {data, cols, 1}; }

template <typename scalar_t>
Operand<scalar_t> transposed(const scalar_t* data, int64_t cols) { return {data, 1, cols}; }

// One R × (V·W) tile of Y = A B (+ Y when accumulating), at rows r0 and column c0; row k of B
// starts at B + k·b_stride. The R·V accumulators stay in registers: each row of B loaded once
// serves R rows, and R·V independent FMA chains hide the FMA latency.
template <int R, int V, typename scalar_t>
void gemm_tile(scalar_t* Y, int64_t y_stride, const Operand<scalar_t>& A, const scalar_t* B, int64_t b_stride,
               int64_t K, int64_t r0, int64_t c0, bool accumulate) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? Vec::loadu(Y + (r0 + r) * y_stride + c0 + v * W) : Vec(0);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = Vec::loadu(B + k * b_stride + c0 + v * W);
    for (int r = 0; r < R; ++r) {
      const Vec a(A(r0 + r, k));
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v].store(Y + (r0 + r) * y_stride + c0 + v * W);
}

// Columns [c0, c0 + V·W) of Y = A B (+ Y), in tiles of kRows rows, then single rows.
template <int V, typename scalar_t>
void gemm_columns(scalar_t* Y, int64_t y_stride, const Operand<scalar_t>& A, const scalar_t* B, int64_t b_stride,
                  int64_t rows, int64_t K, int64_t c0, bool accumulate) {
  constexpr int kRows = 4;
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows) gemm_tile<kRows, V>(Y, y_stride, A, B, b_stride, K, r0, c0, accumulate);
  for (; r0 < rows; ++r0) gemm_tile<1, V>(Y, y_stride, A, B, b_stride, K, r0, c0, accumulate);
}

// Y = A B, or Y += A B when accumulating: A is rows × K (an Operand), B is K × C with row
// stride b_stride and unit column stride, Y is rows × C with row stride y_stride. Column strips
// of two vectors, then one, then scalar columns; a strip of B (K × 2W) stays in L1 while every
// row of A passes over it.
template <typename scalar_t>
void small_gemm(scalar_t* Y, int64_t y_stride, const Operand<scalar_t>& A, const scalar_t* B, int64_t b_stride,
                int64_t rows, int64_t K, int64_t C, bool accumulate) {
  constexpr int64_t W = at::vec::Vectorized<scalar_t>::size();
  int64_t c0 = 0;
  for (; c0 + 2 * W <= C; c0 += 2 * W) gemm_columns<2>(Y, y_stride, A, B, b_stride, rows, K, c0, accumulate);
  for (; c0 + W <= C; c0 += W) gemm_columns<1>(Y, y_stride, A, B, b_stride, rows, K, c0, accumulate);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = c0; c < C; ++c) {
      scalar_t sum = accumulate ? Y[r * y_stride + c] : scalar_t(0);
      for (int64_t k = 0; k < K; ++k) sum += A(r, k) * B[k * b_stride + c];
      Y[r * y_stride + c] = sum;
    }
  }
}

// Y (rows × C, row stride y_stride) = A B, or += A B when accumulating; B is K × C with row
// stride b_stride. Small products go to our register GEMM, where an ATen call per product
// would cost more than the arithmetic (attention_colsum on a few dozen tokens runs one task per
// frame and head); large ones to ATen's GEMM (MKL) on views of the same buffers, whose wider
// vector kernels win there. The threshold is the measured crossover (2 threads, AVX2 build;
// 2^14 and 2^20 were each slower at some token count from 17 to 1370).
constexpr int64_t kAtenGemmMacs = int64_t{1} << 17;

template <typename scalar_t>
void gemm(scalar_t* Y, int64_t y_stride, const Operand<scalar_t>& A, const scalar_t* B, int64_t b_stride,
          int64_t rows, int64_t K, int64_t C, bool accumulate) {
  if (rows * K * C < kAtenGemmMacs) return small_gemm(Y, y_stride, A, B, b_stride, rows, K, C, accumulate);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto a = at::from_blob(const_cast<scalar_t*>(A.data), {rows, K}, {A.row_stride, A.k_stride}, options);
  const auto b = at::from_blob(const_cast<scalar_t*>(B), {K, C}, {b_stride, 1}, options);
  auto y = at::from_blob(Y, {rows, C}, {y_stride, 1}, options);
  if (accumulate) y.addmm_(a, b);
  else at::mm_out(y, a, b);
}

template <typename scalar_t>
scalar_t dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), acc);
  scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

}  // namespace amflow
