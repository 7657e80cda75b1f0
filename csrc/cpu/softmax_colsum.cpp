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
// Every row of the scratch buffers is padded to Np, a whole number of vectors: the keys' padded
// columns are zero, so the GEMMs and the row loops run on whole vectors with no scalar tail (at
// a few dozen tokens the tails cost as much as the rest), and the padded logits are set to −∞,
// so they add nothing to a softmax.
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
#include "kernel_limits.h"
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
  check_dtype("softmax_colsum", "cpu", q.scalar_type(), cpu::limits::kDtypes);
}

// The row helpers below take whole vectors: n is a multiple of Vectorized<scalar_t>::size().
// x ← exp(x − m) in place; returns Σ_j exp(x_j − m).
template <typename scalar_t>
scalar_t exp_shifted_sum(scalar_t* x, scalar_t m, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec shift(m);
  Vec acc(0);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const Vec e = (Vec::loadu(x + j) - shift).exp();
    e.store(x + j);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// The logits of one padded score row: x = |S[a] − S[b]| with z = S[a] − S[b] kept (paired), or
// x = S[a]; x = −∞ on the padding [n, np), which the softmax turns into zeros. Returns max_j x,
// formed in the same pass (a second pass would reload x at a few dozen tokens, where the passes
// over a row cost more than its exponentials).
template <typename scalar_t>
scalar_t row_logits_max(const scalar_t* sa, const scalar_t* sb, bool paired, scalar_t* z, scalar_t* x, int64_t n,
                        int64_t np) {
  using Vec = Vectorized<scalar_t>;
  const Vec minus_inf(-std::numeric_limits<scalar_t>::infinity());
  Vec acc = minus_inf;
  for (int64_t j = 0; j < np; j += Vec::size()) {
    Vec v = Vec::loadu(sa + j);
    if (paired) {
      const Vec difference = v - Vec::loadu(sb + j);
      difference.store(z + j);
      v = difference.abs();
    }
    // Past n (the last vectors: rows are padded to whole float vectors), keep the real lanes.
    if (j + Vec::size() > n) v = Vec::set(minus_inf, v, std::max<int64_t>(n - j, 0));
    v.store(x + j);
    acc = at::vec::maximum(acc, v);
  }
  return at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
}

// The logit gradient of one row, dz_j = factor · e_j · (g_j − c) (∂L/∂z = scale · P · (g − c) with
// P = e / Σ e, so factor = scale / Σ e), added to the frames' score gradients: e_first += sign(z)·dz
// and e_second −= sign(z)·dz, with sign(0) = sign(NaN) = 0 (paired), or e_first += dz.
template <typename scalar_t>
void scatter_logit_grad(const scalar_t* z, const scalar_t* e, const scalar_t* g, scalar_t c, scalar_t factor,
                        bool paired, scalar_t* e_first, scalar_t* e_second, int64_t np) {
  using Vec = Vectorized<scalar_t>;
  const Vec zero(0);
  for (int64_t j = 0; j < np; j += Vec::size()) {
    Vec v = Vec(factor) * Vec::loadu(e + j) * (Vec::loadu(g + j) - Vec(c));
    if (paired) {
      const Vec zj = Vec::loadu(z + j);
      v = Vec::blendv(zero, v, zj > zero) - Vec::blendv(zero, v, zj < zero);
      (Vec::loadu(e_second + j) - v).store(e_second + j);
    }
    (Vec::loadu(e_first + j) + v).store(e_first + j);
  }
}

struct Shape {
  int64_t B, T, H, N, D, P, offset;
  bool paired;
  int64_t Np;  // N rounded up to whole vectors (of float, so of double too): scratch rows
};

Shape shape_of(const at::Tensor& q, int64_t offset, bool paired) {
  const int64_t T = q.size(1), N = q.size(3), W = Vectorized<float>::size();
  return {q.size(0), T, q.size(2), N, q.size(4), paired ? T - offset : T, paired ? offset : 0, paired,
          (N + W - 1) / W * W};
}

// Offset of the N outputs (or output gradients) of clip b, pair p, head h in (B, P, H, N).
int64_t output_slice(const Shape& s, int64_t b, int64_t p, int64_t h) { return ((b * s.P + p) * s.H + h) * s.N; }

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

// Thread-local buffers of one parallel chunk, reused by all its tasks; rows padded to Np, the
// padding of keys_t and grad_row zero (no task writes it).
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> keys_t;   // (T, D, Np): scale · K_tᵀ
  std::vector<scalar_t> scores;   // (T, R, Np): S_t of a row block
  std::vector<scalar_t> colsums;  // (P, Np): the task's column sums (forward)
  std::vector<scalar_t> grads;    // (T, R, Np): scale · E_t of a row block (backward)
  std::vector<scalar_t> grad_row; // (Np): ∂L/∂out of one pair (backward)
  std::vector<scalar_t> z, x;     // (Np) each

  Scratch(const Shape& s, int64_t R, bool backward)
      : keys_t(s.T * s.D * s.Np), scores(s.T * R * s.Np), colsums(backward ? 0 : s.P * s.Np),
        grads(backward ? s.T * R * s.Np : 0), grad_row(backward ? s.Np : 0), z(s.Np), x(s.Np) {}
};

