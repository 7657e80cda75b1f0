// Fused CPU kernels for amflow::linear_attention_fwd / _bwd (float32, float64).
//
// A task owns one (batch b, head h) and walks blocks of R tokens. For each block, φ(x) =
// elu(x) + 1 is formed in a thread-local R × D buffer (φ' is read off it), and a small register-blocked
// GEMM (small_gemm.h) updates or applies the D × Dv state, which stays in L1; φ(q), φ(k) never
// exist for a whole head (the aligning encoder's heads are small: D = its width / 12, often 4 to
// 16). Extra memory is O(R·(D + Dv) + D·Dv) per thread plus the returned
// state. Every sum runs in a fixed order inside its task, so results do not depend on the
// thread count.
//
// Forward:   KV = Σ_j φ(k_j) v_jᵀ,  z = Σ_j φ(k_j),  out_i = φ(q_i)ᵀ KV / (φ(q_i)·z + eps).
// Backward, with g_i = ∂L/∂out_i, den_i = φ(q_i)·z + eps, u_i = g_i / den_i and t_i = KV g_i,
// w_i = −(g_i·out_i)/den_i = −(φ(q_i)·t_i)/den_i² (out_i is never formed: one GEMM with KV, not two):
//   dq_i = (t_i / den_i + w_i z) ⊙ φ'(q_i),   dKV = Σ_i φ(q_i) u_iᵀ,   dz = Σ_i w_i φ(q_i),
//   dk_j = (dKV v_j + dz) ⊙ φ'(k_j),          dv_j = dKVᵀ φ(k_j).

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
#include <vector>

namespace amflow {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTokenBlock = 32;  // rows of φ per block: 8 KiB of float32 at D = 64

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_linear_attention_inputs("cpu", q, k, v);
  TORCH_CHECK(q.device().is_cpu(), "linear_attention (cpu): q must be a CPU tensor, got ", q.device());
  check_dtype("linear_attention", "cpu", q.scalar_type(), cpu::limits::kDtypes);
}

// Rows of one (b, h) slice of a (B, H, N, C) tensor with a unit last stride.
template <typename scalar_t>
struct HeadRows {
  const scalar_t* data;
  int64_t row_stride;

  HeadRows(const at::Tensor& x, int64_t b, int64_t h)
      : data(x.data_ptr<scalar_t>() + b * x.stride(0) + h * x.stride(1)), row_stride(x.stride(2)) {}
  const scalar_t* operator[](int64_t n) const { return data + n * row_stride; }
};

// dst[t, :] = src row r0 + t, dense.
template <typename scalar_t>
void load_rows(scalar_t* dst, const HeadRows<scalar_t>& src, int64_t r0, int64_t rows, int64_t C) {
  for (int64_t t = 0; t < rows; ++t) std::copy(src[r0 + t], src[r0 + t] + C, dst + t * C);
}

// phi[t, :] = φ(src row r0 + t) = elu(x) + 1, vectorised over the dense block (small D included).
// The comparison is false for NaN and exp(NaN) is NaN, so NaN propagates as in the reference.
template <typename scalar_t>
void load_features(scalar_t* phi, const HeadRows<scalar_t>& src, int64_t r0, int64_t rows, int64_t D) {
  using Vec = Vectorized<scalar_t>;
  load_rows(phi, src, r0, rows, D);
  const Vec zero(0), one(1);
  const int64_t n = rows * D;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec x = Vec::loadu(phi + i);
    Vec::blendv(x.exp(), x + one, x > zero).store(phi + i);
  }
  for (; i < n; ++i) phi[i] = phi[i] > 0 ? phi[i] + 1 : std::exp(phi[i]);
}

// x ⊙= φ'(·) over n elements, φ' read off φ as the CUDA and Triton kernels do: 1 where the input
// was positive (φ = x + 1 > 1), φ = eˣ ≤ 1 elsewhere; NaN stays NaN (the comparison is false).
template <typename scalar_t>
void scale_by_phi_slope(scalar_t* x, const scalar_t* phi, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec one(1);
  at::vec::map2<scalar_t>([one](Vec xv, Vec pv) { return xv * Vec::blendv(pv, one, pv > one); }, x, x, phi, n);
}

