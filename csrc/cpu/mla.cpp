// MLA on the CPU: fused cache append and split-KV decode attention over the paged latent cache.
//
// Append: one pass per token (OpenMP over tokens): widen the latent, RMSNorm (sum of squares in
// double), interleaved RoPE of k_pe, round to bf16, optionally quantize to FlashMLA's 656-byte
// FP8 row, write to its slot.
//
// Decode: the work unit is (sequence, group of up to 16 query rows, KV split), rows being the
// s_q * H (query, head) pairs of a sequence, which all attend to the same keys. A unit walks its
// keys in tiles of 32 tokens: it widens each tile once to fp32 (bf16 shift, or e4m3 table times
// the tile scale), so each cache token is read once per row group, then runs the scores
// (4 tokens at a time so each q load feeds 4 FMAs), an online softmax in the log2 domain, and the
// P.V accumulation into 16 x 512 fp32 accumulators (L1/L2 resident). Partials of several splits
// are merged by their lse (the combine step); one split writes the output directly.
// Per token and row group: 1152 B (bf16) or 656 B (FP8) read, 2 * 16 * 1088 FLOPs.
#include "cpu/mla.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/fp8.h"

namespace lk::cpu {
namespace {

constexpr int kTile = 32;        // keys per tile
constexpr int kRowsPerUnit = 16;  // query rows sharing one widened tile

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



// NOTES: GCC/Clang vector extensions: 16 fp32 lanes become one zmm with AVX-512, two ymm
// with AVX2, four xmm otherwise, so one source serves every x86 and ARM build.
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// s[r * kTile + t] = dot(q[r], k[t]) over the 576 values; rows/keys in 4 x 4 register blocks so
// 8 loads feed 16 FMAs.
void scores(const float* q, int64_t nr, const float* k, int64_t n, float* s) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    const float* q0 = q + r * kMlaDim;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      const float* k0 = k + t * kMlaDim;
      vf a[4][4] = {};
      for (int d = 0; d < kMlaDim; d += kLanes) {
        vf kv[4], qv[4];
        for (int j = 0; j < 4; ++j) kv[j] = load(k0 + j * kMlaDim + d);
        for (int i = 0; i < 4; ++i) qv[i] = load(q0 + i * kMlaDim + d);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) a[i][j] += qv[i] * kv[j];
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) s[(r + i) * kTile + t + j] = hsum(a[i][j]);
    }
    for (; t < n; ++t) {
      const float* k0 = k + t * kMlaDim;
      vf a[4] = {};
      for (int d = 0; d < kMlaDim; d += kLanes) {
        const vf kv = load(k0 + d);
        for (int i = 0; i < 4; ++i) a[i] += load(q0 + i * kMlaDim + d) * kv;
      }
      for (int i = 0; i < 4; ++i) s[(r + i) * kTile + t] = hsum(a[i]);
    }
  }
  for (; r < nr; ++r) {
    for (int64_t t = 0; t < n; ++t) {
      vf a = {};
      for (int d = 0; d < kMlaDim; d += kLanes) a += load(q + r * kMlaDim + d) * load(k + t * kMlaDim + d);
      s[r * kTile + t] = hsum(a);
    }
  }
}

// acc[r] += sum_t p[r * kTile + t] * v[t] over the 512 latent values; 4 rows x 64 values of
// accumulators stay in registers across the tile's keys.
void accumulate_pv(const float* p, int64_t nr, const float* v, int64_t n, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    for (int d = 0; d < kMlaLatent; d += 4 * kLanes) {
      vf a[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) a[i][j] = load(acc + (r + i) * kMlaLatent + d + j * kLanes);
      for (int64_t t = 0; t < n; ++t) {
        vf vv[4];
        for (int j = 0; j < 4; ++j) vv[j] = load(v + t * kMlaDim + d + j * kLanes);
        for (int i = 0; i < 4; ++i) {
          const vf pi = splat(p[(r + i) * kTile + t]);
          for (int j = 0; j < 4; ++j) a[i][j] += pi * vv[j];
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) store(acc + (r + i) * kMlaLatent + d + j * kLanes, a[i][j]);
    }
  }
  for (; r < nr; ++r)
    for (int64_t t = 0; t < n; ++t) {
      const float pr = p[r * kTile + t];
      for (int k = 0; k < kMlaLatent; ++k) acc[r * kMlaLatent + k] += pr * v[t * kMlaDim + k];
    }
}

}  // namespace

