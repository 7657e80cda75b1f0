// The amflow operator library: every schema, declared once. Each backend registers its
// kernels for these schemas with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); fake kernels and
// autograd are registered from Python (amflow_kernels/ops/registration.py). What the ops compute:
// docs/kernels.md, and each kernel file's header.
//
// softmax_colsum_*: q, k (B, T, H, N, D) of any strides; paired is AM flow (frame p against
// p + offset), not paired the attention colsum. The forward returns (out (B, P, H, N), what
// the backward needs: fp32 row statistics (B, P, H, N, 2) from the CUDA kernels, an empty tensor
// from the CPU kernels, which recompute whole rows); the backward (dq, dk), contiguous.
// linear_attention_*: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) of any strides. The
// forward returns (out, KV, z), the state in float32 (float64 for float64 inputs); the backward
// (dq, dk, dv), contiguous.
// attention_*: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) of any strides, bias (B·H, Nk) in the
// state dtype or none. The forward returns (out, colsum (B, H, Nk), row statistics (B, H, Nq, 2)), the
// last two in float32 (float64 for float64 inputs); the backward takes the gradients of out and
// colsum and returns (dq, dk, dv, dbias), dbias empty without a bias. CPU kernels only, for now.

#include <Python.h>
#include <torch/library.h>

#include <string>

#include "checks.h"
#include "cpu/kernel_limits.h"
#include "cuda/kernel_limits.h"

namespace {

template <size_t N>
std::string json_list(const char* const (&names)[N]) {
  return "[" + amflow::joined(names, "\"") + "]";
}

// What each device's kernels accept, as JSON: {device: {"dtypes": [...], "max_head_dim": {op family: limit}}},
// read from the constants the kernels' own checks use.
PyObject* kernel_limits(PyObject*, PyObject*) {
  namespace cuda = amflow::cuda::limits;
  const std::string json =
      "{\"cpu\": {\"dtypes\": " + json_list(amflow::cpu::limits::kDtypes) + ", \"max_head_dim\": {}}, " +
      "\"cuda\": {\"dtypes\": " + json_list(cuda::kDtypes) + ", \"max_head_dim\": {\"softmax_colsum\": " +
      std::to_string(cuda::kSoftmaxColsumMaxHeadDim) +
      ", \"linear_attention\": " + std::to_string(cuda::kLinearAttentionMaxHeadDim) + "}}}";
  return PyUnicode_FromString(json.c_str());
}

PyMethodDef methods[] = {
    {"kernel_limits", kernel_limits, METH_NOARGS, "What each device's kernels accept, as JSON."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing amflow_kernels._C loads this library, which registers the operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(amflow, m) {
  m.def("softmax_colsum_fwd(Tensor q, Tensor k, int offset, bool paired, float scale) -> (Tensor, Tensor)");
  m.def(
      "softmax_colsum_bwd(Tensor grad, Tensor q, Tensor k, Tensor stats, int offset, bool paired, "
      "float scale) -> (Tensor, Tensor)");
  m.def("linear_attention_fwd(Tensor q, Tensor k, Tensor v, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor kv, Tensor z, float eps) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, int colsum_rows, float scale) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor grad_colsum, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, "
      "Tensor stats, int colsum_rows, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}
