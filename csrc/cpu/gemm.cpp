// FP8 (e4m3) block-scaled GEMM on the CPU: dense, grouped-contiguous and grouped-masked.
//
// What: out[r, n] = sum_kb (sum_{k in kb} a[r,k] * b[g,n,k]) * (a_scale[r,kb] * b_scale[g,n/128,kb])
// with each block sum in fp32 (e4m3 x e4m3 products are exact in fp32), one 128-wide K block
// at a time: exactly the contract of reference.fp8_gemm.
//
// Work split (both paths): the used rows of a are decoded once into a zero-padded [R, Kp]
// buffer (Kp = K rounded up to 128). Work items are (group, row tile, column tile); threads
// take chunks of items from a shared counter (dynamic: a core shared with another process
// does not hold the other back), so a decode step with a few rows per expert still keeps every
// core busy (the parallelism is over N).
//
// AVX512_BF16 path (Zen 4, Sapphire Rapids, ...): every e4m3 value is exact in bf16, so the
// products run on `vdpbf16ps` (32 multiply-adds per instruction, fp32 accumulate).
//  - An item is <= 32 rows x 48 columns. Per 128-wide K block it decodes its 48 weight rows
//    (vectorised bit manipulation, 32 bytes per step) and transposes them (16x16 dword
//    transposes) into an L1-resident panel [64 k-pairs][48 columns] of bf16 pairs.
//  - The micro-kernel holds 8 rows x 48 columns of block sums in 24 zmm registers; per k-pair
//    it loads 3 panel vectors and broadcasts one bf16 pair of a per row: 24 vdpbf16ps per 11
//    loads, all from L1. After the block, sums are promoted into the fp32 totals with the
//    scale a_scale * b_scale (one FMA per 16 outputs per block, 1/64 of the dot work).
//  - Weight rows of the next K blocks are prefetched while the current block computes.
// Portable path (any other CPU): fp32 operands and a 4x3 dot-product micro-kernel with 16-lane
// arrays that compilers turn into SIMD FMAs.
//
// Bound at the MoE decode shape (8 experts x 16 rows, N=4096, K=7168): 7.5 GFLOP and 235 MB of
// fp8 weights. On 2 Zen 4 cores the weight stream is ~11 ms at ~22 GB/s and the dot products
// ~17 ms at one 512-bit vdpbf16ps per cycle (~226 GFLOP/s per core measured): compute bound.
// Last measurement: see bench/bench_gemm.py and the report in the README.
#include "cpu/gemm.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/fp8.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512BF16__)
#define LK_GEMM_AVX512BF16 1
#include <immintrin.h>
#endif

namespace lk::cpu {
namespace {

struct Segment {
  int64_t group, r0, r1;  // rows [r0, r1) of a use b[group]
};

std::vector<Segment> segments(GemmLayout layout, const int32_t* groups, int64_t G, int64_t M) {
  std::vector<Segment> segs;
  if (layout == GemmLayout::dense) {
    if (M > 0) segs.push_back({0, 0, M});
  } else if (layout == GemmLayout::contiguous) {
    // Row r belongs to the first g with offs[g] > r (a running maximum of the ends), the same
    // rule the CUDA kernel's search and the reference follow; ends are clamped to M.
    int64_t start = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t end = std::min<int64_t>(std::max<int64_t>(groups[g], 0), M);
      if (end > start) segs.push_back({g, start, end});
      start = std::max(start, end);
    }
  } else {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t m = std::min<int64_t>(std::max<int64_t>(groups[g], 0), M);
      if (m > 0) segs.push_back({g, g * M, g * M + m});
    }
  }
  return segs;
}

#ifdef LK_GEMM_AVX512BF16
using Elem = uint16_t;  // bf16 bits

constexpr int kNV = 3;              // 16-column vectors per micro-kernel row
constexpr int64_t kNTile = 16 * kNV;  // columns per item
constexpr int kMR = 8;              // rows per micro-kernel call (8 x 3 accumulators)
constexpr int64_t kMTile = 32;      // rows per item
constexpr int kPairs = kQuantGroup / 2;
constexpr int64_t kPrefetchBlocks = 4;  // how far ahead weight rows are prefetched

