// MLA on the CPU: fused cache append and split-KV decode attention over the paged latent cache.
//
// Append: one pass per token (OpenMP over tokens): widen the latent, RMSNorm (sum of squares in
// double), interleaved RoPE of k_pe, round to bf16, optionally quantize to FlashMLA's 656-byte
// FP8 row, write to its slot.
//
// Decode: the work unit is (sequence, group of up to 16 query rows, KV split), rows being the
// s_q * H (query, head) pairs of a sequence, which all attend to the same keys, so each cache
// token is read once per row group. A unit walks its keys in tiles of 32 tokens: scores in 4 x 4
// (row, key) register blocks, an online softmax in the log2 domain (vectorised exp2), then P.V
// into 16 x 512 fp32 accumulators held 4 rows x 64 columns at a time in registers. Partials of
// several splits are merged by their lse (the combine step); one split writes the output.
// Two tile engines: with AVX512-BF16 (Zen 4, Sapphire Rapids) the bf16 cache rows are used in
// place by vdpbf16ps (32 products per instruction, fp32 sums; FP8 rows are dequantized to bf16
// exactly first; P is rounded to bf16 for P.V, as GPU flash attention does), the 4 x 4 score
// blocks are summed by one shuffle tree. Elsewhere the tile is widened to fp32 and the same
// blocking runs on 16-lane vector-extension FMAs (AVX-512, AVX2, NEON alike).
// Per token and row group: 1152 B (bf16) or 656 B (FP8) read, 2 * 16 * 1088 FLOPs.
// Compiled once per CPU level by mla.cpp (cpu/variants.h): no include guard, LK_ISA selects code.

#if LK_ISA >= 3
#define LK_MLA_DPBF16 1
// NOTES: GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector
// idiom (_mm512_undefined_ps) when inlined; the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lk::cpu::LK_NS {
namespace {

constexpr int kTile = 32;         // keys per tile
// Below this many (key row x 16-row group) pairs a decode call runs on the calling thread: an
// OpenMP region costs microseconds idle but milliseconds when another process holds a core.
constexpr int64_t kParallelKeys = 2048;
constexpr int kRowsPerUnit = 16;  // query rows sharing one tile
static_assert(kTile % 4 == 0 && kRowsPerUnit % 4 == 0, "4 x 4 blocks may run past n and nr");

float widen(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i) v[i] = fp8e4m3_to_f32(uint8_t(i));
  }
};
const Fp8Table& fp8_table() {
  static const Fp8Table t;
  return t;
}

uint8_t* token_ptr(const MlaCache& c, int64_t block, int64_t offset) {
  return static_cast<uint8_t*>(c.data) + block * c.block_stride + offset * c.token_bytes();
}

// NOTES: GCC/Clang vector extensions at the target's native width (zmm, ymm, or xmm/NEON), so
// one source serves every x86 and ARM build; kRB rows per register block keep the score and
// P.V accumulators (kRB x 4 vectors) within the register file (32 zmm; 16 ymm/xmm).
#pragma GCC diagnostic ignored "-Wpsabi"
// Whether a cached row's 512 latent values (the attention values) are all finite: bf16
// exponent bits not all ones; FP8 codes not NaN (0x7F / 0xFF) and finite group scales.
inline bool latent_finite(const uint8_t* row, bool fp8) {
  if (!fp8) {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(row);
    bool bad = false;
    for (int k = 0; k < kMlaLatent; ++k) bad |= (v[k] & 0x7F80) == 0x7F80;
    return !bad;
  }
  bool bad = false;
  for (int k = 0; k < kMlaLatent; ++k) bad |= (row[k] & 0x7F) == 0x7F;
  float scales[4];
  memcpy(scales, row + kMlaLatent, sizeof(scales));
  for (float sc : scales) bad |= !(std::fabs(sc) <= std::numeric_limits<float>::max());
  return !bad;
}

alignas(64) static const uint16_t kZeroRow[kMlaDim] = {};

