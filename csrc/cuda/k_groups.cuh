// Device side of the k-grouped (MoE wgrad) token groups of common/k_groups.h, shared by
// quantize_fp8_transposed (quant.cu) and fp8_k_grouped_gemm (k_grouped_gemm.cu). offs is read
// on the device (no host synchronisation); ends are clamped to [0, M] and each expert starts at
// the running maximum of the earlier ends, exactly as the CPU kernels and the reference do.
#pragma once
#include <cuda_runtime.h>

#include "common/k_groups.h"

namespace lk::cuda {

__device__ __forceinline__ int64_t k_max64(int64_t x, int64_t y) { return x > y ? x : y; }

// First token of expert e: max(0, offs[0..e-1] clamped). Called by every thread of the block
// (block-wide reduction; `red` is 32 int64 of shared memory). e == E gives the last end.
__device__ __forceinline__ int64_t k_expert_start(const int32_t* __restrict__ offs, int64_t e, int64_t M, int64_t* red) {
  int64_t m = 0;
  if (offs != nullptr)
    for (int64_t i = threadIdx.x; i < e; i += blockDim.x) m = k_max64(m, k_group_end(offs, i, M));
  else if (e > 0)
    m = M;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = k_max64(m, __shfl_xor_sync(0xffffffffu, m, d));
  __syncthreads();  // `red` may still be read from a previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = k_max64(m, red[w]);
  return m;
}

// One step of a warp's scan over expert (or group) ends, 32 at a time: lane i takes entry
// base + i (entries past E read as end 0), returns its end clamped to [0, M] and sets *start to
// the running maximum of all earlier ends; carry (the largest end before this chunk) advances.
// Row r then belongs to the first entry whose end exceeds r, so unchecked decreasing ends never
// give a row to two entries. Shared with the m-grouped GEMM (gemm.cu).
__device__ __forceinline__ int64_t running_max_ends(const int32_t* __restrict__ offs, int64_t base, int64_t E,
                                                    int64_t M, int64_t* carry, int64_t* start) {
  const int lane = threadIdx.x % 32;
  const int64_t e = base + lane;
  const int64_t end = e < E ? k_group_end(offs, e, M) : 0;
  int64_t run = end;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int64_t v = __shfl_up_sync(0xffffffffu, run, d);
    if (lane >= d) run = k_max64(run, v);
  }
  run = k_max64(run, *carry);
  *start = __shfl_up_sync(0xffffffffu, run, 1);
  if (lane == 0) *start = *carry;
  *carry = __shfl_sync(0xffffffffu, run, 31);
  return end;
}

// The token group that uses scale column `col`: tokens [*t0, *t1); false when no group uses it.
// Run by one whole warp: a scan over the experts, 32 at a time (running maximum of the ends,
// then each expert's first column floor(start/128) + e and group count), stopping once the
// experts' first columns pass col (they never decrease).
__device__ inline bool k_group_of_column(const int32_t* __restrict__ offs, int64_t E, int64_t M, int64_t col,
                                  int64_t* t0, int64_t* t1) {
  const int lane = threadIdx.x % 32;
  int64_t carry = 0;  // largest end of the experts before this chunk
  for (int64_t base = 0; base < E; base += 32) {
    const int64_t e = base + lane;
    int64_t start;
    const int64_t end = running_max_ends(offs, base, E, M, &carry, &start);
    const int64_t first = k_group_first_column(start, e);
    const int64_t n = end > start ? (end - start + kQuantGroup - 1) / kQuantGroup : 0;
    const bool mine = e < E && col >= first && col < first + n;
    const unsigned hit = __ballot_sync(0xffffffffu, mine);
    if (hit) {
      const int src = __ffs(hit) - 1;
      const int64_t s = __shfl_sync(0xffffffffu, start + (col - first) * kQuantGroup, src);
      const int64_t stop = __shfl_sync(0xffffffffu, end, src);
      *t0 = s;
      *t1 = s + kQuantGroup < stop ? s + kQuantGroup : stop;
      return true;
    }
    if (__shfl_sync(0xffffffffu, e < E ? first : col + 1, 31) > col) break;
  }
  return false;
}

}  // namespace lk::cuda
