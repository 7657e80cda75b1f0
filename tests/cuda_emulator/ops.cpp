// The kernels and launchers of csrc/cuda/*.cuh, compiled for the emulator and bound to CPU
// tensors. The parameters are filled as the CUDA glue (csrc/cuda/*.cu) fills them; outputs and
// scratch start as NaN, so an element that no kernel writes fails the comparison.
#include <torch/extension.h>

#include "dispatch.h"
#include "linear_attention.cuh"
#include "softmax_colsum.cuh"

namespace {

namespace la = amflow::cuda::linear;
using amflow::dispatch_dtype;

at::Tensor nans(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

void check(cudaError_t error) { TORCH_CHECK(error == cudaSuccess, "CUDA emulator: launch returned error ", int(error)); }

amflow::cuda::ColsumParams colsum_params(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired,
                                         double scale) {
  amflow::cuda::ColsumParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  for (int i = 0; i < 5; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
  }
  p.B = q.size(0);
  p.T = q.size(1);
  p.H = q.size(2);
  p.N = q.size(3);
  p.D = q.size(4);
  p.paired = paired;
  p.offset = paired ? offset : 0;
  p.P = paired ? p.T - offset : p.T;
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<at::Tensor, at::Tensor> colsum_fwd(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired,
                                              double scale) {
  auto p = colsum_params(q, k, offset, paired, scale);
  auto out = nans({p.B, p.P, p.H, p.N}, q.options());
  auto stats = nans({p.B, p.P, p.H, p.N, 2}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  dispatch_dtype("colsum_fwd", q.scalar_type(), [&](auto element) {
    check(amflow::cuda::launch_forward<decltype(element)>(p, nullptr));
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> colsum_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& stats, int64_t offset, bool paired, double scale) {
  auto p = colsum_params(q, k, offset, paired, scale);
  const auto grad_c = grad.to(q.scalar_type()).contiguous();
  const auto stats_c = stats.contiguous();
  auto rowdot = nans({p.B, p.P, p.H, p.N}, q.options().dtype(at::kFloat));
  auto stats_bwd = nans(stats_c.sizes(), stats_c.options());
  auto dq = nans(q.sizes(), q.options());
  auto dk = nans(k.sizes(), k.options());
  p.grad = grad_c.data_ptr();
  p.stats = const_cast<float*>(stats_c.data_ptr<float>());
  p.rowdot = rowdot.data_ptr<float>();
  p.stats_bwd = stats_bwd.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  dispatch_dtype("colsum_bwd", q.scalar_type(), [&](auto element) {
    check(amflow::cuda::launch_backward<decltype(element)>(p, nullptr));
  });
  return {dq, dk};
}

la::Params linear_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double eps) {
  la::Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.Nk = k.size(2);
  p.D = q.size(3);
  p.Dv = v.size(3);
  p.eps = static_cast<float>(eps);
  return p;
}

// The glue's chunking rule for a device of `sms` multiprocessors.
int64_t chunk_tokens(int64_t n, int64_t heads, int64_t sms) {
  const int64_t tiles = (n + la::kTokens - 1) / la::kTokens;
  const int64_t chunks = std::min(tiles, std::max<int64_t>(1, (4 * sms + heads - 1) / heads));
  return (tiles + chunks - 1) / chunks * la::kTokens;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double eps, int64_t sms) {
  auto p = linear_params(q, k, v, eps);
  const auto state = q.options().dtype(at::kFloat);
  const int64_t heads = p.B * p.H;
  auto out = nans({p.B, p.H, p.Nq, p.Dv}, q.options());
  auto kv = nans({p.B, p.H, p.D, p.Dv}, state);
  auto z = nans({p.B, p.H, p.D}, state);
  p.chunk = chunk_tokens(p.Nk, heads, sms);
  p.parts = (p.Nk + p.chunk - 1) / p.chunk;
  at::Tensor part_kv = kv, part_z = z;
  if (p.parts > 1) {
    part_kv = nans({p.parts, heads, p.D, p.Dv}, state);
    part_z = nans({p.parts, heads, p.D}, state);
  }
  p.part_kv = part_kv.data_ptr<float>();
  p.part_z = part_z.data_ptr<float>();
  p.out = out.data_ptr();
  p.kv = kv.data_ptr<float>();
  p.z = z.data_ptr<float>();
  const int64_t out_chunk = chunk_tokens(p.Nq, heads, sms);
  dispatch_dtype("linear_fwd", q.scalar_type(), [&](auto element) {
    check(la::launch_forward<decltype(element)>(p, out_chunk, nullptr));
  });
  return {out, kv, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& kv, const at::Tensor& z, double eps,
                                                          int64_t sms) {
  auto p = linear_params(q, k, v, eps);
  const int64_t heads = p.B * p.H;
  auto dq = nans(q.sizes(), q.options());
  auto dk = nans(k.sizes(), k.options());
  auto dv = nans(v.sizes(), v.options());
  const auto grad_c = grad.to(q.scalar_type()).contiguous();
  const auto kv_c = kv.contiguous();
  const auto z_c = z.contiguous();
  p.chunk = chunk_tokens(p.Nq, heads, sms);
  p.parts = (p.Nq + p.chunk - 1) / p.chunk;
  auto part_dkv = nans({p.parts, heads, p.D, p.Dv}, kv_c.options());
  auto part_dz = nans({p.parts, heads, p.D}, kv_c.options());
  p.part_kv = part_dkv.data_ptr<float>();
  p.part_z = part_dz.data_ptr<float>();
  p.kv = const_cast<float*>(kv_c.data_ptr<float>());
  p.z = const_cast<float*>(z_c.data_ptr<float>());
  p.grad = grad_c.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const int64_t kv_chunk = chunk_tokens(p.Nk, heads, sms);
  dispatch_dtype("linear_bwd", q.scalar_type(), [&](auto element) {
    check(la::launch_backward<decltype(element)>(p, kv_chunk, nullptr));
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_colsum_fwd", &colsum_fwd);
  m.def("softmax_colsum_bwd", &colsum_bwd);
  m.def("linear_attention_fwd", &linear_fwd);
  m.def("linear_attention_bwd", &linear_bwd);
}