#if LK_ISA >= 2
constexpr int kLanes = 16, kRB = 4;
#elif LK_ISA >= 1
constexpr int kLanes = 8, kRB = 2;
#else
constexpr int kLanes = 4, kRB = 2;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef float vfu __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
static_assert(kTile % kLanes == 0 && kRowsPerUnit % kRB == 0, "tiles hold whole vectors and row blocks");

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// 2^x for x <= 0, vectorised: x = n + f with n = round(x), |f| <= 1/2, 2^f by its degree-6
// Taylor polynomial (relative error < 2e-7), 2^n through the exponent bits. x < -126
// (-inf included) gives 0.
inline vf exp2_neg(vf x) {
  const vf xc = x < -126.0f ? splat(-126.0f) : (x > 0.0f ? splat(0.0f) : x);
  const vi n = __builtin_convertvector(xc - 0.5f, vi);  // truncation toward 0 = round for x <= 0
  const vf f = (xc - __builtin_convertvector(n, vf)) * 0.6931471805599453f;
  vf p = splat(1.0f / 720);
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  vf two_n;
  const vi bits = (n + 127) << 23;
  memcpy(&two_n, &bits, sizeof(two_n));
  return x < -126.0f ? splat(0.0f) : p * two_n;
}

#if LK_MLA_DPBF16
// ---- AVX512-BF16 engine: bf16 rows in place, vdpbf16ps.
inline __m512bh ld_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// Sums each of 16 vectors: out[4 j + i] = sum of a[4 i + j] (a shuffle tree, 30 instructions).
inline __m512 reduce16(const __m512* a) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  const __m512 z0 = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
  const __m512 z1 = _mm512_add_ps(_mm512_unpacklo_ps(y[2], y[3]), _mm512_unpackhi_ps(y[2], y[3]));
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(z0), _mm512_castps_pd(z1))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(z0), _mm512_castps_pd(z1))));
}

struct TileEngine {
  const uint16_t* qrow[kRowsPerUnit];
  const uint16_t* krow[kTile];
  alignas(64) uint16_t kbuf[kTile][kMlaDim];              // FP8 rows dequantized to bf16
  alignas(64) uint16_t vpair[kTile / 2][2 * kMlaLatent];  // V of keys 2p, 2p+1 interleaved
  alignas(64) uint32_t ppair[kRowsPerUnit][kTile / 2];    // P of keys 2p, 2p+1 as bf16 pairs
  alignas(64) uint16_t zero_row[kMlaDim] = {};

