// Expert gating and token routing on any sm_80+ GPU.
//
// route: one warp per token; the token's selection keys live in shared memory as order-
// preserving uint32 (common/gate.h), so every ranking step is an integer max over
// (key << 32 | ~index), which breaks ties to the lower index for free. Group scores (top-2 sum
// or max) are a shuffle-merge of per-lane top-2 pairs (a warp per group when groups have >= 32
// experts, a lane per group otherwise); topk_group and top_k rounds are warp argmaxes in which
// each lane keeps its own best and rescans only when its best was taken. Scores are float64
// math rounded once (the same bits as the CPU and the reference). Traffic: read T*E logits once
// (4096 x 256 bf16 = 2 MB), write T*top_k*8 bytes: the bound is latency, not bandwidth
// (target <= 20 us at T=4096 on an H100).
// plan: histogram + scan + stable scatter, no atomics and no host sync. The flat (token, k)
// list is cut into <= 1024 chunks of >= 256 pairs, one warp each. (1) each warp counts its
// chunk's experts with __match_any_sync; (2) one block scans the [chunk, expert] counts down
// each expert (stable chunk starts) and across experts (padded segment ends = offs); (3) each
// warp walks its chunk again in order, ranking equal experts inside a 32-pair tile by popcount
// of the match mask, so rows keep token order and the result is bitwise deterministic.
// permute / unpermute: 16-byte vector loads and stores when rows are 16-byte aligned (else a
// scalar path); permute_fp8 gives each 128-wide group 16 lanes (8 elements each) and a
// 16-lane shuffle max, as quant.cu does. Both are pure bandwidth: T=16384, top-8, H=7168 bf16
// moves 2 x 1.88 GB per permute (read + write) and 1.88 + 0.23 GB per unpermute (~1.3 ms at
// 3 TB/s); target >= 70% of the device copy bandwidth.
// Last measurement: none yet on a GPU (compiled only).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/fp8.h"
#include "common/gate.h"
#include "cuda/launch.cuh"
#include "cuda/routing.cuh"

namespace lk::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

struct bf16_t { uint16_t v; };
struct f16_t { uint16_t v; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return bf16_to_f32(v.v); }
__device__ __forceinline__ float to_f32(f16_t v) { return f16_to_f32(v.v); }

__device__ __forceinline__ void from_f32(float v, float* p) { *p = v; }
__device__ __forceinline__ void from_f32(float v, bf16_t* p) { p->v = f32_to_bf16(v); }
__device__ __forceinline__ void from_f32(float v, f16_t* p) {
  p->v = __half_as_ushort(__float2half_rn(v));
}

__device__ __forceinline__ uint64_t pack(uint32_t key, int index) {
  return (uint64_t(key) << 32) | uint32_t(~uint32_t(index));
}
__device__ __forceinline__ int unpack_index(uint64_t p) { return int(~uint32_t(p)); }

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint64_t o = __shfl_xor_sync(kFull, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Merges top-2 pairs (a1 >= a2) across the warp; keys compare like the values they encode.
__device__ __forceinline__ void warp_top2(uint32_t& a1, uint32_t& a2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint32_t b1 = __shfl_xor_sync(kFull, a1, off);
    const uint32_t b2 = __shfl_xor_sync(kFull, a2, off);
    const uint32_t lo = min(a1, b1);
    a1 = max(a1, b1);
    a2 = max(lo, max(a2, b2));
  }
}

__device__ __forceinline__ void top2_push(uint32_t& a1, uint32_t& a2, uint32_t v) {
  if (v > a1) {
    a2 = a1;
    a1 = v;
  } else if (v > a2) {
    a2 = v;
  }
}

// NOTES: noinline so the weight pass recomputes exactly the score the selection pass used
// (one compiled body: no call-site-dependent FMA contraction).
__device__ __noinline__ float gate_score(float x, bool sigmoid, double max, double inv_sum) {
  if (sigmoid) return sigmoid_score(x);
  if (!(x == x)) return x;
  return float(softmax_term(x, max) * inv_sum);
}

// Each lane's best remaining candidate among its experts (lane, lane + 32, ...).
__device__ __forceinline__ uint64_t lane_best(const uint32_t* key, int n, int lane) {
  uint64_t b = 0;
  for (int e = lane; e < n; e += 32) {
    const uint64_t p = pack(key[e], e);
    b = p > b ? p : b;
  }
  return b;
}