// 32 e4m3 bytes -> 32 bf16, exact, branch-free: normals rebias the exponent (+120) and keep the
// 3 mantissa bits; subnormals (exponent 0) come from an 8-entry table; S.1111.111 -> NaN.
struct Decoder {
  __m512i sub_table;
  Decoder() {
    alignas(64) uint16_t t[32] = {};
    for (int i = 0; i < 8; ++i) t[i] = f32_to_bf16(fp8e4m3_to_f32(uint8_t(i)));
    sub_table = _mm512_load_si512(t);
  }
  __m512i operator()(__m256i bytes) const {
    const __m512i w = _mm512_cvtepu8_epi16(bytes);
    const __m512i mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
    const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0x80)), 8);
    __m512i v = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
    v = _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), v,
                                _mm512_permutexvar_epi16(mag, sub_table));
    v = _mm512_mask_blend_epi16(_mm512_cmpeq_epi16_mask(mag, _mm512_set1_epi16(0x7f)), v,
                                _mm512_set1_epi16(0x7fc0));
    return _mm512_or_si512(v, sign);
  }
};

// One row of K e4m3 bytes -> Kp decoded elements, zero padded past K.
void decode_row(const Decoder& dec, const uint8_t* src, int64_t K, int64_t Kp, Elem* dst) {
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    _mm512_storeu_si512(dst + k, dec(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
  if (k < K) {
    alignas(32) uint8_t tail[32] = {};
    std::copy(src + k, src + K, tail);
    _mm512_storeu_si512(dst + k, dec(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail))));
    k += 32;
  }
  for (; k < Kp; k += 32) _mm512_storeu_si512(dst + k, _mm512_setzero_si512());
}

// 16x16 transpose of 32-bit elements: rows[i] lane j -> rows[j] lane i.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4i + j] 128-bit lane L holds column 4L + j of rows 4i..4i+3.
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// e4m3 -> bf16 as two 128-entry byte tables (low and high byte of the bf16 of each magnitude,
// subnormals and NaN included): `vpermt2b` looks up 64 bytes at once, the sign bit is ignored
// by the lookup and ORed back into the high byte.
struct PanelDecoder {
  __m512i lo[2], hi[2];
  PanelDecoder() {
    alignas(64) uint8_t tl[128], th[128];
    for (int i = 0; i < 128; ++i) {
      const uint16_t v = f32_to_bf16(fp8e4m3_to_f32(uint8_t(i)));
      tl[i] = uint8_t(v & 0xff);
      th[i] = uint8_t(v >> 8);
    }
    lo[0] = _mm512_load_si512(tl);
    lo[1] = _mm512_load_si512(tl + 64);
    hi[0] = _mm512_load_si512(th);
    hi[1] = _mm512_load_si512(th + 64);
  }
  // 64 bytes -> bf16 pairs: w0 dword j = elements (k, k+1) with k/2 = 8*(j/4) + j%4, w1 the
  // same + 4 (the in-lane order of unpacklo/hi_epi8).
  void operator()(__m512i x, __m512i* w0, __m512i* w1) const {
    const __m512i l = _mm512_permutex2var_epi8(lo[0], x, lo[1]);
    __m512i h = _mm512_permutex2var_epi8(hi[0], x, hi[1]);
    h = _mm512_ternarylogic_epi32(h, x, _mm512_set1_epi8(char(0x80)), 0xf8);  // h | (x & 0x80)
    *w0 = _mm512_unpacklo_epi8(l, h);
    *w1 = _mm512_unpackhi_epi8(l, h);
  }
};

// Weight rows n0..n0+47 of one group (zero past N and past K), K block kb -> panel[kp][48]
// dwords, each the bf16 pair (b[n][2kp], b[n][2kp+1]) of the block.
void decode_panel(const PanelDecoder& dec, const uint8_t* bg, int64_t n0, int64_t N, int64_t K,
                  int64_t kb, uint32_t* panel) {
  const int64_t k0 = kb * kQuantGroup;
  const int64_t kv = std::min<int64_t>(kQuantGroup, K - k0);
  for (int half = 0; half < 2; ++half) {
    const int64_t valid = std::min<int64_t>(64, std::max<int64_t>(0, kv - 64 * half));
    const __mmask64 kmask = valid >= 64 ? ~__mmask64(0) : ((__mmask64(1) << valid) - 1);
    for (int grp = 0; grp < kNV; ++grp) {
      __m512i r0[16], r1[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + grp * 16 + i;
        // Masked-off bytes (past K, or rows past N) read as zero and never fault.
        const __m512i x = _mm512_maskz_loadu_epi8(n < N ? kmask : 0, bg + n * K + k0 + 64 * half);
        dec(x, &r0[i], &r1[i]);
      }
      transpose16(r0);
      transpose16(r1);
      for (int j = 0; j < 16; ++j) {
        const int kp = 32 * half + 8 * (j / 4) + j % 4;
        _mm512_storeu_si512(panel + kp * kNTile + grp * 16, r0[j]);
        _mm512_storeu_si512(panel + (kp + 4) * kNTile + grp * 16, r1[j]);
      }
    }
  }
}

