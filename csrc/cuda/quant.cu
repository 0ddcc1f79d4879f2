// FP8 (e4m3) block quantization on any sm_80+ GPU.
//
// 1x128 (activations): 16 threads own one 128-wide group, 8 consecutive elements each
// (one 16-byte load for bf16/fp16, two for fp32), |x| max by 16-lane shuffles, then each
// thread writes its 8 codes as one 8-byte store; lane 0 of the group writes the scale.
// Traffic per element: read 2 B (bf16) + write 1 B + 4/128 B of scale; no reuse, so the
// bound is DRAM bandwidth: on an H100 (~3.0 TB/s copy) 4096x7168 bf16 (88 MB moved) is ~29 us.
// Unaligned or partial groups take the scalar path of the same kernel.
// 128x128 (weights): one 256-thread block per tile, each thread keeps its 8x8 elements in
// registers across the block-wide max, so x is read once.
// Transposed (quantize_fp8_transposed, the MoE wgrad operands): x [M, K] -> x.T [K, M] in 1x128
// groups along M (tokens) in the k-grouped layout (common/k_groups.h). One 256-thread block per
// (64 columns of x, one scale column): warp 0 finds the column's token group from offs on the
// device (cuda/k_groups.cuh), the block reads the <= 128 x 64 tile of x row by row (coalesced
// along K) into shared memory (fp32, rows padded to 65 words), then each warp takes 8 columns:
// |x| max over the group's tokens by shuffles, scale, and each lane encodes 4 consecutive tokens
// and writes them as one 4-byte store where aligned, so a warp writes 128 contiguous bytes of an
// xt row. Scale columns no group uses get 0; extra blocks (one per 128 tokens) zero the xt
// columns of tokens past the last expert's end. Traffic: x read once, xt written once (memory
// bound, like the 1x128 kernel). Last measurement: none (compiled only; no GPU here).
#include <cuda_runtime.h>

#include "common/fp8.h"
#include "cuda/k_groups.cuh"
#include "cuda/launch.cuh"
#include "cuda/quant.cuh"

