// What the CUDA kernels accept, in one place: the kernel headers size their tiles by these
// head-dim limits, the glue (softmax_colsum.cu, linear_attention.cu) checks inputs against them,
// and amflow_kernels._C.kernel_limits() reports them to Python's dispatch (amflow_kernels/_dispatch.py).
// Free of torch's headers: tests/test_cuda_registers.py compiles the kernels without them.
#pragma once

namespace amflow::cuda::limits {

constexpr int kSoftmaxColsumMaxHeadDim = 256;    // D
constexpr int kLinearAttentionMaxHeadDim = 128;  // D and Dv
constexpr const char* kDtypes[] = {"float16", "bfloat16", "float32"};  // as torch names them

}  // namespace amflow::cuda::limits