  void set_q(const uint16_t* q, int64_t nr) {
    for (int r = 0; r < kRowsPerUnit; ++r) qrow[r] = q + (r < nr ? r : 0) * kMlaDim;
  }
  // bf16 cache: rows are used where they are. FP8: e4m3 * power-of-two scale is exact in bf16.
  void set_key(int t, const uint8_t* src, bool fp8, const float* f8) {
    if (!fp8) {
      krow[t] = reinterpret_cast<const uint16_t*>(src);
      return;
    }
    // 16 codes at a time: the 7 magnitude bits at fp32's exponent/mantissa top give
    // 2^(e-127) (1 + m/8); times 2^120 that is the e4m3 magnitude exactly. Subnormal codes
    // (e = 0) are m * 2^-9, computed apart so a flush-to-zero/DAZ mode cannot zero them; 0x7f
    // is NaN. Times the tile scale, rounded to bf16 (exact for FlashMLA's power-of-two scales).
    const __m512 two120 = _mm512_set1_ps(0x1p120f);
    const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
    for (int g = 0; g < 4; ++g) {
      float sc;
      memcpy(&sc, src + kMlaLatent + 4 * g, 4);
      const __m512 scale = _mm512_set1_ps(sc);
      for (int k = 0; k < kQuantGroup; k += 16) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g * kQuantGroup + k)));
        const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi32(0x7f));
        __m512 f = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(mag, 20)), two120);
        const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
        f = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)), f, sub);
        f = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)), f, nan);
        const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24);
        f = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign)), scale);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&kbuf[t][g * kQuantGroup + k]), (__m256i)_mm512_cvtneps_pbh(f));
      }
    }
    (void)f8;
    memcpy(&kbuf[t][kMlaLatent], src + kMlaLatent + 16, 2 * kMlaRope);
    krow[t] = kbuf[t];
  }
  void finish_tile(int64_t n) {
    for (int64_t t = n; t < kTile; ++t) krow[t] = zero_row;
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                        38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t p = 0; p < (n + 1) / 2; ++p)
      for (int d = 0; d < kMlaLatent; d += 32) {
        const __m512i a = _mm512_loadu_si512(krow[2 * p] + d), b = _mm512_loadu_si512(krow[2 * p + 1] + d);
        _mm512_store_si512(&vpair[p][2 * d], _mm512_permutex2var_epi16(a, lo, b));
        _mm512_store_si512(&vpair[p][2 * d + 32], _mm512_permutex2var_epi16(a, hi, b));
      }
  }
  // s[r * kTile + t] = q[r] . k[t] (unscaled), for r < nr and t < n rounded up to 4.
  void scores(int64_t nr, int64_t n, float* s) const {
    for (int64_t r = 0; r < nr; r += 4)
      for (int64_t t = 0; t < n; t += 4) {
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
        for (int d = 0; d < kMlaDim; d += 32) {
          __m512bh kv[4], qv[4];
          for (int j = 0; j < 4; ++j) kv[j] = ld_bh(krow[t + j] + d);
          for (int i = 0; i < 4; ++i) qv[i] = ld_bh(qrow[r + i] + d);
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], qv[i], kv[j]);
        }
        alignas(64) float out[16];
        _mm512_store_ps(out, reduce16(acc));
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) s[(r + i) * kTile + t + j] = out[4 * j + i];
      }
  }
  // acc[r] += sum_t p[r * kTile + t] v[t], P rounded to bf16.
  void accumulate(const float* p, int64_t nr, int64_t n, float* acc) {
    const int64_t np = (n + 1) / 2;
    for (int64_t r = 0; r < ceil_div(nr, 4) * 4; ++r)  // padded rows carry p = 0
      for (int64_t q = 0; q < np; ++q) {
        const float p1 = 2 * q + 1 < n ? p[r * kTile + 2 * q + 1] : 0.0f;
        ppair[r][q] = uint32_t(f32_to_bf16(p[r * kTile + 2 * q])) | (uint32_t(f32_to_bf16(p1)) << 16);
      }
    for (int64_t r = 0; r < nr; r += 4)
      for (int d = 0; d < kMlaLatent; d += 64) {
        __m512 a[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) a[i][j] = _mm512_loadu_ps(acc + (r + i) * kMlaLatent + d + 16 * j);
        for (int64_t q = 0; q < np; ++q) {
          __m512bh v[4];
          for (int j = 0; j < 4; ++j) v[j] = (__m512bh)_mm512_load_si512(&vpair[q][2 * (d + 16 * j)]);
          for (int i = 0; i < 4; ++i) {
            const __m512bh pb = (__m512bh)_mm512_set1_epi32(int(ppair[r + i][q]));
            for (int j = 0; j < 4; ++j) a[i][j] = _mm512_dpbf16_ps(a[i][j], pb, v[j]);
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + (r + i) * kMlaLatent + d + 16 * j, a[i][j]);
      }
  }
};
#else
// ---- Portable engine: the tile widened to fp32, 16-lane vector-extension FMAs.
struct TileEngine {
  alignas(64) float qf[kRowsPerUnit][kMlaDim];
  alignas(64) float kt[kTile][kMlaDim];

