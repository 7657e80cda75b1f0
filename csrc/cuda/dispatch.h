// Host-side helpers shared by the CUDA glue: ATen dtypes to the kernels' element types, strides.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace amflow {

// Calls f with a value of the CUDA element type of `dtype` (float16, bfloat16 or float32).
template <typename F>
void dispatch_dtype(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (accepted: float16, bfloat16, float32)");
  }
}

template <int kDims>
void copy_strides(const at::Tensor& x, int64_t (&strides)[kDims]) {
  for (int i = 0; i < kDims; ++i) strides[i] = x.stride(i);
}

}  // namespace amflow
