// The CUDA glue of amflow::softmax_colsum_fwd / _bwd after validation, shared by
// softmax_colsum.cu and the CPU emulator of tests/cuda_emulator: kernel parameters from ATen
// tensors, outputs and scratch, and the launch. Callers give the stream and `check`, which
// turns a launch's cudaError_t into an exception.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "dispatch.h"
#include "softmax_colsum.cuh"

namespace amflow::glue {

inline cuda::ColsumParams colsum_params(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired,
                                        double scale) {
  cuda::ColsumParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  copy_strides(q, p.q_stride);
  copy_strides(k, p.k_stride);
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

template <typename Check>
std::tuple<at::Tensor, at::Tensor> softmax_colsum_fwd(const at::Tensor& q, const at::Tensor& k, int64_t offset,
                                                      bool paired, double scale, cudaStream_t stream, Check&& check) {
  auto p = colsum_params(q, k, offset, paired, scale);
  auto out = at::empty({p.B, p.P, p.H, p.N}, q.options());
  auto stats = at::empty({p.B, p.P, p.H, p.N, 2}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, stats};
  p.out = out.data_ptr();
  p.stats = stats.data_ptr<float>();
  dispatch_dtype("softmax_colsum (cuda)", q.scalar_type(), [&](auto element) {
    check(cuda::launch_forward<decltype(element)>(p, stream));
  });
  return {out, stats};
}

template <typename Check>
std::tuple<at::Tensor, at::Tensor> softmax_colsum_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& stats, int64_t offset, bool paired,
                                                      double scale, cudaStream_t stream, Check&& check) {
  auto p = colsum_params(q, k, offset, paired, scale);
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
    check(cuda::launch_backward<decltype(element)>(p, stream));
  });
  return {dq, dk};
}

}  // namespace amflow::glue
