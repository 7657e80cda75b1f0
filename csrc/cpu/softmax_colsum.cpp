// Fused CPU kernels for amflow::softmax_colsum_fwd / _bwd (float32, float64).
//
// A task owns one (clip b, head h). It first lays out scale · K_tᵀ of every frame densely (the
// right operand of its GEMMs), then walks row blocks of R query rows (32 to 128). For a row
// block, a GEMM per frame forms its score rows, S[t] = scale · Q_t[rows] K_tᵀ (T × R × N, kept in
// cache), so each frame's scores are computed once and shared by the two pairs it belongs to.
// Small GEMMs run on our register kernel without any ATen call, large ones on ATen's (see gemm
// below). Row softmaxes, |·| and column sums are vectorised with at::vec. Extra memory is
// O(T·(D + R)·N) per thread (never N × N per (clip, head)); outputs are owned by their task, so
// results do not depend on the thread count and no reduction races.
//
// Forward, per row i of pair p (a = p, b = p + offset; not paired: z = S[p]):
//   z = S[a] − S[b], x = |z|, m = max_j x, e = exp(x − m), P = e / Σ_j e;  out[p] += Σ_i P.
// Backward, with g = ∂L/∂out[p] and c_i = Σ_j P_ij g_j (P recomputed exactly from full rows):
//   ∂L/∂z_ij = sign(z_ij)·P_ij·(g_j − c_i);   E_t = ∂L/∂z^(t) − ∂L/∂z^(t−offset)
//   dQ_t[rows] = scale · E_t K_t,   dK_t += scale · E_tᵀ Q_t[rows]   (a GEMM per frame).

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../checks.h"
#include "tasks.h"
#include "small_gemm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace amflow {
namespace {

using at::vec::Vectorized;

// Rows per block: large blocks give the GEMMs more rows per key loaded; the (T, R, N) score
// and gradient buffers of a thread stay near 8 MiB in float32 (at least 32 rows).
int64_t row_block(int64_t T, int64_t N) {
  return std::clamp<int64_t>((int64_t{1} << 21) / (T * N), 32, 128);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired) {
  check_softmax_colsum_inputs("cpu", q, k, offset, paired);
  TORCH_CHECK(q.device().is_cpu(), "softmax_colsum (cpu): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "softmax_colsum (cpu): q.dtype must be float32 or float64, got ", q.scalar_type());
}

template <typename scalar_t>
scalar_t row_max(const scalar_t* x, int64_t n) {
  return at::vec::reduce_all<scalar_t>(
      [](Vectorized<scalar_t>& a, Vectorized<scalar_t>& b) { return at::vec::maximum(a, b); }, x, n);
}

// x ← exp(x − m) in place; returns Σ_j exp(x_j − m).
template <typename scalar_t>
scalar_t exp_shifted_sum(scalar_t* x, scalar_t m, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec shift(m);
  Vec acc(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - shift).exp();
    e.store(x + j);
    acc = acc + e;
  }
  scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    sum += x[j];
  }
  return sum;
}

// Row i of the logits x = |S[a] − S[b]| (paired) or S[a], into `x`; z keeps the signed values.
template <typename scalar_t>
void row_logits(const scalar_t* sa, const scalar_t* sb, bool paired, scalar_t* z, scalar_t* x, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  if (!paired) {
    std::copy(sa, sa + n, x);
    return;
  }
  at::vec::map2<scalar_t>([](Vec a, Vec b) { return a - b; }, z, sa, sb, n);
  at::vec::map<scalar_t>([](Vec v) { return v.abs(); }, x, z, n);
}

struct Shape {
  int64_t B, T, H, N, D, P, offset;
  bool paired;
};

Shape shape_of(const at::Tensor& q, int64_t offset, bool paired) {
  const int64_t T = q.size(1);
  return {q.size(0), T, q.size(2), q.size(3), q.size(4), paired ? T - offset : T, paired ? offset : 0, paired};
}

// Rows of frame t of one (b, h) in a (B, T, H, N, D) tensor with a unit last stride.
template <typename scalar_t>
struct Frames {
  scalar_t* data;
  int64_t frame_stride, row_stride;

  Frames(const at::Tensor& x, int64_t b, int64_t h)
      : data(x.data_ptr<std::remove_const_t<scalar_t>>() + b * x.stride(0) + h * x.stride(2)),
        frame_stride(x.stride(1)), row_stride(x.stride(3)) {}
  scalar_t* row(int64_t t, int64_t n) const { return data + t * frame_stride + n * row_stride; }
};

