// Input checks shared by the CPU and CUDA glue of the amflow:: ops. Each
// message names the argument, the value received and what is accepted.
//
// Every kernel entry also opens an at::AutoDispatchBelowADInplaceOrView: the backward ops have
// no autograd formula, and called directly in grad mode the dispatcher's fallback would let the
// ATen ops inside the kernels record a graph on inputs that require grad.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <iterator>
#include <optional>
#include <string>

namespace amflow {

// A dtype as torch names it in Python (torch.float16, ...), as csrc/*/kernel_limits.h list them.
inline const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    default: return c10::toString(dtype);
  }
}

// "a, b, c", each name between ``quote``s.
template <size_t N>
std::string joined(const char* const (&names)[N], const std::string& quote = "") {
  std::string list;
  for (const char* name : names) list += (list.empty() ? "" : ", ") + quote + name + quote;
  return list;
}

template <size_t N>
void check_dtype(const char* op, const char* backend, at::ScalarType dtype, const char* const (&accepted)[N]) {
  const std::string name = dtype_name(dtype);
  TORCH_CHECK(std::find(std::begin(accepted), std::end(accepted), name) != std::end(accepted), op, " (", backend,
              "): q.dtype must be one of ", joined(accepted), ", got ", name);
}

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

inline void check_linear_attention_inputs(const char* backend, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "linear_attention (", backend,
              "): q, k, v must have shapes (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "linear_attention (",
              backend, "): k.shape must be (B, H, Nk, D) matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), "linear_attention (",
              backend, "): v.shape must be (B, H, Nk, Dv) matching k ", k.sizes(), ", got ", v.sizes());
  for (const auto* x : {&k, &v}) {
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "linear_attention (", backend,
                "): k and v must have q's dtype ", q.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK(x->device() == q.device(), "linear_attention (", backend, "): k and v must be on q's device ",
                q.device(), ", got ", x->device());
  }
}

// The state dtype of linear_attention: float32, float64 for float64 inputs.
inline at::ScalarType linear_attention_state_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_linear_attention_grad(const char* backend, const at::Tensor& grad, const at::Tensor& q,
                                        const at::Tensor& v, const at::Tensor& kv, const at::Tensor& z) {
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  const std::vector<int64_t> kv_shape{q.size(0), q.size(1), q.size(3), v.size(3)};
  const std::vector<int64_t> z_shape{q.size(0), q.size(1), q.size(3)};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_shape), "linear_attention_bwd (", backend,
              "): grad must have shape ", out_shape, ", got ", grad.sizes());
  const auto state = linear_attention_state_dtype(q);
  TORCH_CHECK(kv.sizes() == at::IntArrayRef(kv_shape) && kv.scalar_type() == state, "linear_attention_bwd (",
              backend, "): kv must be ", state, " of shape ", kv_shape, ", got ", kv.scalar_type(), " ", kv.sizes());
  TORCH_CHECK(z.sizes() == at::IntArrayRef(z_shape) && z.scalar_type() == state, "linear_attention_bwd (", backend,
              "): z must be ", state, " of shape ", z_shape, ", got ", z.scalar_type(), " ", z.sizes());
}

inline void check_attention_inputs(const char* backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& bias, int64_t colsum_rows) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention (", backend,
              "): q, k, v must have shapes (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "attention (", backend,
              "): k.shape must be (B, H, Nk, D) matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), "attention (", backend,
              "): v.shape must be (B, H, Nk, Dv) matching k ", k.sizes(), ", got ", v.sizes());
  for (const auto* x : {&k, &v}) {
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "attention (", backend, "): k and v must have q's dtype ",
                q.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK(x->device() == q.device(), "attention (", backend, "): k and v must be on q's device ", q.device(),
                ", got ", x->device());
  }
  TORCH_CHECK(colsum_rows >= 1 && colsum_rows <= q.size(2), "attention (", backend,
              "): colsum_rows must be in [1, Nq = ", q.size(2), "], got ", colsum_rows);
  if (bias.has_value()) {
    const std::vector<int64_t> shape{q.size(0) * q.size(1), k.size(2)};
    TORCH_CHECK(bias->sizes() == at::IntArrayRef(shape) && bias->scalar_type() == q.scalar_type() &&
                    bias->device() == q.device(),
                "attention (", backend, "): bias must be ", q.scalar_type(), " of shape ", shape, " on ", q.device(),
                ", got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
}

inline void check_attention_grads(const char* backend, const at::Tensor& grad_out, const at::Tensor& grad_colsum,
                                  const at::Tensor& stats, const at::Tensor& q, const at::Tensor& v) {
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  const std::vector<int64_t> colsum_shape{q.size(0), q.size(1), v.size(2)};
  const std::vector<int64_t> stats_shape{q.size(0), q.size(1), q.size(2), 2};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "attention_bwd (", backend,
              "): grad_out must have shape ", out_shape, ", got ", grad_out.sizes());
  TORCH_CHECK(grad_colsum.sizes() == at::IntArrayRef(colsum_shape), "attention_bwd (", backend,
              "): grad_colsum must have shape ", colsum_shape, ", got ", grad_colsum.sizes());
  TORCH_CHECK(stats.sizes() == at::IntArrayRef(stats_shape), "attention_bwd (", backend, "): stats must have shape ",
              stats_shape, ", got ", stats.sizes());
}

}  // namespace amflow