  void set_q(const uint16_t* q, int64_t nr) {
    for (int r = 0; r < kRowsPerUnit; ++r)
      for (int k = 0; k < kMlaDim; ++k) qf[r][k] = r < nr ? bf16_to_f32(q[r * kMlaDim + k]) : 0.0f;
  }
  void set_key(int t, const uint8_t* src, bool fp8, const float* f8) {
    float* dst = kt[t];
    if (!fp8) {
      const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
      for (int k = 0; k < kMlaDim; ++k) dst[k] = bf16_to_f32(s16[k]);
      return;
    }
    float scales[4];
    memcpy(scales, src + kMlaLatent, sizeof(scales));
    for (int g = 0; g < 4; ++g)
      for (int k = 0; k < kQuantGroup; ++k) dst[g * kQuantGroup + k] = f8[src[g * kQuantGroup + k]] * scales[g];
    uint16_t rope[kMlaRope];
    memcpy(rope, src + kMlaLatent + 16, sizeof(rope));
    for (int k = 0; k < kMlaRope; ++k) dst[kMlaLatent + k] = bf16_to_f32(rope[k]);
  }
  void finish_tile(int64_t n) {
    for (int64_t t = n; t < kTile; ++t) std::fill(kt[t], kt[t] + kMlaDim, 0.0f);
  }
  // s[r * kTile + t] = q[r] . k[t]; kRB x 4 register blocks.
  void scores(int64_t nr, int64_t n, float* s) const {
    for (int64_t r = 0; r < nr; r += kRB)
      for (int64_t t = 0; t < n; t += 4) {
        vf a[kRB][4] = {};
        for (int d = 0; d < kMlaDim; d += kLanes) {
          vf kv[4], qv[kRB];
          for (int j = 0; j < 4; ++j) kv[j] = load(kt[t + j] + d);
          for (int i = 0; i < kRB; ++i) qv[i] = load(qf[r + i] + d);
          for (int i = 0; i < kRB; ++i)
            for (int j = 0; j < 4; ++j) a[i][j] += qv[i] * kv[j];
        }
        for (int i = 0; i < kRB; ++i)
          for (int j = 0; j < 4; ++j) s[(r + i) * kTile + t + j] = hsum(a[i][j]);
      }
  }
  // acc[r] += sum_t p[r * kTile + t] v[t]; kRB rows x 4 vectors of accumulators in registers.
  void accumulate(const float* p, int64_t nr, int64_t n, float* acc) {
    for (int64_t r = 0; r < nr; r += kRB)
      for (int d = 0; d < kMlaLatent; d += 4 * kLanes) {
        vf a[kRB][4];
        for (int i = 0; i < kRB; ++i)
          for (int j = 0; j < 4; ++j) a[i][j] = load(acc + (r + i) * kMlaLatent + d + j * kLanes);
        for (int64_t t = 0; t < n; ++t) {
          vf vv[4];
          for (int j = 0; j < 4; ++j) vv[j] = load(kt[t] + d + j * kLanes);
          for (int i = 0; i < kRB; ++i) {
            const vf pi = splat(p[(r + i) * kTile + t]);
            for (int j = 0; j < 4; ++j) a[i][j] += pi * vv[j];
          }
        }
        for (int i = 0; i < kRB; ++i)
          for (int j = 0; j < 4; ++j) store(acc + (r + i) * kMlaLatent + d + j * kLanes, a[i][j]);
      }
  }
};
#endif

}  // namespace

