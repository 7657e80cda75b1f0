// The emulator's checked build (AMFLOW_EMU_CHECKED): what compute-sanitizer's memcheck,
// racecheck and initcheck would report on a GPU, found on this CPU.
//
// The build compiles the kernels with GCC's -fsanitize=thread instrumentation but without
// ThreadSanitizer's runtime: every load and store of the translation unit calls
// __tsan_read<N>(address) / __tsan_write<N>(address), defined below. While a block runs,
// each access is checked against the memory the launch may touch:
//
// - shared memory: every __shared__ array (the loader rewrites each declaration into a
//   SharedVar, which has 64 bytes of red zone on either side) and the dynamic shared memory
//   (also between red zones) is a region. At each block start its bytes are poisoned with NaN
//   (0xFF: NaN in fp32, fp16 and bf16) and its shadow is cleared;
//   - racecheck: each byte remembers its last writer and reader(s) with the block's barrier
//     generation and their warp's. Two accesses to one byte by different threads, at least one
//     a write, with no __syncthreads between them (nor a warp collective, for two threads of
//     one warp) are a race, whatever values the two orders would give;
//   - initcheck: a read of a byte no thread of this block has written;
//   - memcheck: an access in a red zone (past either end of an array).
// - global memory: the storage of every tensor the op is given, and of every tensor allocated
//   while it runs (the glue's outputs and scratch, allocated between red zones by the checked
//   allocator of ops.cpp), is a region; an access within 64 bytes of either end of one and in
//   none is out of bounds. Two blocks writing one output show as a schedule-dependent result
//   (emulator.h's two schedules), as before.
//
// Accesses to anything else (kernel parameters, registers on a fiber's stack, the emulator's
// own state) are not checked. The first violation stops the block with its description, as
// every other emulator error does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// Included by emulator.h, after the Block it reads the barriers and the running thread of.
namespace emu::check {

constexpr size_t kRedzone = 64;
constexpr int kNobody = -1, kManyThreads = -2;

struct Access {
  int thread = kNobody;  // or kManyThreads (readers only)
  int warp = kNobody;    // kManyThreads: readers of several warps
  unsigned epoch = 0, warp_epoch = 0;
};

struct Shadow {
  Access write, read;
};

struct Region {
  uintptr_t begin = 0, end = 0;
  std::string name;
  std::vector<Shadow> shadow;  // shared memory only
};

struct State {
  std::vector<Region> shared, global;
  uintptr_t lo = 0, hi = 0;  // every region and its red zones lie in [lo, hi)

