// fp8_k_grouped_gemm on any sm_80+ GPU: the MoE wgrad GEMM, contracting over tokens.
//
// What: out[e, m, n] = sum over expert e's token groups g of
//   (sum_{t in g} a[m, t] b[n, t]) * (a_scale[m, col(g)] * b_scale[n, col(g)])
// a [M, L], b [N, L] e4m3 (per-row 1x128 scales along L in quantize_fp8_transposed's layout,
// common/k_groups.h), group sums in fp32, out [E, M, N] f32 or bf16; reference.fp8_k_grouped_gemm.
//
// Work split: one 256-thread CTA per (64 x 64 output tile, expert): grid (ceil(N/64), ceil(M/64),
// E). The CTA finds its expert's tokens from offs on the device (a block-wide max over the
// earlier ends, cuda/k_groups.cuh), so no host sync and the launch is CUDA-graph capturable.
// Per token group it zeroes 4x4 fp32 partial sums per thread, walks the group in 32-token
// steps (a 64x32 slice of a and of b, bytes decoded to fp32 into shared memory token-major so
// each thread reads 4 rows of a and 4 of b per token as float4), then folds the partials into
// the totals with the two scales: the group boundary is the promotion step. Experts without
// tokens write zeros (every output element is written, once: deterministic, no atomics).
// Why this shape: token groups start at any token (no 16-byte alignment for cp.async or mma
// fragments) and the scales change every 128 tokens per row AND column, so a plain SIMT tile
// with byte loads is the portable, obviously-correct baseline.
// Bound: 2*M*N*L flops at fp32 SIMT rate (H100 ~ 60 TFLOP/s peak, expect a fraction); traffic
// (M + N) * L bytes per 64-wide band, small. A tensor-core (mma.sync m16n8k32 e4m3) version
// is the next step where wgrad time matters.
// Last measurement: none (compiled for sm_80 / sm_89 / sm_90a only; no GPU here).
#include <cuda_runtime.h>

#include "common/fp8.h"
#include "common/k_groups.h"
#include "cuda/gemm.cuh"
#include "cuda/k_groups.cuh"
#include "cuda/launch.cuh"