// Thread-local buffers of one parallel chunk, reused by all its tasks.
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> keys_t;  // (T, D, N): scale · K_tᵀ
  std::vector<scalar_t> scores;  // (T, R, N): S_t of a row block
  std::vector<scalar_t> grads;   // (T, R, N): scale · E_t of a row block (backward)
  std::vector<scalar_t> z, x, dz;

  Scratch(const Shape& s, int64_t R, bool backward)
      : keys_t(s.T * s.D * s.N), scores(s.T * R * s.N), grads(backward ? s.T * R * s.N : 0), z(s.N), x(s.N),
        dz(s.N) {}
};

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

// keys_t[t] = scale · K_tᵀ (D × N, dense) for every frame of the task.
template <typename scalar_t>
void scaled_keys_transposed(const Shape& s, const Frames<const scalar_t>& k, scalar_t scale, scalar_t* keys_t) {
  for (int64_t t = 0; t < s.T; ++t) {
    scalar_t* kt = keys_t + t * s.D * s.N;
    for (int64_t n = 0; n < s.N; ++n) {
      const scalar_t* kn = k.row(t, n);
      for (int64_t d = 0; d < s.D; ++d) kt[d * s.N + n] = scale * kn[d];
    }
  }
}

// scores[t] = Q_t[r0 : r0 + rows] · keys_t[t] = S_t rows (rows × N) for every frame.
template <typename scalar_t>
void frame_scores(const Shape& s, const Frames<const scalar_t>& q, const scalar_t* keys_t, int64_t r0, int64_t rows,
                  scalar_t* scores) {
  for (int64_t t = 0; t < s.T; ++t) {
    const Operand<scalar_t> q_rows{q.row(t, r0), q.row_stride, 1};
    gemm(scores + t * rows * s.N, s.N, q_rows, keys_t + t * s.D * s.N, s.N, rows, s.D, s.N, false);
  }
}

template <typename scalar_t>
void forward_task(const Shape& s, int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k, scalar_t scale,
                  Scratch<scalar_t>& buf, scalar_t* out, float* stats) {
  using Vec = Vectorized<scalar_t>;
  const int64_t N = s.N;
  scalar_t* z = buf.z.data();
  scalar_t* x = buf.x.data();
  const Frames<const scalar_t> qf(q, b, h);
  scaled_keys_transposed(s, Frames<const scalar_t>(k, b, h), scale, buf.keys_t.data());
  const int64_t R = row_block(s.T, N);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const scalar_t* scores = buf.scores.data();
    frame_scores(s, qf, buf.keys_t.data(), r0, rows, buf.scores.data());
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t slice = ((b * s.P + p) * s.H + h) * N;
      scalar_t* colsum = out + slice;
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* sa = scores + (p * rows + i) * N;
        const scalar_t* sb = scores + ((p + s.offset) * rows + i) * N;
        row_logits(sa, sb, s.paired, z, x, N);
        const scalar_t m = row_max(x, N);
        const scalar_t sum = exp_shifted_sum(x, m, N);
        const scalar_t inv = scalar_t(1) / sum;
        at::vec::map2<scalar_t>([inv](Vec acc, Vec e) { return acc + e * Vec(inv); }, colsum, colsum, x, N);
        stats[2 * (slice + r0 + i)] = static_cast<float>(m);
        stats[2 * (slice + r0 + i) + 1] = static_cast<float>(std::log2(sum));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_colsum_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          int64_t offset, bool paired, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q_in, k_in, offset, paired);
  const auto q = unit_last_stride(q_in);
  const auto k = unit_last_stride(k_in);
  const Shape s = shape_of(q, offset, paired);
  auto out = at::zeros({s.B, s.P, s.H, s.N}, q.options());
  auto stats = at::empty({s.B, s.P, s.H, s.N, 2}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "softmax_colsum_fwd_cpu", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    float* stats_ptr = stats.data_ptr<float>();
    parallel_tasks(s.B * s.H, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> buf(s, row_block(s.T, s.N), false);
      for (int64_t task = begin; task < end; ++task) {
        forward_task<scalar_t>(s, task / s.H, task % s.H, q, k, static_cast<scalar_t>(scale), buf, out_ptr, stats_ptr);
      }
    });
  });
  return {out, stats};
}

