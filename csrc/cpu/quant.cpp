// FP8 quantize / dequantize on the CPU: the kernels are in quant_body.h, compiled once per CPU
// level (cpu/variants.h) and chosen at run time (cpu/isa.h).
#include "cpu/quant.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "common/fp8.h"
#include "common/k_groups.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

// NOTES: GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector idiom.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/widen.h"

#define LK_VARIANT_BODY "cpu/quant_body.h"
#include "cpu/variants.h"

namespace lk::cpu {

void quantize_fp8(const void* x, DType dtype, int64_t batch, int64_t rows, int64_t K,
                  int64_t batch_stride, int64_t row_stride, int64_t block_rows, uint8_t* q,
                  float* scale, bool ue8m0) {
  LK_CPU_DISPATCH(quantize_fp8, x, dtype, batch, rows, K, batch_stride, row_stride, block_rows, q, scale, ue8m0)
}

void silu_mul_quantize_fp8(const void* h, DType dtype, int64_t rows, int64_t I, int64_t row_stride, uint8_t* q,
                           float* scale, bool ue8m0) {
  LK_CPU_DISPATCH(silu_mul_quantize_fp8, h, dtype, rows, I, row_stride, q, scale, ue8m0)
}

void silu_mul(const void* h, DType dtype, int64_t rows, int64_t I, int64_t row_stride, void* out) {
  LK_CPU_DISPATCH(silu_mul, h, dtype, rows, I, row_stride, out)
}

void silu_mul_backward(const void* h, const void* grad, DType dtype, int64_t rows, int64_t I, int64_t h_stride,
                       int64_t grad_stride, void* dh) {
  LK_CPU_DISPATCH(silu_mul_backward, h, grad, dtype, rows, I, h_stride, grad_stride, dh)
}

void dequantize_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows, int64_t K,
                    int64_t block_rows, float* out) {
  LK_CPU_DISPATCH(dequantize_fp8, q, scale, batch, rows, K, block_rows, out)
}

void quantize_fp8_transposed(const void* x, DType dtype, int64_t M, int64_t K, int64_t row_stride,
                             const int32_t* offs, int64_t num_experts, uint8_t* q, float* scale, bool ue8m0) {
  LK_CPU_DISPATCH(quantize_fp8_transposed, x, dtype, M, K, row_stride, offs, num_experts, q, scale, ue8m0)
}

}  // namespace lk::cpu