struct Shape {
  int64_t B, H, Nq, Nk, D, Dv;
};

// Thread-local buffers of one parallel chunk, reused by all its heads.
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> phi, rows, kv_t, dkv, dkv_t, dz;

  Scratch(const Shape& s)
      : phi(kTokenBlock * s.D), rows(kTokenBlock * s.Dv), kv_t(s.D * s.Dv), dkv(s.D * s.Dv), dkv_t(s.D * s.Dv),
        dz(s.D) {}
};

// out = Mᵀ for the D × C matrix M.
template <typename scalar_t>
void transpose(scalar_t* out, const scalar_t* M, int64_t D, int64_t C) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t c = 0; c < C; ++c) out[c * D + d] = M[d * C + c];
}

template <typename scalar_t>
void forward_task(const Shape& s, Scratch<scalar_t>& buf, const HeadRows<scalar_t>& q, const HeadRows<scalar_t>& k,
                  const HeadRows<scalar_t>& v, double eps, scalar_t* kv, scalar_t* z, scalar_t* out) {
  const int64_t D = s.D, Dv = s.Dv;
  std::fill(kv, kv + D * Dv, scalar_t(0));
  std::fill(z, z + D, scalar_t(0));
  for (int64_t r0 = 0; r0 < s.Nk; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, s.Nk - r0);
    load_features(buf.phi.data(), k, r0, rows, D);
    load_rows(buf.rows.data(), v, r0, rows, Dv);
    small_gemm(kv, Dv, transposed(buf.phi.data(), D), buf.rows.data(), Dv, D, rows, Dv, true);  // KV += φ(K)ᵀ V
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t d = 0; d < D; ++d) z[d] += buf.phi[t * D + d];
  }
  for (int64_t r0 = 0; r0 < s.Nq; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, s.Nq - r0);
    load_features(buf.phi.data(), q, r0, rows, D);
    scalar_t* out_rows = out + r0 * Dv;
    small_gemm(out_rows, Dv, dense(buf.phi.data(), D), kv, Dv, rows, D, Dv, false);  // φ(Q) KV
    for (int64_t t = 0; t < rows; ++t) {
      const scalar_t den = dot(buf.phi.data() + t * D, z, D) + static_cast<scalar_t>(eps);
      for (int64_t c = 0; c < Dv; ++c) out_rows[t * Dv + c] /= den;
    }
  }
}

template <typename scalar_t>
void backward_task(const Shape& s, Scratch<scalar_t>& buf, const HeadRows<scalar_t>& grad,
                   const HeadRows<scalar_t>& q, const HeadRows<scalar_t>& k, const HeadRows<scalar_t>& v,
                   const scalar_t* kv, const scalar_t* z, double eps, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  const int64_t D = s.D, Dv = s.Dv;
  scalar_t *phi = buf.phi.data(), *u = buf.rows.data();
  scalar_t *dkv = buf.dkv.data(), *dz = buf.dz.data();
  std::fill(dkv, dkv + D * Dv, scalar_t(0));
  std::fill(dz, dz + D, scalar_t(0));
  transpose(buf.kv_t.data(), kv, D, Dv);
  for (int64_t r0 = 0; r0 < s.Nq; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, s.Nq - r0);
    load_features(phi, q, r0, rows, D);
    load_rows(u, grad, r0, rows, Dv);
    scalar_t* dq_rows = dq + r0 * D;
    small_gemm(dq_rows, D, dense(u, Dv), buf.kv_t.data(), D, rows, Dv, D, false);  // KV g_i
    for (int64_t t = 0; t < rows; ++t) {
      const scalar_t* phi_t = phi + t * D;
      scalar_t* dq_t = dq_rows + t * D;
      const scalar_t den = dot(phi_t, z, D) + static_cast<scalar_t>(eps);
      const scalar_t w = -(dot(phi_t, dq_t, D) / den) / den;
      for (int64_t d = 0; d < D; ++d) {
        dq_t[d] = dq_t[d] / den + w * z[d];
        dz[d] += w * phi_t[d];
      }
      for (int64_t c = 0; c < Dv; ++c) u[t * Dv + c] /= den;
    }
    scale_by_phi_slope(dq_rows, phi, rows * D);
    small_gemm(dkv, Dv, transposed(phi, D), u, Dv, D, rows, Dv, true);  // dKV += φ(Q)ᵀ U
  }
  transpose(buf.dkv_t.data(), dkv, D, Dv);
  for (int64_t r0 = 0; r0 < s.Nk; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, s.Nk - r0);
    load_features(phi, k, r0, rows, D);
    load_rows(u, v, r0, rows, Dv);
    scalar_t* dk_rows = dk + r0 * D;
    small_gemm(dk_rows, D, dense(u, Dv), buf.dkv_t.data(), D, rows, Dv, D, false);  // dKV v_j
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t d = 0; d < D; ++d) dk_rows[t * D + d] += dz[d];
    scale_by_phi_slope(dk_rows, phi, rows * D);
    small_gemm(dv + r0 * Dv, Dv, dense(phi, D), dkv, Dv, rows, D, Dv, false);  // dKVᵀ φ(k_j)
  }
}