// keys_t[t] = scale · K_tᵀ (D × Np, the padded columns left zero) for every frame of the task:
// whole W × W blocks transposed in registers, the edges element by element, then scaled.
template <typename scalar_t>
void scaled_keys_transposed(const Shape& s, const Frames<const scalar_t>& k, scalar_t scale, scalar_t* keys_t) {
  using Vec = Vectorized<scalar_t>;
  constexpr int W = Vec::size();
  const int64_t N = s.N, D = s.D, Np = s.Np, n_blocks = N / W * W, d_blocks = D / W * W;
  for (int64_t t = 0; t < s.T; ++t) {
    scalar_t* kt = keys_t + t * D * Np;
    for (int64_t n = 0; n < n_blocks; n += W) {
      for (int64_t d = 0; d < d_blocks; d += W) {
        at::vec::transpose_mxn<scalar_t, W, W>(k.row(t, n) + d, k.row_stride, kt + d * Np + n, Np);
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* kn = k.row(t, n);
      for (int64_t d = n < n_blocks ? d_blocks : 0; d < D; ++d) kt[d * Np + n] = kn[d];
    }
  }
  at::vec::map<scalar_t>([scale](Vec x) { return x * Vec(scale); }, keys_t, keys_t, s.T * D * Np);
}

// scores[t] = Q_t[r0 : r0 + rows] · keys_t[t] = S_t rows (rows × Np, zero padded) for every frame.
template <typename scalar_t>
void frame_scores(const Shape& s, const Frames<const scalar_t>& q, const scalar_t* keys_t, int64_t r0, int64_t rows,
                  scalar_t* scores) {
  for (int64_t t = 0; t < s.T; ++t) {
    const Operand<scalar_t> q_rows{q.row(t, r0), q.row_stride, 1};
    gemm(scores + t * rows * s.Np, s.Np, q_rows, keys_t + t * s.D * s.Np, s.Np, rows, s.D, s.Np, false);
  }
}

template <typename scalar_t>
void forward_task(const Shape& s, int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k, scalar_t scale,
                  Scratch<scalar_t>& buf, scalar_t* out) {
  using Vec = Vectorized<scalar_t>;
  const int64_t N = s.N, Np = s.Np;
  scalar_t* z = buf.z.data();
  scalar_t* x = buf.x.data();
  scalar_t* colsums = buf.colsums.data();
  const Frames<const scalar_t> qf(q, b, h);
  scaled_keys_transposed(s, Frames<const scalar_t>(k, b, h), scale, buf.keys_t.data());
  std::fill(colsums, colsums + s.P * Np, scalar_t(0));
  const int64_t R = row_block(s.T, N);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const scalar_t* scores = buf.scores.data();
    frame_scores(s, qf, buf.keys_t.data(), r0, rows, buf.scores.data());
    for (int64_t p = 0; p < s.P; ++p) {
      scalar_t* colsum = colsums + p * Np;
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* sa = scores + (p * rows + i) * Np;
        const scalar_t* sb = scores + ((p + s.offset) * rows + i) * Np;
        const scalar_t m = row_logits_max(sa, sb, s.paired, z, x, N, Np);
        const scalar_t inv = scalar_t(1) / exp_shifted_sum(x, m, Np);
        at::vec::map2<scalar_t>([inv](Vec acc, Vec e) { return acc + e * Vec(inv); }, colsum, colsum, x, Np);
      }
    }
  }
  for (int64_t p = 0; p < s.P; ++p) std::copy_n(colsums + p * Np, N, out + output_slice(s, b, p, h));
}