// MR rows x 48 columns, one K block: totals[r][n] += (a_blk . panel) * scale[r][n / 16].
// a[r] points at row r's decoded block (128 bf16).
template <int MR>
void micro_kernel(const Elem* const* a, const uint32_t* panel, const float* scale, float* totals) {
  __m512 acc[MR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < kNV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int kp = 0; kp < kPairs; ++kp) {
    __m512bh bv[kNV];
#pragma GCC unroll 3
    for (int j = 0; j < kNV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(panel + kp * kNTile + 16 * j);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a[r] + 2 * kp, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 3
      for (int j = 0; j < kNV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < kNV; ++j) {
      float* t = totals + r * kNTile + 16 * j;
      _mm512_storeu_ps(t, _mm512_fmadd_ps(acc[r][j], _mm512_set1_ps(scale[r * kNV + j]), _mm512_loadu_ps(t)));
    }
}

using MicroKernel = void (*)(const Elem* const*, const uint32_t*, const float*, float*);

MicroKernel pick(int mr) {
  switch (mr) {
    case 1: return micro_kernel<1>;
    case 2: return micro_kernel<2>;
    case 3: return micro_kernel<3>;
    case 4: return micro_kernel<4>;
    case 5: return micro_kernel<5>;
    case 6: return micro_kernel<6>;
    case 7: return micro_kernel<7>;
    default: return micro_kernel<8>;
  }
}

struct Scratch {
  std::vector<uint32_t> panel = std::vector<uint32_t>(kPairs * kNTile);
  std::vector<float> totals = std::vector<float>(kMTile * kNTile);
  std::vector<float> scale = std::vector<float>(kMTile * kNV);
};

#else
using Elem = float;

constexpr int kMR = 4;      // rows per micro-kernel call
constexpr int kNR = 3;      // weight columns per micro-kernel call
constexpr int64_t kMTile = 32;
constexpr int64_t kNTile = 18;  // a multiple of kNR

struct Decoder {
  float table[256];
  Decoder() {
    for (int i = 0; i < 256; ++i) table[i] = fp8e4m3_to_f32(uint8_t(i));
  }
};

void decode_row(const Decoder& dec, const uint8_t* src, int64_t K, int64_t Kp, Elem* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = dec.table[src[k]];
  for (int64_t k = K; k < Kp; ++k) dst[k] = 0.0f;
}

// MR x NR outputs over all KB blocks: out[r * NR + c]. a[r] / b[c]: decoded rows (Kp floats);
// scale[(r * NR + c) * KB + kb] = a_scale[r, kb] * b_scale[c / 128, kb].
template <int MR, int NR>
void micro_kernel(const Elem* const* a, const Elem* const* b, const float* scale, int64_t KB,
                  float* out) {
  constexpr int L = 16;
  float total[MR][NR][L];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c)
      for (int l = 0; l < L; ++l) total[r][c][l] = 0.0f;
  for (int64_t kb = 0; kb < KB; ++kb) {
    float acc[MR][NR][L] = {};
    for (int s = 0; s < kQuantGroup; s += L) {
      const int64_t k = kb * kQuantGroup + s;
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NR; ++c)
          for (int l = 0; l < L; ++l) acc[r][c][l] += a[r][k + l] * b[c][k + l];
    }
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) {
        const float s = scale[(r * NR + c) * KB + kb];
        for (int l = 0; l < L; ++l) total[r][c][l] += acc[r][c][l] * s;
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      float v = 0.0f;
      for (int l = 0; l < L; ++l) v += total[r][c][l];
      out[r * NR + c] = v;
    }
}

using MicroKernel = void (*)(const Elem* const*, const Elem* const*, const float*, int64_t, float*);

