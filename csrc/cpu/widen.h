// Row widening and narrowing shared by the CPU kernels: fp32/bf16/fp16 elements <-> an fp32
// scratch row. The bf16 and fp32 loops vectorise; fp16 goes through the exact scalar codec.
#pragma once
#include <algorithm>

#include "common/common.h"

namespace lk::cpu {

inline void widen_row(const void* x, DType dtype, int64_t offset, int64_t n, float* out) {
  switch (dtype) {
    case DType::f32: {
      const float* p = static_cast<const float*>(x) + offset;
      std::copy(p, p + n, out);
      break;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      break;
    }
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(x) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      break;
    }
    default:
      throw ArgError("leankernels: input must be float32, bfloat16 or float16");
  }
}

// fp32 -> IEEE half, round to nearest even, NaN stays NaN (PyTorch's conversion).
inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (x >= 0x47800000u) return uint16_t(sign | 0x7c00u);  // >= 65536: Inf
  if (x < 0x38800000u) {                                   // below 2^-14: subnormal result
    const float v = f32_from_bits(x) + 0.5f;               // the ulp of 0.5 is 2^-24
    return uint16_t(sign | (f32_bits(v) - 0x3f000000u));
  }
  x += (uint32_t(15 - 127) << 23) + 0xfffu + ((x >> 13) & 1u);
  return uint16_t(sign | (x >> 13));
}

// fp32 row -> n elements of dtype at out (round to nearest even), the inverse of widen_row.
inline void narrow_row(const float* in, DType dtype, int64_t n, void* out) {
  switch (dtype) {
    case DType::f32:
      std::copy(in, in + n, static_cast<float*>(out));
      break;
    case DType::bf16: {
      uint16_t* p = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) {  // f32_to_bf16, branch-free so the loop vectorises
        const uint32_t u = f32_bits(in[i]);
        const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        p[i] = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
      }
      break;
    }
    case DType::f16: {
      uint16_t* p = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_f16(in[i]);
      break;
    }
    default:
      throw ArgError("leankernels: output must be float32, bfloat16 or float16");
  }
}

}  // namespace lk::cpu