namespace lk::cuda {
namespace {

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float f(float v) { return v; }
};
struct bf16_t { uint16_t v; };
struct f16_t { uint16_t v; };
template <>
struct Elem<bf16_t> {
  static __device__ __forceinline__ float f(bf16_t v) { return bf16_to_f32(v.v); }
};
template <>
struct Elem<f16_t> {
  static __device__ __forceinline__ float f(f16_t v) { return f16_to_f32(v.v); }
};

constexpr int kThreadsPerGroup = 16;   // 16 x 8 elements = one 128-wide group
constexpr int kElemsPerThread = 8;

// Loads 8 consecutive elements starting at column k of a row with K columns.
template <typename T, bool kVec>
__device__ __forceinline__ void load8(const T* row, int64_t k, int64_t K, float (&v)[8]) {
  if constexpr (kVec) {
    static_assert(sizeof(T) * 8 % 16 == 0, "vector path loads whole 16-byte words");
    constexpr int kWords = sizeof(T) * 8 / 16;
    T tmp[8];
#pragma unroll
    for (int w = 0; w < kWords; ++w)
      reinterpret_cast<uint4*>(tmp)[w] = __ldg(reinterpret_cast<const uint4*>(row + k) + w);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = Elem<T>::f(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (k + i < K) ? Elem<T>::f(row[k + i]) : 0.0f;
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(256) quantize_1x128_kernel(
    const T* __restrict__ x, int64_t rows, int64_t K, int64_t row_stride, uint8_t* __restrict__ q,
    float* __restrict__ scale, bool ue8m0) {
  const int64_t groups = (K + kQuantGroup - 1) / kQuantGroup;
  const int64_t total = rows * groups;
  const int lane_in_group = threadIdx.x % kThreadsPerGroup;
  const int64_t groups_per_grid = int64_t(gridDim.x) * (blockDim.x / kThreadsPerGroup);
  for (int64_t gi = int64_t(blockIdx.x) * (blockDim.x / kThreadsPerGroup) +
                    threadIdx.x / kThreadsPerGroup;
       gi < total; gi += groups_per_grid) {
    const int64_t r = gi / groups, g = gi % groups;
    const int64_t k = g * kQuantGroup + lane_in_group * kElemsPerThread;
    float v[8];
    const bool full = kVec && (g + 1) * kQuantGroup <= K;
    if (full) load8<T, kVec>(x + r * row_stride, k, K, v);
    else load8<T, false>(x + r * row_stride, k, K, v);
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = max(m, abs_bits(v[i]));
    // NOTES: the two groups of a warp may leave the loop at different trips, so the shuffle
    // mask names only this group's 16 lanes.
    const unsigned mask = 0xffffu << (threadIdx.x & 16);
#pragma unroll
    for (int off = kThreadsPerGroup / 2; off > 0; off >>= 1)
      m = max(m, __shfl_xor_sync(mask, m, off));
    const float s = fp8_scale_from_amax(__uint_as_float(m), ue8m0);
    uint8_t out[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = fp8_quantize_value(v[i], s);
    uint8_t* qrow = q + r * K;
    if (full && (K % 8 == 0)) {
      *reinterpret_cast<uint2*>(qrow + k) = *reinterpret_cast<uint2*>(out);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (k + i < K) qrow[k + i] = out[i];
    }
    if (lane_in_group == 0) scale[gi] = s;
  }
}

// One block per 128x128 tile: thread (tx = t % 16, ty = t / 16) owns columns 8*tx..8*tx+7 of
// rows ty, ty+16, ..., ty+112, kept in registers between the max and the encode.
// NOTES: the 64 values stay in the input type (16-bit inputs: 32 registers, not 64) and are
// widened again for the encode: as fp32 the array plus the division's slow path spilled to
// local memory on sm_89 (30 STL/LDL for fp16 inputs).
template <typename T>
__global__ void __launch_bounds__(256) quantize_128x128_kernel(
    const T* __restrict__ x, int64_t rows, int64_t K, int64_t batch_stride, int64_t row_stride,
    uint8_t* __restrict__ q, float* __restrict__ scale, bool ue8m0) {
  const int64_t col_blocks = (K + kQuantGroup - 1) / kQuantGroup;
  const int64_t row_blocks = (rows + kQuantGroup - 1) / kQuantGroup;
  const int64_t b = blockIdx.z, rb = blockIdx.y, cb = blockIdx.x;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t k = cb * kQuantGroup + tx * 8;
  const T* xb = x + b * batch_stride;
  T v[8][8];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t r = rb * kQuantGroup + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[i][j] = (r < rows && k + j < K) ? xb[r * row_stride + k + j] : T{};
      m = max(m, abs_bits(Elem<T>::f(v[i][j])));
    }
  }
  __shared__ uint32_t warp_max[8];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  m = warp_max[0];
#pragma unroll
  for (int w = 1; w < 8; ++w) m = max(m, warp_max[w]);
  const float s = fp8_scale_from_amax(__uint_as_float(m), ue8m0);
  if (threadIdx.x == 0) scale[(b * row_blocks + rb) * col_blocks + cb] = s;
  uint8_t* qb = q + b * rows * K;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t r = rb * kQuantGroup + ty + 16 * i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (k + j < K) qb[r * K + k + j] = fp8_quantize_value(Elem<T>::f(v[i][j]), s);
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                  int64_t rows, int64_t K, int64_t block_rows, int64_t total,
                                  float* __restrict__ out) {
  const int64_t groups = (K + kQuantGroup - 1) / kQuantGroup;
  const int64_t row_blocks = (rows + block_rows - 1) / block_rows;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t kk = i % K, br = i / K;
    const int64_t b = br / rows, r = br % rows;
    out[i] = fp8e4m3_to_f32(q[i]) * scale[(b * row_blocks + r / block_rows) * groups + kk / kQuantGroup];
  }
}

constexpr int kTCols = 64;        // columns of x per transposed block
constexpr int kTPad = kTCols + 1;  // shared row stride in words: column reads hit distinct banks

// grid (ceil(K/64), G + ceil(M/128)): y < G a scale column, y >= G a 128-token slice to zero
// where no expert holds it.
template <typename T>
__global__ void __launch_bounds__(256) quantize_transposed_kernel(
    const T* __restrict__ x, int64_t M, int64_t K, int64_t row_stride, const int32_t* __restrict__ offs,
    int64_t E, int64_t G, uint8_t* __restrict__ q, float* __restrict__ scale, bool ue8m0) {
  __shared__ float tile[kQuantGroup][kTPad];
  __shared__ int64_t red[32];
  __shared__ int64_t span[3];  // t0, t1, found
  const int64_t k0 = int64_t(blockIdx.x) * kTCols, y = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (y >= G) {  // tokens [max(covered, 128z), 128z + 128) of every column: code 0
    const int64_t covered = k_expert_start(offs, E, M, red);
    const int64_t z0 = k_max64((y - G) * kQuantGroup, covered), z1 = (y - G + 1) * kQuantGroup < M ? (y - G + 1) * kQuantGroup : M;
    for (int c = warp; c < kTCols; c += 8)
      if (k0 + c < K)
        for (int64_t t = z0 + lane; t < z1; t += 32) q[(k0 + c) * M + t] = 0;
    return;
  }
  if (warp == 0) {
    int64_t t0 = 0, t1 = 0;
    const bool found = k_group_of_column(offs, E, M, y, &t0, &t1);
    if (lane == 0) span[0] = t0, span[1] = t1, span[2] = found;
  }
  __syncthreads();
  if (!span[2]) {  // a column no group uses
    if (threadIdx.x < kTCols && k0 + threadIdx.x < K) scale[(k0 + threadIdx.x) * G + y] = 0.0f;
    return;
  }
  const int64_t t0 = span[0], n = span[1] - span[0];
  for (int i = threadIdx.x; i < kQuantGroup * kTCols; i += blockDim.x) {
    const int r = i / kTCols, c = i % kTCols;
    tile[r][c] = (r < n && k0 + c < K) ? Elem<T>::f(x[(t0 + r) * row_stride + k0 + c]) : 0.0f;
  }
  __syncthreads();
  for (int c = warp; c < kTCols; c += 8) {
    if (k0 + c >= K) break;
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) m = max(m, abs_bits(tile[lane + 32 * i][c]));  // padding rows are 0
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, d));
    const float s = fp8_scale_from_amax(__uint_as_float(m), ue8m0);
    if (lane == 0) scale[(k0 + c) * G + y] = s;
    uint8_t code[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) code[j] = fp8_quantize_value(tile[4 * lane + j][c], s);
    uint8_t* dst = q + (k0 + c) * M + t0 + 4 * lane;
    if (4 * lane + 4 <= n && (reinterpret_cast<uintptr_t>(dst) % 4) == 0) {
      *reinterpret_cast<uint32_t*>(dst) = uint32_t(code[0]) | uint32_t(code[1]) << 8 | uint32_t(code[2]) << 16 |
                                          uint32_t(code[3]) << 24;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (4 * lane + j < n) dst[j] = code[j];
    }
  }
}

