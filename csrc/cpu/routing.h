// CPU expert gating and token routing kernels (see routing.cpp). Layouts match
// reference.route / plan / permute / unpermute / update_bias.
#pragma once
#include "common/common.h"

namespace lk::cpu {

// logits [T, E] (row stride in elements, unit column stride), bias fp32 [E] or null.
// weights fp32 [T, top_k], ids int32 [T, top_k], both contiguous.
void route(const void* logits, DType dtype, int64_t T, int64_t E, int64_t row_stride,
           const float* bias, bool sigmoid, int64_t top_k, int64_t n_group, int64_t topk_group,
           bool renormalize, float scale, float* weights, int32_t* ids);

// Router logits: out [T, E] fp32 (contiguous) = x [T, H] (row-strided, unit column stride,
// widened to fp32) times w [E, H]^T (fp32, contiguous), fp32 sums.
void gate_logits(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride, const float* w, int64_t E,
                 float* out);

// ids int32 [T*top_k] contiguous -> counts [E], offs [E], row_token [R], token_row [T*top_k].
void plan(const int32_t* ids, int64_t T, int64_t top_k, int64_t E, int64_t align, int64_t R,
          int32_t* counts, int32_t* offs, int32_t* row_token, int32_t* token_row);

// out[r] = x[row_token[r]] (zeros for -1); x [T, H] row-strided, out [R, H] contiguous; elem_size
// bytes per element. Tokens outside [0, T) read as zeros.
void permute(const void* x, int64_t elem_size, int64_t T, int64_t H, int64_t row_stride,
             const int32_t* row_token, int64_t R, void* out);

// Same gather fused with 1x128 FP8 quantization: q [R, H] e4m3, scale [R, ceil(H/128)] fp32.
void permute_fp8(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride,
                 const int32_t* row_token, int64_t R, uint8_t* q, float* scale, bool ue8m0);

// out[t] = sum_k weights[t, k] * y[token_row[t, k]] in fp32, cast to dtype; y [R, H] and
// out [T, H] contiguous, weights fp32 [T, top_k]. Rows outside [0, R) are skipped.
void unpermute(const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
               const float* weights, int64_t T, int64_t top_k, void* out);

// unpermute's gradient, for grad [T, H] of its output (grad and y in dtype, f32 or bf16):
//   dy[token_row[t, k]] = dtype(weights[t, k] * grad[t])   (dy [R, H]; rows no pair names are
//                                                          not written: the caller zeroes them)
//   dw[t, k] = sum_h grad[t, h] * y[token_row[t, k], h]    (fp32; 0 for a pair outside [0, R))
// dy or dw nullptr: not computed. Each row must be named by at most one pair (plan's rows are).
void unpermute_backward(const void* grad, const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
                        const float* weights, int64_t T, int64_t top_k, void* dy, float* dw);

// out[e] = bias[e] + rate * sign(sum(counts) - E * counts[e]); counts int32 or int64.
void update_bias(const float* bias, const void* counts, DType counts_dtype, int64_t E, float rate,
                 float* out);

}  // namespace lk::cpu
