// The CUDA glue of csrc/cuda/*_glue.h (parameters, outputs, launches) and the kernels it
// launches, compiled for the emulator and bound to CPU tensors. The linear-attention ops take
// the multiprocessor count that the glue sizes its chunks by; set_reverse_schedule picks the
// emulator's scheduling order (see emulator.h).
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/extension.h>

#include <cstring>
#include <initializer_list>

#include "linear_attention_glue.h"
#include "softmax_colsum_glue.h"

namespace {

// The memory of one op's run. In the checked build (checks.h) every allocation while it lasts
// (the glue's outputs and scratch, and a copy of each input's storage, viewed as the input was)
// lies between red zones and is registered as global memory; elsewhere inputs are used as given.
#ifdef AMFLOW_EMU_CHECKED
class CheckedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    auto* block = static_cast<char*>(c10::alloc_cpu(bytes + 2 * emu::check::kRedzone));
    char* data = block + emu::check::kRedzone;
    emu::check::declare_global(data, bytes, "of " + std::to_string(bytes) + " bytes");
    return {data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  static void release(void* block) {  // freed memory is no longer the op's to touch
    emu::check::forget_global(static_cast<char*>(block) + emu::check::kRedzone);
    c10::free_cpu(block);
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // the data is not the block freed
  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }
};

class OpMemory {
 public:
  OpMemory() : previous_(c10::GetCPUAllocator()) {
    c10::SetCPUAllocator(&allocator_, kPriority);
    TORCH_CHECK(c10::GetCPUAllocator() == &allocator_, "CUDA emulator: could not install the checked allocator");
  }
  ~OpMemory() {
    c10::SetCPUAllocator(previous_, kPriority);
    const emu::check::HooksOff off;
    emu::check::state().global.clear();
    emu::check::state().bound();
  }
  at::Tensor input(const at::Tensor& t) const {
    const size_t bytes = t.storage().nbytes();
    auto storage = at::empty({int64_t(bytes)}, t.options().dtype(at::kByte));
    if (bytes > 0) std::memcpy(storage.data_ptr(), t.storage().data(), bytes);
    return at::empty({0}, t.options()).set_(storage.storage(), t.storage_offset(), t.sizes(), t.strides());
  }

 private:
  static constexpr uint8_t kPriority = 255;
  CheckedAllocator allocator_;
  c10::Allocator* previous_;
};
#else
struct OpMemory {
  const at::Tensor& input(const at::Tensor& t) const { return t; }
};
#endif

void check_launch(cudaError_t error) { TORCH_CHECK(error == cudaSuccess, "CUDA emulator: launch error ", int(error)); }

std::tuple<at::Tensor, at::Tensor> colsum_fwd(const at::Tensor& q, const at::Tensor& k, int64_t offset, bool paired,
                                              double scale) {
  const OpMemory memory;
  return amflow::glue::softmax_colsum_fwd(memory.input(q), memory.input(k), offset, paired, scale, nullptr, check_launch);
}

std::tuple<at::Tensor, at::Tensor> colsum_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& stats, int64_t offset, bool paired, double scale) {
  const OpMemory memory;
  return amflow::glue::softmax_colsum_bwd(memory.input(grad), memory.input(q), memory.input(k), memory.input(stats),
                                          offset, paired, scale, nullptr, check_launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double eps, int64_t sms) {
  const OpMemory memory;
  return amflow::glue::linear_attention_fwd(memory.input(q), memory.input(k), memory.input(v), eps, sms, nullptr, check_launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& kv, const at::Tensor& z, double eps,
                                                          int64_t sms) {
  const OpMemory memory;
  return amflow::glue::linear_attention_bwd(memory.input(grad), memory.input(q), memory.input(k), memory.input(v),
                                            memory.input(kv), memory.input(z), eps, sms, nullptr, check_launch);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_colsum_fwd", &colsum_fwd);
  m.def("softmax_colsum_bwd", &colsum_bwd);
  m.def("linear_attention_fwd", &linear_fwd);
  m.def("linear_attention_bwd", &linear_bwd);
  m.def("set_reverse_schedule", [](bool reversed) { ::emu::reverse_schedule() = reversed; });
}