template <typename T>
void launch_quantize_transposed(const T* x, int64_t M, int64_t K, int64_t row_stride, const int32_t* offs,
                                int64_t E, uint8_t* q, float* scale, bool ue8m0, cudaStream_t stream) {
  const int64_t G = k_group_columns(M, E), slots = G + ceil_div(M, kQuantGroup);
  LK_CHECK(slots <= 65535, "quantize_fp8_transposed: ceil(M/128) * 2 + E - 1 must be <= 65535 per launch");
  LK_CHECK(ceil_div(K, kTCols) < (int64_t(1) << 31), "quantize_fp8_transposed: K too large");
  dim3 grid(unsigned(ceil_div(K, kTCols)), unsigned(slots));
  quantize_transposed_kernel<T><<<grid, 256, 0, stream>>>(x, M, K, row_stride, offs, E, G, q, scale, ue8m0);
  LK_CUDA_LAUNCH_CHECK("quantize_fp8_transposed");
}

template <typename T>
void launch_quantize(const T* x, int64_t batch, int64_t rows, int64_t K, int64_t batch_stride,
                     int64_t row_stride, int64_t block_rows, uint8_t* q, float* scale, bool ue8m0,
                     int device, cudaStream_t stream) {
  if (block_rows == 1) {
    // A [batch, rows, K] tensor with 1x128 groups is a [batch*rows, K] one when batches are
    // evenly spaced rows (the Python side guarantees it, copying otherwise).
    LK_CHECK(batch == 1 || batch_stride == rows * row_stride, "1x128 batch stride");
    const int64_t all_rows = batch * rows;
    const int64_t groups = all_rows * ceil_div(K, kQuantGroup);
    const int64_t blocks = std::min<int64_t>(ceil_div(groups, 256 / kThreadsPerGroup),
                                             int64_t(num_sms(device)) * 16);
    const bool vec = (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                     (row_stride * sizeof(T)) % 16 == 0 && (K * sizeof(T)) % 16 == 0;
    if (vec)
      quantize_1x128_kernel<T, true><<<blocks, 256, 0, stream>>>(x, all_rows, K, row_stride, q, scale, ue8m0);
    else
      quantize_1x128_kernel<T, false><<<blocks, 256, 0, stream>>>(x, all_rows, K, row_stride, q, scale, ue8m0);
  } else {
    LK_CHECK(batch <= 65535, "128x128 quantization supports at most 65535 matrices per call");
    LK_CHECK(ceil_div(rows, kQuantGroup) <= 65535, "too many 128-row blocks");
    dim3 grid(unsigned(ceil_div(K, kQuantGroup)), unsigned(ceil_div(rows, kQuantGroup)), unsigned(batch));
    quantize_128x128_kernel<T><<<grid, 256, 0, stream>>>(x, rows, K, batch_stride, row_stride, q, scale, ue8m0);
  }
  LK_CUDA_LAUNCH_CHECK("quantize_fp8");
}

}  // namespace

