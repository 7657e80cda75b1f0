// A CPU emulator of the CUDA execution model, enough to run the kernels and launchers of
// csrc/cuda/*.cuh on CPU tensors: what TRITON_INTERPRET=1 is to the Triton kernels, for tests on
// machines without a GPU. It is compiled with g++ in place of nvcc (see __init__.py).
//
// - A launch runs its blocks one after another. A block runs each of its threads as a fiber
//   (ucontext) on this OS thread; a fiber runs until it reaches a barrier, so threads interleave
//   only at __syncthreads, __syncwarp and warp collectives (shuffles, WMMA), deterministically.
// - __shared__ variables become static locals: one instance, shared by a block's threads, reused
//   (not cleared) by the next block, as shared memory is.
// - Misuse that a GPU would turn into a hang or undefined behaviour is an error here: a barrier
//   that some threads never reach (divergent __syncthreads), lanes of one warp at different
//   collectives, shuffles with a partial mask, misaligned WMMA pointers or leading dimensions,
//   empty or oversized grids, and more dynamic shared memory than the launch is allowed.
// - WMMA fragments hold each lane's share of a 16 × 16 tile in an arbitrary (row-major) order,
//   which code that follows the API cannot observe; mma_sync forms the product in fp32 from
//   the fp16/bf16 elements, as the tensor cores do (up to summation order).
//
// - Races are not seen where they happen (every thread sees every write at once), but by their
//   effect: the scheduler runs a block's runnable threads, and a grid's blocks, in ascending or
//   (reverse_schedule) descending order, so between two barriers every pair of threads runs in
//   both orders across the two schedules. A read and a write, or two writes, of one address by
//   two threads between the same barriers, or of one output by two blocks, make the two
//   schedules' results differ.
//
// Builds: checks.h adds memcheck, racecheck and initcheck (AMFLOW_EMU_CHECKED); fast_math.h the
// arithmetic of nvcc's --use_fast_math (AMFLOW_EMU_FAST_MATH).
//
// Not emulated: the memory model's weaker orderings, timing, occupancy and register limits.
#pragma once

#include <driver_types.h>
#include <ucontext.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

// CUDA's host_defines.h (through vector_types.h) already makes __global__, __device__ and
// __host__ empty and __align__ a GNU attribute for a host compiler.
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::current().block)
#define blockDim (::emu::current().block_dim)
#define gridDim (::emu::current().grid_dim)

#ifdef AMFLOW_EMU_FAST_MATH
#include "fast_math.h"
inline float __expf(float x) { return ::emu::fast_math::exp(x); }
#else
inline float __expf(float x) { return std::exp(x); }
#endif

namespace emu {

constexpr unsigned kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in limit per block
constexpr size_t kSharedRedzone = 64;             // unused bytes on either side of each shared array

// A barrier of `expected` threads; `op` names the collective that the first arrival entered,
// which every other arrival must match.
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
  std::string op;
};

enum class FiberState { runnable, waiting, done };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  FiberState state = FiberState::done;
  Barrier* waiting_on = nullptr;
};

// Per-warp scratch through which lanes exchange shuffle values and WMMA fragments; two slots,
// alternating by barrier generation, so a lane that has left a collective cannot overwrite
// values that a slower lane has yet to read.
struct WarpScratch {
  float shuffle[2][kWarpSize];
  float a[2][256], b[2][256], c[2][256];
};

struct Block {
  dim3 block, block_dim, grid_dim;
  unsigned threads = 0, current_thread = 0;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<WarpScratch> warps;
  std::vector<char> dynamic_shared;
  ucontext_t scheduler;
  std::function<void()> body;
  std::string error;
};

// Whether threads and blocks run in descending order (see the header comment).
inline bool& reverse_schedule() {
  static bool reversed = false;
  return reversed;
}

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}
inline Block& current() { return *current_block(); }
inline uint3 thread_index() { return uint3{current().current_thread, 0, 0}; }
inline unsigned lane() { return current().current_thread % kWarpSize; }
inline unsigned warp() { return current().current_thread / kWarpSize; }

