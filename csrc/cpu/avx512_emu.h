// Test-only: the AVX-512 levels (avx512, avx512bf16) of the CPU kernels on an AVX2 machine.
// Built only with -DLEANKERNELS_EMULATE_AVX512=ON (scripts/emulate_avx512.sh), never shipped.
//
// Why: CI machines without AVX-512 (an AVX2-only Zen 1 ran five sessions in a row) could not
// run the code that AVX-512 CPUs run by default (every Zen 4/5, Sapphire Rapids and later
// server), and qemu-user (7.2) cannot emulate it. This build compiles the same kernel bodies
// with every _mm512_* intrinsic and __m512* type renamed (macros below) to SIMDe's portable
// versions (Debian's libsimde-dev: header-only, AVX2 underneath), so the avx512 and avx512bf16
// paths run on an AVX2 CPU and the CPU test suite checks their results. It checks the kernels'
// logic (indexing, masks, tails, lane orders, rounding), not their speed and not the compiler's
// AVX-512 code generation.
//
// SIMDe 0.7.4 lacks some intrinsics the kernels use; those are written here (namespace
// lk::cpu::emu) from Intel's pseudo-code, one lane at a time. Masked loads and stores touch only
// the bytes their mask selects, as the hardware does (the kernels rely on it at buffer ends).
// A kernel that starts to use an intrinsic not mapped here fails to compile in this build
// ("inlining failed ... target specific option mismatch"): add it below.
#pragma once
#ifndef LK_EMULATE_AVX512
#error "cpu/avx512_emu.h is for the LEANKERNELS_EMULATE_AVX512 test build only"
#endif
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the AVX-512 emulation build compiles lk_cpu with -mavx2 -mfma -mf16c"
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include <simde/x86/avx512.h>

namespace lk::cpu::emu {

template <class T, int N, class V>
inline void lanes(const V& v, T (&out)[N]) {
  static_assert(sizeof(V) == sizeof(T) * N, "lane view of a vector");
  std::memcpy(out, &v, sizeof(V));
}
template <class V, class T, int N>
inline V vec(const T (&in)[N]) {
  static_assert(sizeof(V) == sizeof(T) * N, "vector from lanes");
  V v;
  std::memcpy(&v, in, sizeof(V));
  return v;
}

// Bit i: lane i of a < lane i of b, the lanes read as T (cmpgt swaps the operands).
template <class T>
inline simde__mmask16 lt_mask(simde__m512i a, simde__m512i b) {
  T x[16], y[16];
  lanes(a, x), lanes(b, y);
  simde__mmask16 m = 0;
  for (int i = 0; i < 16; ++i) m |= simde__mmask16((x[i] < y[i]) << i);
  return m;
}
inline simde__mmask16 cmpgt_epu32_mask(simde__m512i a, simde__m512i b) { return lt_mask<uint32_t>(b, a); }
inline simde__mmask16 cmplt_epu32_mask(simde__m512i a, simde__m512i b) { return lt_mask<uint32_t>(a, b); }
inline simde__mmask16 cmplt_epi32_mask(simde__m512i a, simde__m512i b) { return lt_mask<int32_t>(a, b); }

// Lane-wise conversions: vpmovdw / vpmovdb (truncation, not saturation), vcvtdq2ps (round to
// nearest even: the MXCSR default, as C's int -> float conversion), vpmovzxwd / vpmovzxbd.
template <class VOut, class To, class From, class VIn>
inline VOut convert_lanes(VIn a) {
  From x[16];
  To r[16];
  lanes(a, x);
  for (int i = 0; i < 16; ++i) r[i] = To(x[i]);
  return vec<VOut>(r);
}
inline simde__m256i cvtepi32_epi16(simde__m512i a) { return convert_lanes<simde__m256i, uint16_t, uint32_t>(a); }
inline simde__m128i cvtepi32_epi8(simde__m512i a) { return convert_lanes<simde__m128i, uint8_t, uint32_t>(a); }
inline simde__m512 cvtepi32_ps(simde__m512i a) { return convert_lanes<simde__m512, float, int32_t>(a); }
inline simde__m512i cvtepu16_epi32(simde__m256i a) { return convert_lanes<simde__m512i, uint32_t, uint16_t>(a); }
inline simde__m512i cvtepu8_epi32(simde__m128i a) { return convert_lanes<simde__m512i, uint32_t, uint8_t>(a); }
// vcvtneps2bf16: round to nearest even, fp32 subnormal inputs read as zero (and results that
// would be bf16 subnormals cannot occur then), NaN kept and made quiet; MXCSR is not consulted.
inline simde__m256bh cvtneps_pbh(simde__m512 a) {
  uint32_t x[16];
  uint16_t r[16];
  lanes(a, x);
  for (int i = 0; i < 16; ++i) {
    const uint32_t u = x[i];
    if ((u & 0x7fffffffu) > 0x7f800000u) r[i] = uint16_t((u >> 16) | 0x40);
    else if ((u & 0x7f800000u) == 0) r[i] = uint16_t((u >> 16) & 0x8000);
    else r[i] = uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  }
  return vec<simde__m256bh>(r);
}
inline simde__m512 cvtph_ps(simde__m256i a) {
  const __m256 lo = _mm256_cvtph_ps(simde_mm256_extracti128_si256(a, 0));
  const __m256 hi = _mm256_cvtph_ps(simde_mm256_extracti128_si256(a, 1));
  float r[16];
  std::memcpy(r, &lo, 32);
  std::memcpy(r + 8, &hi, 32);
  return vec<simde__m512>(r);
}
// vpgatherdd with a mask: masked-off lanes keep src and read no memory.
inline simde__m512i mask_i32gather_epi32(simde__m512i src, simde__mmask16 k, simde__m512i vindex,
                                         const void* base, int scale) {
  int32_t s[16], idx[16];
  lanes(src, s), lanes(vindex, idx);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1)
      std::memcpy(&s[i], static_cast<const char*>(base) + int64_t(idx[i]) * scale, 4);
  return vec<simde__m512i>(s);
}
// Masked stores and loads: only the selected elements' bytes are touched.
inline void mask_storeu_epi16(void* p, simde__mmask32 k, simde__m512i a) {
  uint16_t x[32];
  lanes(a, x);
  for (int i = 0; i < 32; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + 2 * i, &x[i], 2);
}
inline void mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 a) {
  float x[16];
  lanes(a, x);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + 4 * i, &x[i], 4);
}
inline void mask_storeu_epi8_128(void* p, simde__mmask16 k, simde__m128i a) {
  uint8_t x[16];
  lanes(a, x);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) static_cast<uint8_t*>(p)[i] = x[i];
}
inline simde__m512i maskz_loadu_epi8(simde__mmask64 k, const void* p) {
  uint8_t r[64];
  for (int i = 0; i < 64; ++i) r[i] = ((k >> i) & 1) ? static_cast<const uint8_t*>(p)[i] : 0;
  return vec<simde__m512i>(r);
}
// Masked-off lanes are not read (zero), as the instruction does not fault on them.
inline simde__m512 maskz_loadu_ps(simde__mmask16 k, const void* p) {
  float r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = 0.0f;
    if ((k >> i) & 1) std::memcpy(&r[i], static_cast<const char*>(p) + 4 * i, 4);
  }
  return vec<simde__m512>(r);
}
// GCC's _mm512_reduce_*: halve the vector (256, 128, 64, 32 bits) and combine the halves.
template <class T, class F>
inline T reduce_tree(T (&x)[16], F f) {
  for (int n = 8; n >= 1; n /= 2)
    for (int i = 0; i < n; ++i) x[i] = f(x[i], x[i + n]);
  return x[0];
}
inline float reduce_add_ps(simde__m512 a) {
  float x[16];
  lanes(a, x);
  return reduce_tree(x, [](float u, float v) { return u + v; });
}
inline uint32_t reduce_max_epu32(simde__m512i a) {
  uint32_t x[16];
  lanes(a, x);
  return reduce_tree(x, [](uint32_t u, uint32_t v) { return u > v ? u : v; });
}
inline uint32_t reduce_min_epu32(simde__m512i a) {
  uint32_t x[16];
  lanes(a, x);
  return reduce_tree(x, [](uint32_t u, uint32_t v) { return u < v ? u : v; });
}

}  // namespace lk::cpu::emu