int64_t mla_append(const void* kv_c, DType kv_dtype, int64_t kv_stride, const void* k_pe,
                   DType pe_dtype, int64_t pe_stride, const int64_t* slot_mapping, int64_t T,
                   const float* norm_weight, float eps, const float* cos, const float* sin,
                   const int64_t* positions, int64_t num_positions, MlaCache cache, bool debug) {
  const int64_t num_slots = cache.num_blocks * cache.block_size;
  int64_t skipped = 0;
  int64_t first_bad = -1;
  // NOTES: a decode step appends one token per sequence: too little work for an OpenMP region,
  // which costs milliseconds when another process holds a core (see kParallelKeys).
#pragma omp parallel for schedule(static) reduction(+ : skipped) if (T >= 64)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    const int64_t pos = positions ? positions[t] : t;
    if (slot >= num_slots || (cos && (pos < 0 || pos >= num_positions))) {
      ++skipped;
#pragma omp critical(lk_mla_append_bad)
      if (first_bad < 0 || t < first_bad) first_bad = t;
      continue;
    }
    float row[kMlaDim];
    for (int k = 0; k < kMlaLatent; ++k) row[k] = widen(kv_c, kv_dtype, t * kv_stride + k);
    if (norm_weight) {
      double ss = 0.0;
      for (int k = 0; k < kMlaLatent; ++k) ss += double(row[k]) * double(row[k]);
      const float inv = float(1.0 / std::sqrt(ss / kMlaLatent + double(eps)));
      for (int k = 0; k < kMlaLatent; ++k) {
        const float y = row[k] * inv;  // two rounded multiplies, as the reference does
        row[k] = y * norm_weight[k];
      }
    }
    for (int k = 0; k < kMlaRope; ++k) row[kMlaLatent + k] = widen(k_pe, pe_dtype, t * pe_stride + k);
    if (cos) {
      const float* c = cos + pos * (kMlaRope / 2);
      const float* s = sin + pos * (kMlaRope / 2);
      for (int i = 0; i < kMlaRope / 2; ++i) {
        const float x0 = row[kMlaLatent + 2 * i], x1 = row[kMlaLatent + 2 * i + 1];
        const float a = x0 * c[i], b = x1 * s[i], d = x0 * s[i], e = x1 * c[i];
        row[kMlaLatent + 2 * i] = a - b;
        row[kMlaLatent + 2 * i + 1] = d + e;
      }
    }
    uint8_t* dst = token_ptr(cache, slot / cache.block_size, slot % cache.block_size);
    uint16_t bf[kMlaDim];
    for (int k = 0; k < kMlaDim; ++k) bf[k] = f32_to_bf16(row[k]);
    if (!cache.fp8) {
      memcpy(dst, bf, sizeof(bf));
      continue;
    }
    float scales[4];
    for (int g = 0; g < 4; ++g) {
      uint32_t m = 0;
      for (int k = 0; k < kQuantGroup; ++k) m = std::max(m, abs_bits(bf16_to_f32(bf[g * kQuantGroup + k])));
      scales[g] = mla_fp8_scale(f32_from_bits(m));
      for (int k = 0; k < kQuantGroup; ++k)
        dst[g * kQuantGroup + k] = fp8_quantize_value(bf16_to_f32(bf[g * kQuantGroup + k]), scales[g]);
    }
    memcpy(dst + kMlaLatent, scales, sizeof(scales));
    memcpy(dst + kMlaLatent + 16, bf + kMlaLatent, 2 * kMlaRope);
  }
  if (debug && first_bad >= 0) {
    const int64_t pos = positions ? positions[first_bad] : first_bad;
    if (slot_mapping[first_bad] >= num_slots)
      throw ArgError("leankernels: slot_mapping[" + std::to_string(first_bad) + "] = " +
                     std::to_string(slot_mapping[first_bad]) + " is out of range for a cache of " +
                     std::to_string(num_slots) + " slots (LEANKERNELS_DEBUG=1)");
    throw ArgError("leankernels: positions[" + std::to_string(first_bad) + "] = " + std::to_string(pos) +
                   " is out of range for cos/sin tables of " + std::to_string(num_positions) +
                   " rows (LEANKERNELS_DEBUG=1)");
  }
  return skipped;
}

void mla_decode(const uint16_t* q, int64_t B, int64_t s_q, int64_t H, MlaCache cache,
                const int32_t* block_table, int64_t max_blocks, int64_t bt_stride,
                const int32_t* seqlens, float softmax_scale, bool causal, int64_t num_splits,
                float* o_part, float* lse_part, uint16_t* out, float* lse) {
  LK_CHECK(num_splits >= 1, "num_splits must be >= 1");
  const int64_t rows = s_q * H;
  if (B == 0 || rows == 0) return;
  // Data-dependent checks up front (cheap on the CPU): used block-table entries in range.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = seqlens[b];
    LK_CHECK(L >= 0, "seqlens[" + std::to_string(b) + "] = " + std::to_string(L) + " is negative");
    LK_CHECK(L <= max_blocks * cache.block_size,
             "seqlens[" + std::to_string(b) + "] = " + std::to_string(L) + " needs more than the " +
                 std::to_string(max_blocks) + " blocks of its block_table row");
    for (int64_t j = 0; j < ceil_div(L, cache.block_size); ++j) {
      const int64_t blk = block_table[b * bt_stride + j];
      LK_CHECK(blk >= 0 && blk < cache.num_blocks,
               "block_table[" + std::to_string(b) + ", " + std::to_string(j) + "] = " + std::to_string(blk) +
                   " is out of range for a cache of " + std::to_string(cache.num_blocks) + " blocks");
    }
  }
  const int64_t groups = ceil_div(rows, kRowsPerUnit);
  const int64_t units = B * groups * num_splits;
  const float scale_log2 = softmax_scale * 1.4426950408889634f;
  const float ln2 = 0.6931471805599453f;
  const float* f8 = fp8_table().v;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  constexpr float kFloatMax = std::numeric_limits<float>::max();

  int64_t total_keys = 0;  // key rows read by all units: small calls stay on this thread
  for (int64_t b = 0; b < B; ++b) total_keys += int64_t(seqlens[b]) * groups;
