// MLA append / decode on the CPU: the kernels are in mla_body.h, compiled once per CPU level
// (cpu/variants.h) and chosen at run time (cpu/isa.h).
#include "cpu/mla.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "common/fp8.h"
#include "cpu/isa.h"

// NOTES: GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector idiom.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define LK_VARIANT_BODY "cpu/mla_body.h"
#include "cpu/variants.h"

namespace lk::cpu {

int64_t mla_append(const void* kv_c, DType kv_dtype, int64_t kv_stride, const void* k_pe,
                   DType pe_dtype, int64_t pe_stride, const int64_t* slot_mapping, int64_t T,
                   const float* norm_weight, float eps, const float* cos, const float* sin,
                   const int64_t* positions, int64_t num_positions, MlaCache cache, bool debug) {
  LK_CPU_DISPATCH(mla_append, kv_c, kv_dtype, kv_stride, k_pe, pe_dtype, pe_stride, slot_mapping, T, norm_weight,
                  eps, cos, sin, positions, num_positions, cache, debug)
}

void mla_decode(const uint16_t* q, int64_t B, int64_t s_q, int64_t H, MlaCache cache,
                const int32_t* block_table, int64_t max_blocks, int64_t bt_stride,
                const int32_t* seqlens, float softmax_scale, bool causal, int64_t num_splits,
                float* o_part, float* lse_part, uint16_t* out, float* lse) {
  LK_CPU_DISPATCH(mla_decode, q, B, s_q, H, cache, block_table, max_blocks, bt_stride, seqlens, softmax_scale,
                  causal, num_splits, o_part, lse_part, out, lse)
}

void mla_schedule(const int32_t* seqlens, int64_t B, int64_t num_parts, int32_t* metadata,
                  int32_t* num_splits) {
  LK_CPU_DISPATCH(mla_schedule, seqlens, B, num_parts, metadata, num_splits)
}

}  // namespace lk::cpu
