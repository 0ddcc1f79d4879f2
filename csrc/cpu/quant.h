// CPU FP8 quantization kernels (see quant.cpp).
#pragma once
#include "common/common.h"

namespace lk::cpu {

// x viewed as [batch, rows, K] with strides (batch_stride, row_stride, 1) in elements.
// Groups are block_rows x 128 (block_rows 1: per-token 1x128; 128: 128x128 weight blocks).
// q: contiguous [batch, rows, K] e4m3 bytes; scale: contiguous [batch, ceil(rows/block_rows),
// ceil(K/128)] fp32.
void quantize_fp8(const void* x, DType dtype, int64_t batch, int64_t rows, int64_t K,
                  int64_t batch_stride, int64_t row_stride, int64_t block_rows, uint8_t* q,
                  float* scale, bool ue8m0);

// out[b, r, k] = e4m3(q[b, r, k]) * scale[b, r / block_rows, k / 128]; all contiguous.
void dequantize_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows, int64_t K,
                    int64_t block_rows, float* out);

// x [M, K] (row stride row_stride elements, unit column stride) -> q = x.T quantized: q [K, M]
// contiguous e4m3, scale [K, ceil(M/128) + E - 1] contiguous fp32, 1x128 groups along M in the
// k-grouped layout of common/k_groups.h (offs: int32 [E] cumulative ends, or nullptr with E = 1).
void quantize_fp8_transposed(const void* x, DType dtype, int64_t M, int64_t K, int64_t row_stride,
                             const int32_t* offs, int64_t num_experts, uint8_t* q, float* scale, bool ue8m0);

// The SwiGLU activation of h [rows, 2I] (row stride row_stride elements, unit column stride),
// silu(h[:, :I]) * h[:, I:] in fp32, quantized like quantize_fp8 in 1x128 groups: q [rows, I]
// contiguous e4m3, scale [rows, ceil(I/128)] fp32. silu(g) = g / (1 + exp(-g)); full groups of
// finite inputs use a vector exp within a few ulp of libm's, the others libm's.
void silu_mul_quantize_fp8(const void* h, DType dtype, int64_t rows, int64_t I, int64_t row_stride, uint8_t* q,
                           float* scale, bool ue8m0);

// The SwiGLU of training, h [rows, 2I] (row stride row_stride elements, unit column stride),
// f32 or bf16: out [rows, I] contiguous in h's dtype = silu(h[:, :I]) * h[:, I:] computed in fp32
// (torch's F.silu(g) * u), rounded to nearest even.
void silu_mul(const void* h, DType dtype, int64_t rows, int64_t I, int64_t row_stride, void* out);

// Its gradient: grad [rows, I] (row stride grad_stride) of out, both in dtype -> dh [rows, 2I]
// contiguous in dtype: dg = (grad * u) * (s * (1 + g * (1 - s))), s = sigmoid(g); du = grad * silu(g).
void silu_mul_backward(const void* h, const void* grad, DType dtype, int64_t rows, int64_t I, int64_t h_stride,
                       int64_t grad_stride, void* dh);

}  // namespace lk::cpu

namespace lk::cpu {

// src [batch, rows, cols] bytes -> dst [batch, cols, rows], both contiguous (transpose.cpp).
void transpose_bytes(const uint8_t* src, uint8_t* dst, int64_t batch, int64_t rows, int64_t cols);

}  // namespace lk::cpu