template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, int64_t num_tokens, int E,
                             int64_t row_stride, const float* __restrict__ bias, bool sigmoid,
                             int top_k, int n_group, int topk_group, bool renormalize, float scale,
                             float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ uint32_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x / 32) + warp;
  if (t >= num_tokens) return;  // whole warps leave together; no block-level sync below
  uint32_t* key = smem + int64_t(warp) * (E + n_group);
  uint32_t* gkey = key + E;
  const T* x = logits + t * row_stride;

  double mx = 0.0, inv_sum = 0.0;
  bool all_nan = false;
  if (!sigmoid) {
    float m = kNegInf;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, to_f32(x[e]));  // fmaxf skips NaN
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, off));
    all_nan = !isfinite(m);
    mx = m;
    double sum = 0.0;
    if (!all_nan) {
      for (int e = lane; e < E; e += 32) {
        const float v = to_f32(x[e]);
        if (v == v) sum += softmax_term(v, mx);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
    }
    inv_sum = 1.0 / sum;
  }
  const float nan = __int_as_float(0x7fc00000);
  for (int e = lane; e < E; e += 32) {
    const float s = all_nan ? nan : gate_score(to_f32(x[e]), sigmoid, mx, inv_sum);
    key[e] = order_key(bias ? s + bias[e] : s);
  }
  __syncwarp();

  if (n_group > 1) {
    const int G = E / n_group;
    if (G >= 32) {
      for (int g = 0; g < n_group; ++g) {
        uint32_t a1 = 0, a2 = 0;
        for (int i = lane; i < G; i += 32) top2_push(a1, a2, key[g * G + i]);
        warp_top2(a1, a2);
        if (lane == 0) gkey[g] = order_key(bias ? key_value(a1) + key_value(a2) : key_value(a1));
      }
    } else {
      for (int g = lane; g < n_group; g += 32) {
        uint32_t a1 = 0, a2 = 0;
        for (int i = 0; i < G; ++i) top2_push(a1, a2, key[g * G + i]);
        gkey[g] = order_key(bias ? key_value(a1) + key_value(a2) : key_value(a1));
      }
    }
    __syncwarp();
    // Kept groups are marked 0 (every real group key is >= order_key(-inf) > 0).
    uint64_t best = lane_best(gkey, n_group, lane);
    for (int r = 0; r < topk_group; ++r) {
      const int g = unpack_index(warp_max(best));
      if (g % 32 == lane) {
        gkey[g] = 0;
        best = lane_best(gkey, n_group, lane);
      }
      __syncwarp();
    }
    for (int e = lane; e < E; e += 32)
      if (gkey[e / G] != 0) key[e] = 0;
    __syncwarp();
  }

  int my_id = 0;
  uint64_t best = lane_best(key, E, lane);
  for (int k = 0; k < top_k; ++k) {
    const int e = unpack_index(warp_max(best));
    if (lane == k) my_id = e;
    if (e % 32 == lane) {
      key[e] = 0;
      best = lane_best(key, E, lane);
    }
    __syncwarp();
  }
  const float w = lane < top_k ? (all_nan ? nan : gate_score(to_f32(x[my_id]), sigmoid, mx, inv_sum)) : 0.0f;
  float denom = __shfl_sync(kFull, w, 0);
  for (int k = 1; k < top_k; ++k) denom = denom + __shfl_sync(kFull, w, k);
  if (lane < top_k) {
    weights[t * top_k + lane] = (renormalize ? w / denom : w) * scale;
    ids[t * top_k + lane] = my_id;
  }
}

// ---------------------------------------------------------------- plan
constexpr int64_t kMaxChunks = 1024;
constexpr int64_t kMinChunk = 256;

int64_t chunk_size(int64_t n) {
  const int64_t c = std::max(kMinChunk, ceil_div(n, kMaxChunks));
  return ceil_div(c, 32) * 32;
}

__global__ void plan_count_kernel(const int32_t* __restrict__ ids, int64_t n, int64_t chunk, int E,
                                  int32_t* __restrict__ hist) {
  extern __shared__ int32_t cnt[];
  const int lane = threadIdx.x;
  for (int e = lane; e < E; e += 32) cnt[e] = 0;
  __syncwarp();
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = min(n, begin + chunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    int e = i < end ? ids[i] : -1;
    e = (e >= 0 && e < E) ? e : -1;
    const unsigned same = __match_any_sync(kFull, e);
    if (e >= 0 && lane == 31 - __clz(same)) cnt[e] += __popc(same);
    __syncwarp();
  }
  int32_t* row = hist + int64_t(blockIdx.x) * E;
  for (int e = lane; e < E; e += 32) row[e] = cnt[e];
}

