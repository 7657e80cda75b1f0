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

#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing amflow_kernels._C loads this library, which registers the operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
}
