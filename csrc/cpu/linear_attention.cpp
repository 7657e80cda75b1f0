// Fused CPU kernels for amflow::linear_attention_fwd / _bwd (float32, float64).
//
// A task owns one (batch b, head h) and walks blocks of R tokens. For each block, φ(x) =
// elu(x) + 1 (and φ'(x)) are formed with at::vec in a thread-local R × D buffer that stays in
// cache, and small GEMMs update or apply the D × Dv state; φ(q), φ(k) never exist for a whole
// head. Extra memory is O(R·(D + Dv)) per thread plus the returned state. Outputs are owned by
// their task, so results do not depend on the thread count.
//
// Forward:   KV = Σ_j φ(k_j) v_jᵀ,  z = Σ_j φ(k_j),  out_i = φ(q_i)ᵀ KV / (φ(q_i)·z + eps).
// Backward, with g_i = ∂L/∂out_i, den_i = φ(q_i)·z + eps, u_i = g_i / den_i, w_i = −(g_i·out_i)/den_i:
//   dq_i = (KV u_i + w_i z) ⊙ φ'(q_i),   dKV = Σ_i φ(q_i) u_iᵀ,   dz = Σ_i w_i φ(q_i),
//   dk_j = (dKV v_j + dz) ⊙ φ'(k_j),     dv_j = dKVᵀ φ(k_j).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>

namespace amflow {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTokenBlock = 1024;  // 256 KiB of float32 φ at D = 64: stays in L2

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_linear_attention_inputs("cpu", q, k, v);
  TORCH_CHECK(q.device().is_cpu(), "linear_attention (cpu): q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "linear_attention (cpu): q.dtype must be float32 or float64, got ", q.scalar_type());
}

// phi ← φ(x) = elu(x) + 1 and, if dphi is given, dphi ← φ'(x), for a contiguous block. The
// comparison is false for NaN and exp(NaN) is NaN, so NaN propagates as in the reference.
template <typename scalar_t>
void feature_map(scalar_t* phi, scalar_t* dphi, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec zero(0), one(1);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec x = Vec::loadu(phi + i);
    const Vec positive = x > zero;
    const Vec e = x.exp();
    Vec::blendv(e, x + one, positive).store(phi + i);
    if (dphi != nullptr) Vec::blendv(e, one, positive).store(dphi + i);
  }
  for (; i < n; ++i) {
    const scalar_t x = phi[i];
    const scalar_t e = std::exp(x);
    phi[i] = x > 0 ? x + 1 : e;
    if (dphi != nullptr) dphi[i] = x > 0 ? scalar_t(1) : e;
  }
}

// Thread-local φ (and φ') of up to kTokenBlock rows of one (N, D) head slice.
template <typename scalar_t>
struct FeatureBlock {
  at::Tensor phi, dphi;

  FeatureBlock(int64_t d, const at::TensorOptions& options, bool with_grad)
      : phi(at::empty({kTokenBlock, d}, options)), dphi(with_grad ? at::empty({kTokenBlock, d}, options) : at::Tensor()) {}

  // φ of rows [r0, r0 + rows) of x; returns the (rows, D) view.
  at::Tensor load(const at::Tensor& x, int64_t r0, int64_t rows) {
    auto block = phi.narrow(0, 0, rows);
    block.copy_(x.narrow(0, r0, rows));
    feature_map<scalar_t>(block.data_ptr<scalar_t>(), dphi.defined() ? dphi.data_ptr<scalar_t>() : nullptr,
                          block.numel());
    return block;
  }

  at::Tensor grad(int64_t rows) const { return dphi.narrow(0, 0, rows); }
};

// den_i = φ(q_i)·z + eps as a (rows, 1) column. Sums here and below are at:: reductions, not
// BLAS gemv, whose summation order can depend on the thread count.
at::Tensor normaliser(const at::Tensor& phi_q, const at::Tensor& z, double eps) {
  return (phi_q * z).sum(1, /*keepdim=*/true).add_(eps);
}

