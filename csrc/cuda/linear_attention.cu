// CUDA glue for amflow::linear_attention_fwd / _bwd: validates, then launches the kernels of
// linear_attention.cuh through linear_attention_glue.h on the current stream of q's device,
// chunked for its multiprocessor count.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "linear_attention_glue.h"

namespace amflow {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_linear_attention_inputs("cuda", q, k, v);
  TORCH_CHECK(q.is_cuda(), "linear_attention (cuda): q must be a CUDA tensor, got ", q.device());
  check_dtype("linear_attention", "cuda", q.scalar_type(), cuda::limits::kDtypes);
  constexpr int limit = cuda::limits::kLinearAttentionMaxHeadDim;
  TORCH_CHECK(q.size(3) <= limit && v.size(3) <= limit, "linear_attention (cuda): D and Dv must be ≤ ", limit,
              ", got D=", q.size(3), ", Dv=", v.size(3));
}

void check_launch(cudaError_t error) { C10_CUDA_CHECK(error); }

int64_t multiprocessors() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& v, double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  return glue::linear_attention_fwd(q, k, v, eps, multiprocessors(), c10::cuda::getCurrentCUDAStream(),
                                    check_launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const at::Tensor& kv, const at::Tensor& z,
                                                                         double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, v);
  check_linear_attention_grad("cuda", grad, q, v, kv, z);
  const c10::cuda::CUDAGuard guard(q.device());
  return glue::linear_attention_bwd(grad, q, k, v, kv, z, eps, multiprocessors(), c10::cuda::getCurrentCUDAStream(),
                                    check_launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(amflow, CUDA, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cuda);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cuda);
}

}  // namespace amflow
