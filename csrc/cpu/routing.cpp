// Expert gating and token routing on the CPU.
//
// gate_logits: the router's x @ W^T at decode sizes (the MoE layer calls it for few tokens):
// tokens widened once, then parallel over experts, each weight row meeting every token in L1.
// route: OpenMP over tokens. Per token the logits row is widened once, the scores are computed
// by a vectorised float64 loop (common/gate.h: correctly rounded fp32 scores, the same bits as
// the GPU and the reference), then group scores, the kept groups and the top_k experts are
// picked by insertion into short sorted lists (k <= 32: most candidates cost one compare).
// One pass over the logits against the ~15 full-tensor passes of the eager PyTorch gate.
// plan: one chunk of (token, k) pairs per thread: per-chunk histograms, a serial scan over
// (expert, chunk) giving every chunk its stable start inside each expert, then a parallel
// scatter. Deterministic whatever the thread count (the order is fixed by the flat index).
// permute / unpermute: row copies (memcpy) and an fp32 weighted sum over each token's rows,
// both memory bound; permute_fp8 quantizes each gathered row from an fp32 scratch row with the
// common/fp8.h codec, so its bytes equal quantize_fp8 of the gathered rows.
#include "cpu/routing.h"
#include "cpu/quant.h"
#include "cpu/widen.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "common/fp8.h"
#include "common/gate.h"
#include "cpu/bf16_simd.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

// NOTES: GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector
// idiom once inlined into the combine (as in gemm.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define LK_VARIANT_BODY "cpu/routing_body.h"
#include "cpu/variants.h"

namespace lk::cpu {

void route(const void* logits, DType dtype, int64_t T, int64_t E, int64_t row_stride,
           const float* bias, bool sigmoid, int64_t top_k, int64_t n_group, int64_t topk_group,
           bool renormalize, float scale, float* weights, int32_t* ids) {
  LK_CPU_DISPATCH(route, logits, dtype, T, E, row_stride, bias, sigmoid, top_k, n_group, topk_group, renormalize,
                  scale, weights, ids)
}

void gate_logits(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride, const float* w, int64_t E,
                 float* out) {
  LK_CPU_DISPATCH(gate_logits, x, dtype, T, H, row_stride, w, E, out)
}

void plan(const int32_t* ids, int64_t T, int64_t top_k, int64_t E, int64_t align, int64_t R,
          int32_t* counts, int32_t* offs, int32_t* row_token, int32_t* token_row) {
  LK_CPU_DISPATCH(plan, ids, T, top_k, E, align, R, counts, offs, row_token, token_row)
}

void permute(const void* x, int64_t elem_size, int64_t T, int64_t H, int64_t row_stride,
             const int32_t* row_token, int64_t R, void* out) {
  LK_CPU_DISPATCH(permute, x, elem_size, T, H, row_stride, row_token, R, out)
}

void permute_fp8(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride,
                 const int32_t* row_token, int64_t R, uint8_t* q, float* scale, bool ue8m0) {
  LK_CPU_DISPATCH(permute_fp8, x, dtype, T, H, row_stride, row_token, R, q, scale, ue8m0)
}

void unpermute(const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
               const float* weights, int64_t T, int64_t top_k, void* out) {
  LK_CPU_DISPATCH(unpermute, y, dtype, R, H, token_row, weights, T, top_k, out)
}

void unpermute_backward(const void* grad, const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
                        const float* weights, int64_t T, int64_t top_k, void* dy, float* dw) {
  LK_CHECK(dtype == DType::f32 || dtype == DType::bf16, "unpermute_backward: y must be float32 or bfloat16");
  LK_CHECK(T >= 0 && H >= 0 && R >= 0 && top_k >= 0, "unpermute_backward: bad size");
  LK_CPU_DISPATCH(unpermute_backward, grad, y, dtype, R, H, token_row, weights, T, top_k, dy, dw)
}

#if !defined(__SIZEOF_INT128__)
#error "update_bias needs __int128 (GCC or Clang on a 64-bit target)"
#endif
void update_bias(const float* bias, const void* counts, DType counts_dtype, int64_t E, float rate,
                 float* out) {
  LK_CHECK(counts_dtype == DType::i32 || counts_dtype == DType::i64, "update_bias: counts must be int32 or int64");
  auto count = [&](int64_t e) -> int64_t {
    return counts_dtype == DType::i32 ? int64_t(static_cast<const int32_t*>(counts)[e])
                                      : static_cast<const int64_t*>(counts)[e];
  };
  // sign(mean - count_e) == sign(sum - E * count_e), exactly, in 128-bit integers: |sum| and
  // |E * count_e| are below 2^126 for any E < 2^63 and int64 counts, so nothing can overflow
  // (int64 overflowed for counts near 2^62 and gave the wrong sign).
  __int128 sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += count(e);
  for (int64_t e = 0; e < E; ++e) {
    const __int128 d = sum - static_cast<__int128>(E) * count(e);
    const float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
    out[e] = bias[e] + rate * sign;
  }
}

}  // namespace lk::cpu
