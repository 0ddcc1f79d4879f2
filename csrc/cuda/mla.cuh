// CUDA launchers for MLA over the paged latent cache (see mla.cu). Same layouts as cpu/mla.h.
// error_flag: null, or a device int32[4] set to {kind, i, j, value} on the first bad index
// (kind 1: slot_mapping[i] or positions[i]; kind 2: block_table[i, j]) for LEANKERNELS_DEBUG.
#pragma once
#include "common/mla.h"

namespace lk::cuda {

void mla_append(const void* kv_c, DType kv_dtype, int64_t kv_stride, const void* k_pe, DType pe_dtype,
                int64_t pe_stride, const int64_t* slot_mapping, int64_t T, const float* norm_weight,
                float eps, const float* cos, const float* sin, const int64_t* positions,
                int64_t num_positions, MlaCache cache, int32_t* error_flag, int device, void* stream);

// Used block-table entries out of range: that block's keys are skipped. seqlens are clamped to
// [0, max_blocks * block_size].
void mla_decode(const uint16_t* q, int64_t B, int64_t s_q, int64_t H, MlaCache cache,
                const int32_t* block_table, int64_t max_blocks, int64_t bt_stride,
                const int32_t* seqlens, float softmax_scale, bool causal, int64_t num_splits,
                float* o_part, float* lse_part, uint16_t* out, float* lse, int32_t* error_flag,
                int device, void* stream);

void mla_schedule(const int32_t* seqlens, int64_t B, int64_t num_parts, int32_t* metadata,
                  int32_t* num_splits, int device, void* stream);

}  // namespace lk::cuda
