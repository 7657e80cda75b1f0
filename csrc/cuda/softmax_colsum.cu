// CUDA glue for amflow::softmax_colsum_fwd / _bwd: validates, then launches the kernels of
// softmax_colsum.cuh through softmax_colsum_glue.h on the current stream of q's device.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "softmax_colsum_glue.h"

namespace amflow {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired) {
  check_softmax_colsum_inputs("cuda", q, k, offset, paired);
  TORCH_CHECK(q.is_cuda(), "softmax_colsum (cuda): q must be a CUDA tensor, got ", q.device());
  check_dtype("softmax_colsum", "cuda", q.scalar_type(), cuda::limits::kDtypes);
  TORCH_CHECK(q.size(4) <= cuda::limits::kSoftmaxColsumMaxHeadDim, "softmax_colsum (cuda): head dim must be ≤ ",
              cuda::limits::kSoftmaxColsumMaxHeadDim, ", got ", q.size(4));
}

void check_launch(cudaError_t error) { C10_CUDA_CHECK(error); }

std::tuple<at::Tensor, at::Tensor> softmax_colsum_fwd_cuda(const at::Tensor& q, const at::Tensor& k, int64_t offset,
                                                           bool paired, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, offset, paired);
  const c10::cuda::CUDAGuard guard(q.device());
  return glue::softmax_colsum_fwd(q, k, offset, paired, scale, c10::cuda::getCurrentCUDAStream(), check_launch);
}

std::tuple<at::Tensor, at::Tensor> softmax_colsum_bwd_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& stats,
                                                           int64_t offset, bool paired, double scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, offset, paired);
  const std::vector<int64_t> rows{q.size(0), paired ? q.size(1) - offset : q.size(1), q.size(2), q.size(3)};
  check_softmax_colsum_grad("cuda", grad, rows);
  const std::vector<int64_t> stats_shape{rows[0], rows[1], rows[2], rows[3], 2};
  TORCH_CHECK(stats.sizes() == at::IntArrayRef(stats_shape) && stats.scalar_type() == at::kFloat,
              "softmax_colsum_bwd (cuda): stats must be float32 of shape ", stats_shape, ", got ",
              stats.scalar_type(), " ", stats.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  return glue::softmax_colsum_bwd(grad, q, k, stats, offset, paired, scale, c10::cuda::getCurrentCUDAStream(),
                                  check_launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(amflow, CUDA, m) {
  m.impl("softmax_colsum_fwd", &softmax_colsum_fwd_cuda);
  m.impl("softmax_colsum_bwd", &softmax_colsum_bwd_cuda);
}

}  // namespace amflow
