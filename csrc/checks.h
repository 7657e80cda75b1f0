// Input checks shared by the CPU and CUDA glue of amflow::softmax_colsum_fwd / _bwd. Each
// message names the argument, the value received and what is accepted.
#pragma once

#include <ATen/ATen.h>

namespace amflow {

inline void check_softmax_colsum_inputs(const char* backend, const at::Tensor& q, const at::Tensor& k,
                                        int64_t offset, bool paired) {
  TORCH_CHECK(q.dim() == 5, "softmax_colsum (", backend, "): q must have shape (B, T, H, N, D), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "softmax_colsum (", backend, "): k.shape must equal q.shape ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "softmax_colsum (", backend, "): k.dtype must equal q.dtype (",
              q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "softmax_colsum (", backend, "): k.device must equal q.device (",
              q.device(), "), got ", k.device());
  if (paired) {
    TORCH_CHECK(offset >= 1, "softmax_colsum (", backend, "): offset must be ≥ 1, got ", offset);
    TORCH_CHECK(q.size(1) > offset, "softmax_colsum (", backend, "): T must exceed offset (", offset, "), got T=",
                q.size(1));
  }
}

inline void check_softmax_colsum_grad(const char* backend, const at::Tensor& grad, at::IntArrayRef expected) {
  TORCH_CHECK(grad.sizes() == expected, "softmax_colsum_bwd (", backend, "): grad must have shape ", expected,
              ", got ", grad.sizes());
}

}  // namespace amflow