template <typename scalar_t>
void forward_task(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double eps, at::Tensor kv,
                  at::Tensor z, at::Tensor out) {
  const int64_t nq = q.size(0), nk = k.size(0);
  FeatureBlock<scalar_t> features(q.size(1), q.options(), false);
  kv.zero_();
  z.zero_();
  for (int64_t r0 = 0; r0 < nk; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, nk - r0);
    const auto phi_k = features.load(k, r0, rows);
    kv.addmm_(phi_k.t(), v.narrow(0, r0, rows));
    z.add_(phi_k.sum(0));
  }
  for (int64_t r0 = 0; r0 < nq; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, nq - r0);
    const auto phi_q = features.load(q, r0, rows);
    auto out_rows = out.narrow(0, r0, rows);
    at::mm_out(out_rows, phi_q, kv);
    out_rows.div_(normaliser(phi_q, z, eps));
  }
}

template <typename scalar_t>
void backward_task(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& kv, const at::Tensor& z, double eps, at::Tensor dq, at::Tensor dk,
                   at::Tensor dv) {
  const int64_t nq = q.size(0), nk = k.size(0);
  FeatureBlock<scalar_t> features(q.size(1), q.options(), true);
  auto dkv = at::zeros_like(kv);
  auto dz = at::zeros_like(z);
  for (int64_t r0 = 0; r0 < nq; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, nq - r0);
    const auto phi_q = features.load(q, r0, rows);
    const auto den = normaliser(phi_q, z, eps);                        // (rows, 1)
    const auto u = grad.narrow(0, r0, rows).div(den);                  // g / den
    const auto w = (u * at::mm(phi_q, kv)).sum(1, true).neg_().div_(den);  // −(g · out) / den
    auto dq_rows = dq.narrow(0, r0, rows);
    at::mm_out(dq_rows, u, kv.t());
    dq_rows.add_(w * z).mul_(features.grad(rows));
    dkv.addmm_(phi_q.t(), u);
    dz.add_((phi_q * w).sum(0));
  }
  for (int64_t r0 = 0; r0 < nk; r0 += kTokenBlock) {
    const int64_t rows = std::min(kTokenBlock, nk - r0);
    const auto phi_k = features.load(k, r0, rows);
    auto dk_rows = dk.narrow(0, r0, rows);
    at::mm_out(dk_rows, v.narrow(0, r0, rows), dkv.t());
    dk_rows.add_(dz).mul_(features.grad(rows));
    auto dv_rows = dv.narrow(0, r0, rows);
    at::mm_out(dv_rows, phi_k, dkv);
  }
}

// Runs task(b, h) for every head in parallel.
template <typename F>
void for_each_head(int64_t B, int64_t H, F&& task) {
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) task(i / H, i % H);
  });
}

at::Tensor head(const at::Tensor& x, int64_t b, int64_t h) { return x.select(0, b).select(0, h); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, double eps) {
  check_inputs(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Dv = v.size(3);
  auto out = at::empty({B, H, q.size(2), Dv}, q.options());
  auto kv = at::empty({B, H, D, Dv}, q.options());
  auto z = at::empty({B, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_attention_fwd_cpu", [&] {
    for_each_head(B, H, [&](int64_t b, int64_t h) {
      forward_task<scalar_t>(head(q, b, h), head(k, b, h), head(v, b, h), eps, head(kv, b, h), head(z, b, h),
                             head(out, b, h));
    });
  });
  return {out, kv, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const at::Tensor& kv, const at::Tensor& z,
                                                                        double eps) {
  check_inputs(q, k, v);
  check_linear_attention_grad("cpu", grad_in, q, v, kv, z);
  const auto grad = grad_in.to(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_attention_bwd_cpu", [&] {
    for_each_head(B, H, [&](int64_t b, int64_t h) {
      backward_task<scalar_t>(head(grad, b, h), head(q, b, h), head(k, b, h), head(v, b, h), head(kv, b, h),
                              head(z, b, h), eps, head(dq, b, h), head(dk, b, h), head(dv, b, h));
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