// Runs task(scratch, b, h) for every head in parallel, with one Scratch per chunk.
template <typename scalar_t, typename F>
void for_each_head(const Shape& s, F&& task) {
  parallel_tasks(s.B * s.H, [&](int64_t begin, int64_t end) {
    Scratch<scalar_t> scratch(s);
    for (int64_t i = begin; i < end; ++i) task(scratch, i / s.H, i % s.H);
  });
}

Shape shape_of(const at::Tensor& q, const at::Tensor& v) {
  return {q.size(0), q.size(1), q.size(2), v.size(2), q.size(3), v.size(3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                        const at::Tensor& v_in, double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q_in, k_in, v_in);
  const auto q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Shape s = shape_of(q, v);
  auto out = at::empty({s.B, s.H, s.Nq, s.Dv}, q.options());
  auto kv = at::empty({s.B, s.H, s.D, s.Dv}, q.options());
  auto z = at::empty({s.B, s.H, s.D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_attention_fwd_cpu", [&] {
    for_each_head<scalar_t>(s, [&](Scratch<scalar_t>& scratch, int64_t b, int64_t h) {
      const int64_t head = b * s.H + h;
      forward_task<scalar_t>(s, scratch, HeadRows<scalar_t>(q, b, h), HeadRows<scalar_t>(k, b, h), HeadRows<scalar_t>(v, b, h),
                             eps, kv.data_ptr<scalar_t>() + head * s.D * s.Dv, z.data_ptr<scalar_t>() + head * s.D,
                             out.data_ptr<scalar_t>() + head * s.Nq * s.Dv);
    });
  });
  return {out, kv, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                                        const at::Tensor& k_in, const at::Tensor& v_in,
                                                                        const at::Tensor& kv_in, const at::Tensor& z_in,
                                                                        double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q_in, k_in, v_in);
  check_linear_attention_grad("cpu", grad_in, q_in, v_in, kv_in, z_in);
  const auto q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const auto grad = unit_last_stride(grad_in.to(q.scalar_type()));
  const auto kv = kv_in.contiguous(), z = z_in.contiguous();
  const Shape s = shape_of(q, v);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_attention_bwd_cpu", [&] {
    for_each_head<scalar_t>(s, [&](Scratch<scalar_t>& scratch, int64_t b, int64_t h) {
      const int64_t head = b * s.H + h;
      backward_task<scalar_t>(s, scratch, HeadRows<scalar_t>(grad, b, h), HeadRows<scalar_t>(q, b, h),
                              HeadRows<scalar_t>(k, b, h), HeadRows<scalar_t>(v, b, h),
                              kv.data_ptr<scalar_t>() + head * s.D * s.Dv, z.data_ptr<scalar_t>() + head * s.D, eps,
                              dq.data_ptr<scalar_t>() + head * s.Nq * s.D, dk.data_ptr<scalar_t>() + head * s.Nk * s.D,
                              dv.data_ptr<scalar_t>() + head * s.Nk * s.Dv);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(amflow, CPU, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cpu);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cpu);
}

}  // namespace amflow
