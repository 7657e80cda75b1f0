// Fused CPU kernels for amflow::attention_fwd / _bwd (float32, float64): softmax attention that
// also returns the attention each key receives.
//
// A task owns one (batch b, head h). It lays out scale · Kᵀ (and, backward, Vᵀ) densely, then walks
// blocks of R query rows; a row block's scores x = scale · Q[rows] Kᵀ + bias (R × Nk, padded to Np,
// kept in cache) are whole rows, so the row softmax is exact in one pass: m = max_j x,
// e = exp(x − m), P = e / Σ e. Extra memory is O((D + Dv + R) · Np) per thread, never Nq × Nk;
// outputs are owned by their task, so results do not depend on the thread count.
//
// Forward, per row block:  out[rows] = P V,  colsum += Σ_{i < R_colsum} P_i,  stats = (m, 1 / Σ e).
// Backward (P recomputed from the stats with the forward's own GEMM, so bitwise the same), with
// g = ∂L/∂colsum and dO = ∂L/∂out:
//   dP = dO[rows] Vᵀ + g [i < R_colsum],  δ_i = Σ_j P_ij dP_ij,  dS = P (dP − δ),
//   db += Σ_i dS_i,  dQ[rows] = scale · dS K,  dK += scale · dSᵀ Q[rows],  dV += Pᵀ dO[rows].

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../checks.h"
#include "kernel_limits.h"
#include "small_gemm.h"
#include "tasks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace amflow {
namespace {

using at::vec::Vectorized;

struct Shape {
  int64_t B, H, Nq, Nk, D, Dv, colsum_rows;  // the first colsum_rows queries' attention is summed
  int64_t Np;                         // Nk rounded up to whole vectors (of float, so of double too)
  int64_t R;                          // query rows per block
};

Shape shape_of(const at::Tensor& q, const at::Tensor& v, int64_t colsum_rows) {
  const int64_t Nk = v.size(2), W = Vectorized<float>::size(), Np = (Nk + W - 1) / W * W;
  // Row blocks whose score and gradient rows stay near 4 MiB in float32 (16 to 128 rows).
  const int64_t R = std::clamp<int64_t>((int64_t{1} << 20) / Np, 16, 128);
  return {q.size(0), q.size(1), q.size(2), Nk, q.size(3), v.size(3), colsum_rows, Np, R};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& bias, int64_t colsum_rows) {
  check_attention_inputs("cpu", q, k, v, bias, colsum_rows);
  TORCH_CHECK(q.device().is_cpu(), "attention (cpu): q must be a CPU tensor, got ", q.device());
  check_dtype("attention", "cpu", q.scalar_type(), cpu::limits::kDtypes);
}

// Rows of one (b, h) in a (B, H, N, C) tensor with a unit last stride.
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t stride;

  Rows(const at::Tensor& x, int64_t b, int64_t h)
      : data(x.data_ptr<std::remove_const_t<scalar_t>>() + b * x.stride(0) + h * x.stride(1)), stride(x.stride(2)) {}
  scalar_t* row(int64_t n) const { return data + n * stride; }
};

// Thread-local buffers of one parallel chunk, reused by its tasks; rows padded to Np.
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> keys_t;    // (D, Np): scale · Kᵀ, padding zero
  std::vector<scalar_t> values_t;  // (Dv, Np): Vᵀ, padding zero (backward)
  std::vector<scalar_t> bias;      // (Np): the key bias, −∞ on the padding
  std::vector<scalar_t> probs;     // (R, Np): x, then P, of a row block
  std::vector<scalar_t> dscores;   // (R, Np): dP, then dS (backward)

  Scratch(const Shape& s, bool backward)
      : keys_t(s.D * s.Np), values_t(backward ? s.Dv * s.Np : 0), bias(s.Np), probs(s.R * s.Np),
        dscores(backward ? s.R * s.Np : 0) {}
};

// dst (C × Np) = factor · rowsᵀ of an (Nk, C) slice; the padded columns stay zero.
template <typename scalar_t>
void transpose_rows(const Rows<const scalar_t>& x, int64_t n, int64_t c, int64_t np, scalar_t factor, scalar_t* dst) {
  std::fill(dst, dst + c * np, scalar_t(0));
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* row = x.row(j);
    for (int64_t d = 0; d < c; ++d) dst[d * np + j] = factor * row[d];
  }
}

// The task's key bias row: b_j (0 without a bias) and −∞ on the padding [Nk, Np).
template <typename scalar_t>
void bias_row(const Shape& s, const scalar_t* bias, int64_t task, scalar_t* dst) {
  for (int64_t j = 0; j < s.Np; ++j) {
    dst[j] = j >= s.Nk ? -std::numeric_limits<scalar_t>::infinity() : bias ? bias[task * s.Nk + j] : scalar_t(0);
  }
}

