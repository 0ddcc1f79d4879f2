// fp32 -> bf16 rounding on 16 lanes, shared by the AVX-512 levels of the CPU kernels (the
// GEMM's bf16 output, unpermute's combine). x86 only; the AVX-512 target is the function's own,
// so it inlines into every AVX-512 variant region (cpu/variants.h) and nowhere else.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#ifdef LK_EMULATE_AVX512
#include "cpu/avx512_emu.h"  // test-only build: the AVX-512 code on AVX2 (see there)
#define LK_BF16_SIMD_TARGET_ "avx2"
#else
#define LK_BF16_SIMD_TARGET_ "avx512f"
#endif

namespace lk::cpu {

// The bf16 of each fp32 lane (bits u), in the lane's low 16 bits: f32_to_bf16's rounding (round
// to nearest even, NaN kept quiet). NOTES: not vcvtneps2bf16, which flushes fp32 subnormals.
__attribute__((target(LK_BF16_SIMD_TARGET_))) inline __m512i bf16_bits16(__m512i u) {
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                       _mm512_and_si512(hi, _mm512_set1_epi32(1))), 16);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

}  // namespace lk::cpu
#endif