// ---- the names the kernels use, after <immintrin.h> has declared the real ones
#define __m512 simde__m512
#define __m512i simde__m512i
#define __m512d simde__m512d
#define __m512bh simde__m512bh
#define __m256bh simde__m256bh

#define _mm512_cmpgt_epu32_mask ::lk::cpu::emu::cmpgt_epu32_mask
#define _mm512_cmplt_epu32_mask ::lk::cpu::emu::cmplt_epu32_mask
#define _mm512_cmplt_epi32_mask ::lk::cpu::emu::cmplt_epi32_mask
#define _mm512_cvtepi32_epi16 ::lk::cpu::emu::cvtepi32_epi16
#define _mm512_cvtepi32_epi8 ::lk::cpu::emu::cvtepi32_epi8
#define _mm512_cvtepi32_ps ::lk::cpu::emu::cvtepi32_ps
#define _mm512_cvtepu16_epi32 ::lk::cpu::emu::cvtepu16_epi32
#define _mm512_cvtepu8_epi32 ::lk::cpu::emu::cvtepu8_epi32
#define _mm512_cvtneps_pbh ::lk::cpu::emu::cvtneps_pbh
#define _mm512_cvtph_ps ::lk::cpu::emu::cvtph_ps
#define _mm512_mask_i32gather_epi32 ::lk::cpu::emu::mask_i32gather_epi32
#define _mm512_mask_storeu_epi16 ::lk::cpu::emu::mask_storeu_epi16
#define _mm512_mask_storeu_ps ::lk::cpu::emu::mask_storeu_ps
#define _mm_mask_storeu_epi8 ::lk::cpu::emu::mask_storeu_epi8_128
#define _mm512_maskz_loadu_epi8 ::lk::cpu::emu::maskz_loadu_epi8
#define _mm512_maskz_loadu_ps ::lk::cpu::emu::maskz_loadu_ps
#define _mm512_reduce_add_ps ::lk::cpu::emu::reduce_add_ps
#define _mm512_reduce_max_epu32 ::lk::cpu::emu::reduce_max_epu32
#define _mm512_reduce_min_epu32 ::lk::cpu::emu::reduce_min_epu32
#define _mm512_undefined_ps simde_mm512_setzero_ps

