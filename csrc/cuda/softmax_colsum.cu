// CUDA glue for amflow::softmax_colsum_fwd / _bwd: validates, fills the torch-free params
// struct, and launches the kernels of softmax_colsum.cuh on the current stream of q's device.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "dispatch.h"
#include "softmax_colsum.cuh"

namespace amflow {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired) {
  check_softmax_colsum_inputs("cuda", q, k, offset, paired);
  TORCH_CHECK(q.is_cuda(), "softmax_colsum (cuda): q must be a CUDA tensor, got ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "softmax_colsum (cuda): q.dtype must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(q.size(4) <= cuda::kMaxHeadDim, "softmax_colsum (cuda): head dim must be ≤ ", cuda::kMaxHeadDim,
              ", got ", q.size(4));
}

cuda::ColsumParams make_params(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired, double scale) {
  cuda::ColsumParams p{};
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

std::tuple<at::Tensor, at::Tensor> softmax_colsum_fwd_cuda(const at::Tensor& q, const at::Tensor& k, int64_t offset,
                                                           bool paired, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, offset, paired);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, offset, paired, scale);
  auto out = at::empty({p.B, p.P, p.H, p.N}, q.options());
  auto stats = at::empty({p.B, p.P, p.H, p.N, 2}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, stats};
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  dispatch_dtype("softmax_colsum (cuda)", q.scalar_type(), [&](auto element) {
    C10_CUDA_CHECK(cuda::launch_forward<decltype(element)>(p, c10::cuda::getCurrentCUDAStream()));
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> softmax_colsum_bwd_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& stats,
                                                           int64_t offset, bool paired, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, offset, paired);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, offset, paired, scale);
  check_softmax_colsum_grad("cuda", grad, {p.B, p.P, p.H, p.N});
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({p.B, p.P, p.H, p.N, 2}) && stats.scalar_type() == at::kFloat,
              "softmax_colsum_bwd (cuda): stats must be float32 of shape ", at::IntArrayRef({p.B, p.P, p.H, p.N, 2}),
              ", got ", stats.scalar_type(), " ", stats.sizes());
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  if (p.B * p.P * p.H == 0) return {dq.zero_(), dk.zero_()};
  const auto grad_c = grad.to(q.scalar_type()).contiguous();
  const auto stats_c = stats.contiguous();
  auto rowdot = at::empty({p.B, p.P, p.H, p.N}, q.options().dtype(at::kFloat));
  auto stats_bwd = at::empty_like(stats_c);
  p.grad = grad_c.data_ptr();
  p.stats = const_cast<float*>(stats_c.data_ptr<float>());
  p.rowdot = rowdot.data_ptr<float>();
  p.stats_bwd = stats_bwd.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  dispatch_dtype("softmax_colsum (cuda)", q.scalar_type(), [&](auto element) {
    C10_CUDA_CHECK(cuda::launch_backward<decltype(element)>(p, c10::cuda::getCurrentCUDAStream()));
  });
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(amflow, CUDA, m) {
  m.impl("softmax_colsum_fwd", &softmax_colsum_fwd_cuda);
  m.impl("softmax_colsum_bwd", &softmax_colsum_bwd_cuda);
}

}  // namespace amflow