// One block: column scans of hist (each chunk's first row inside each expert), counts, offs.
// Thread i owns experts [i * per, (i + 1) * per), so the expert-wise scan is a block scan of
// the per-thread sums.
__global__ void __launch_bounds__(1024) plan_scan_kernel(int32_t* __restrict__ hist, int64_t chunks,
                                                          int E, int align, int32_t* __restrict__ counts,
                                                          int32_t* __restrict__ offs) {
  __shared__ int64_t warp_sums[32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int per = (E + blockDim.x - 1) / blockDim.x;
  const int e0 = min(E, tid * per), e1 = min(E, e0 + per);
  int64_t local = 0;
  for (int e = e0; e < e1; ++e) {
    int64_t run = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t h = hist[c * E + e];
      hist[c * E + e] = int32_t(run);
      run += h;
    }
    counts[e] = int32_t(run);
    local += (run + align - 1) / align * align;
  }
  // exclusive block scan of `local`
  int64_t incl = local;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int64_t o = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    int64_t v = lane < nw ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t o = __shfl_up_sync(kFull, v, off);
      if (lane >= off) v += o;
    }
    if (lane < nw) warp_sums[lane] = v;  // inclusive totals of warps 0..lane
  }
  __syncthreads();
  int64_t start = incl - local + (warp > 0 ? warp_sums[warp - 1] : 0);
  for (int e = e0; e < e1; ++e) {
    const int64_t n = counts[e];
    for (int64_t c = 0; c < chunks; ++c) hist[c * E + e] += int32_t(start);
    start += (n + align - 1) / align * align;
    offs[e] = int32_t(start);
  }
}

__global__ void plan_scatter_kernel(const int32_t* __restrict__ ids, int64_t n, int64_t chunk, int E,
                                    int top_k, const int32_t* __restrict__ hist,
                                    int32_t* __restrict__ row_token, int32_t* __restrict__ token_row) {
  extern __shared__ int32_t next[];
  const int lane = threadIdx.x;
  const int32_t* row = hist + int64_t(blockIdx.x) * E;
  for (int e = lane; e < E; e += 32) next[e] = row[e];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = min(n, begin + chunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    int e = i < end ? ids[i] : -1;
    e = (e >= 0 && e < E) ? e : -1;
    const unsigned same = __match_any_sync(kFull, e);
    if (e >= 0) {
      const int32_t r = next[e] + __popc(same & lower);
      token_row[i] = r;
      row_token[r] = int32_t(i / top_k);
    } else if (i < end) {
      token_row[i] = -1;
    }
    __syncwarp();
    if (e >= 0 && lane == 31 - __clz(same)) next[e] += __popc(same);
    __syncwarp();
  }
}

// ---------------------------------------------------------------- permute / unpermute
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <bool kVec>
__global__ void __launch_bounds__(256) permute_kernel(const char* __restrict__ x, int64_t elem_size,
                                                      int64_t T, int64_t row_bytes, int64_t stride_bytes,
                                                      const int32_t* __restrict__ row_token, int64_t R,
                                                      char* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int32_t t = row_token[r];
    const bool valid = t >= 0 && t < T;
    const char* src = x + int64_t(valid ? t : 0) * stride_bytes;
    char* dst = out + r * row_bytes;
    if constexpr (kVec) {
      const int64_t n = row_bytes / 16;
      const uint4* s = reinterpret_cast<const uint4*>(src);
      uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        d[i] = valid ? __ldg(s + i) : make_uint4(0, 0, 0, 0);
    } else {
      if (elem_size == 4) {
        for (int64_t i = threadIdx.x; i < row_bytes / 4; i += blockDim.x)
          reinterpret_cast<uint32_t*>(dst)[i] = valid ? reinterpret_cast<const uint32_t*>(src)[i] : 0u;
      } else {
        for (int64_t i = threadIdx.x; i < row_bytes / 2; i += blockDim.x)
          reinterpret_cast<uint16_t*>(dst)[i] = valid ? reinterpret_cast<const uint16_t*>(src)[i] : uint16_t(0);
      }
    }
  }
}

