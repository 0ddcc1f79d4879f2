// MLA on any sm_80+ GPU: fused latent-cache append, split-KV decode attention with tensor cores
// (mma.sync m16n8k16 bf16, fp32 accumulate), the split combine, and FlashMLA's metadata.
//
// Decode work split: one CTA (4 warps) per (KV split, group of 16 query rows, sequence); the
// rows of a sequence are its s_q * H (query, head) pairs, which all read the same keys, so a
// key tile in shared memory feeds 16 rows. Per 32-key tile: cp.async brings the tile (bf16:
// 32 x 1152 B; FP8: 32 x 656 B, then dequantized to bf16 in shared memory: e4m3 * power-of-two
// scale is exact in bf16) while the previous tile computes. S = Q K^T: each warp owns 8 keys
// (36 MMAs over the 576 dims). The scores go through shared memory so every warp sees the full
// 16 x 32 tile, runs the same online softmax (log2 domain) and packs P to bf16 A fragments;
// O += P V: each warp owns 128 of the 512 output columns (16 n-tiles, 64 fp32 accumulators
// per thread). Partials (o / l, lse) of several splits are merged by mla_combine_kernel.
// Shared memory: Q 18.7 KB + K 2 x 37.4 KB (bf16) or 37.4 KB + raw 2 x 21 KB (FP8) + scores
// 2.3 KB: at most 100.6 KB, under the 99 KB-per-block limit of sm_86/89 (2 CTAs per SM on
// H100). Rows are padded to 1168 B so ldmatrix row addresses fall 4 banks apart.
// Bound (b=128, s_q=1, h=16, s_k=8192): 1.21 GB of bf16 cache per call, 36.5 GFLOP: memory-
// bound on an H100 (0.40 ms at 3.0 TB/s); FP8 moves 0.69 GB.
// Last measurement: none on a GPU (compiled for sm_80/89/90a only; unverified).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "common/fp8.h"
#include "common/mla.h"
#include "cuda/launch.cuh"
#include "cuda/mla.cuh"

