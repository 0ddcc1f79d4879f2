// Row widening shared by the CPU kernels: fp32/bf16/fp16 elements -> an fp32 scratch row.
// The bf16 and fp32 loops vectorise; fp16 goes through the exact scalar codec.
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

}  // namespace lk::cpu