// 16 lanes per 128-wide group, 8 consecutive elements per lane (as quant.cu's 1x128 kernel).
template <typename T, bool kVec>
__global__ void __launch_bounds__(256) permute_fp8_kernel(const T* __restrict__ x, int64_t num_tokens,
                                                          int64_t H, int64_t row_stride,
                                                          const int32_t* __restrict__ row_token, int64_t R,
                                                          uint8_t* __restrict__ q, float* __restrict__ scale,
                                                          bool ue8m0) {
  const int64_t groups = (H + kQuantGroup - 1) / kQuantGroup;
  const int64_t total = R * groups;
  const int sub = threadIdx.x % 16;
  const int64_t per_grid = int64_t(gridDim.x) * (blockDim.x / 16);
  for (int64_t gi = int64_t(blockIdx.x) * (blockDim.x / 16) + threadIdx.x / 16; gi < total; gi += per_grid) {
    const int64_t r = gi / groups, g = gi % groups;
    const int32_t t = row_token[r];
    const bool valid = t >= 0 && t < num_tokens;
    const int64_t k = g * kQuantGroup + sub * 8;
    const T* row = x + int64_t(valid ? t : 0) * row_stride;
    const bool full = (g + 1) * kQuantGroup <= H;
    float v[8];
    if (!valid) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    } else if (kVec && full) {
      constexpr int kWords = sizeof(T) * 8 / 16;
      T tmp[8];
#pragma unroll
      for (int w = 0; w < kWords; ++w)
        reinterpret_cast<uint4*>(tmp)[w] = __ldg(reinterpret_cast<const uint4*>(row + k) + w);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_f32(tmp[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = k + i < H ? to_f32(row[k + i]) : 0.0f;
    }
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = max(m, abs_bits(v[i]));
    // NOTES: the two groups of a warp may leave the loop at different trips, so the mask names
    // only this group's 16 lanes.
    const unsigned mask = 0xffffu << (threadIdx.x & 16);
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(mask, m, off));
    const float s = fp8_scale_from_amax(__uint_as_float(m), ue8m0);
    uint8_t out[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = fp8_quantize_value(v[i], s);
    uint8_t* qrow = q + r * H;
    if (full && H % 8 == 0) {
      *reinterpret_cast<uint2*>(qrow + k) = *reinterpret_cast<uint2*>(out);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (k + i < H) qrow[k + i] = out[i];
    }
    if (sub == 0) scale[gi] = s;
  }
}

// One block per token (grid-stride); each thread owns 8 consecutive columns per step.
template <typename T, bool kVec>
__global__ void __launch_bounds__(256) unpermute_kernel(const T* __restrict__ y, int64_t R, int64_t H,
                                                        const int32_t* __restrict__ token_row,
                                                        const float* __restrict__ weights, int64_t num_tokens,
                                                        int top_k, T* __restrict__ out) {
  constexpr int kWords = sizeof(T) * 8 / 16;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int64_t h = int64_t(threadIdx.x) * 8; h < H; h += int64_t(blockDim.x) * 8) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < top_k; ++k) {
        const int32_t r = token_row[t * top_k + k];
        if (r < 0 || r >= R) continue;
        const float w = weights[t * top_k + k];
        const T* src = y + int64_t(r) * H + h;
        if (kVec) {
          T tmp[8];
#pragma unroll
          for (int i = 0; i < kWords; ++i)
            reinterpret_cast<uint4*>(tmp)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] += w * to_f32(tmp[i]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (h + i < H) acc[i] += w * to_f32(src[i]);
        }
      }
      T* dst = out + t * H + h;
      if (kVec) {
        T tmp[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) from_f32(acc[i], &tmp[i]);
#pragma unroll
        for (int i = 0; i < kWords; ++i) reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<uint4*>(tmp)[i];
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (h + i < H) from_f32(acc[i], dst + i);
      }
    }
  }
}

template <typename C>
__global__ void __launch_bounds__(256) update_bias_kernel(const float* __restrict__ bias,
                                                          const C* __restrict__ counts, int64_t E,
                                                          float rate, float* __restrict__ out) {
  // Exact in 128-bit integers, as the CPU kernel: sign(sum - E * count_e) cannot overflow.
  __shared__ __int128 partial[256];
  __int128 s = 0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) s += counts[e];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  const __int128 sum = partial[0];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const __int128 d = sum - (__int128)E * (long long)counts[e];
    const float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
    out[e] = bias[e] + rate * sign;
  }
}

int grid_for(int device, int64_t work, int per_sm) {
  return int(std::max<int64_t>(1, std::min<int64_t>(work, int64_t(num_sms(device)) * per_sm)));
}

}  // namespace