namespace lk::cuda {
namespace {

constexpr int kTile = 64;      // output rows and columns per CTA
constexpr int kStep = 32;      // tokens per shared-memory slice
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
static_assert(kTile == 16 * 4 && kThreads == 16 * 16, "16x16 threads of 4x4 outputs");
static_assert(kQuantGroup % kStep == 0, "a group is a whole number of slices");

// Rows [r0, r0 + 64) x tokens [t, t + 32) of src (row stride L), zero outside rows < R and
// tokens < t_end, decoded into dst[token][row].
__device__ __forceinline__ void load_slice(float (*dst)[kTile + 4], const uint8_t* __restrict__ src, int64_t r0,
                                           int64_t R, int64_t L, int64_t t, int64_t t_end) {
  // 64 rows x 32 tokens = 2048 bytes: each thread 8 consecutive tokens of one row
  const int row = threadIdx.x / 4, part = threadIdx.x % 4;
  const int64_t r = r0 + row;
  const uint8_t* p = src + r * L + t + part * 8;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t tok = t + part * 8 + j;
    dst[part * 8 + j][row] = (r < R && tok < t_end) ? fp8e4m3_to_f32(p[j]) : 0.0f;
  }
}

__device__ __forceinline__ void fma_row(float (&acc)[4], float a, float4 b) {
  acc[0] = fmaf(a, b.x, acc[0]);
  acc[1] = fmaf(a, b.y, acc[1]);
  acc[2] = fmaf(a, b.z, acc[2]);
  acc[3] = fmaf(a, b.w, acc[3]);
}

template <typename Out>
__device__ __forceinline__ void store(Out* out, int64_t i, float v);
template <>
__device__ __forceinline__ void store<float>(float* out, int64_t i, float v) { out[i] = v; }
template <>
__device__ __forceinline__ void store<uint16_t>(uint16_t* out, int64_t i, float v) { out[i] = f32_to_bf16(v); }

template <typename Out>
__global__ void __launch_bounds__(kThreads) k_grouped_gemm_kernel(
    const uint8_t* __restrict__ a, const float* __restrict__ a_scale, const uint8_t* __restrict__ b,
    const float* __restrict__ b_scale, const int32_t* __restrict__ offs, int64_t E, int64_t M, int64_t N, int64_t L,
    Out* __restrict__ out) {
  __shared__ __align__(16) float as[kStep][kTile + 4];
  __shared__ __align__(16) float bs[kStep][kTile + 4];
  __shared__ int64_t red[32];
  const int64_t e = blockIdx.z, m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
  const int64_t start = k_expert_start(offs, e, L, red);
  const int64_t end = k_max64(start, k_group_end(offs, e, L));
  const int64_t G = k_group_columns(L, E);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // columns 4tx.., rows 4ty..
  float total[4][4] = {};
  for (int64_t t0 = start, col = k_group_first_column(start, e); t0 < end; t0 += kQuantGroup, ++col) {
    const int64_t t1 = t0 + kQuantGroup < end ? t0 + kQuantGroup : end;
    float acc[4][4] = {};
    const int len = int(t1 - t0);  // <= 128: 32-bit slice counter (a 64-bit one made ptxas spill)
    for (int off = 0; off < len; off += kStep) {
      __syncthreads();  // the previous slice is consumed
      load_slice(as, a, m0, M, L, t0 + off, t1);
      load_slice(bs, b, n0, N, L, t0 + off, t1);
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kStep; ++k) {
        const float4 av = *reinterpret_cast<const float4*>(&as[k][4 * ty]);
        const float4 bv = *reinterpret_cast<const float4*>(&bs[k][4 * tx]);
        fma_row(acc[0], av.x, bv);
        fma_row(acc[1], av.y, bv);
        fma_row(acc[2], av.z, bv);
        fma_row(acc[3], av.w, bv);
      }
    }
    // promotion: (group sum) * (a_scale * b_scale), as the reference orders it
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + 4 * ty + i;
      const float sa = m < M ? a_scale[m * G + col] : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + 4 * tx + j;
        const float sb = n < N ? b_scale[n * G + col] : 0.0f;
        total[i][j] += acc[i][j] * (sa * sb);
      }
    }
  }
  Out* oe = out + e * M * N;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + 4 * ty + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + 4 * tx + j;
      if (n < N) store(oe, m * N + n, total[i][j]);
    }
  }
}

}  // namespace

void fp8_k_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b, const float* b_scale,
                        const int32_t* offs, int64_t num_experts, int64_t M, int64_t N, int64_t L, void* out,
                        DType out_dtype, int device, void* stream) {
  LK_CHECK(M >= 0 && N >= 0 && L >= 0 && num_experts >= 1, "fp8_k_grouped_gemm: bad size");
  LK_CHECK(offs != nullptr || num_experts == 1, "fp8_k_grouped_gemm: offs=None means one expert");
  LK_CHECK(out_dtype == DType::f32 || out_dtype == DType::bf16, "out dtype must be f32 or bf16");
  if (M == 0 || N == 0) return;
  LK_CHECK(num_experts <= 65535, "fp8_k_grouped_gemm: at most 65535 experts per launch");
  LK_CHECK(ceil_div(M, kTile) <= 65535, "fp8_k_grouped_gemm: M too large (ceil(M/64) <= 65535)");
  LK_CHECK(ceil_div(N, kTile) < (int64_t(1) << 31), "fp8_k_grouped_gemm: N too large");
  DeviceGuard guard(device);
  const dim3 grid(unsigned(ceil_div(N, kTile)), unsigned(ceil_div(M, kTile)), unsigned(num_experts));
  cudaStream_t s = as_stream(stream);
  if (out_dtype == DType::f32)
    k_grouped_gemm_kernel<float><<<grid, kThreads, 0, s>>>(a, a_scale, b, b_scale, offs, num_experts, M, N, L,
                                                           static_cast<float*>(out));
  else
    k_grouped_gemm_kernel<uint16_t><<<grid, kThreads, 0, s>>>(a, a_scale, b, b_scale, offs, num_experts, M, N, L,
                                                              static_cast<uint16_t*>(out));
  LK_CUDA_LAUNCH_CHECK("fp8_k_grouped_gemm");
}

}  // namespace lk::cuda
