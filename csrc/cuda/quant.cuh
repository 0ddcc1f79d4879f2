// CUDA FP8 quantization launchers (see quant.cu). Same layouts as cpu/quant.h.
#pragma once
#include "common/common.h"

namespace lk::cuda {

void quantize_fp8(const void* x, DType dtype, int64_t batch, int64_t rows, int64_t K,
                  int64_t batch_stride, int64_t row_stride, int64_t block_rows, uint8_t* q,
                  float* scale, bool ue8m0, int device, void* stream);

void dequantize_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows, int64_t K,
                    int64_t block_rows, float* out, int device, void* stream);

void quantize_fp8_transposed(const void* x, DType dtype, int64_t M, int64_t K, int64_t row_stride,
                             const int32_t* offs, int64_t num_experts, uint8_t* q, float* scale, bool ue8m0,
                             int device, void* stream);

}  // namespace lk::cuda