void route(const void* logits, DType dtype, int64_t T, int64_t E, int64_t row_stride,
           const float* bias, bool sigmoid, int64_t top_k, int64_t n_group, int64_t topk_group,
           bool renormalize, float scale, float* weights, int32_t* ids, int device, void* stream) {
  LK_CHECK(E > 0 && E <= kRouteMaxExperts, "route: the CUDA kernel takes 1..12288 experts");
  LK_CHECK(top_k >= 1 && top_k <= 32 && top_k <= E, "route: top_k must be in [1, min(E, 32)]");
  LK_CHECK(n_group >= 1 && E % n_group == 0, "route: n_group must divide num_experts");
  LK_CHECK(topk_group >= 1 && topk_group <= n_group, "route: topk_group must be in [1, n_group]");
  LK_CHECK(n_group == 1 || top_k <= topk_group * (E / n_group), "route: top_k exceeds the kept groups");
  LK_CHECK(n_group == 1 || bias == nullptr || E / n_group >= 2, "route: top-2 group scores need >= 2 experts per group");
  if (T == 0) return;
  DeviceGuard guard(device);
  const int64_t per_warp = (E + n_group) * int64_t(sizeof(uint32_t));
  // NOTES: 4 warps per block when their keys fit the default 48 KB; larger expert counts run
  // one warp per block and opt in to more shared memory.
  const int warps = int(std::max<int64_t>(1, std::min<int64_t>(4, (48 << 10) / per_warp)));
  const size_t smem = size_t(per_warp) * warps;
  const unsigned grid = unsigned(ceil_div(T, warps));
  auto launch = [&](auto kernel, const auto* x) {
    if (smem > (48u << 10))
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
            "route shared memory");
    kernel<<<grid, warps * 32, smem, as_stream(stream)>>>(x, T, int(E), row_stride, bias, sigmoid,
                                                           int(top_k), int(n_group), int(topk_group),
                                                           renormalize, scale, weights, ids);
  };
  switch (dtype) {
    case DType::f32: launch(route_kernel<float>, static_cast<const float*>(logits)); break;
    case DType::bf16: launch(route_kernel<bf16_t>, static_cast<const bf16_t*>(logits)); break;
    case DType::f16: launch(route_kernel<f16_t>, static_cast<const f16_t*>(logits)); break;
    default: throw ArgError("leankernels: route logits must be float32, bfloat16 or float16");
  }
  LK_CUDA_LAUNCH_CHECK("route");
}

int64_t plan_workspace_size(int64_t T, int64_t top_k, int64_t E) {
  const int64_t n = T * top_k;
  return ceil_div(n, chunk_size(n)) * E;
}

void plan(const int32_t* ids, int64_t T, int64_t top_k, int64_t E, int64_t align, int64_t R,
          int32_t* counts, int32_t* offs, int32_t* row_token, int32_t* token_row,
          int32_t* workspace, int64_t workspace_size, int device, void* stream) {
  LK_CHECK(E > 0 && E <= kRouteMaxExperts, "plan: the CUDA kernels take 1..12288 experts");
  LK_CHECK(align >= 1 && T >= 0 && top_k >= 0, "plan: bad sizes");
  const int64_t n = T * top_k;
  LK_CHECK(R >= n + std::min(E, n) * (align - 1), "plan: row_token too small for the bound");
  LK_CHECK(workspace_size >= plan_workspace_size(T, top_k, E), "plan: workspace too small");
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  const int64_t chunk = chunk_size(n);
  const int64_t chunks = ceil_div(n, chunk);
  const size_t smem = size_t(E) * sizeof(int32_t);
  if (R > 0) check(cudaMemsetAsync(row_token, 0xff, size_t(R) * sizeof(int32_t), s), "plan memset");
  if (chunks > 0) {
    plan_count_kernel<<<unsigned(chunks), 32, smem, s>>>(ids, n, chunk, int(E), workspace);
    LK_CUDA_LAUNCH_CHECK("plan count");
  }
  plan_scan_kernel<<<1, 1024, 0, s>>>(workspace, chunks, int(E), int(align), counts, offs);
  LK_CUDA_LAUNCH_CHECK("plan scan");
  if (chunks > 0) {
    plan_scatter_kernel<<<unsigned(chunks), 32, smem, s>>>(ids, n, chunk, int(E), int(top_k), workspace,
                                                            row_token, token_row);
    LK_CUDA_LAUNCH_CHECK("plan scatter");
  }
}