// x = scale · Q[r0 : r0 + rows] Kᵀ + b of a row block (rows × Np) in probs.
template <typename scalar_t>
void block_logits(const Shape& s, const Rows<const scalar_t>& q, int64_t r0, int64_t rows, Scratch<scalar_t>& buf) {
  using Vec = Vectorized<scalar_t>;
  scalar_t* x = buf.probs.data();
  gemm(x, s.Np, Operand<scalar_t>{q.row(r0), q.stride, 1}, buf.keys_t.data(), s.Np, rows, s.D, s.Np, false);
  for (int64_t i = 0; i < rows; ++i) {
    at::vec::map2<scalar_t>([](Vec a, Vec b) { return a + b; }, x + i * s.Np, x + i * s.Np, buf.bias.data(), s.Np);
  }
}

// Row i of P in place from its logits x and the row's (m, 1 / Σ e): exp(x − m) · (1 / Σ e).
template <typename scalar_t>
void probs_from_stats(scalar_t* x, scalar_t m, scalar_t inv_sum, int64_t np) {
  using Vec = Vectorized<scalar_t>;
  at::vec::map<scalar_t>([m, inv_sum](Vec v) { return (v - Vec(m)).exp() * Vec(inv_sum); }, x, x, np);
}

template <typename scalar_t>
void forward_task(const Shape& s, int64_t b, int64_t h, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const scalar_t* bias, scalar_t scale, Scratch<scalar_t>& buf, scalar_t* out,
                  scalar_t* colsum, scalar_t* stats) {
  using Vec = Vectorized<scalar_t>;
  const int64_t task = b * s.H + h, Np = s.Np;
  const Rows<const scalar_t> qr(q, b, h), kr(k, b, h), vr(v, b, h);
  transpose_rows(kr, s.Nk, s.D, Np, scale, buf.keys_t.data());
  bias_row(s, bias, task, buf.bias.data());
  std::vector<scalar_t> sums(Np, scalar_t(0));
  scalar_t* p = buf.probs.data();
  for (int64_t r0 = 0; r0 < s.Nq; r0 += s.R) {
    const int64_t rows = std::min(s.R, s.Nq - r0);
    block_logits(s, qr, r0, rows, buf);
    for (int64_t i = 0; i < rows; ++i) {
      scalar_t* x = p + i * Np;
      const scalar_t m = at::vec::reduce_all<scalar_t>([](Vec a, Vec c) { return at::vec::maximum(a, c); }, x, Np);
      const scalar_t sum = at::vec::map_reduce_all<scalar_t>(
          [m](Vec a) { return (a - Vec(m)).exp(); }, [](Vec a, Vec c) { return a + c; }, x, Np);
      const scalar_t inv_sum = scalar_t(1) / sum;
      probs_from_stats(x, m, inv_sum, Np);
      scalar_t* row_stats = stats + 2 * (task * s.Nq + r0 + i);
      row_stats[0] = m;
      row_stats[1] = inv_sum;
      if (r0 + i < s.colsum_rows) {
        at::vec::map2<scalar_t>([](Vec a, Vec c) { return a + c; }, sums.data(), sums.data(), x, Np);
      }
    }
    gemm(out + (task * s.Nq + r0) * s.Dv, s.Dv, dense<scalar_t>(p, Np), vr.row(0), vr.stride, rows, s.Nk, s.Dv,
         false);  // out[rows] = P V
  }
  std::copy_n(sums.data(), s.Nk, colsum + task * s.Nk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                 const at::Tensor& v_in,
                                                                 const std::optional<at::Tensor>& bias_in,
                                                                 int64_t colsum_rows, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q_in, k_in, v_in, bias_in, colsum_rows);
  const auto q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Shape s = shape_of(q, v, colsum_rows);
  auto out = at::empty({s.B, s.H, s.Nq, s.Dv}, q.options());
  auto colsum = at::empty({s.B, s.H, s.Nk}, q.options());
  auto stats = at::empty({s.B, s.H, s.Nq, 2}, q.options());
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd_cpu", [&] {
    const scalar_t* bias_ptr = bias ? bias->data_ptr<scalar_t>() : nullptr;
    parallel_tasks(s.B * s.H, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> buf(s, false);
      for (int64_t task = begin; task < end; ++task) {
        forward_task<scalar_t>(s, task / s.H, task % s.H, q, k, v, bias_ptr, static_cast<scalar_t>(scale), buf,
                               out.data_ptr<scalar_t>(), colsum.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>());
      }
    });
  });
  return {out, colsum, stats};
}