void quantize_fp8(const void* x, DType dtype, int64_t batch, int64_t rows, int64_t K,
                  int64_t batch_stride, int64_t row_stride, int64_t block_rows, uint8_t* q,
                  float* scale, bool ue8m0, int device, void* stream) {
  LK_CHECK(block_rows == 1 || block_rows == kQuantGroup, "block_rows must be 1 or 128");
  if (batch == 0 || rows == 0 || K == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case DType::f32:
      launch_quantize(static_cast<const float*>(x), batch, rows, K, batch_stride, row_stride, block_rows, q, scale, ue8m0, device, s);
      break;
    case DType::bf16:
      launch_quantize(static_cast<const bf16_t*>(x), batch, rows, K, batch_stride, row_stride, block_rows, q, scale, ue8m0, device, s);
      break;
    case DType::f16:
      launch_quantize(static_cast<const f16_t*>(x), batch, rows, K, batch_stride, row_stride, block_rows, q, scale, ue8m0, device, s);
      break;
    default:
      throw ArgError("leankernels: quantize_fp8 input must be float32, bfloat16 or float16");
  }
}

void dequantize_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows, int64_t K,
                    int64_t block_rows, float* out, int device, void* stream) {
  LK_CHECK(block_rows == 1 || block_rows == kQuantGroup, "block_rows must be 1 or 128");
  const int64_t total = batch * rows * K;
  if (total == 0) return;
  DeviceGuard guard(device);
  const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), int64_t(num_sms(device)) * 8);
  dequantize_kernel<<<blocks, 256, 0, as_stream(stream)>>>(q, scale, rows, K, block_rows, total, out);
  LK_CUDA_LAUNCH_CHECK("dequantize_fp8");
}

void quantize_fp8_transposed(const void* x, DType dtype, int64_t M, int64_t K, int64_t row_stride,
                             const int32_t* offs, int64_t num_experts, uint8_t* q, float* scale, bool ue8m0,
                             int device, void* stream) {
  LK_CHECK(M >= 0 && K >= 0 && num_experts >= 1, "quantize_fp8_transposed: bad size");
  LK_CHECK(offs != nullptr || num_experts == 1, "quantize_fp8_transposed: offs=None means one expert");
  if (K == 0 || k_group_columns(M, num_experts) + ceil_div(M, kQuantGroup) == 0) return;
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case DType::f32:
      launch_quantize_transposed(static_cast<const float*>(x), M, K, row_stride, offs, num_experts, q, scale, ue8m0, s);
      break;
    case DType::bf16:
      launch_quantize_transposed(static_cast<const bf16_t*>(x), M, K, row_stride, offs, num_experts, q, scale, ue8m0, s);
      break;
    case DType::f16:
      launch_quantize_transposed(static_cast<const f16_t*>(x), M, K, row_stride, offs, num_experts, q, scale, ue8m0, s);
      break;
    default:
      throw ArgError("leankernels: quantize_fp8_transposed input must be float32, bfloat16 or float16");
  }
}

}  // namespace lk::cuda