void permute(const void* x, int64_t elem_size, int64_t T, int64_t H, int64_t row_stride,
             const int32_t* row_token, int64_t R, void* out, int device, void* stream) {
  if (R == 0 || H == 0) return;
  LK_CHECK(elem_size == 2 || elem_size == 4, "permute: element size must be 2 or 4 bytes");
  DeviceGuard guard(device);
  const int64_t row_bytes = H * elem_size, stride_bytes = row_stride * elem_size;
  const bool vec = row_bytes % 16 == 0 && stride_bytes % 16 == 0 && aligned16(x) && aligned16(out);
  const int grid = grid_for(device, R, 16);
  if (vec)
    permute_kernel<true><<<grid, 256, 0, as_stream(stream)>>>(static_cast<const char*>(x), elem_size, T, row_bytes,
                                                             stride_bytes, row_token, R, static_cast<char*>(out));
  else
    permute_kernel<false><<<grid, 256, 0, as_stream(stream)>>>(static_cast<const char*>(x), elem_size, T, row_bytes,
                                                              stride_bytes, row_token, R, static_cast<char*>(out));
  LK_CUDA_LAUNCH_CHECK("permute");
}

void permute_fp8(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride,
                 const int32_t* row_token, int64_t R, uint8_t* q, float* scale, bool ue8m0,
                 int device, void* stream) {
  if (R == 0 || H == 0) return;
  DeviceGuard guard(device);
  const int64_t groups = ceil_div(H, kQuantGroup);
  const int grid = grid_for(device, ceil_div(R * groups, 16), 16);
  auto launch = [&](auto* xp, int64_t es) {
    using T_ = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const bool vec = (row_stride * es) % 16 == 0 && aligned16(x);
    if (vec)
      permute_fp8_kernel<T_, true><<<grid, 256, 0, as_stream(stream)>>>(xp, T, H, row_stride, row_token, R, q,
                                                                       scale, ue8m0);
    else
      permute_fp8_kernel<T_, false><<<grid, 256, 0, as_stream(stream)>>>(xp, T, H, row_stride, row_token, R, q,
                                                                        scale, ue8m0);
  };
  switch (dtype) {
    case DType::f32: launch(static_cast<const float*>(x), 4); break;
    case DType::bf16: launch(static_cast<const bf16_t*>(x), 2); break;
    case DType::f16: launch(static_cast<const f16_t*>(x), 2); break;
    default: throw ArgError("leankernels: permute input must be float32, bfloat16 or float16");
  }
  LK_CUDA_LAUNCH_CHECK("permute_fp8");
}

void unpermute(const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
               const float* weights, int64_t T, int64_t top_k, void* out, int device, void* stream) {
  if (T == 0 || H == 0) return;
  DeviceGuard guard(device);
  const int grid = grid_for(device, T, 16);
  const int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(ceil_div(H, 8), 32) * 32)));
  auto launch = [&](auto* yp) {
    using T_ = std::remove_const_t<std::remove_pointer_t<decltype(yp)>>;
    auto* op = static_cast<T_*>(out);
    const bool vec = H % 8 == 0 && aligned16(y) && aligned16(out);
    if (vec)
      unpermute_kernel<T_, true><<<grid, threads, 0, as_stream(stream)>>>(yp, R, H, token_row, weights, T,
                                                                         int(top_k), op);
    else
      unpermute_kernel<T_, false><<<grid, threads, 0, as_stream(stream)>>>(yp, R, H, token_row, weights, T,
                                                                          int(top_k), op);
  };
  switch (dtype) {
    case DType::f32: launch(static_cast<const float*>(y)); break;
    case DType::bf16: launch(static_cast<const bf16_t*>(y)); break;
    case DType::f16: launch(static_cast<const f16_t*>(y)); break;
    default: throw ArgError("leankernels: unpermute input must be float32, bfloat16 or float16");
  }
  LK_CUDA_LAUNCH_CHECK("unpermute");
}

void update_bias(const float* bias, const void* counts, DType counts_dtype, int64_t E, float rate,
                 float* out, int device, void* stream) {
  if (E == 0) return;
  DeviceGuard guard(device);
  if (counts_dtype == DType::i32)
    update_bias_kernel<int32_t><<<1, 256, 0, as_stream(stream)>>>(bias, static_cast<const int32_t*>(counts), E,
                                                                  rate, out);
  else if (counts_dtype == DType::i64)
    update_bias_kernel<long long><<<1, 256, 0, as_stream(stream)>>>(bias, static_cast<const long long*>(counts),
                                                                    E, rate, out);
  else
    throw ArgError("leankernels: update_bias counts must be int32 or int64");
  LK_CUDA_LAUNCH_CHECK("update_bias");
}

}  // namespace lk::cuda
