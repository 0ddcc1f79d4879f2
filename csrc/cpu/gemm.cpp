// FP8 (e4m3) block-scaled GEMM on the CPU: dense, grouped-contiguous and grouped-masked.
//
// What: out[r, n] = sum_kb (sum_{k in kb} a[r,k] * b[g,n,k]) * (a_scale[r,kb] * b_scale[g,n/128,kb])
// with the inner sum in fp32 (e4m3 x e4m3 products are exact in fp32), one 128-wide K block at
// a time, exactly the contract of reference.fp8_gemm.
//
// How (GEBP-style blocking, dot-product form):
//  1. The used rows of a are decoded once into a zero-padded [R, Kp] buffer (Kp = K rounded up
//     to 128): bf16 on CPUs with AVX512_BF16 (every e4m3 value is exact in bf16), else fp32.
//  2. Work items are (group, 32-row tile, Nt-column tile); OpenMP hands them out dynamically, so
//     a decode step with a few rows per expert still keeps every core busy (parallel over N).
//  3. An item first decodes its Nt weight rows (Nt * K contiguous bytes of b: one sequential
//     stream) into a zero-padded panel sized to stay in L2 (Nt * Kp * 2 bytes <= 256 KiB), then
//     runs a 4-row x 3-column register micro-kernel over every row group and column group.
//  4. The micro-kernel keeps, for each of its 12 outputs, a 16-lane block accumulator and a
//     16-lane total: per K block, acc = sum of products (AVX512_BF16 `vdpbf16ps`, 32 products
//     per instruction), then total += acc * (a_scale * b_scale). The lanes are summed once at
//     the end (scaling is linear, so this equals scaling the block sum). No transpose of the
//     K-major operands is ever needed.
// Bound at the decode shape (8 experts x 16 rows, N=4096, K=7168): 7.5 GFLOP and 235 MB of
// fp8 weights. On 2 Zen 4 cores the weight stream is ~11 ms at ~22 GB/s, the dot products
// ~20-25 ms at one 512-bit vdpbf16ps per cycle: compute bound, about twice fp32-FMA speed.
// Last measurement: see bench/bench_gemm.py and the README table.
#include "cpu/gemm.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/fp8.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define LK_GEMM_AVX512BF16 1
#include <immintrin.h>
#endif