// Stops this fiber for good with `message`; the launch reports it as an error.
[[noreturn]] inline void fail(const std::string& message) {
  Block& b = current();
  if (b.error.empty()) b.error = message;
  Fiber& fiber = b.fibers[b.current_thread];
  fiber.state = FiberState::done;
  swapcontext(&fiber.context, &b.scheduler);
  std::abort();  // never resumed
}

// Arrive at `barrier` for collective `op`; returns once all expected threads have arrived.
inline void arrive(Barrier& barrier, const std::string& op) {
  Block& b = current();
  if (barrier.arrived == 0) barrier.op = op;
  else if (barrier.op != op)
    fail("thread " + std::to_string(b.current_thread) + " reached " + op + " while others of its group wait at " +
         barrier.op);
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    for (Fiber& f : b.fibers) {
      if (f.state == FiberState::waiting && f.waiting_on == &barrier) f.state = FiberState::runnable;
    }
    return;
  }
  Fiber& fiber = b.fibers[b.current_thread];
  fiber.state = FiberState::waiting;
  fiber.waiting_on = &barrier;
  swapcontext(&fiber.context, &b.scheduler);
}

inline void warp_collective(const char* op) { arrive(current().warp_barriers[warp()], op); }
inline unsigned warp_slot() { return current().warp_barriers[warp()].generation & 1; }

inline void fiber_entry() {
  Block& b = current();
  b.body();
  b.fibers[b.current_thread].state = FiberState::done;
  swapcontext(&b.fibers[b.current_thread].context, &b.scheduler);
}

#ifdef AMFLOW_EMU_CHECKED
}  // namespace emu
#include "checks.h"
namespace emu {
#endif

// Runs `body` on every thread of block `index` until all have returned.
inline void run_block(Block& b, dim3 index) {
  b.block = index;
#ifdef AMFLOW_EMU_CHECKED
  check::start_block();
  if (b.dynamic_shared.size() > 2 * kSharedRedzone) {
    check::declare_shared(b.dynamic_shared.data() + kSharedRedzone, b.dynamic_shared.size() - 2 * kSharedRedzone,
                          "dynamic shared memory");
  }
#endif
  b.block_barrier = Barrier{b.threads};
  b.warp_barriers.assign(b.threads / kWarpSize, Barrier{kWarpSize});
  for (Fiber& f : b.fibers) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
    f.state = FiberState::runnable;
    f.waiting_on = nullptr;
  }
  current_block() = &b;
  for (;;) {
    bool ran = false, all_done = true;
    for (unsigned i = 0; i < b.threads && b.error.empty(); ++i) {
      const unsigned t = reverse_schedule() ? b.threads - 1 - i : i;
      if (b.fibers[t].state != FiberState::runnable) continue;
      b.current_thread = t;
      swapcontext(&b.scheduler, &b.fibers[t].context);
      ran = true;
    }
    if (!b.error.empty()) break;
    unsigned waiting = 0;
    for (const Fiber& f : b.fibers) {
      all_done = all_done && f.state == FiberState::done;
      waiting += f.state == FiberState::waiting;
    }
    if (all_done) break;
    if (!ran) {
      b.error = std::to_string(waiting) + " of " + std::to_string(b.threads) +
                " threads wait at a barrier that the others never reach (divergent __syncthreads or warp collective)";
      break;
    }
  }
  current_block() = nullptr;
  if (!b.error.empty()) {
    throw std::runtime_error("CUDA emulator, block (" + std::to_string(index.x) + ", " + std::to_string(index.y) +
                             "): " + b.error);
  }
}

// Each kernel's dynamic shared memory limit, raised by cudaFuncSetAttribute.
inline std::map<const void*, int>& max_dynamic_shared() {
  static std::map<const void*, int> limits;
  return limits;
}