namespace lk::cuda {
namespace {

constexpr int kRows = 16;                // query rows per CTA: one m16 MMA tile
constexpr int kTileN = 32;               // keys per pipeline stage
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowElems = kMlaDim + 8;   // smem pitch of a 576-wide bf16 row: 1168 B
constexpr int kChunks = kMlaDim * 2 / 16;        // 72 16-byte chunks per bf16 row
constexpr int kRawChunks = kMlaFp8Bytes / 16;    // 41 per FP8 row
constexpr int kSPitch = kTileN + 4;
constexpr int kQBytes = kRows * kRowElems * 2;
constexpr int kKBytes = kTileN * kRowElems * 2;
constexpr int kRawBytes = kTileN * kMlaFp8Bytes;
constexpr int kSBytes = kRows * kSPitch * 4;
constexpr int kValidBytes = 2 * kTileN * 4;
static_assert(kMlaFp8Bytes % 16 == 0 && (kMlaDim * 2) % 16 == 0, "cp.async moves 16-byte chunks");
static_assert(kTileN == 8 * kWarps, "each warp scores 8 keys of the tile");
static_assert(kMlaLatent == 128 * kWarps, "each warp owns 128 output columns");
static_assert(kThreads == 4 * kTileN, "the tile loader gives each key 4 threads");
static_assert((kMlaDim / 16) % 2 == 0, "the score loop takes two k-steps at a time");

template <bool kFp8>
constexpr int decode_smem_bytes() {
  return kQBytes + (kFp8 ? kKBytes + 2 * kRawBytes : 2 * kKBytes) + kSBytes + kValidBytes;
}
static_assert(decode_smem_bytes<true>() <= 99 * 1024, "must fit sm_86/sm_89's 99 KB per block");

struct DecodeParams {
  const uint16_t* q;
  int64_t s_q, H, rows;
  const uint8_t* cache;
  int64_t num_blocks, block_size, block_stride;
  const int32_t* block_table;
  int64_t max_blocks, bt_stride;
  const int32_t* seqlens;
  float scale_log2;
  bool causal;
  int64_t num_splits;
  float* o_part;
  float* lse_part;
  uint16_t* out;
  float* lse;
  int32_t* error_flag;
};

__device__ __forceinline__ void report(int32_t* flag, int kind, int64_t i, int64_t j, int64_t v) {
  if (flag && atomicCAS(flag, 0, kind) == 0) {
    flag[1] = int32_t(i);
    flag[2] = int32_t(j);
    flag[3] = int32_t(v);
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy; with valid false nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// e4m3 -> fp32 without a table: the 7 magnitude bits placed at fp32's exponent/mantissa top
// give 2^(e-127) (1 + m/8), and 2^120 rebiases to 2^(e-7) (1 + m/8); subnormal codes land on
// fp32 subnormals and scale exactly (no flush-to-zero in this file). 0x7f is NaN.
__device__ __forceinline__ float e4m3_to_f32(uint32_t v) {
  const uint32_t mag = v & 0x7fu;
  float f = __uint_as_float(mag << 20) * 0x1p120f;
  f = mag == 0x7fu ? __uint_as_float(0x7fc00000u) : f;
  return (v & 0x80u) ? -f : f;
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads) mla_decode_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sK0 = reinterpret_cast<uint16_t*>(smem + kQBytes);
  uint8_t* sRaw = smem + kQBytes + kKBytes;  // FP8 only: 2 raw stages
  float* sS = reinterpret_cast<float*>(smem + kQBytes + (kFp8 ? kKBytes + 2 * kRawBytes : 2 * kKBytes));
  int32_t* sValid = reinterpret_cast<int32_t*>(sS + kRows * kSPitch);

  const int split = blockIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * kRows, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, qd = lane % 4;
  const int64_t rows = p.rows;
  int64_t L = p.seqlens[b];
  L = L < 0 ? 0 : (L > p.max_blocks * p.block_size ? p.max_blocks * p.block_size : L);
  const int64_t chunk = mla_split_chunk(L, p.num_splits);
  const int64_t t0 = min(L, split * chunk), t1 = min(L, t0 + chunk);
  auto row_limit = [&](int64_t row) -> int64_t {  // keys [0, limit) of this split the row sees
    if (row >= rows) return 0;
    const int64_t i = row / p.H;
    const int64_t lim = p.causal ? max(int64_t(0), L - p.s_q + i + 1) : L;
    return min(lim, t1);
  };
  const int64_t t_end = max(t0, row_limit(min(r0 + kRows, rows) - 1));
  const int64_t lim_lo = row_limit(r0 + g), lim_hi = row_limit(r0 + g + 8);
  const int64_t lim_min = row_limit(r0);  // limits grow with the row: the CTA's first row sees least
  const int n_tiles = int((t_end - t0 + kTileN - 1) / kTileN);
  const int64_t token_bytes = kFp8 ? kMlaFp8Bytes : 2 * kMlaDim;

  // Each key of a tile is fetched by 4 threads; out-of-range blocks and keys past the end are
  // zero-filled (never NaN from unused slots) and flagged invalid.
  auto load_tile = [&](int64_t a, int buf) {
    const int tt = tid / 4, part = tid % 4;
    const int64_t tok = a + tt;
    bool ok = tok < t_end;
    const uint8_t* src = p.cache;
    if (ok) {
      const int64_t j = tok / p.block_size;
      const int64_t blk = p.block_table[b * p.bt_stride + j];
      if (blk < 0 || blk >= p.num_blocks) {
        ok = false;
        if (part == 0) report(p.error_flag, 2, b, j, blk);
      } else {
        src = p.cache + blk * p.block_stride + (tok % p.block_size) * token_bytes;
      }
    }
    if (part == 0) sValid[buf * kTileN + tt] = ok;
    if constexpr (kFp8) {
      uint8_t* dst = sRaw + buf * kRawBytes + tt * kMlaFp8Bytes;
      for (int c = part; c < kRawChunks; c += 4) cp_async16(dst + c * 16, src + (ok ? c * 16 : 0), ok);
    } else {
      uint16_t* dst = sK0 + (buf * kTileN + tt) * kRowElems;
      for (int c = part; c < kChunks; c += 4) cp_async16(dst + c * 8, src + (ok ? c * 16 : 0), ok);
    }
  };

  if (n_tiles > 0) {
    for (int c = tid; c < kRows * kChunks; c += kThreads) {
      const int r = c / kChunks, k = c % kChunks;
      const bool ok = r0 + r < rows;
      const uint16_t* src = ok ? p.q + (b * rows + r0 + r) * kMlaDim + k * 8 : p.q;
      cp_async16(sQ + r * kRowElems + k * 8, src, ok);
    }
    load_tile(t0, 0);
  }
  cp_async_commit();

  const float neg_inf = -INFINITY;
  float m_lo = neg_inf, m_hi = neg_inf, l_lo = 0.0f, l_hi = 0.0f;
  bool bad_lo = false, bad_hi = false;  // this lane saw a non-finite visible score of the row
  float o[16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

  for (int it = 0; it < n_tiles; ++it) {
    const int buf = it & 1;
    const int64_t a = t0 + int64_t(it) * kTileN;
    if (it + 1 < n_tiles) load_tile(a + kTileN, buf ^ 1);
    cp_async_commit();  // possibly empty: keeps wait_group<1> uniform
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* sK;
    if constexpr (kFp8) {
      // Thread (key tid/4, quarter tid%4) dequantizes 128 latent values with their tile scale
      // and copies 16 of the 64 RoPE values.
      const int tt = tid / 4, part = tid % 4;
      const uint8_t* raw = sRaw + buf * kRawBytes + tt * kMlaFp8Bytes;
      const float scale = reinterpret_cast<const float*>(raw + kMlaLatent)[part];
      uint16_t* dst = sK0 + tt * kRowElems;
#pragma unroll
      for (int c = 0; c < kQuantGroup / 16; ++c) {
        const uint4 codes = reinterpret_cast<const uint4*>(raw + part * kQuantGroup)[c];
        const uint32_t w[4] = {codes.x, codes.y, codes.z, codes.w};
        uint32_t packed[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const uint32_t word = w[k / 2] >> (16 * (k % 2));
          packed[k] = pack_bf16x2(e4m3_to_f32(word & 0xffu) * scale, e4m3_to_f32((word >> 8) & 0xffu) * scale);
        }
        uint4* d = reinterpret_cast<uint4*>(dst + part * kQuantGroup + c * 16);
        d[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        d[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
      }
      const uint4* rope = reinterpret_cast<const uint4*>(raw + kMlaLatent + 16);
      uint4* rd = reinterpret_cast<uint4*>(dst + kMlaLatent);
      rd[2 * part] = rope[2 * part];
      rd[2 * part + 1] = rope[2 * part + 1];
      __syncthreads();
      sK = sK0;
    } else {
      sK = sK0 + buf * kTileN * kRowElems;
    }

    // S = Q K^T for this warp's 8 keys.
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 6
    for (int kk = 0; kk < kMlaDim / 16; kk += 2) {
      uint32_t a0[4], a1[4], kb[4];
      ldmatrix_x4(a0, sQ + (lane % 16) * kRowElems + kk * 16 + (lane / 16) * 8);
      ldmatrix_x4(a1, sQ + (lane % 16) * kRowElems + (kk + 1) * 16 + (lane / 16) * 8);
      ldmatrix_x4(kb, sK + (warp * 8 + lane % 8) * kRowElems + kk * 16 + (lane / 8) * 8);
      mma_bf16(s, a0, kb[0], kb[1]);
      mma_bf16(s, a1, kb[2], kb[3]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row_in = e < 2 ? g : g + 8;
      const int tt = warp * 8 + 2 * qd + (e & 1);
      const bool vis = a + tt < (e < 2 ? lim_lo : lim_hi) && sValid[buf * kTileN + tt];
      // A non-finite visible score is stored as NaN: it makes the row NaN (mla_decode's rule).
      const float sv = s[e] * p.scale_log2;
      sS[row_in * kSPitch + tt] = vis ? (isfinite(sv) ? sv : __int_as_float(0x7fc00000)) : neg_inf;
    }
    __syncthreads();
    // NOTES: a loaded key that some row of this CTA does not see (the causal tail) meets that row
    // as p = 0 in the P.V MMA, and 0 x NaN = NaN: non-finite values of such tiles are zeroed in
    // shared memory (rows that do see the key are NaN by the rule anyway). Only tail tiles pay.
    if (a + kTileN > lim_min && lim_min < t_end) {
      uint32_t* kw = reinterpret_cast<uint32_t*>(const_cast<uint16_t*>(sK));
      for (int c = tid; c < kTileN * (kMlaLatent / 2); c += kThreads) {
        uint32_t* w = kw + (c / (kMlaLatent / 2)) * (kRowElems / 2) + c % (kMlaLatent / 2);
        uint32_t v = *w;
        if ((v & 0x7f80u) == 0x7f80u) v &= 0xffff0000u;
        if ((v & 0x7f800000u) == 0x7f800000u) v &= 0x0000ffffu;
        *w = v;
      }
      __syncthreads();
    }

    // Online softmax of the full 16 x 32 tile; every warp computes the same statistics.
    float v_lo[8], v_hi[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) {
      const int col = (x / 4) * 16 + ((x / 2) % 2) * 8 + 2 * qd + (x % 2);
      v_lo[x] = sS[g * kSPitch + col];
      v_hi[x] = sS[(g + 8) * kSPitch + col];
    }
    float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
    for (int x = 0; x < 8; ++x) {
      bad_lo |= isnan(v_lo[x]), bad_hi |= isnan(v_hi[x]);  // every warp reads the whole tile row
      mx_lo = fmaxf(mx_lo, v_lo[x]), mx_hi = fmaxf(mx_hi, v_hi[x]);
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float alpha_lo = mx_lo == neg_inf ? 1.0f : exp2f(m_lo - mx_lo);
    const float alpha_hi = mx_hi == neg_inf ? 1.0f : exp2f(m_hi - mx_hi);
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int x = 0; x < 8; ++x) {
      v_lo[x] = mx_lo == neg_inf ? 0.0f : exp2f(v_lo[x] - mx_lo);
      v_hi[x] = mx_hi == neg_inf ? 0.0f : exp2f(v_hi[x] - mx_hi);
      sum_lo += v_lo[x];
      sum_hi += v_hi[x];
    }
    l_lo = l_lo * alpha_lo + sum_lo;
    l_hi = l_hi * alpha_hi + sum_hi;
    m_lo = mx_lo;
    m_hi = mx_hi;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      o[j][0] *= alpha_lo, o[j][1] *= alpha_lo;
      o[j][2] *= alpha_hi, o[j][3] *= alpha_hi;
    }
    uint32_t pa[2][4];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      pa[ks][0] = pack_bf16x2(v_lo[ks * 4 + 0], v_lo[ks * 4 + 1]);
      pa[ks][1] = pack_bf16x2(v_hi[ks * 4 + 0], v_hi[ks * 4 + 1]);
      pa[ks][2] = pack_bf16x2(v_lo[ks * 4 + 2], v_lo[ks * 4 + 3]);
      pa[ks][3] = pack_bf16x2(v_hi[ks * 4 + 2], v_hi[ks * 4 + 3]);
    }

    // O += P V over this warp's 128 output columns.
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
      for (int j = 0; j < 16; j += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sK + (ks * 16 + lane % 16) * kRowElems + warp * 128 + j * 8 + (lane / 16) * 8);
        mma_bf16(o[j], pa[ks], vb[0], vb[1]);
        mma_bf16(o[j + 1], pa[ks], vb[2], vb[3]);
      }
    }
    __syncthreads();  // the buffers are refilled by the next iterations
  }
  cp_async_wait<0>();

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    bad_lo |= __shfl_xor_sync(0xffffffffu, int(bad_lo), off) != 0;
    bad_hi |= __shfl_xor_sync(0xffffffffu, int(bad_hi), off) != 0;
  }
  const float nan = __int_as_float(0x7fc00000);
  const float ln2 = 0.6931471805599453f;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = r0 + g + 8 * half;
    if (row >= rows) continue;
    const float l = half ? l_hi : l_lo, m = half ? m_hi : m_lo;
    const bool bad = half ? bad_hi : bad_lo;
    const bool empty = !bad && !(l > 0.0f);
    const float inv = bad ? nan : empty ? 0.0f : 1.0f / l;
    const int64_t i = row / p.H, h = row % p.H;
    if (p.num_splits == 1) {
      uint16_t* orow = p.out + (b * rows + row) * kMlaLatent + warp * 128 + 2 * qd;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<uint32_t*>(orow + j * 8) = pack_bf16x2(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
      if (warp == 0 && qd == 0) p.lse[(b * p.H + h) * p.s_q + i] = bad ? nan : empty ? INFINITY : (m + log2f(l)) * ln2;
    } else {
      const int64_t pr = (b * p.num_splits + split) * rows + row;
      float* orow = p.o_part + pr * kMlaLatent + warp * 128 + 2 * qd;
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<float2*>(orow + j * 8) = make_float2(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
      if (warp == 0 && qd == 0) p.lse_part[pr] = bad ? nan : empty ? neg_inf : (m + log2f(l)) * ln2;
    }
  }
}

// One CTA per (sequence, row): out = sum_s exp(lse_s - lse) o_s with lse = log sum_s exp(lse_s);
// every split empty: out 0, lse +inf; a split with a non-finite score (lse NaN): out and lse NaN.
// 128 threads x 4 columns.
__global__ void __launch_bounds__(128) mla_combine_kernel(const float* __restrict__ o_part,
                                                          const float* __restrict__ lse_part, int64_t S,
                                                          int64_t rows, int64_t H, int64_t s_q,
                                                          uint16_t* __restrict__ out, float* __restrict__ lse) {
  const int64_t br = blockIdx.x, b = br / rows, row = br % rows;
  const float* lp = lse_part + b * S * rows + row;
  float mx = -INFINITY;
  bool nan_split = false;
  for (int64_t s = 0; s < S; ++s) mx = fmaxf(mx, lp[s * rows]), nan_split |= isnan(lp[s * rows]);
  const int k = threadIdx.x * 4;
  uint16_t* orow = out + br * kMlaLatent + k;
  const int64_t i = row / H, h = row % H;
  if (nan_split) {
    const uint32_t nan2 = pack_bf16x2(__int_as_float(0x7fc00000), __int_as_float(0x7fc00000));
    *reinterpret_cast<uint2*>(orow) = make_uint2(nan2, nan2);
    if (threadIdx.x == 0) lse[(b * H + h) * s_q + i] = __int_as_float(0x7fc00000);
    return;
  }
  if (mx == -INFINITY) {
    *reinterpret_cast<uint2*>(orow) = make_uint2(0u, 0u);
    if (threadIdx.x == 0) lse[(b * H + h) * s_q + i] = INFINITY;
    return;
  }
  float total = 0.0f, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t s = 0; s < S; ++s) {
    const float w = expf(lp[s * rows] - mx);
    total += w;
    if (w == 0.0f) continue;
    const float4 v = *reinterpret_cast<const float4*>(o_part + ((b * S + s) * rows + row) * kMlaLatent + k);
    acc[0] += w * v.x, acc[1] += w * v.y, acc[2] += w * v.z, acc[3] += w * v.w;
  }
  const float inv = 1.0f / total;
  *reinterpret_cast<uint2*>(orow) = make_uint2(pack_bf16x2(acc[0] * inv, acc[1] * inv), pack_bf16x2(acc[2] * inv, acc[3] * inv));
  if (threadIdx.x == 0) lse[(b * H + h) * s_q + i] = mx + logf(total);
}

struct AppendParams {
  const void* kv_c;
  DType kv_dtype;
  int64_t kv_stride;
  const void* k_pe;
  DType pe_dtype;
  int64_t pe_stride;
  const int64_t* slot_mapping;
  int64_t T;
  const float* norm_weight;
  float eps;
  const float* cos;
  const float* sin;
  const int64_t* positions;
  int64_t num_positions;
  uint8_t* cache;
  bool fp8;
  int64_t num_blocks, block_size, block_stride;
  int32_t* error_flag;
};

__device__ __forceinline__ float widen(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

// One warp per token: lane l owns latent values [16 l, 16 l + 16) (so lanes 8 g .. 8 g + 7 hold
// FP8 tile g) and RoPE pair l. Products are rounded separately (__fmul_rn), as the reference.
__global__ void __launch_bounds__(256) mla_append_kernel(const AppendParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (t >= p.T) return;  // warp-uniform
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0) return;
  const int64_t pos = p.positions ? p.positions[t] : t;
  if (slot >= p.num_blocks * p.block_size) {
    if (lane == 0) report(p.error_flag, 1, t, 0, slot);
    return;
  }
  if (p.cos && (pos < 0 || pos >= p.num_positions)) {
    if (lane == 0) report(p.error_flag, 3, t, 0, pos);
    return;
  }
  float x[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) x[k] = widen(p.kv_c, p.kv_dtype, t * p.kv_stride + lane * 16 + k);
  if (p.norm_weight) {
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < 16; ++k) ss += double(x[k]) * double(x[k]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float inv = float(1.0 / sqrt(ss / kMlaLatent + double(p.eps)));
#pragma unroll
    for (int k = 0; k < 16; ++k) x[k] = __fmul_rn(__fmul_rn(x[k], inv), p.norm_weight[lane * 16 + k]);
  }
  float y0 = widen(p.k_pe, p.pe_dtype, t * p.pe_stride + 2 * lane);
  float y1 = widen(p.k_pe, p.pe_dtype, t * p.pe_stride + 2 * lane + 1);
  if (p.cos) {
    const float c = p.cos[pos * (kMlaRope / 2) + lane], s = p.sin[pos * (kMlaRope / 2) + lane];
    const float r0 = __fsub_rn(__fmul_rn(y0, c), __fmul_rn(y1, s));
    const float r1 = __fadd_rn(__fmul_rn(y0, s), __fmul_rn(y1, c));
    y0 = r0, y1 = r1;
  }
  // Rounded to bf16 once; the FP8 path quantizes these bf16 values (as FlashMLA quantizes a
  // bf16 cache). Words are packed by hand so nothing is spilled to local memory.
  float xb[16];
  uint32_t words[8];
#pragma unroll
  for (int k = 0; k < 16; k += 2) {
    const uint16_t lo = f32_to_bf16(x[k]), hi = f32_to_bf16(x[k + 1]);
    words[k / 2] = uint32_t(lo) | (uint32_t(hi) << 16);
    xb[k] = bf16_to_f32(lo);
    xb[k + 1] = bf16_to_f32(hi);
  }
  const uint32_t rope = uint32_t(f32_to_bf16(y0)) | (uint32_t(f32_to_bf16(y1)) << 16);
  uint8_t* dst = p.cache + (slot / p.block_size) * p.block_stride +
                 (slot % p.block_size) * (p.fp8 ? kMlaFp8Bytes : 2 * kMlaDim);
  if (!p.fp8) {
    uint4* d = reinterpret_cast<uint4*>(dst + lane * 32);
    d[0] = make_uint4(words[0], words[1], words[2], words[3]);
    d[1] = make_uint4(words[4], words[5], words[6], words[7]);
    *reinterpret_cast<uint32_t*>(dst + 2 * kMlaLatent + lane * 4) = rope;
    return;
  }
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < 16; ++k) m = max(m, abs_bits(xb[k]));
#pragma unroll
  for (int off = 1; off < 8; off <<= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  const float scale = mla_fp8_scale(__uint_as_float(m));
  uint32_t codes[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int k = 0; k < 16; ++k) codes[k / 4] |= uint32_t(fp8_quantize_value(xb[k], scale)) << (8 * (k % 4));
  *reinterpret_cast<uint4*>(dst + lane * 16) = make_uint4(codes[0], codes[1], codes[2], codes[3]);
  if (lane % 8 == 0) reinterpret_cast<float*>(dst + kMlaLatent)[lane / 8] = scale;
  *reinterpret_cast<uint32_t*>(dst + kMlaLatent + 16 + lane * 4) = rope;
}

__global__ void mla_schedule_kernel(const int32_t* seqlens, int64_t B, int64_t num_parts, int32_t* metadata,
                                    int32_t* num_splits) {
  mla_schedule_serial(seqlens, B, num_parts, metadata, num_splits);
}

void check_cache(const MlaCache& c) {
  LK_CHECK(reinterpret_cast<uintptr_t>(c.data) % 16 == 0 && c.block_stride % 16 == 0,
           "the CUDA MLA kernels need a 16-byte aligned cache and block stride");
}

}  // namespace

void mla_append(const void* kv_c, DType kv_dtype, int64_t kv_stride, const void* k_pe, DType pe_dtype,
                int64_t pe_stride, const int64_t* slot_mapping, int64_t T, const float* norm_weight,
                float eps, const float* cos, const float* sin, const int64_t* positions,
                int64_t num_positions, MlaCache cache, int32_t* error_flag, int device, void* stream) {
  if (T == 0) return;
  check_cache(cache);
  DeviceGuard guard(device);
  AppendParams p{kv_c, kv_dtype, kv_stride, k_pe, pe_dtype, pe_stride, slot_mapping, T, norm_weight, eps,
                 cos, sin, positions, num_positions, static_cast<uint8_t*>(cache.data), cache.fp8,
                 cache.num_blocks, cache.block_size, cache.block_stride, error_flag};
  mla_append_kernel<<<unsigned(ceil_div(T, 8)), 256, 0, as_stream(stream)>>>(p);
  LK_CUDA_LAUNCH_CHECK("mla_append");
}

void mla_decode(const uint16_t* q, int64_t B, int64_t s_q, int64_t H, MlaCache cache,
                const int32_t* block_table, int64_t max_blocks, int64_t bt_stride,
                const int32_t* seqlens, float softmax_scale, bool causal, int64_t num_splits,
                float* o_part, float* lse_part, uint16_t* out, float* lse, int32_t* error_flag,
                int device, void* stream) {
  const int64_t rows = s_q * H;
  if (B == 0 || rows == 0) return;
  check_cache(cache);
  LK_CHECK(reinterpret_cast<uintptr_t>(q) % 16 == 0, "the CUDA mla_decode needs a 16-byte aligned q (cp.async)");
  LK_CHECK(num_splits >= 1 && num_splits <= 65535, "num_splits must be in [1, 65535]");
  LK_CHECK(B <= 65535, "mla_decode supports at most 65535 sequences per call");
  const int64_t groups = ceil_div(rows, kRows);
  LK_CHECK(groups <= 65535, "too many query rows (s_q * H) per sequence");
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  DecodeParams p{q, s_q, H, rows, static_cast<const uint8_t*>(cache.data), cache.num_blocks, cache.block_size,
                 cache.block_stride, block_table, max_blocks, bt_stride, seqlens,
                 softmax_scale * 1.4426950408889634f, causal, num_splits, o_part, lse_part, out, lse, error_flag};
  const dim3 grid{unsigned(num_splits), unsigned(groups), unsigned(B)};
  // NOTES: the >48 KB shared-memory opt-in is set once per device (first, eager call), so a
  // later CUDA-graph capture only records launches.
  static std::atomic<uint32_t> opted_in[64];
  if (device < 0 || device >= 64 || !opted_in[device].load(std::memory_order_acquire)) {
    check(cudaFuncSetAttribute(mla_decode_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               decode_smem_bytes<true>()), "mla_decode smem");
    check(cudaFuncSetAttribute(mla_decode_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               decode_smem_bytes<false>()), "mla_decode smem");
    if (device >= 0 && device < 64) opted_in[device].store(1u, std::memory_order_release);
  }
  if (cache.fp8)
    mla_decode_kernel<true><<<grid, kThreads, decode_smem_bytes<true>(), s>>>(p);
  else
    mla_decode_kernel<false><<<grid, kThreads, decode_smem_bytes<false>(), s>>>(p);
  LK_CUDA_LAUNCH_CHECK("mla_decode");
  if (num_splits > 1) {
    mla_combine_kernel<<<unsigned(B * rows), 128, 0, s>>>(o_part, lse_part, num_splits, rows, H, s_q, out, lse);
    LK_CUDA_LAUNCH_CHECK("mla_decode combine");
  }
}

void mla_schedule(const int32_t* seqlens, int64_t B, int64_t num_parts, int32_t* metadata,
                  int32_t* num_splits, int device, void* stream) {
  DeviceGuard guard(device);
  mla_schedule_kernel<<<1, 1, 0, as_stream(stream)>>>(seqlens, B, num_parts, metadata, num_splits);
  LK_CUDA_LAUNCH_CHECK("mla_schedule");
}

}  // namespace lk::cuda