namespace lk::cpu {
namespace {

constexpr int kMR = 4;      // rows per micro-kernel call
constexpr int kNR = 3;      // weight columns per micro-kernel call
constexpr int kMTile = 32;  // rows per work item
constexpr int64_t kPanelBytes = 256 * 1024;  // decoded weight panel: stays in L2

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

// MR x NR outputs over all KB blocks: out[r * NR + c]. a[r] / b[c]: decoded rows (Kp elements);
// sa[r], sb[c]: the KB block scales of row r / column c.
// NOTES: the operands stream from L2 (4 a rows + 3 b rows = 7 loads per 12 vdpbf16ps). K-chunking
// them into L1 with the totals spilled between chunks measured slower on Zen 4, so it is not done.
template <int MR, int NR>
void micro_kernel(const Elem* const* a, const Elem* const* b, const float* const* sa,
                  const float* const* sb, int64_t KB, float* out) {
  __m512 total[MR][NR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int c = 0; c < NR; ++c)
      total[r][c] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    __m512 acc[MR][NR];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int s = 0; s < kQuantGroup; s += 32) {
      const int64_t k = kb * kQuantGroup + s;
      __m512bh bv[NR];
#pragma GCC unroll 3
      for (int c = 0; c < NR; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b[c] + k);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = (__m512bh)_mm512_loadu_si512(a[r] + k);
#pragma GCC unroll 3
        for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, bv[c]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
      for (int c = 0; c < NR; ++c)
        total[r][c] = _mm512_fmadd_ps(acc[r][c], _mm512_set1_ps(sa[r][kb] * sb[c][kb]), total[r][c]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
    for (int c = 0; c < NR; ++c) out[r * NR + c] = _mm512_reduce_add_ps(total[r][c]);
}

#else  // portable path: fp32 operands, 16-lane arrays the compiler turns into SIMD FMAs
using Elem = float;

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

template <int MR, int NR>
void micro_kernel(const Elem* const* a, const Elem* const* b, const float* const* sa,
                  const float* const* sb, int64_t KB, float* out) {
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
        const float s = sa[r][kb] * sb[c][kb];
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
#endif

using MicroKernel = void (*)(const Elem* const*, const Elem* const*, const float* const*,
                             const float* const*, int64_t, float*);

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

struct WorkItem {
  int64_t group, r0, r1, n0;
};

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

  // Column tile: a multiple of kNR whose decoded panel stays in L2.
  int64_t Nt = kPanelBytes / (Kp * int64_t(sizeof(Elem)));
  Nt = std::max<int64_t>(kNR, std::min<int64_t>(48, Nt / kNR * kNR));

  std::vector<WorkItem> items;
  for (const Segment& s : segs)
    for (int64_t r0 = s.r0; r0 < s.r1; r0 += kMTile)
      for (int64_t n0 = 0; n0 < N; n0 += Nt)
        items.push_back({s.group, r0, std::min(s.r1, r0 + kMTile), n0});

  const Decoder dec;
  // K == 0: every block sum is empty, so the products are zero (a and b are never read).
  std::vector<Elem> a_dec(size_t(R) * Kp);
  if (K > 0) {
    for (const Segment& s : segs) {
#pragma omp parallel for schedule(static)
      for (int64_t r = s.r0; r < s.r1; ++r) decode_row(dec, a + r * K, K, Kp, a_dec.data() + r * Kp);
    }
  }

  float* out_f32 = static_cast<float*>(out);
  uint16_t* out_bf16 = static_cast<uint16_t*>(out);
  const int64_t n_items = int64_t(items.size());

  // The weight bytes of one item (Nt rows x K, contiguous in b) for the prefetcher.
  auto item_bytes = [&](const WorkItem& w, const uint8_t** p, int64_t* n) {
    *p = b + (w.group * N + w.n0) * K;
    *n = std::min(Nt, N - w.n0) * K;
  };

  constexpr int64_t kChunk = 8;
  std::atomic<int64_t> next_item{0};
#pragma omp parallel
  {
    std::vector<Elem> panel(size_t(Nt) * Kp);
    std::vector<const float*> sb_cols(Nt);
    // NOTES: threads take chunks of kChunk consecutive items from a shared counter (dynamic, so
    // a core shared with another process does not hold the others back); inside a chunk a
    // thread knows its next item and prefetches that item's weights into L2 while it computes
    // the current one, so the fp8 weight stream overlaps the dot products.
    for (;;) {
      const int64_t it_begin = next_item.fetch_add(kChunk);
      if (it_begin >= n_items) break;
      const int64_t it_end = std::min(n_items, it_begin + kChunk);
    for (int64_t it = it_begin; it < it_end; ++it) {
      const WorkItem w = items[it];
      const int64_t nc = std::min(Nt, N - w.n0);
      const uint8_t* bg = b + w.group * N * K;
      const float* sbg = b_scale + w.group * NB * KB;
      if (K > 0)
        for (int64_t c = 0; c < nc; ++c)
          decode_row(dec, bg + (w.n0 + c) * K, K, Kp, panel.data() + c * Kp);
      for (int64_t c = 0; c < nc; ++c) sb_cols[c] = sbg + ((w.n0 + c) / kQuantGroup) * KB;

      const uint8_t* pf = nullptr;
      int64_t pf_bytes = 0, pf_done = 0;
      if (it + 1 < it_end && K > 0) item_bytes(items[it + 1], &pf, &pf_bytes);
      const int64_t col_groups = ceil_div(nc, kNR), row_groups = ceil_div(w.r1 - w.r0, kMR);
      const int64_t pf_step = ceil_div(ceil_div(pf_bytes, 64), col_groups * row_groups) * 64;

      for (int64_t c0 = 0; c0 < nc; c0 += kNR) {
        const int nr = int(std::min<int64_t>(kNR, nc - c0));
        const Elem* bp[kNR];
        const float* sbp[kNR];
        for (int c = 0; c < nr; ++c) {
          bp[c] = panel.data() + (c0 + c) * Kp;
          sbp[c] = sb_cols[c0 + c];
        }
        for (int64_t r0 = w.r0; r0 < w.r1; r0 += kMR) {
          const int mr = int(std::min<int64_t>(kMR, w.r1 - r0));
          const Elem* ap[kMR];
          const float* sap[kMR];
          for (int r = 0; r < mr; ++r) {
            ap[r] = a_dec.data() + (r0 + r) * Kp;
            sap[r] = a_scale + (r0 + r) * KB;
          }
          for (const int64_t e = std::min(pf_bytes, pf_done + pf_step); pf_done < e; pf_done += 64)
            __builtin_prefetch(pf + pf_done, 0, 2);
          float res[kMR * kNR];
          if (K > 0) pick(mr, nr)(ap, bp, sap, sbp, KB, res);
          else std::fill(res, res + kMR * kNR, 0.0f);
          for (int r = 0; r < mr; ++r) {
            const int64_t o = (r0 + r) * N + w.n0 + c0;
            for (int c = 0; c < nr; ++c) {
              if (out_dtype == DType::f32) out_f32[o + c] = res[r * nr + c];
              else out_bf16[o + c] = f32_to_bf16(res[r * nr + c]);
            }
          }
        }
      }
    }
    }
  }
}

}  // namespace lk::cpu
