// The CUDA glue of amflow::linear_attention_fwd / _bwd after validation, shared by
// linear_attention.cu and the CPU emulator of tests/cuda_emulator: kernel parameters from ATen
// tensors, outputs and scratch, and the launch. Callers give the stream, the device's
// multiprocessor count (the token chunks are sized by it) and `check`, which turns a launch's
// cudaError_t into an exception.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "dispatch.h"
#include "linear_attention.cuh"

namespace amflow::glue {

namespace la = cuda::linear;

inline la::Params linear_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double eps) {
  la::Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(q, p.q_stride);
  copy_strides(k, p.k_stride);
  copy_strides(v, p.v_stride);
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.Nk = k.size(2);
  p.D = q.size(3);
  p.Dv = v.size(3);
  p.eps = static_cast<float>(eps);
  return p;
}

// Tokens per chunk for n tokens over `heads` heads on `sms` multiprocessors: enough blocks to
// fill the device four times over, whole tiles per chunk.
inline int64_t chunk_tokens(int64_t n, int64_t heads, int64_t sms) {
  const int64_t tiles = (n + la::kTokens - 1) / la::kTokens;
  const int64_t chunks = std::min(tiles, std::max<int64_t>(1, (4 * sms + heads - 1) / heads));
  return (tiles + chunks - 1) / chunks * la::kTokens;
}

inline int64_t chunks_of(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

template <typename Check>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, double eps, int64_t sms,
                                                                    cudaStream_t stream, Check&& check) {
  auto p = linear_attention_params(q, k, v, eps);
  const auto state_options = q.options().dtype(at::kFloat);
  auto out = at::empty({p.B, p.H, p.Nq, p.Dv}, q.options());
  auto kv = at::empty({p.B, p.H, p.D, p.Dv}, state_options);
  auto z = at::empty({p.B, p.H, p.D}, state_options);
  const int64_t heads = p.B * p.H;
  if (heads == 0) return {out, kv, z};
  p.chunk = chunk_tokens(p.Nk, heads, sms);
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
  const int64_t out_chunk = chunk_tokens(p.Nq, heads, sms);
  dispatch_dtype("linear_attention (cuda)", q.scalar_type(), [&](auto element) {
    check(la::launch_forward<decltype(element)>(p, out_chunk, stream));
  });
  return {out, kv, z};
}

template <typename Check>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd(const at::Tensor& grad_in, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& kv_in, const at::Tensor& z_in,
                                                                    double eps, int64_t sms, cudaStream_t stream,
                                                                    Check&& check) {
  auto p = linear_attention_params(q, k, v, eps);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  const int64_t heads = p.B * p.H;
  if (heads == 0) return {dq, dk, dv};
  const auto grad = grad_in.to(q.scalar_type()).contiguous();
  const auto kv = kv_in.contiguous();
  const auto z = z_in.contiguous();
  p.chunk = chunk_tokens(p.Nq, heads, sms);
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
  const int64_t kv_chunk = chunk_tokens(p.Nk, heads, sms);
  dispatch_dtype("linear_attention (cuda)", q.scalar_type(), [&](auto element) {
    check(la::launch_backward<decltype(element)>(p, kv_chunk, stream));
  });
  return {dq, dk, dv};
}

}  // namespace amflow::glue
