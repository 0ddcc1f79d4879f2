// Gate score math shared by the CPU and CUDA routing kernels, so every device selects the
// same experts with the same weights.
//
// NOTES: scores are evaluated in float64 and rounded once to fp32. The double result is within
// a few 2^-53 of the exact value, so the rounded fp32 score is the correctly rounded one except
// with probability ~1e-8 per value: CPU, GPU and the PyTorch reference (torch.sigmoid on
// float64) agree bitwise, whereas fp32 exp implementations differ by an ulp between libraries,
// which would flip near-tied expert choices.
#pragma once
#include "common/common.h"

// Force inlining on the host too: these sit inside loops that must vectorise.
#if defined(__CUDACC__)
#define LK_HD_INLINE __host__ __device__ __forceinline__
#else
#define LK_HD_INLINE inline __attribute__((always_inline))
#endif

namespace lk {

constexpr float kNegInf = -__builtin_huge_valf();

// exp(x) for x in [-708, 708], written branch-free so CPU loops vectorise: x = n ln2 + r with
// |r| <= ln2/2, a degree-13 Taylor polynomial for e^r (truncation < 3e-18 relative), and 2^n
// built from the bits of the rounding constant (valid for |n| <= 1022).
LK_HD_INLINE double exp_f64(double x) {
  const double kShift = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double kLog2e = 1.4426950408889634;
  const double kLn2Hi = 6.93147180369123816490e-01;
  const double kLn2Lo = 1.90821492927058770002e-10;
  const double k = x * kLog2e + kShift;
  const double n = k - kShift;
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // the low bits of k hold n; the high bits shift out
#if defined(__CUDA_ARCH__)
  const double two_n = __longlong_as_double((__double_as_longlong(k) + 1023) << 52);
#else
  const double two_n = __builtin_bit_cast(double, (__builtin_bit_cast(uint64_t, k) + 1023u) << 52);
#endif
  return p * two_n;
}

// x when x is NaN, else s: an integer blend, so loops around it stay branch-free.
LK_HD_INLINE float nan_or(float x, float s) {
  const uint32_t u = f32_bits(x);
  const uint32_t nan = uint32_t(0) - uint32_t((u & 0x7fffffffu) > 0x7f800000u);  // all ones for NaN
  return f32_from_bits((u & nan) | (f32_bits(s) & ~nan));
}

// Correctly rounded fp32 sigmoid; NaN stays NaN, +-Inf give 1 and 0.
LK_HD_INLINE float sigmoid_score(float x) {
  // |x| > 200 saturates: sigmoid(-200) ~ 1e-87 is 0 in fp32 and sigmoid(200) rounds to 1.
  // NOTES: clamp and NaN pass-through are integer selects, so GCC keeps the loop branch-free
  // (with float compares it sinks the float64 math into a branch that -ftrapping-math will not
  // if-convert, and the loop stays scalar: 8x slower).
  const uint32_t u = f32_bits(x);
  const bool big = (u & 0x7fffffffu) > 0x43480000u;  // |x| > 200, Inf or NaN
  const float xc = big ? f32_from_bits((u & 0x80000000u) | 0x43480000u) : x;
  return nan_or(x, float(1.0 / (1.0 + exp_f64(-double(xc)))));
}

// exp(x - max) in float64 for softmax; x - max <= 0 (NaN logits are handled by the caller).
LK_HD_INLINE double softmax_term(float x, double max) {
  double d = double(x) - max;
  d = d < -708.0 ? -708.0 : d;  // keeps 2^n in range; e^-708 / sum is 0 in fp32 anyway
  return exp_f64(d);
}

// Selection order as an unsigned integer: larger key = better expert. NaN keys rank as -Inf;
// 0 is reserved for "not a candidate" (experts of discarded groups, already chosen experts),
// which ranks below every real key (-Inf maps to 0x007fffff).
LK_HD_INLINE uint32_t order_key(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t a = u & 0x7fffffffu;
  u = a > 0x7f800000u ? 0xff800000u : u;  // NaN ranks as -Inf
  u = a == 0 ? 0u : u;                     // -0.0 ties with +0.0 (they compare equal)
  const uint32_t neg = 0u - (u >> 31);     // negative: flip all bits; else set the sign bit
  return u ^ (neg | 0x80000000u);
}

// Inverse of order_key for real keys (NaN was mapped to -Inf; -0.0 reads back as +0.0).
LK_HD float key_value(uint32_t k) {
  return f32_from_bits((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

}  // namespace lk