int64_t mla_append(const void* kv_c, DType kv_dtype, int64_t kv_stride, const void* k_pe,
                   DType pe_dtype, int64_t pe_stride, const int64_t* slot_mapping, int64_t T,
                   const float* norm_weight, float eps, const float* cos, const float* sin,
                   const int64_t* positions, int64_t num_positions, MlaCache cache, bool debug) {
  const int64_t num_slots = cache.num_blocks * cache.block_size;
  int64_t skipped = 0;
  int64_t first_bad = -1;
#pragma omp parallel for schedule(static) reduction(+ : skipped)
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

#pragma omp parallel
  {
    std::vector<float> qf(kRowsPerUnit * kMlaDim), kt(kTile * kMlaDim), acc(kRowsPerUnit * kMlaLatent);
    float sc[kRowsPerUnit][kTile];
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t split = u % num_splits, g = (u / num_splits) % groups, b = u / (num_splits * groups);
      const int64_t r0 = g * kRowsPerUnit, nr = std::min<int64_t>(kRowsPerUnit, rows - r0);
      const int64_t L = seqlens[b];
      const int64_t chunk = mla_split_chunk(L, num_splits);
      const int64_t t0 = std::min(L, split * chunk), t1 = std::min(L, t0 + chunk);
      int64_t limit[kRowsPerUnit];
      float m[kRowsPerUnit], l[kRowsPerUnit];
      int64_t t_end = t0;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = (r0 + r) / H;
        const int64_t lim = causal ? std::max<int64_t>(0, L - s_q + i + 1) : L;
        limit[r] = std::min(lim, t1);
        t_end = std::max(t_end, limit[r]);
        m[r] = neg_inf;
        l[r] = 0.0f;
      }
      const uint16_t* qb = q + (b * rows + r0) * kMlaDim;
      for (int64_t k = 0; k < nr * kMlaDim; ++k) qf[k] = bf16_to_f32(qb[k]) * scale_log2;
      std::fill(acc.begin(), acc.begin() + nr * kMlaLatent, 0.0f);

      for (int64_t a = t0; a < t_end; a += kTile) {
        const int64_t n = std::min<int64_t>(kTile, t_end - a);
        for (int64_t t = 0; t < n; ++t) {
          const int64_t tok = a + t;
          const int64_t blk = block_table[b * bt_stride + tok / cache.block_size];
          const uint8_t* src = token_ptr(cache, blk, tok % cache.block_size);
          float* dst = kt.data() + t * kMlaDim;
          if (!cache.fp8) {
            const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
            for (int k = 0; k < kMlaDim; ++k) dst[k] = bf16_to_f32(s16[k]);
          } else {
            float scales[4];
            memcpy(scales, src + kMlaLatent, sizeof(scales));
            for (int gq = 0; gq < 4; ++gq)
              for (int k = 0; k < kQuantGroup; ++k)
                dst[gq * kQuantGroup + k] = f8[src[gq * kQuantGroup + k]] * scales[gq];
            uint16_t rope[kMlaRope];
            memcpy(rope, src + kMlaLatent + 16, sizeof(rope));
            for (int k = 0; k < kMlaRope; ++k) dst[kMlaLatent + k] = bf16_to_f32(rope[k]);
          }
        }
        // Scores of every row against every key of the tile (4 x 4 register blocks), then the
        // rows' own causal limits mask the tail.
        float* sp = &sc[0][0];
        scores(qf.data(), nr, kt.data(), n, sp);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t nv = std::max<int64_t>(0, std::min<int64_t>(n, limit[r] - a));
          float* sr = sp + r * kTile;
          float mx = m[r];
          for (int64_t t = 0; t < nv; ++t) mx = std::max(mx, sr[t]);
          if (mx == neg_inf) {  // nothing visible yet: p = 0 (acc and l stay 0)
            for (int64_t t = 0; t < n; ++t) sr[t] = 0.0f;
            continue;
          }
          const float alpha = std::exp2(m[r] - mx);  // 0 when m was -inf
          float sum = 0.0f;
          for (int64_t t = 0; t < n; ++t) {
            const float p = t < nv ? std::exp2(sr[t] - mx) : 0.0f;
            sr[t] = p;
            sum += p;
          }
          if (alpha != 1.0f) {
            float* ar = acc.data() + r * kMlaLatent;
            for (int k = 0; k < kMlaLatent; ++k) ar[k] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
        }
        accumulate_pv(sp, nr, kt.data(), n, acc.data());
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r, i = row / H, h = row % H;
        const float* ar = acc.data() + r * kMlaLatent;
        const bool empty = l[r] == 0.0f;
        const float inv = empty ? 0.0f : 1.0f / l[r];
        const float part_lse = empty ? neg_inf : (m[r] + std::log2(l[r])) * ln2;
        if (num_splits == 1) {
          uint16_t* o = out + (b * rows + row) * kMlaLatent;
          for (int k = 0; k < kMlaLatent; ++k) o[k] = f32_to_bf16(ar[k] * inv);
          lse[(b * H + h) * s_q + i] = empty ? std::numeric_limits<float>::infinity() : part_lse;
        } else {
          const int64_t pr = (b * num_splits + split) * rows + row;
          float* o = o_part + pr * kMlaLatent;
          for (int k = 0; k < kMlaLatent; ++k) o[k] = ar[k] * inv;
          lse_part[pr] = part_lse;
        }
      }
    }
  }
  if (num_splits == 1) return;

  // Combine: out = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s).
#pragma omp parallel for schedule(static)
  for (int64_t br = 0; br < B * rows; ++br) {
    const int64_t b = br / rows, row = br % rows, i = row / H, h = row % H;
    float mx = neg_inf;
    for (int64_t s = 0; s < num_splits; ++s) mx = std::max(mx, lse_part[(b * num_splits + s) * rows + row]);
    uint16_t* o = out + br * kMlaLatent;
    if (mx == neg_inf) {
      for (int k = 0; k < kMlaLatent; ++k) o[k] = 0;
      lse[(b * H + h) * s_q + i] = std::numeric_limits<float>::infinity();
      continue;
    }
    float w[256];
    float total = 0.0f;
    const int64_t ns = std::min<int64_t>(num_splits, 256);
    for (int64_t s = 0; s < ns; ++s) total += (w[s] = std::exp(lse_part[(b * num_splits + s) * rows + row] - mx));
    float acc[kMlaLatent] = {};
    for (int64_t s = 0; s < ns; ++s) {
      if (w[s] == 0.0f) continue;
      const float ws = w[s] / total;
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

}  // namespace lk::cpu
