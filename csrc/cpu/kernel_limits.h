// What the CPU kernels accept: any head dim, these dtypes. The glue (softmax_colsum.cpp,
// linear_attention.cpp) checks inputs against them, and amflow_kernels._C.kernel_limits() reports
// them to Python's dispatch (amflow_kernels/_dispatch.py).
#pragma once

namespace amflow::cpu::limits {

constexpr const char* kDtypes[] = {"float32", "float64"};  // as torch names them

}  // namespace amflow::cpu::limits