template <int MR>
constexpr MicroKernel pick_nr(int nr) {
  return nr == 1 ? micro_kernel<MR, 1> : nr == 2 ? micro_kernel<MR, 2> : micro_kernel<MR, 3>;
}

MicroKernel pick(int mr, int nr) {
  switch (mr) {
    case 1: return pick_nr<1>(nr);
    case 2: return pick_nr<2>(nr);
    case 3: return pick_nr<3>(nr);
    default: return pick_nr<4>(nr);
  }
}

struct Scratch {
  std::vector<Elem> panel;
  std::vector<float> scale;
};
#endif

// One row of K e4m3 bytes -> Kp decoded elements, zero padded past K (both paths).
void decode_a_row(const Decoder& dec, const uint8_t* src, int64_t K, int64_t Kp, Elem* dst) {
#ifdef LK_GEMM_AVX512BF16
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    _mm512_storeu_si512(dst + k, dec(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
  if (k < K) {
    alignas(32) uint8_t tail[32] = {};
    std::copy(src + k, src + K, tail);
    _mm512_storeu_si512(dst + k, dec(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail))));
    k += 32;
  }
  for (; k < Kp; k += 32) _mm512_storeu_si512(dst + k, _mm512_setzero_si512());
#else
  decode_row(dec, src, K, Kp, dst);
#endif
}

struct WorkItem {
  int64_t group, r0, r1, n0;
};

struct Problem {
  const Elem* a_dec;  // [R, Kp]
  const float* a_scale;
  const uint8_t* b;
  const float* b_scale;
  int64_t N, K, KB, NB, Kp;
  void* out;
  DType out_dtype;
};

inline void store_out(const Problem& p, int64_t row, int64_t col, float v) {
  if (p.out_dtype == DType::f32) static_cast<float*>(p.out)[row * p.N + col] = v;
  else static_cast<uint16_t*>(p.out)[row * p.N + col] = f32_to_bf16(v);
}

#ifdef LK_GEMM_AVX512BF16
void process_item(const Problem& p, const PanelDecoder& dec, const WorkItem& w, Scratch& s) {
  const int64_t rows = w.r1 - w.r0;
  const int64_t nc = std::min(kNTile, p.N - w.n0);
  const uint8_t* bg = p.b + w.group * p.N * p.K;
  const float* sbg = p.b_scale + w.group * p.NB * p.KB;
  std::fill(s.totals.begin(), s.totals.begin() + rows * kNTile, 0.0f);
  for (int64_t kb = 0; kb < p.KB; ++kb) {
    if (kb + kPrefetchBlocks < p.KB)
      for (int64_t c = 0; c < nc; ++c) {
        const uint8_t* q = bg + (w.n0 + c) * p.K + (kb + kPrefetchBlocks) * kQuantGroup;
        __builtin_prefetch(q, 0, 1);
        __builtin_prefetch(q + 64, 0, 1);
      }
    decode_panel(dec, bg, w.n0, p.N, p.K, kb, s.panel.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < kNV; ++j) {
        const int64_t n = w.n0 + 16 * j;  // 16 columns share one 128-wide b_scale block
        s.scale[r * kNV + j] = n < p.N ? p.a_scale[(w.r0 + r) * p.KB + kb] * sbg[(n / kQuantGroup) * p.KB + kb] : 0.0f;
      }
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int mr = int(std::min<int64_t>(kMR, rows - r0));
      const Elem* ap[kMR];
      for (int r = 0; r < mr; ++r) ap[r] = p.a_dec + (w.r0 + r0 + r) * p.Kp + kb * kQuantGroup;
      pick(mr)(ap, s.panel.data(), s.scale.data() + r0 * kNV, s.totals.data() + r0 * kNTile);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < nc; ++c) store_out(p, w.r0 + r, w.n0 + c, s.totals[r * kNTile + c]);
}
#else
void process_item(const Problem& p, const Decoder& dec, const WorkItem& w, Scratch& s) {
  const int64_t nc = std::min(kNTile, p.N - w.n0);
  const uint8_t* bg = p.b + w.group * p.N * p.K;
  const float* sbg = p.b_scale + w.group * p.NB * p.KB;
  s.panel.resize(size_t(kNTile) * p.Kp);
  s.scale.resize(size_t(kMR * kNR) * p.KB);
  for (int64_t c = 0; c < nc; ++c) decode_row(dec, bg + (w.n0 + c) * p.K, p.K, p.Kp, s.panel.data() + c * p.Kp);
  for (int64_t c0 = 0; c0 < nc; c0 += kNR) {
    const int nr = int(std::min<int64_t>(kNR, nc - c0));
    const Elem* bp[kNR];
    const float* sbp[kNR];
    for (int c = 0; c < nr; ++c) {
      bp[c] = s.panel.data() + (c0 + c) * p.Kp;
      sbp[c] = sbg + ((w.n0 + c0 + c) / kQuantGroup) * p.KB;
    }
    for (int64_t r0 = w.r0; r0 < w.r1; r0 += kMR) {
      const int mr = int(std::min<int64_t>(kMR, w.r1 - r0));
      const Elem* ap[kMR];
      for (int r = 0; r < mr; ++r) ap[r] = p.a_dec + (r0 + r) * p.Kp;
      for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nr; ++c)
          for (int64_t kb = 0; kb < p.KB; ++kb)
            s.scale[(r * nr + c) * p.KB + kb] = p.a_scale[(r0 + r) * p.KB + kb] * sbp[c][kb];
      float res[kMR * kNR];
      pick(mr, nr)(ap, bp, s.scale.data(), p.KB, res);
      for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nr; ++c) store_out(p, r0 + r, w.n0 + c0 + c, res[r * nr + c]);
    }
  }
}
#endif

}  // namespace