template <typename... Args>
struct Launch {
  void (*kernel)(Args...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... Given>
  void operator()(Given&&... given) const {
    const auto raised = max_dynamic_shared().find(reinterpret_cast<const void*>(kernel));
    const size_t limit = raised == max_dynamic_shared().end() ? kDefaultSharedBytes : size_t(raised->second);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || block.x == 0 ||
        block.x * block.y * block.z > 1024 || block.y != 1 || block.z != 1 || block.x % kWarpSize != 0 ||
        shared_bytes > limit) {
      throw std::runtime_error("CUDA emulator: invalid launch: grid (" + std::to_string(grid.x) + ", " +
                               std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block " +
                               std::to_string(block.x) + ", " + std::to_string(shared_bytes) +
                               " bytes of dynamic shared memory (allowed: " + std::to_string(limit) + ")");
    }
#ifdef AMFLOW_EMU_FAST_MATH
    const fast_math::FlushSubnormals flush_subnormals;
#endif
    const std::tuple<std::decay_t<Args>...> args(std::forward<Given>(given)...);
    Block b;
    b.grid_dim = grid;
    b.block_dim = block;
    b.threads = block.x;
    b.fibers.resize(b.threads);
    for (Fiber& f : b.fibers) f.stack.reset(new char[kStackBytes]);
    b.warps.resize(b.threads / kWarpSize);
    b.dynamic_shared.assign(shared_bytes + 2 * kSharedRedzone, 0);
    b.body = [&] { std::apply(kernel, args); };
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    for (uint64_t i = 0; i < blocks; ++i) {
      const uint64_t id = reverse_schedule() ? blocks - 1 - i : i;
      run_block(b, dim3(id % grid.x, id / grid.x % grid.y, id / (uint64_t(grid.x) * grid.y)));
    }
  }
};

// kernel<<<grid, block, shared_bytes, stream>>>(args) is rewritten to
// ::emu::launch(kernel, grid, block, shared_bytes, stream)(args).
template <typename... Args>
Launch<Args...> launch(void (*kernel)(Args...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                       cudaStream_t = nullptr) {
  return Launch<Args...>{kernel, grid, block, shared_bytes};
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current().dynamic_shared.data() + kSharedRedzone);
}

// A `__shared__ T name;` declaration, rewritten by the loader to a static SharedVar<T> and a
// reference to its value: one instance, shared by a block's threads and reused by the next
// block, between red zones. The checked build registers it in each block (checks.h).
template <typename T>
struct SharedVar {
  alignas(64) unsigned char before[kSharedRedzone];
  alignas(64) T value;
  alignas(64) unsigned char after[kSharedRedzone];

  T& get([[maybe_unused]] const char* name) {
#ifdef AMFLOW_EMU_CHECKED
    check::declare_shared(&value, sizeof(T), name);
#endif
    return value;
  }
};

}  // namespace emu

inline void __syncthreads() { ::emu::arrive(::emu::current().block_barrier, "__syncthreads"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::emu::fail("__syncwarp with a partial mask is not emulated");
  ::emu::warp_collective("__syncwarp");
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = ::emu::kWarpSize) {
  if (mask != 0xffffffffu || width != int(::emu::kWarpSize))
    ::emu::fail("__shfl_xor_sync with a partial mask or width is not emulated");
  auto& scratch = ::emu::current().warps[::emu::warp()];
  const unsigned slot = ::emu::warp_slot();
  scratch.shuffle[slot][::emu::lane()] = value;
  ::emu::warp_collective("__shfl_xor_sync");
  return scratch.shuffle[slot][::emu::lane() ^ unsigned(lane_mask)];
}

// An invalid launch throws where it is made, so none is left to report.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > ::emu::kMaxSharedBytes) {
    return cudaErrorInvalidValue;
  }
  ::emu::max_dynamic_shared()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
