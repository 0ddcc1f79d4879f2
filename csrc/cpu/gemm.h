// CPU FP8 block-scaled GEMMs: dense, grouped-contiguous and grouped-masked (see gemm.cpp).
#pragma once
#include "common/common.h"

namespace lk {

// How rows of a map to weight groups. Shared by the CPU and CUDA launchers.
//   dense:      one group; a [M, K] -> out [M, N]; `groups` unused.
//   contiguous: a [M, K] rows sorted by group; groups = offs int32 [G], cumulative END offsets;
//               row r belongs to the first g with offs[g] > r; rows >= offs[G-1] are skipped.
//   masked:     a [G, M, K] -> out [G, M, N]; groups = masked_m int32 [G]; rows >= masked_m[g]
//               (clamped to [0, M]) are skipped.
enum class GemmLayout : int { dense = 0, contiguous = 1, masked = 2 };

}  // namespace lk

namespace lk::cpu {

// out = a @ b[g].T per group, with 1x128 a scales and 128x128 b scales applied per 128-wide
// K step to an fp32 accumulator. Everything contiguous:
//   a [R, K] e4m3 (R = M, or G*M for masked), a_scale [R, ceil(K/128)] fp32,
//   b [G, N, K] e4m3, b_scale [G, ceil(N/128), ceil(K/128)] fp32, out [R, N] (f32 or bf16).
// Skipped rows of out are never written. b_nan_free: the caller knows b holds no NaN code
// (0x7f / 0xff), e.g. from fp8_nan_free on weights unchanged since; the AVX2 and AVX-512 walks
// then skip their NaN check (a NaN code would then count as +-480, not NaN).
void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b,
              const float* b_scale, const int32_t* groups, int64_t num_groups, int64_t M,
              int64_t N, int64_t K, void* out, DType out_dtype, bool b_nan_free = false);

// True when none of the n bytes at b is an e4m3 NaN code (0x7f / 0xff). Threaded.
bool fp8_nan_free(const uint8_t* b, int64_t n);

// k-grouped GEMM (MoE wgrad, contraction over tokens): out[e] = a[:, seg_e] @ b[:, seg_e].T with
// per-row 1x128 scales along L in the layout of common/k_groups.h. All contiguous:
//   a [M, L] e4m3, a_scale [M, G] fp32, b [N, L] e4m3, b_scale [N, G] fp32 (G = ceil(L/128) + E - 1),
//   offs int32 [E] cumulative token ends (nullptr: E = 1, every token), out [E, M, N] f32 or bf16.
// Every element of out is written (experts without tokens: 0). accumulate (f32 out only):
// out[e] += the product instead (one fp32 add per element, after the whole sum; experts without
// tokens keep their values): a weight gradient accumulated into an existing fp32 buffer.
void fp8_k_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b, const float* b_scale,
                        const int32_t* offs, int64_t num_experts, int64_t M, int64_t N, int64_t L, void* out,
                        DType out_dtype, bool accumulate = false);

}  // namespace lk::cpu