void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b,
              const float* b_scale, const int32_t* groups, int64_t num_groups, int64_t M,
              int64_t N, int64_t K, void* out, DType out_dtype) {
  LK_CHECK(M >= 0 && N >= 0 && K >= 0 && num_groups >= 0, "negative size");
  LK_CHECK(out_dtype == DType::f32 || out_dtype == DType::bf16, "out dtype must be f32 or bf16");
  LK_CHECK(layout == GemmLayout::dense || groups != nullptr, "grouped layouts need group sizes");
  LK_CHECK(layout != GemmLayout::dense || num_groups == 1, "dense layout has one group");
  const std::vector<Segment> segs = segments(layout, groups, num_groups, M);
  if (segs.empty() || N == 0) return;
  const int64_t KB = ceil_div(K, kQuantGroup), NB = ceil_div(N, kQuantGroup);
  const int64_t Kp = std::max<int64_t>(KB, 1) * kQuantGroup;
  const int64_t R = layout == GemmLayout::masked ? num_groups * M : M;

  if (K == 0) {  // empty block sums: the product is exactly zero (a and b are never read)
    const Problem p{nullptr, nullptr, nullptr, nullptr, N, K, KB, NB, Kp, out, out_dtype};
    for (const Segment& s : segs)
      for (int64_t r = s.r0; r < s.r1; ++r)
        for (int64_t n = 0; n < N; ++n) store_out(p, r, n, 0.0f);
    return;
  }

  std::vector<WorkItem> items;
  for (const Segment& s : segs)
    for (int64_t r0 = s.r0; r0 < s.r1; r0 += kMTile)
      for (int64_t n0 = 0; n0 < N; n0 += kNTile)
        items.push_back({s.group, r0, std::min(s.r1, r0 + kMTile), n0});

  const Decoder dec;
  std::vector<Elem> a_dec(size_t(R) * Kp);
  std::vector<int64_t> used_rows;
  for (const Segment& s : segs)
    for (int64_t r = s.r0; r < s.r1; ++r) used_rows.push_back(r);
  const int64_t n_used = int64_t(used_rows.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_used; ++i) {
    const int64_t r = used_rows[i];
    decode_a_row(dec, a + r * K, K, Kp, a_dec.data() + r * Kp);
  }

  const Problem p{a_dec.data(), a_scale, b, b_scale, N, K, KB, NB, Kp, out, out_dtype};
#ifdef LK_GEMM_AVX512BF16
  const PanelDecoder panel_dec;
#else
  const Decoder& panel_dec = dec;
#endif
  const int64_t n_items = int64_t(items.size());
  constexpr int64_t kChunk = 4;
  std::atomic<int64_t> next_item{0};
#pragma omp parallel
  {
    Scratch scratch;
    for (;;) {
      const int64_t begin = next_item.fetch_add(kChunk);
      if (begin >= n_items) break;
      for (int64_t it = begin; it < std::min(n_items, begin + kChunk); ++it)
        process_item(p, panel_dec, items[it], scratch);
    }
  }
}

}  // namespace lk::cpu
