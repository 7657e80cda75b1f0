// Fused CPU kernels for amflow::softmax_colsum_fwd / _bwd (float32, float64).
//
// A task owns one (clip b, head h) and walks row blocks of R query rows (32 to 128). For a row block,
// one batched GEMM forms the scaled score rows of every frame, S[t] = scale · Q_t[rows] K_tᵀ
// (T × R × N, kept in cache), so each frame's scores are computed once and shared by the two
// pairs it belongs to. Row softmaxes, |·| and column sums are vectorised with at::vec. Extra
// memory is O(T·R·N) per thread (never N × N per (clip, head)); outputs are owned by their
// task, so results do not depend on the thread count and no reduction races.
//
// Forward, per row i of pair p (a = p, b = p + offset; not paired: z = S[p]):
//   z = S[a] − S[b], x = |z|, m = max_j x, e = exp(x − m), P = e / Σ_j e;  out[p] += Σ_i P.
// Backward, with g = ∂L/∂out[p] and c_i = Σ_j P_ij g_j (P recomputed exactly from full rows):
//   ∂L/∂z_ij = sign(z_ij)·P_ij·(g_j − c_i);   E_t = ∂L/∂z^(t) − ∂L/∂z^(t−offset)
//   dQ_t[rows] = scale · E_t K_t,   dK_t += scale · E_tᵀ Q_t[rows]   (batched GEMMs over t).

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../checks.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace amflow {
namespace {

using at::vec::Vectorized;

// Rows per block: large blocks make the batched GEMMs efficient; the (T, R, N) score and
// gradient buffers of a thread stay near 8 MiB in float32 (at least 32 rows).
int64_t row_block(int64_t T, int64_t N) {
  return std::clamp<int64_t>((int64_t{1} << 21) / (T * N), 32, 128);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired) {
  check_softmax_colsum_inputs("cpu", q, k, offset, paired);
  TORCH_CHECK(q.device().is_cpu(), "softmax_colsum (cpu): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "softmax_colsum (cpu): q.dtype must be float32 or float64, got ", q.scalar_type());
}

// The GEMMs read rows through their strides but need a unit stride along D.
at::Tensor unit_last_stride(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
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

// scale · Q[b, :, h, r0:r0+rows] K[b, :, h]ᵀ for every frame: (T, rows, N), one batched GEMM.
at::Tensor frame_scores(const at::Tensor& q, const at::Tensor& k, int64_t b, int64_t h, int64_t r0,
                        int64_t rows, double scale) {
  auto qb = q.select(0, b).select(1, h).narrow(1, r0, rows);  // (T, rows, D)
  auto kb = k.select(0, b).select(1, h);                       // (T, N, D)
  return at::bmm(qb, kb.transpose(1, 2)).mul_(scale);
}

template <typename scalar_t>
void forward_task(const Shape& s, int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k,
                  double scale, scalar_t* out, float* stats) {
  const int64_t N = s.N;
  std::vector<scalar_t> z(N), x(N);
  const int64_t R = row_block(s.T, N);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const auto S = frame_scores(q, k, b, h, r0, rows, scale);
    const scalar_t* scores = S.data_ptr<scalar_t>();
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t slice = ((b * s.P + p) * s.H + h) * N;
      scalar_t* colsum = out + slice;
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* sa = scores + (p * rows + i) * N;
        const scalar_t* sb = scores + ((p + s.offset) * rows + i) * N;
        row_logits(sa, sb, s.paired, z.data(), x.data(), N);
        const scalar_t m = row_max(x.data(), N);
        const scalar_t sum = exp_shifted_sum(x.data(), m, N);
        const scalar_t inv = scalar_t(1) / sum;
        using Vec = Vectorized<scalar_t>;
        at::vec::map2<scalar_t>([inv](Vec acc, Vec e) { return acc + e * Vec(inv); }, colsum, colsum, x.data(), N);
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
      for (int64_t task = begin; task < end; ++task) {
        forward_task<scalar_t>(s, task / s.H, task % s.H, q, k, scale, out_ptr, stats_ptr);
      }
    });
  });
  return {out, stats};
}

// The row softmax is recomputed exactly from full rows, so the forward's stats are not needed.
template <typename scalar_t>
void backward_task(const Shape& s, int64_t b, int64_t h, const scalar_t* grad, const at::Tensor& q,
                   const at::Tensor& k, double scale, at::Tensor& dq, at::Tensor& dk) {
  using Vec = Vectorized<scalar_t>;
  const int64_t N = s.N;
  std::vector<scalar_t> z(N), prob(N), dz(N);
  auto qb = q.select(0, b).select(1, h);    // (T, N, D)
  auto kb = k.select(0, b).select(1, h);    // (T, N, D)
  auto dqb = dq.select(0, b).select(1, h);  // (T, N, D)
  auto dkb = dk.select(0, b).select(1, h);  // (T, N, D)
  const int64_t R = row_block(s.T, N);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const auto S = frame_scores(q, k, b, h, r0, rows, scale);
    auto E = at::zeros_like(S);  // (T, rows, N): the score gradient of each frame
    const scalar_t* scores = S.data_ptr<scalar_t>();
    scalar_t* e_ptr = E.data_ptr<scalar_t>();
    for (int64_t p = 0; p < s.P; ++p) {
      const scalar_t* g = grad + ((b * s.P + p) * s.H + h) * N;
      for (int64_t i = 0; i < rows; ++i) {
        const scalar_t* sa = scores + (p * rows + i) * N;
        const scalar_t* sb = scores + ((p + s.offset) * rows + i) * N;
        row_logits(sa, sb, s.paired, z.data(), prob.data(), N);
        const scalar_t m = row_max(prob.data(), N);
        const scalar_t inv = scalar_t(1) / exp_shifted_sum(prob.data(), m, N);
        at::vec::map<scalar_t>([inv](Vec e) { return e * Vec(inv); }, prob.data(), prob.data(), N);
        const scalar_t c = at::vec::map2_reduce_all<scalar_t>(
            [](Vec pv, Vec gv) { return pv * gv; }, [](Vec a, Vec bv) { return a + bv; }, prob.data(), g, N);
        // dz = P · (g − c), signed by z when paired.
        at::vec::map2<scalar_t>([c](Vec pv, Vec gv) { return pv * (gv - Vec(c)); }, dz.data(), prob.data(), g, N);
        scalar_t* e_first = e_ptr + (p * rows + i) * N;
        scalar_t* e_second = e_ptr + ((p + s.offset) * rows + i) * N;
        if (s.paired) {
          for (int64_t j = 0; j < N; ++j) {
            const scalar_t v = z[j] > 0 ? dz[j] : (z[j] < 0 ? -dz[j] : scalar_t(0));
            e_first[j] += v;
            e_second[j] -= v;
          }
        } else {
          at::vec::map2<scalar_t>([](Vec a, Vec d) { return a + d; }, e_first, e_first, dz.data(), N);
        }
      }
    }
    dqb.narrow(1, r0, rows).copy_(at::bmm(E, kb).mul_(scale));               // dQ_t[rows] = scale · E_t K_t
    dkb.add_(at::bmm(E.transpose(1, 2), qb.narrow(1, r0, rows)), scale);     // dK_t += scale · E_tᵀ Q_t[rows]
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
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::zeros(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "softmax_colsum_bwd_cpu", [&] {
    const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    parallel_tasks(s.B * s.H, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        backward_task<scalar_t>(s, task / s.H, task % s.H, grad_ptr, q, k, scale, dq, dk);
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
