// CPU kernels for MLA over a paged latent cache (see mla.cpp).
#pragma once
#include "common/mla.h"

namespace lk::cpu {

// kv_c [T, 512] and k_pe [T, 64] (fp32/bf16/fp16, row strides in elements, unit column
// stride); slot_mapping int64 [T]; norm_weight fp32 [512] or null; cos/sin fp32 [P, 32]
// (P = T and positions null: one row per token; else rows picked by positions int64 [T]).
// Returns the number of tokens skipped for an out-of-range slot or position (slot < 0 is
// padding, not counted); throws under debug instead.
int64_t mla_append(const void* kv_c, DType kv_dtype, int64_t kv_stride, const void* k_pe,
                   DType pe_dtype, int64_t pe_stride, const int64_t* slot_mapping, int64_t T,
                   const float* norm_weight, float eps, const float* cos, const float* sin,
                   const int64_t* positions, int64_t num_positions, MlaCache cache, bool debug);

// q bf16 contiguous [B, s_q, H, 576]; block_table int32 [B, max_blocks] (row stride bt_stride);
// seqlens int32 [B]. out bf16 [B, s_q, H, 512], lse fp32 [B, H, s_q]. With num_splits > 1,
// o_part fp32 [B, num_splits, s_q*H, 512] and lse_part fp32 [B, num_splits, s_q*H] are scratch.
// Block-table entries that are used but out of range, and seqlens beyond the table, throw.
void mla_decode(const uint16_t* q, int64_t B, int64_t s_q, int64_t H, MlaCache cache,
                const int32_t* block_table, int64_t max_blocks, int64_t bt_stride,
                const int32_t* seqlens, float softmax_scale, bool causal, int64_t num_splits,
                float* o_part, float* lse_part, uint16_t* out, float* lse);

// FlashMLA's tile-scheduler metadata (see common/mla.h).
void mla_schedule(const int32_t* seqlens, int64_t B, int64_t num_parts, int32_t* metadata,
                  int32_t* num_splits);

}  // namespace lk::cpu
