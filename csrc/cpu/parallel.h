// Parallel loops of the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace amflow {

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
