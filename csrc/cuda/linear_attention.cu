// CUDA glue for amflow::linear_attention_fwd / _bwd: validates, chooses the token chunking,
// fills the torch-free params struct and launches the kernels of linear_attention.cuh on the
// current stream of q's device.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "dispatch.h"
#include "linear_attention.cuh"

namespace amflow {
namespace {

namespace la = cuda::linear;

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_linear_attention_inputs("cuda", q, k, v);
  TORCH_CHECK(q.is_cuda(), "linear_attention (cuda): q must be a CUDA tensor, got ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "linear_attention (cuda): q.dtype must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(q.size(3) <= la::kMaxHeadDim && v.size(3) <= la::kMaxHeadDim, "linear_attention (cuda): D and Dv must be ≤ ",
              la::kMaxHeadDim, ", got D=", q.size(3), ", Dv=", v.size(3));
}

la::Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double eps) {
  la::Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.Nk = k.size(2);
  p.D = q.size(3);
  p.Dv = v.size(3);
  p.eps = static_cast<float>(eps);
  return p;
}

// Tokens per chunk for n tokens over `heads` heads: enough blocks to fill the device four
// times over, whole tiles per chunk.
int64_t chunk_tokens(int64_t n, int64_t heads) {
  const int64_t tiles = (n + la::kTokens - 1) / la::kTokens;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted_blocks = 4 * int64_t(sms);
  const int64_t chunks = std::min(tiles, std::max<int64_t>(1, (wanted_blocks + heads - 1) / heads));
  return (tiles + chunks - 1) / chunks * la::kTokens;
}

int64_t chunks_of(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& v, double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, v, eps);
  const auto state_options = q.options().dtype(at::kFloat);
  auto out = at::empty({p.B, p.H, p.Nq, p.Dv}, q.options());
  auto kv = at::empty({p.B, p.H, p.D, p.Dv}, state_options);
  auto z = at::empty({p.B, p.H, p.D}, state_options);
  const int64_t heads = p.B * p.H;
  if (heads == 0) return {out, kv, z};
  p.chunk = chunk_tokens(p.Nk, heads);
  p.parts = chunks_of(p.Nk, p.chunk);
  at::Tensor part_kv = kv, part_z = z;
  if (p.parts > 1) {
    part_kv = at::empty({p.parts, heads, p.D, p.Dv}, state_options);
    part_z = at::empty({p.parts, heads, p.D}, state_options);
  }
  p.part_kv = part_kv.data_ptr<float>();
  p.part_z = part_z.data_ptr<float>();
  p.out = out.data_ptr();
  p.kv = kv.data_ptr<float>();
  p.z = z.data_ptr<float>();
  const int64_t out_chunk = chunk_tokens(p.Nq, heads);
  dispatch_dtype("linear_attention (cuda)", q.scalar_type(), [&](auto element) {
    C10_CUDA_CHECK(la::launch_forward<decltype(element)>(p, out_chunk, c10::cuda::getCurrentCUDAStream()));
  });
  return {out, kv, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const at::Tensor& kv_in, const at::Tensor& z_in,
                                                                         double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see checks.h
  check_inputs(q, k, v);
  check_linear_attention_grad("cuda", grad_in, q, v, kv_in, z_in);
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, v, eps);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  const int64_t heads = p.B * p.H;
  if (heads == 0) return {dq, dk, dv};
  const auto grad = grad_in.to(q.scalar_type()).contiguous();
  const auto kv = kv_in.contiguous();
  const auto z = z_in.contiguous();
  p.chunk = chunk_tokens(p.Nq, heads);
  p.parts = chunks_of(p.Nq, p.chunk);
  auto part_dkv = at::empty({p.parts, heads, p.D, p.Dv}, kv.options());
  auto part_dz = at::empty({p.parts, heads, p.D}, kv.options());
  p.part_kv = part_dkv.data_ptr<float>();
  p.part_z = part_dz.data_ptr<float>();
  p.kv = const_cast<float*>(kv.data_ptr<float>());
  p.z = const_cast<float*>(z.data_ptr<float>());
  p.grad = grad.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const int64_t kv_chunk = chunk_tokens(p.Nk, heads);
  dispatch_dtype("linear_attention (cuda)", q.scalar_type(), [&](auto element) {
    C10_CUDA_CHECK(la::launch_backward<decltype(element)>(p, kv_chunk, c10::cuda::getCurrentCUDAStream()));
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(amflow, CUDA, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cuda);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cuda);
}

}  // namespace amflow