template <typename scalar_t>
void backward_task(const Shape& s, int64_t b, int64_t h, const scalar_t* grad_out, const scalar_t* grad_colsum,
                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const scalar_t* bias,
                   const scalar_t* stats, scalar_t scale, Scratch<scalar_t>& buf, scalar_t* dq, scalar_t* dk,
                   scalar_t* dv, scalar_t* dbias) {
  using Vec = Vectorized<scalar_t>;
  const int64_t task = b * s.H + h, Np = s.Np;
  const Rows<const scalar_t> qr(q, b, h), kr(k, b, h), vr(v, b, h);
  transpose_rows(kr, s.Nk, s.D, Np, scale, buf.keys_t.data());
  transpose_rows(vr, s.Nk, s.Dv, Np, scalar_t(1), buf.values_t.data());
  bias_row(s, bias, task, buf.bias.data());
  std::vector<scalar_t> g(Np, scalar_t(0)), db(Np, scalar_t(0));
  std::copy_n(grad_colsum + task * s.Nk, s.Nk, g.data());
  scalar_t* p = buf.probs.data();
  scalar_t* ds = buf.dscores.data();
  scalar_t* dk_task = dk + task * s.Nk * s.D;
  scalar_t* dv_task = dv + task * s.Nk * s.Dv;
  for (int64_t r0 = 0; r0 < s.Nq; r0 += s.R) {
    const int64_t rows = std::min(s.R, s.Nq - r0);
    const scalar_t* dout = grad_out + (task * s.Nq + r0) * s.Dv;
    block_logits(s, qr, r0, rows, buf);
    gemm(ds, Np, dense<scalar_t>(dout, s.Dv), buf.values_t.data(), Np, rows, s.Dv, Np, false);  // dP = dO Vᵀ
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* row_stats = stats + 2 * (task * s.Nq + r0 + i);
      scalar_t* pi = p + i * Np;
      scalar_t* dsi = ds + i * Np;
      probs_from_stats(pi, row_stats[0], row_stats[1], Np);
      if (r0 + i < s.colsum_rows) at::vec::map2<scalar_t>([](Vec a, Vec c) { return a + c; }, dsi, dsi, g.data(), Np);
      const scalar_t delta = at::vec::map2_reduce_all<scalar_t>(
          [](Vec a, Vec c) { return a * c; }, [](Vec a, Vec c) { return a + c; }, pi, dsi, Np);
      at::vec::map2<scalar_t>([delta](Vec pv, Vec dp) { return pv * (dp - Vec(delta)); }, dsi, pi, dsi, Np);
      at::vec::map2<scalar_t>([](Vec a, Vec c) { return a + c; }, db.data(), db.data(), dsi, Np);
      at::vec::map<scalar_t>([scale](Vec a) { return a * Vec(scale); }, dsi, dsi, Np);  // scale · dS
    }
    // dQ[rows] = (scale · dS) K;  dK += (scale · dS)ᵀ Q[rows];  dV += Pᵀ dO[rows]  (= on the first block).
    gemm(dq + (task * s.Nq + r0) * s.D, s.D, dense<scalar_t>(ds, Np), kr.row(0), kr.stride, rows, s.Nk, s.D, false);
    gemm(dk_task, s.D, transposed<scalar_t>(ds, Np), qr.row(r0), qr.stride, s.Nk, rows, s.D, r0 > 0);
    gemm(dv_task, s.Dv, transposed<scalar_t>(p, Np), dout, s.Dv, s.Nk, rows, s.Dv, r0 > 0);
  }
  if (dbias) std::copy_n(db.data(), s.Nk, dbias + task * s.Nk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& grad_colsum_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& /*out: unused*/,
    const at::Tensor& stats_in, int64_t colsum_rows, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q_in, k_in, v_in, bias_in, colsum_rows);
  const auto q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Shape s = shape_of(q, v, colsum_rows);
  check_attention_grads("cpu", grad_out_in, grad_colsum_in, stats_in, q, v);
  const auto dtype = q.scalar_type();
  const auto grad_out = grad_out_in.to(dtype).contiguous(), grad_colsum = grad_colsum_in.to(dtype).contiguous();
  const auto stats = stats_in.to(dtype).contiguous();
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  auto dq = at::empty({s.B, s.H, s.Nq, s.D}, q.options());
  auto dk = at::empty({s.B, s.H, s.Nk, s.D}, q.options());
  auto dv = at::empty({s.B, s.H, s.Nk, s.Dv}, q.options());
  auto dbias = bias ? at::empty({s.B * s.H, s.Nk}, q.options()) : at::empty({0}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(dtype, "attention_bwd_cpu", [&] {
    const scalar_t* bias_ptr = bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* dbias_ptr = bias ? dbias.data_ptr<scalar_t>() : nullptr;
    parallel_tasks(s.B * s.H, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> buf(s, true);
      for (int64_t task = begin; task < end; ++task) {
        backward_task<scalar_t>(s, task / s.H, task % s.H, grad_out.data_ptr<scalar_t>(),
                                grad_colsum.data_ptr<scalar_t>(), q, k, v, bias_ptr, stats.data_ptr<scalar_t>(),
                                static_cast<scalar_t>(scale), buf, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                dv.data_ptr<scalar_t>(), dbias_ptr);
      }
    });
  });
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(amflow, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace amflow