#pragma omp parallel if (units > 1 && total_keys >= kParallelKeys)
  {
    std::unique_ptr<TileEngine> eng(new TileEngine());
    std::vector<float> accbuf(kRowsPerUnit * kMlaLatent);
    float* acc = accbuf.data();
    alignas(64) float sc[kRowsPerUnit * kTile];
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t split = u % num_splits, g = (u / num_splits) % groups, b = u / (num_splits * groups);
      const int64_t r0 = g * kRowsPerUnit, nr = std::min<int64_t>(kRowsPerUnit, rows - r0);
      const int64_t L = seqlens[b];
      const int64_t chunk = mla_split_chunk(L, num_splits);
      const int64_t t0 = std::min(L, split * chunk), t1 = std::min(L, t0 + chunk);
      int64_t limit[kRowsPerUnit];
      float m[kRowsPerUnit], l[kRowsPerUnit];
      bool bad[kRowsPerUnit];
      int64_t t_end = t0;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = (r0 + r) / H;
        const int64_t lim = causal ? std::max<int64_t>(0, L - s_q + i + 1) : L;
        limit[r] = std::min(lim, t1);
        t_end = std::max(t_end, limit[r]);
        m[r] = neg_inf;
        l[r] = 0.0f;
        bad[r] = false;
      }
      eng->set_q(q + (b * rows + r0) * kMlaDim, nr);
      std::fill(accbuf.begin(), accbuf.end(), 0.0f);

      for (int64_t a = t0; a < t_end; a += kTile) {
        const int64_t n = std::min<int64_t>(kTile, t_end - a);
        for (int64_t t = 0; t < n; ++t) {
          const int64_t tok = a + t;
          const int64_t blk = block_table[b * bt_stride + tok / cache.block_size];
          eng->set_key(int(t), token_ptr(cache, blk, tok % cache.block_size), cache.fp8, f8);
        }
        eng->finish_tile(n);
        eng->scores(nr, n, sc);
        // A loaded key some row may not see (causal tail) must not reach that row through
        // p = 0 times a NaN/Inf value: such keys' values are replaced by zeros (the rows that
        // do see them already have a non-finite score, so their result is NaN either way).
        int64_t min_limit = t_end;
        for (int64_t r = 0; r < nr; ++r) min_limit = std::min(min_limit, limit[r]);
        if (min_limit < a + n) {
          bool replaced = false;
          for (int64_t t = std::max<int64_t>(0, min_limit - a); t < n; ++t) {
            const int64_t tok = a + t;
            const int64_t blk = block_table[b * bt_stride + tok / cache.block_size];
            if (!latent_finite(token_ptr(cache, blk, tok % cache.block_size), cache.fp8)) {
              eng->set_key(int(t), reinterpret_cast<const uint8_t*>(kZeroRow), false, f8);
              replaced = true;
            }
          }
          if (replaced) eng->finish_tile(n);
        }
        // Online softmax: keys past a row's causal limit (or the tile) get p = 0.
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t nv = std::max<int64_t>(0, std::min<int64_t>(n, limit[r] - a));
          float* sr = sc + r * kTile;
          for (int64_t t = 0; t < kTile; ++t) sr[t] = t < nv ? sr[t] * scale_log2 : neg_inf;
          // mla_decode's rule: a non-finite visible score (NaN or Inf in q or a cached row) makes
          // the row's out and lse NaN, never hidden; the row's softmax is skipped from here on.
          for (int64_t t = 0; t < nv && !bad[r]; ++t) bad[r] = !(std::fabs(sr[t]) <= kFloatMax);
          if (bad[r]) {
            std::fill(sr, sr + kTile, 0.0f);
            continue;
          }
          float mx = m[r];
          for (int v = 0; v < kTile; v += kLanes) mx = std::max(mx, hmax(load(sr + v)));
          if (mx == neg_inf) {  // nothing visible yet: p = 0 (acc and l stay 0)
            std::fill(sr, sr + kTile, 0.0f);
            continue;
          }
          const float alpha = m[r] == neg_inf ? 0.0f : std::exp2(m[r] - mx);
          vf psum = {};
          for (int v = 0; v < kTile; v += kLanes) {
            const vf pv = exp2_neg(load(sr + v) - mx);
            store(sr + v, pv);
            psum += pv;
          }
          if (alpha != 1.0f) {
            float* ar = acc + r * kMlaLatent;
            for (int k = 0; k < kMlaLatent; ++k) ar[k] *= alpha;
          }
          l[r] = l[r] * alpha + hsum(psum);
          m[r] = mx;
        }
        for (int64_t r = nr; r < ceil_div(nr, 4) * 4; ++r) std::fill(sc + r * kTile, sc + (r + 1) * kTile, 0.0f);  // padded rows
        eng->accumulate(sc, nr, n, acc);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r, i = row / H, h = row % H;
        const float* ar = acc + r * kMlaLatent;
        const bool empty = l[r] == 0.0f && !bad[r];
        const float nan = std::numeric_limits<float>::quiet_NaN();
        const float inv = bad[r] ? nan : empty ? 0.0f : 1.0f / l[r];
        const float part_lse = bad[r] ? nan : empty ? neg_inf : (m[r] + std::log2(l[r])) * ln2;
        if (num_splits == 1) {
          uint16_t* o = out + (b * rows + row) * kMlaLatent;
          for (int k = 0; k < kMlaLatent; ++k) o[k] = f32_to_bf16(bad[r] ? nan : ar[k] * inv);
          lse[(b * H + h) * s_q + i] = empty ? std::numeric_limits<float>::infinity() : part_lse;
        } else {
          const int64_t pr = (b * num_splits + split) * rows + row;
          float* o = o_part + pr * kMlaLatent;
          for (int k = 0; k < kMlaLatent; ++k) o[k] = bad[r] ? nan : ar[k] * inv;
          lse_part[pr] = part_lse;
        }
      }
    }
  }
  if (num_splits == 1) return;

  // Combine: out = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s).
