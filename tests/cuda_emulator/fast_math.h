// The emulator's fast-math build (AMFLOW_EMU_FAST_MATH): the arithmetic that nvcc's
// --use_fast_math (setup.py) compiles the kernels to, in place of libm's correctly rounded
// functions, so that a kernel whose result depends on exact exponentials or on subnormals
// shows it here.
//
// - exp2f → ex2.approx.ftz.f32 and __expf(x) → ex2.approx.ftz.f32(x · log2 e), the product
//   rounded to fp32 (so its error grows with |x|, as on the GPU): the exact value moved by up
//   to 2 ulp, the PTX bound, by a deterministic function of the input;
// - log2f → lg2.approx.ftz.f32: the exact value moved by up to 2^-22 absolutely, the PTX bound;
// - subnormal inputs of these are read as zero and subnormal results flushed to zero, and, for
//   the whole launch, the processor flushes every fp32 operation's subnormal operands and
//   results (MXCSR's DAZ and FTZ), as --ftz=true does on the GPU.
//
// Not emulated: division's approximation (--prec-div=false: x / y within 2 ulp, a rounding
// difference well below the tests' tolerances); only its flushing is.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace emu::fast_math {

inline uint32_t bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline float flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }

// −2 … 2, a deterministic function of x: how far an approximation strays from the exact value.
inline int stray(float x) { return int((bits(x) * 2654435761u) >> 29) % 5 - 2; }

inline float exp2(float x) {
  x = flush(x);
  const double exact = std::exp2(double(x));
  return flush(float(exact * (1.0 + stray(x) * 0x1p-23)));
}

inline float log2(float x) {
  x = flush(x);
  return float(std::log2(double(x)) + stray(x) * 0x1p-23);
}

inline float exp(float x) { return exp2(x * 1.4426950408889634f); }

// Subnormals flushed by the processor while a launch runs (DAZ and FTZ); restores the mode.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  FlushSubnormals() = default;  // other processors: the functions above still flush
#endif
};

}  // namespace emu::fast_math

#define exp2f(x) ::emu::fast_math::exp2(x)
#define log2f(x) ::emu::fast_math::log2(x)
