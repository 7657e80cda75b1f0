// The CUDA glue of csrc/cuda/*_glue.h (parameters, outputs, launches) and the kernels it
// launches, compiled for the emulator and bound to CPU tensors. The linear-attention ops take
// the multiprocessor count that the glue sizes its chunks by; set_reverse_schedule picks the
// emulator's scheduling order (see emulator.h).
#include <torch/extension.h>

#include "linear_attention_glue.h"
#include "softmax_colsum_glue.h"

namespace {

void check_launch(cudaError_t error) { TORCH_CHECK(error == cudaSuccess, "CUDA emulator: launch error ", int(error)); }

std::tuple<at::Tensor, at::Tensor> colsum_fwd(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired,
                                              double scale) {
  return amflow::glue::softmax_colsum_fwd(q, k, offset, paired, scale, nullptr, check_launch);
}

std::tuple<at::Tensor, at::Tensor> colsum_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& stats, int64_t offset, bool paired, double scale) {
  return amflow::glue::softmax_colsum_bwd(grad, q, k, stats, offset, paired, scale, nullptr, check_launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double eps, int64_t sms) {
  return amflow::glue::linear_attention_fwd(q, k, v, eps, sms, nullptr, check_launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& kv, const at::Tensor& z, double eps,
                                                          int64_t sms) {
  return amflow::glue::linear_attention_bwd(grad, q, k, v, kv, z, eps, sms, nullptr, check_launch);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_colsum_fwd", &colsum_fwd);
  m.def("softmax_colsum_bwd", &colsum_bwd);
  m.def("linear_attention_fwd", &linear_fwd);
  m.def("linear_attention_bwd", &linear_bwd);
  m.def("set_reverse_schedule", [](bool reversed) { ::emu::reverse_schedule() = reversed; });
}