// Returns (out, an empty tensor): the CPU backward needs no row statistics, as it recomputes whole
// rows exactly in the input precision (float32 statistics would cost float64 inputs theirs).
std::tuple<at::Tensor, at::Tensor> softmax_colsum_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          int64_t offset, bool paired, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q_in, k_in, offset, paired);
  const auto q = unit_last_stride(q_in);
  const auto k = unit_last_stride(k_in);
  const Shape s = shape_of(q, offset, paired);
  auto out = at::empty({s.B, s.P, s.H, s.N}, q.options());
  auto no_stats = at::empty({0}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "softmax_colsum_fwd_cpu", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    parallel_tasks(s.B * s.H, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> buf(s, row_block(s.T, s.N), false);
      for (int64_t task = begin; task < end; ++task) {
        forward_task<scalar_t>(s, task / s.H, task % s.H, q, k, static_cast<scalar_t>(scale), buf, out_ptr);
      }
    });
  });
  return {out, no_stats};
}

// The row softmax is recomputed exactly from full rows: the forward saves no statistics.
template <typename scalar_t>
void backward_task(const Shape& s, int64_t b, int64_t h, const scalar_t* grad, const at::Tensor& q,
                   const at::Tensor& k, scalar_t scale, Scratch<scalar_t>& buf, at::Tensor& dq, at::Tensor& dk) {
  using Vec = Vectorized<scalar_t>;
  const int64_t N = s.N, Np = s.Np, D = s.D;
  scalar_t* z = buf.z.data();
  scalar_t* e = buf.x.data();  // exp(x − m) of one row
  scalar_t* g = buf.grad_row.data();
  const Frames<const scalar_t> qf(q, b, h), kf(k, b, h);
  const Frames<scalar_t> dqf(dq, b, h), dkf(dk, b, h);
  scaled_keys_transposed(s, kf, scale, buf.keys_t.data());
  const int64_t R = row_block(s.T, N);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const scalar_t* scores = buf.scores.data();
    scalar_t* grads = buf.grads.data();  // scale · E_t of every frame
    frame_scores(s, qf, buf.keys_t.data(), r0, rows, buf.scores.data());
    std::fill(grads, grads + s.T * rows * Np, scalar_t(0));
    for (int64_t p = 0; p < s.P; ++p) {
      std::copy_n(grad + output_slice(s, b, p, h), N, g);
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* sa = scores + (p * rows + i) * Np;
        const scalar_t* sb = scores + ((p + s.offset) * rows + i) * Np;
        const scalar_t m = row_logits_max(sa, sb, s.paired, z, e, N, Np);
        const scalar_t inv = scalar_t(1) / exp_shifted_sum(e, m, Np);
        // c = Σ_j P_ij g_j = inv · Σ_j e_j g_j.
        const scalar_t c = inv * at::vec::map2_reduce_all<scalar_t>(
            [](Vec ev, Vec gv) { return ev * gv; }, [](Vec a, Vec bv) { return a + bv; }, e, g, Np);
        scatter_logit_grad(z, e, g, c, scale * inv, s.paired, grads + (p * rows + i) * Np,
                           grads + ((p + s.offset) * rows + i) * Np, Np);
      }
    }
    for (int64_t t = 0; t < s.T; ++t) {
      const scalar_t* e_t = grads + t * rows * Np;
      // dQ_t[rows] = (scale · E_t) K_t;  dK_t += (scale · E_t)ᵀ Q_t[rows] (= on the first row block).
      gemm(dqf.row(t, r0), D, dense(e_t, Np), kf.row(t, 0), kf.row_stride, rows, N, D, false);
      gemm(dkf.row(t, 0), D, transposed(e_t, Np), qf.row(t, r0), qf.row_stride, N, rows, D, r0 > 0);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_colsum_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                          const at::Tensor& k_in, const at::Tensor& /*stats: none*/,
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
  auto dk = at::empty({s.B, s.T, s.H, s.N, s.D}, k.options());
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