  void bound() {
    lo = UINTPTR_MAX, hi = 0;
    for (const auto* regions : {&shared, &global}) {
      for (const Region& r : *regions) lo = std::min(lo, r.begin - kRedzone), hi = std::max(hi, r.end + kRedzone);
    }
  }
};

inline State& state() {
  static State s;
  return s;
}

inline unsigned thread_id() { return current().current_thread; }
inline unsigned block_epoch() { return current().block_barrier.generation; }
inline unsigned warp_epoch(unsigned warp) { return current().warp_barriers[warp].generation; }

inline std::string describe(const Region& r, uintptr_t address) {
  return r.name + "[byte " + std::to_string(int64_t(address - r.begin)) + " of " + std::to_string(r.end - r.begin) +
         "]";
}

// Whether an access recorded as `a` happens before the current one by thread `t` of warp `w`.
inline bool ordered(const Access& a, unsigned t, unsigned w) {
  if (a.thread == kNobody || a.thread == int(t)) return true;
  if (a.epoch < block_epoch()) return true;  // a __syncthreads since
  return a.warp == int(w) && a.warp_epoch < warp_epoch(w);  // one warp, a warp collective since
}

inline std::string race(const char* first, const Access& a, const char* second, const Region& r, uintptr_t address) {
  const std::string who = a.thread == kManyThreads ? "several threads" : "thread " + std::to_string(a.thread);
  return "race on shared " + describe(r, address) + ": " + who + " " + first + " it and thread " +
         std::to_string(thread_id()) + " " + second + " it with no barrier between";
}

// Whether an access to shared memory is a race or reads undefined bytes; if so, `error` says how.
inline bool check_shared(Region& r, uintptr_t address, size_t bytes, bool write, std::string& error) {
  const unsigned t = thread_id(), w = t / 32, epoch = block_epoch(), wepoch = warp_epoch(w);
  for (size_t i = 0; i < bytes; ++i) {
    Shadow& s = r.shadow[address + i - r.begin];
    if (write) {
      if (!ordered(s.write, t, w)) return error = race("wrote", s.write, "writes", r, address + i), true;
      if (!ordered(s.read, t, w)) return error = race("read", s.read, "writes", r, address + i), true;
      s.write = Access{int(t), int(w), epoch, wepoch};
      s.read = Access{};
      continue;
    }
    if (s.write.thread == kNobody) {
      error = "thread " + std::to_string(t) + " reads shared " + describe(r, address + i) +
              ", which no thread of this block has written (shared memory is undefined at block start)";
      return true;
    }
    if (!ordered(s.write, t, w)) return error = race("wrote", s.write, "reads", r, address + i), true;
    if (s.read.thread == kNobody || ordered(s.read, t, w) || s.read.thread == int(t)) {
      s.read = Access{int(t), int(w), epoch, wepoch};
    } else {  // a second reader between the same barriers
      s.read = Access{kManyThreads, s.read.warp == int(w) ? int(w) : kManyThreads, epoch, wepoch};
    }
  }
  return false;
}

inline std::string out_of_bounds(const char* kind, const Region& r, uintptr_t address, size_t bytes, bool write) {
  const std::string where = address < r.begin ? std::to_string(r.begin - address) + " bytes before the start of "
                                              : std::to_string(address + bytes - r.end) + " bytes past the end of ";
  return "thread " + std::to_string(thread_id()) + (write ? " writes " : " reads ") + std::to_string(bytes) +
         " bytes out of bounds, " + where + kind + " " + r.name + " (" + std::to_string(r.end - r.begin) + " bytes)";
}

inline bool overlaps(const Region& r, uintptr_t address, size_t bytes, size_t margin) {
  return address < r.end + margin && address + bytes > r.begin - margin;
}

// Whether an access violates a check; if so, `error` says how.
inline bool violates(uintptr_t address, size_t bytes, bool write, std::string& error) {
  State& st = state();
  if (address + bytes <= st.lo || address >= st.hi || current_block() == nullptr) return false;
  for (Region& r : st.shared) {
    if (address >= r.begin && address + bytes <= r.end) {
      return check_shared(r, address, bytes, write, error);
    }
    if (overlaps(r, address, bytes, kRedzone)) {
      error = out_of_bounds("shared array", r, address, bytes, write);
      return true;
    }
  }
  for (const Region& r : st.global) {
    if (address >= r.begin && address + bytes <= r.end) return false;
  }
  for (const Region& r : st.global) {
    if (overlaps(r, address, bytes, kRedzone)) {
      error = out_of_bounds("global tensor", r, address, bytes, write);
      return true;
    }
  }
  return false;
}

// Whether the hooks below ignore accesses: while the checks' own (instrumented) code runs.
__attribute__((no_sanitize_thread)) inline bool& hooks_off() {
  static bool off = false;
  return off;
}

struct HooksOff {
  __attribute__((no_sanitize_thread)) HooksOff() : was_off(hooks_off()) { hooks_off() = true; }
  __attribute__((no_sanitize_thread)) ~HooksOff() { hooks_off() = was_off; }
  bool was_off;
};

// The instrumentation's entry: the access checked, and the thread stopped on a violation.
__attribute__((no_sanitize_thread)) inline void on_access(void* address, size_t bytes, bool write) {
  if (hooks_off()) return;
  static std::string* error = nullptr;
  bool failed;
  {
    const HooksOff off;
    if (error == nullptr) error = new std::string;
    failed = violates(reinterpret_cast<uintptr_t>(address), bytes, write, *error);
  }
  if (failed) ::emu::fail(*error);
}

// A shared array of this block: registered (and poisoned) by the first thread that reaches its
// declaration in each block; dynamic shared memory is registered by the emulator at block start.
inline void declare_shared(void* begin, size_t bytes, const char* name) {
  const HooksOff off;
  State& st = state();
  const auto b = reinterpret_cast<uintptr_t>(begin);
  for (const Region& r : st.shared) {
    if (r.begin == b) return;
  }
  std::memset(begin, 0xFF, bytes);
  st.shared.push_back(Region{b, b + bytes, name, std::vector<Shadow>(bytes)});
  st.bound();
}

inline void start_block() {
  const HooksOff off;
  state().shared.clear();
  state().bound();
}

inline void declare_global(const void* begin, size_t bytes, const std::string& name) {
  const HooksOff off;
  const auto b = reinterpret_cast<uintptr_t>(begin);
  state().global.push_back(Region{b, b + bytes, name, {}});
  state().bound();
}

inline void forget_global(const void* begin) {
  const HooksOff off;
  auto& global = state().global;
  const auto b = reinterpret_cast<uintptr_t>(begin);
  global.erase(std::remove_if(global.begin(), global.end(), [b](const Region& r) { return r.begin == b; }),
               global.end());
  state().bound();
}

}  // namespace emu::check

// The instrumentation's entry points (GCC -fsanitize=thread with
// --param=tsan-instrument-func-entry-exit=0); atomics run as the sequentially consistent
// builtins, unchecked.
#define EMU_ACCESS_HOOKS(N)                                                                                  \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_read##N(void* p) {                              \
    ::emu::check::on_access(p, N, false);                                                                    \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_write##N(void* p) {                             \
    ::emu::check::on_access(p, N, true);                                                                     \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_unaligned_read##N(void* p) {                    \
    ::emu::check::on_access(p, N, false);                                                                    \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_unaligned_write##N(void* p) {                   \
    ::emu::check::on_access(p, N, true);                                                                     \
  }
EMU_ACCESS_HOOKS(1)
EMU_ACCESS_HOOKS(2)
EMU_ACCESS_HOOKS(4)
EMU_ACCESS_HOOKS(8)
EMU_ACCESS_HOOKS(16)
#undef EMU_ACCESS_HOOKS

extern "C" __attribute__((no_sanitize_thread)) void __tsan_read_range(void* p, unsigned long n) {
  ::emu::check::on_access(p, n, false);
}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_write_range(void* p, unsigned long n) {
  ::emu::check::on_access(p, n, true);
}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_init() {}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_func_entry(void*) {}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_func_exit() {}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_vptr_update(void**, void*) {}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_vptr_read(void**) {}
extern "C" __attribute__((no_sanitize_thread)) void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" __attribute__((no_sanitize_thread)) void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#define EMU_ATOMIC_HOOKS(BITS, T)                                                                             \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  extern "C" __attribute__((no_sanitize_thread)) void __tsan_atomic##BITS##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) {                                     \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) {                                     \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int) {                                   \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {         \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {           \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                          \
  extern "C" __attribute__((no_sanitize_thread)) T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int, int) {               \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
    return c;                                                                                                \
  }
EMU_ATOMIC_HOOKS(8, uint8_t)
EMU_ATOMIC_HOOKS(16, uint16_t)
EMU_ATOMIC_HOOKS(32, uint32_t)
EMU_ATOMIC_HOOKS(64, uint64_t)
#undef EMU_ATOMIC_HOOKS
