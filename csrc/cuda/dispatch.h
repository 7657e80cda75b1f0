// Host-side dtype dispatch shared by the CUDA glue: ATen dtypes to the kernels' element types.
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

}  // namespace amflow
