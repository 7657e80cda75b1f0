// What the tasks of every CPU kernel share: the layout they read and the parallel loop that
// runs them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace amflow {

// The tasks read rows through their strides but need a unit stride along the last dim.
inline at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// at::parallel_for over tasks [0, n), one task at a time, with the caller's thread-local state
// (dispatch-key exclusions, grad mode) in every worker. at::parallel_for does not carry it over:
// an ATen op called in an OpenMP worker would otherwise go through autograd again, record a
// graph on inputs that require grad, and return gradients that carry history and keep every
// intermediate alive.
template <typename F>
void parallel_tasks(int64_t n, const F& body) {
  const at::ThreadLocalState state;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    body(begin, end);
  });
}

}  // namespace amflow
