// CUDA expert gating and token routing launchers (see routing.cu). Same layouts as
// cpu/routing.h; every launcher is asynchronous on `stream` (no host sync, graph capturable).
#pragma once
#include "common/common.h"

namespace lk::cuda {

// Largest expert count of the CUDA route kernel (one warp keeps a token's keys in 48 KB of
// shared memory).
constexpr int64_t kRouteMaxExperts = 12288;

void route(const void* logits, DType dtype, int64_t T, int64_t E, int64_t row_stride,
           const float* bias, bool sigmoid, int64_t top_k, int64_t n_group, int64_t topk_group,
           bool renormalize, float scale, float* weights, int32_t* ids, int device, void* stream);

// int32 elements of workspace plan() needs for these sizes.
int64_t plan_workspace_size(int64_t T, int64_t top_k, int64_t E);

void plan(const int32_t* ids, int64_t T, int64_t top_k, int64_t E, int64_t align, int64_t R,
          int32_t* counts, int32_t* offs, int32_t* row_token, int32_t* token_row,
          int32_t* workspace, int64_t workspace_size, int device, void* stream);

void permute(const void* x, int64_t elem_size, int64_t T, int64_t H, int64_t row_stride,
             const int32_t* row_token, int64_t R, void* out, int device, void* stream);

void permute_fp8(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride,
                 const int32_t* row_token, int64_t R, uint8_t* q, float* scale, bool ue8m0,
                 int device, void* stream);

void unpermute(const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
               const float* weights, int64_t T, int64_t top_k, void* out, int device, void* stream);

void update_bias(const float* bias, const void* counts, DType counts_dtype, int64_t E, float rate,
                 float* out, int device, void* stream);

}  // namespace lk::cuda