// The row softmax is recomputed exactly from full rows, so the forward's stats are not needed.
template <typename scalar_t>
void backward_task(const Shape& s, int64_t b, int64_t h, const scalar_t* grad, const at::Tensor& q,
                   const at::Tensor& k, scalar_t scale, Scratch<scalar_t>& buf, at::Tensor& dq, at::Tensor& dk) {
  using Vec = Vectorized<scalar_t>;
  const int64_t N = s.N, D = s.D;
  scalar_t* z = buf.z.data();
  scalar_t* prob = buf.x.data();
  scalar_t* dz = buf.dz.data();
  const Frames<const scalar_t> qf(q, b, h), kf(k, b, h);
  const Frames<scalar_t> dqf(dq, b, h), dkf(dk, b, h);
  scaled_keys_transposed(s, kf, scale, buf.keys_t.data());
  const int64_t R = row_block(s.T, N);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const scalar_t* scores = buf.scores.data();
    scalar_t* grads = buf.grads.data();  // scale · E_t of every frame
    frame_scores(s, qf, buf.keys_t.data(), r0, rows, buf.scores.data());
    std::fill(grads, grads + s.T * rows * N, scalar_t(0));
    for (int64_t p = 0; p < s.P; ++p) {
      const scalar_t* g = grad + ((b * s.P + p) * s.H + h) * N;
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* sa = scores + (p * rows + i) * N;
        const scalar_t* sb = scores + ((p + s.offset) * rows + i) * N;
        row_logits(sa, sb, s.paired, z, prob, N);
        const scalar_t m = row_max(prob, N);
        const scalar_t inv = scalar_t(1) / exp_shifted_sum(prob, m, N);
        at::vec::map<scalar_t>([inv](Vec e) { return e * Vec(inv); }, prob, prob, N);
        const scalar_t c = at::vec::map2_reduce_all<scalar_t>(
            [](Vec pv, Vec gv) { return pv * gv; }, [](Vec a, Vec bv) { return a + bv; }, prob, g, N);
        // dz = scale · P · (g − c), signed by z when paired.
        at::vec::map2<scalar_t>([c, scale](Vec pv, Vec gv) { return pv * (gv - Vec(c)) * Vec(scale); },
                                dz, prob, g, N);
        scalar_t* e_first = grads + (p * rows + i) * N;
        scalar_t* e_second = grads + ((p + s.offset) * rows + i) * N;
        if (s.paired) {
          for (int64_t j = 0; j < N; ++j) {
            const scalar_t v = z[j] > 0 ? dz[j] : (z[j] < 0 ? -dz[j] : scalar_t(0));
            e_first[j] += v;
            e_second[j] -= v;
          }
        } else {
          at::vec::map2<scalar_t>([](Vec a, Vec d) { return a + d; }, e_first, e_first, dz, N);
        }
      }
    }
    for (int64_t t = 0; t < s.T; ++t) {
      const scalar_t* e = grads + t * rows * N;
      // dQ_t[rows] = (scale · E_t) K_t;  dK_t += (scale · E_t)ᵀ Q_t[rows].
      gemm(dqf.row(t, r0), D, dense(e, N), kf.row(t, 0), kf.row_stride, rows, N, D, false);
      gemm(dkf.row(t, 0), D, transposed(e, N), qf.row(t, r0), qf.row_stride, N, rows, D, true);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_colsum_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                          const at::Tensor& k_in, const at::Tensor& stats,
                                                          int64_t offset, bool paired, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q_in, k_in, offset, paired);
  const auto q = unit_last_stride(q_in);
  const auto k = unit_last_stride(k_in);
  const Shape s = shape_of(q, offset, paired);
  check_softmax_colsum_grad("cpu", grad_in, {s.B, s.P, s.H, s.N});
  const auto grad = grad_in.to(q.scalar_type()).contiguous();
  // Contiguous (B, T, H, N, D) gradients, written through the same row view as q and k.
  auto dq = at::empty({s.B, s.T, s.H, s.N, s.D}, q.options());
  auto dk = at::zeros({s.B, s.T, s.H, s.N, s.D}, k.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "softmax_colsum_bwd_cpu", [&] {
    const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    parallel_tasks(s.B * s.H, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> buf(s, row_block(s.T, s.N), true);
      for (int64_t task = begin; task < end; ++task) {
        backward_task<scalar_t>(s, task / s.H, task % s.H, grad_ptr, q, k, static_cast<scalar_t>(scale), buf, dq, dk);
      }
    });
  });
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(amflow, CPU, m) {
  m.impl("softmax_colsum_fwd", &softmax_colsum_fwd_cpu);
  m.impl("softmax_colsum_bwd", &softmax_colsum_bwd_cpu);
}

}  // namespace amflow