#define _mm512_add_epi16 simde_mm512_add_epi16
#define _mm512_add_epi32 simde_mm512_add_epi32
#define _mm512_add_epi8 simde_mm512_add_epi8
#define _mm512_add_ps simde_mm512_add_ps
#define _mm512_and_si512 simde_mm512_and_si512
#define _mm512_broadcast_i32x4 simde_mm512_broadcast_i32x4
#define _mm512_castpd_ps simde_mm512_castpd_ps
#define _mm512_castps_pd simde_mm512_castps_pd
#define _mm512_castps_si512 simde_mm512_castps_si512
#define _mm512_castsi512_ps simde_mm512_castsi512_ps
#define _mm512_cmpeq_epi32_mask simde_mm512_cmpeq_epi32_mask
#define _mm512_cmpeq_epi8_mask simde_mm512_cmpeq_epi8_mask
#define _mm512_dpbf16_ps simde_mm512_dpbf16_ps
#define _mm512_extracti32x4_epi32 simde_mm512_extracti32x4_epi32
#define _mm512_fmadd_ps simde_mm512_fmadd_ps
#define _mm512_fnmadd_ps simde_mm512_fnmadd_ps
#define _mm512_load_ps simde_mm512_load_ps
#define _mm512_load_si512 simde_mm512_load_si512
#define _mm512_loadu_ps simde_mm512_loadu_ps
#define _mm512_loadu_si512 simde_mm512_loadu_si512
#define _mm512_mask_blend_ps simde_mm512_mask_blend_ps
#define _mm512_mask_mov_epi32 simde_mm512_mask_mov_epi32
#define _mm512_max_epu32 simde_mm512_max_epu32
#define _mm512_max_epu8 simde_mm512_max_epu8
#define _mm512_min_epu32 simde_mm512_min_epu32
#define _mm512_mul_ps simde_mm512_mul_ps
#define _mm512_mullo_epi32 simde_mm512_mullo_epi32
#define _mm512_or_si512 simde_mm512_or_si512
#define _mm512_packus_epi32 simde_mm512_packus_epi32
#define _mm512_permutex2var_epi16 simde_mm512_permutex2var_epi16
#define _mm512_permutex2var_epi8 simde_mm512_permutex2var_epi8
#define _mm512_permutexvar_epi32 simde_mm512_permutexvar_epi32
#define _mm512_permutexvar_epi8 simde_mm512_permutexvar_epi8
#define _mm512_set1_epi16 simde_mm512_set1_epi16
#define _mm512_set1_epi32 simde_mm512_set1_epi32
#define _mm512_set1_epi8 simde_mm512_set1_epi8
#define _mm512_set1_ps simde_mm512_set1_ps
#define _mm512_set_epi16 simde_mm512_set_epi16
#undef _mm512_setr_epi32  // (a macro in GCC's header)
#define _mm512_setr_epi32 simde_mm512_setr_epi32
#define _mm512_setzero_ps simde_mm512_setzero_ps
#define _mm512_setzero_si512 simde_mm512_setzero_si512
#define _mm512_shuffle_epi8 simde_mm512_shuffle_epi8
#define _mm512_shuffle_f32x4 simde_mm512_shuffle_f32x4
#define _mm512_shuffle_i32x4 simde_mm512_shuffle_i32x4
#define _mm512_slli_epi32 simde_mm512_slli_epi32
#define _mm512_srli_epi32 simde_mm512_srli_epi32
#define _mm512_store_ps simde_mm512_store_ps
#define _mm512_store_si512 simde_mm512_store_si512
#define _mm512_storeu_ps simde_mm512_storeu_ps
#define _mm512_storeu_si512 simde_mm512_storeu_si512
#define _mm512_ternarylogic_epi32 simde_mm512_ternarylogic_epi32
#define _mm512_unpackhi_epi16 simde_mm512_unpackhi_epi16
#define _mm512_unpackhi_epi32 simde_mm512_unpackhi_epi32
#define _mm512_unpackhi_epi64 simde_mm512_unpackhi_epi64
#define _mm512_unpackhi_epi8 simde_mm512_unpackhi_epi8
#define _mm512_unpackhi_pd simde_mm512_unpackhi_pd
#define _mm512_unpackhi_ps simde_mm512_unpackhi_ps
#define _mm512_unpacklo_epi16 simde_mm512_unpacklo_epi16
#define _mm512_unpacklo_epi32 simde_mm512_unpacklo_epi32
#define _mm512_unpacklo_epi64 simde_mm512_unpacklo_epi64
#define _mm512_unpacklo_epi8 simde_mm512_unpacklo_epi8
#define _mm512_unpacklo_pd simde_mm512_unpacklo_pd
#define _mm512_unpacklo_ps simde_mm512_unpacklo_ps
