// The amflow operator library: every schema, declared once. Each backend registers its
// kernels for these schemas with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); fake kernels and
// autograd are registered from Python (amflow_kernels/ops/cext.py).
//
// Both ops of the package are one computation on (B, T, H, N, D) q, k of any strides:
//   paired:     out[b, p, h, j] = Σ_i softmax_j(|scale·(S_p − S_{p+offset})|)[i, j]   (AM flow)
//   not paired: out[b, p, h, j] = Σ_i softmax_j(scale·S_p)[i, j]                    (colsum)
// with S_t = Q_t K_tᵀ. The forward also returns fp32 row statistics stats[b, p, h, i] =
// (m_i, log2 Σ_j 2^{(x_ij − m_i)·log2 e}); the backward returns (dq, dk), contiguous.
//
// linear_attention: non-causal linear attention with φ(x) = elu(x) + 1 on q (B, H, Nq, D),
// k (B, H, Nk, D), v (B, H, Nk, Dv) of any strides:
//   out_i = φ(q_i)ᵀ KV / (φ(q_i)·z + eps),   KV = Σ_j φ(k_j) v_jᵀ,   z = Σ_j φ(k_j).
// The forward returns (out, KV, z), the state in float32 (float64 for float64 inputs); the
// backward returns (dq, dk, dv), contiguous.

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
