// Framework-free helpers shared by the CPU and CUDA kernels: host/device qualifiers,
// bit casts, element types and argument checks. Nothing here knows about PyTorch.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lk {

// Element types crossing the binding boundary (the Python side maps torch dtypes to these).
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2, fp8e4m3 = 3, i32 = 4, i64 = 5 };

LK_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
LK_HD float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
LK_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// fp32 -> bf16, round to nearest even; NaN stays a quiet NaN (as PyTorch does).
LK_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE half -> fp32, exact (normals, subnormals, Inf, NaN).
LK_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    // subnormal: man * 2^-24, exact in fp32
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

// Thrown for arguments that would corrupt memory; the binding maps it to ValueError.
struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

#define LK_CHECK(cond, msg)                                             \
  do {                                                                  \
    if (!(cond)) throw ::lk::ArgError(std::string("leankernels: ") + (msg)); \
  } while (0)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lk