#pragma omp parallel for schedule(static) if (total_keys >= kParallelKeys)
  for (int64_t br = 0; br < B * rows; ++br) {
    const int64_t b = br / rows, row = br % rows, i = row / H, h = row % H;
    float mx = neg_inf;
    bool nan_split = false;  // a split with a non-finite score: the row is NaN (see above)
    for (int64_t s = 0; s < num_splits; ++s) {
      const float ls = lse_part[(b * num_splits + s) * rows + row];
      nan_split |= std::isnan(ls);
      mx = std::max(mx, ls);
    }
    uint16_t* o = out + br * kMlaLatent;
    if (nan_split || mx == neg_inf) {
      const float v = nan_split ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
      for (int k = 0; k < kMlaLatent; ++k) o[k] = f32_to_bf16(v);
      lse[(b * H + h) * s_q + i] = nan_split ? v : std::numeric_limits<float>::infinity();
      continue;
    }
    // Any number of splits: the weights are recomputed in the second pass (no per-split array).
    float total = 0.0f;
    for (int64_t s = 0; s < num_splits; ++s) total += std::exp(lse_part[(b * num_splits + s) * rows + row] - mx);
    float acc[kMlaLatent] = {};
    for (int64_t s = 0; s < num_splits; ++s) {
      const float w = std::exp(lse_part[(b * num_splits + s) * rows + row] - mx);
      if (w == 0.0f) continue;
      const float ws = w / total;
      const float* op = o_part + ((b * num_splits + s) * rows + row) * kMlaLatent;
      for (int k = 0; k < kMlaLatent; ++k) acc[k] += ws * op[k];
    }
    for (int k = 0; k < kMlaLatent; ++k) o[k] = f32_to_bf16(acc[k]);
    lse[(b * H + h) * s_q + i] = mx + std::log(total);
  }
}

void mla_schedule(const int32_t* seqlens, int64_t B, int64_t num_parts, int32_t* metadata,
                  int32_t* num_splits) {
  mla_schedule_serial(seqlens, B, num_parts, metadata, num_splits);
}

}  // namespace lk::cpu::LK_NS
#undef LK_MLA_DPBF16
