// FP8 (e4m3) block-scaled GEMM on any sm_80+ GPU: dense, grouped-contiguous, grouped-masked.
//
// What: out[r, n] = sum_kb (sum_{k in kb} a[r,k] b[g,n,k]) * (a_scale[r,kb] * b_scale[g,n/128,kb]),
// the contract of reference.fp8_gemm: each 128-wide K block is summed in fp32 by the tensor cores
// and promoted into an fp32 total with the two scales (DeepGEMM's "promotion" step).
//
// Work split: one 128-thread CTA per 64x64 output tile, 4 warps of 32x32 (2 m16 x 4 n8 mma
// tiles each). K advances one 128-wide scale block per pipeline stage: a 64x128 A tile and a
// 64x128 B tile (8 KiB each) are brought global -> shared with cp.async (16-byte chunks,
// zero-filled outside the matrix) into a double buffer, so the next block's loads overlap
// this block's mma. BLOCK_N = 64 divides 128, so one b_scale value covers the whole tile.
//   sm_89 / sm_90: mma.sync m16n8k32 e4m3 x e4m3 -> fp32 straight from the fp8 bytes.
//   sm_80 / sm_86: the bytes are decoded to bf16 in registers (exact) and fed to m16n8k16 bf16.
//   NOTES: Hopper has native FP8 only in wgmma; for sm_90a ptxas lowers the e4m3 mma.sync to
//   fp16 HMMA.16816 (e4m3 is exact in fp16), so results match, at fp16 tensor-core rate (SASS:
//   sm_80 HMMA.16816.F32.BF16, sm_89 QMMA.16832.F32.E4M3.E4M3, sm_90a HMMA.16816.F32).
// Layouts share the kernel; only the tile -> (group, rows) mapping differs:
//   dense: grid.x = m tiles. masked: grid.z = groups, masked_m read on the device, tiles past
//   it exit. contiguous: grid.x = ceil(M/64) + G tile slots (an upper bound on
//   sum_g ceil(m_g/64)); warp 0 of each CTA scans offs on the device (prefix sum of tiles per
//   group, 32 groups per step) to find its group, and excess slots exit. No host sync anywhere,
//   so the launch is CUDA-graph capturable.
// Shared memory rows are padded to 144 bytes so the 32-bit fragment loads of a warp (8 rows x 4
// words) hit 32 distinct banks. K % 16 != 0 or misaligned pointers take a synchronous byte-load
// path of the same kernel.
// Bound (grouped contiguous 8x4096 rows, N=4096, K=7168): 1.92 TFLOP against ~0.74 GB moved
// (a 235 MB, b 235 MB, bf16 out 268 MB; ~0.25 ms at an H100's ~3 TB/s), i.e. ~2 ms even at a
// 1 PFLOP/s FP8 rate: compute bound. mma.sync reaches only part of Hopper's wgmma peak; this is
// the fallback every GPU gets, the sm90 wgmma kernel (dispatch_sm90) is where that peak lives.
// Last measurement: none yet on a GPU (compiled for sm_80/89/90a and SASS-checked only).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "common/fp8.h"
#include "cuda/gemm.cuh"
#include "cuda/k_groups.cuh"
#include "cuda/launch.cuh"
#ifdef LEANKERNELS_WITH_SM90
#include "cuda/sm90_fp8_gemm.cuh"
#endif

// Arch gates (named, per STYLE): FP8 tensor-core mma exists from sm_89 (Ada, Hopper).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define LK_HAS_FP8_MMA 1
#endif

namespace lk::cuda {
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kBlockK = kQuantGroup;  // one scale block per stage
constexpr int kThreads = 128;
constexpr int kRowBytes = kBlockK + 16;  // padded shared row (keeps 16-byte alignment)
static_assert(kQuantGroup % kBlockN == 0, "a tile's columns must share one b_scale block");
static_assert(kBlockM == 2 * 32 && kBlockN == 2 * 32 && kThreads == 4 * 32, "2x2 warps of 32x32");

struct GemmArgs {
  GemmLayout layout;
  const uint8_t* a;
  const float* a_scale;
  const uint8_t* b;
  const float* b_scale;
  const int32_t* groups;
  int64_t G, M, N, K;
  void* out;
  DType out_dtype;
  bool pair_stores;  // N even and out aligned: each thread's two adjacent outputs in one store
};

__host__ __device__ __forceinline__ int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
__host__ __device__ __forceinline__ int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

struct Tile {
  int64_t group, row0, rows;  // rows [row0, row0 + rows) of a / out, rows <= kBlockM
};

// Contiguous layout: slot t -> (group, first row of its tile). Run by warp 0.
__device__ bool find_contiguous_tile(const int32_t* __restrict__ offs, int64_t G, int64_t M,
                                     int64_t t, Tile* tile) {
  const int lane = threadIdx.x % 32;
  int64_t tiles_before = 0;
  int64_t carry = 0;  // largest clamped end of the groups before this chunk
  for (int64_t base = 0; base < G; base += 32) {
    // Row r belongs to the first group whose end exceeds r (reference.fp8_grouped_gemm): group
    // g starts at the running maximum of the earlier ends, so unchecked decreasing offs never
    // give a row to two groups (a write race) nor more tiles than the grid has slots.
    int64_t start;
    const int64_t end = running_max_ends(offs, base, G, M, &carry, &start);
    const int64_t rows = end > start ? end - start : 0;
    const int64_t my_tiles = (rows + kBlockM - 1) / kBlockM;
    int64_t incl = my_tiles;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int64_t v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    const int64_t first = tiles_before + incl - my_tiles;
    const bool mine = my_tiles > 0 && t >= first && t < first + my_tiles;
    const unsigned hit = __ballot_sync(0xffffffffu, mine);
    if (hit) {
      const int src = __ffs(hit) - 1;
      const int64_t row0 = __shfl_sync(0xffffffffu, start + (t - first) * kBlockM, src);
      const int64_t row_end = __shfl_sync(0xffffffffu, end, src);
      tile->group = base + src;
      tile->row0 = row0;
      tile->rows = imin(kBlockM, row_end - row0);
      return true;
    }
    tiles_before += __shfl_sync(0xffffffffu, incl, 31);
    if (tiles_before > t) break;
  }
  return false;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 shared bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Loads rows [0, rows) x K-block kb of `src` (row stride K bytes) into a 64 x kRowBytes shared
// tile; everything outside the matrix reads as zero.
template <bool kVec>
__device__ __forceinline__ void load_tile(uint8_t* smem, const uint8_t* __restrict__ src,
                                          int64_t rows, int64_t K, int64_t kb) {
  const int64_t k0 = kb * kBlockK;
  if constexpr (kVec) {
    constexpr int kChunks = kBlockM * kBlockK / 16;
#pragma unroll
    for (int c = threadIdx.x; c < kChunks; c += kThreads) {
      const int r = c / (kBlockK / 16), col = (c % (kBlockK / 16)) * 16;
      const bool valid = r < rows && k0 + col < K;  // K % 16 == 0: a chunk is all in or all out
      const uint8_t* g = valid ? src + r * K + k0 + col : src;
      cp_async16(smem + r * kRowBytes + col, g, valid);
    }
  } else {
    constexpr int kWords = kBlockM * kBlockK / 4;
    for (int c = threadIdx.x; c < kWords; c += kThreads) {
      const int r = c / (kBlockK / 4), col = (c % (kBlockK / 4)) * 4;
      uint32_t w = 0;
      if (r < rows) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (k0 + col + i < K) w |= uint32_t(src[r * K + k0 + col + i]) << (8 * i);
      }
      *reinterpret_cast<uint32_t*>(smem + r * kRowBytes + col) = w;
    }
  }
}

#ifndef LK_HAS_FP8_MMA
// Two e4m3 bytes (low 16 bits of v) -> two bf16 packed in 32 bits, exact (sm_80 path).
__device__ __forceinline__ uint32_t e4m3_to_bf16_bits(uint32_t x) {
  const uint32_t mag = x & 0x7fu, sign = (x & 0x80u) << 8;
  uint32_t r = (mag << 4) + (120u << 7);                              // normal: rebias exponent
  if (mag < 8u) r = __float_as_uint(float(mag) * 0.001953125f) >> 16;  // subnormal: m * 2^-9
  if (mag == 0x7fu) r = 0x7fc0u;                                       // NaN
  return r | sign;
}
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t v) {
  return e4m3_to_bf16_bits(v & 0xffu) | (e4m3_to_bf16_bits((v >> 8) & 0xffu) << 16);
}
__device__ __forceinline__ uint32_t lds16(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
#else
__device__ __forceinline__ uint32_t lds32(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
#endif

// One 128-wide K block of a warp's 32x32 tile: acc[i][j] (m16 tile i, n8 tile j) = A_blk B_blk^T.
__device__ __forceinline__ void mma_block(const uint8_t* sa, const uint8_t* sb, int warp_m,
                                          int warp_n, float (&acc)[2][4][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
#ifdef LK_HAS_FP8_MMA
#pragma unroll
  for (int ks = 0; ks < kBlockK; ks += 32) {
    uint32_t af[2][4], bf[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint8_t* p = sa + (warp_m * 32 + i * 16 + g) * kRowBytes + ks + tig * 4;
      af[i][0] = lds32(p);
      af[i][1] = lds32(p + 8 * kRowBytes);
      af[i][2] = lds32(p + 16);
      af[i][3] = lds32(p + 8 * kRowBytes + 16);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint8_t* p = sb + (warp_n * 32 + j * 8 + g) * kRowBytes + ks + tig * 4;
      bf[j][0] = lds32(p);
      bf[j][1] = lds32(p + 16);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        asm volatile(
            "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]), "+f"(acc[i][j][3])
            : "r"(af[i][0]), "r"(af[i][1]), "r"(af[i][2]), "r"(af[i][3]), "r"(bf[j][0]),
              "r"(bf[j][1]));
  }
#else
#pragma unroll
  for (int ks = 0; ks < kBlockK; ks += 16) {
    uint32_t af[2][4], bf[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint8_t* p = sa + (warp_m * 32 + i * 16 + g) * kRowBytes + ks + tig * 2;
      af[i][0] = e4m3x2_to_bf16x2(lds16(p));
      af[i][1] = e4m3x2_to_bf16x2(lds16(p + 8 * kRowBytes));
      af[i][2] = e4m3x2_to_bf16x2(lds16(p + 8));
      af[i][3] = e4m3x2_to_bf16x2(lds16(p + 8 * kRowBytes + 8));
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint8_t* p = sb + (warp_n * 32 + j * 8 + g) * kRowBytes + ks + tig * 2;
      bf[j][0] = e4m3x2_to_bf16x2(lds16(p));
      bf[j][1] = e4m3x2_to_bf16x2(lds16(p + 8));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]), "+f"(acc[i][j][3])
            : "r"(af[i][0]), "r"(af[i][1]), "r"(af[i][2]), "r"(af[i][3]), "r"(bf[j][0]),
              "r"(bf[j][1]));
  }
#endif
}

template <typename OutT>
__device__ __forceinline__ OutT to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ uint16_t to_out<uint16_t>(float v) { return f32_to_bf16(v); }

template <bool kVec, typename OutT>
__global__ void __launch_bounds__(kThreads) fp8_gemm_kernel(GemmArgs p) {
  __shared__ __align__(16) uint8_t smem_a[2][kBlockM * kRowBytes];
  __shared__ __align__(16) uint8_t smem_b[2][kBlockN * kRowBytes];
  __shared__ Tile s_tile;
  __shared__ bool s_found;

  // NOTES: M tiles on grid.x (up to 2^31 - 1) and N tiles on grid.y (65535 x 64 columns):
  // with M on grid.y, dense M above ~4.19M rows or ceil(M/64) + E > 65535 slots were refused.
  const int64_t n0 = int64_t(blockIdx.y) * kBlockN;
  Tile tile;
  if (p.layout == GemmLayout::contiguous) {
    if (threadIdx.x < 32) {
      Tile t{};
      const bool found = find_contiguous_tile(p.groups, p.G, p.M, blockIdx.x, &t);
      if (threadIdx.x == 0) {
        s_tile = t;
        s_found = found;
      }
    }
    __syncthreads();
    if (!s_found) return;  // excess slot: uniform exit for the whole CTA
    tile = s_tile;
  } else if (p.layout == GemmLayout::masked) {
    const int64_t g = blockIdx.z;
    const int64_t valid = imin(imax(p.groups[g], 0), p.M);
    const int64_t r = int64_t(blockIdx.x) * kBlockM;
    if (r >= valid) return;
    tile = {g, g * p.M + r, imin(kBlockM, valid - r)};
  } else {
    const int64_t r = int64_t(blockIdx.x) * kBlockM;
    tile = {0, r, imin(kBlockM, p.M - r)};
  }

  const int64_t KB = (p.K + kBlockK - 1) / kBlockK;
  const int64_t NB = (p.N + kQuantGroup - 1) / kQuantGroup;
  const uint8_t* a = p.a + tile.row0 * p.K;
  const uint8_t* b = p.b + (tile.group * p.N + n0) * p.K;
  const int64_t b_rows = imin(kBlockN, p.N - n0);
  const float* sb_row = p.b_scale + (tile.group * NB + n0 / kQuantGroup) * KB;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 2, warp_n = warp % 2, g = lane / 4, tig = lane % 4;
  // a_scale rows of this thread's accumulator registers: m16 tile i, rows g and g + 8.
  const float* sa_row[2][2];
  bool row_ok[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_m * 32 + i * 16 + g + 8 * h;
      row_ok[i][h] = r < tile.rows;
      sa_row[i][h] = p.a_scale + (tile.row0 + (row_ok[i][h] ? r : 0)) * KB;
    }

  float total[2][4][4] = {};
  if (KB > 0) {
    load_tile<kVec>(smem_a[0], a, tile.rows, p.K, 0);
    load_tile<kVec>(smem_b[0], b, b_rows, p.K, 0);
    cp_async_commit();
  }
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int buf = int(kb & 1);
    if (kb + 1 < KB) {
      load_tile<kVec>(smem_a[buf ^ 1], a, tile.rows, p.K, kb + 1);
      load_tile<kVec>(smem_b[buf ^ 1], b, b_rows, p.K, kb + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // Scales first: their global loads are in flight while the tensor cores run.
    const float sb = __ldg(sb_row + kb);
    float s[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) s[i][h] = row_ok[i][h] ? __ldg(sa_row[i][h] + kb) * sb : 0.0f;
    float acc[2][4][4] = {};
    mma_block(smem_a[buf], smem_b[buf], warp_m, warp_n, acc);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) total[i][j][v] += acc[i][j][v] * s[i][v / 2];
    __syncthreads();  // the next iteration overwrites the buffer just read
  }

  OutT* out = static_cast<OutT*>(p.out);
  const bool pair_ok = p.pair_stores;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!row_ok[i][h]) continue;
      const int64_t row = tile.row0 + warp_m * 32 + i * 16 + g + 8 * h;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = n0 + warp_n * 32 + j * 8 + tig * 2;
        OutT* o = out + row * p.N + col;
        const OutT v0 = to_out<OutT>(total[i][j][2 * h]), v1 = to_out<OutT>(total[i][j][2 * h + 1]);
        if (pair_ok && col + 1 < p.N) {
          if constexpr (sizeof(OutT) == 4) {
            *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
          } else {
            *reinterpret_cast<uint32_t*>(o) = uint32_t(v0) | (uint32_t(v1) << 16);
          }
        } else {
          if (col < p.N) o[0] = v0;
          if (col + 1 < p.N) o[1] = v1;
        }
      }
    }
}

// Hopper (sm_90a) wgmma/TMA kernel (sm90_fp8_gemm.cu): returns true when it handled the call.
// LEANKERNELS_GEMM_BACKEND=portable forces the portable kernel (to compare the two on one GPU).
bool dispatch_sm90(const GemmArgs& args, int device, cudaStream_t stream) {
#ifdef LEANKERNELS_WITH_SM90
  const char* backend = std::getenv("LEANKERNELS_GEMM_BACKEND");
  if (backend != nullptr && std::strcmp(backend, "portable") == 0) return false;
  sm90::GemmLayout layout = sm90::GemmLayout::dense;
  if (args.layout == GemmLayout::contiguous) layout = sm90::GemmLayout::contiguous;
  if (args.layout == GemmLayout::masked) layout = sm90::GemmLayout::masked;
  const bool out_fp32 = args.out_dtype == DType::f32;
  if (!sm90::fp8_gemm_supported(layout, args.M, args.N, args.K, out_fp32, args.a, args.b, args.out, args.G))
    return false;
  sm90::fp8_gemm(layout, args.a, args.a_scale, args.b, args.b_scale, args.out, out_fp32, args.M, args.N, args.K,
                 args.G, args.layout == GemmLayout::dense ? nullptr : args.groups, device, stream);
  return true;
#else
  (void)args, (void)device, (void)stream;
  return false;
#endif
}

template <bool kVec>
void launch_portable_out(const GemmArgs& args, dim3 grid, cudaStream_t stream) {
  if (args.out_dtype == DType::f32)
    fp8_gemm_kernel<kVec, float><<<grid, kThreads, 0, stream>>>(args);
  else
    fp8_gemm_kernel<kVec, uint16_t><<<grid, kThreads, 0, stream>>>(args);
}

void launch_portable(const GemmArgs& args, cudaStream_t stream) {
  const int64_t n_tiles = ceil_div(args.N, kBlockN);
  int64_t m_slots = 0, z = 1;
  switch (args.layout) {
    case GemmLayout::dense: m_slots = ceil_div(args.M, kBlockM); break;
    case GemmLayout::contiguous: m_slots = ceil_div(args.M, kBlockM) + args.G; break;
    case GemmLayout::masked: m_slots = ceil_div(args.M, kBlockM); z = args.G; break;
  }
  if (m_slots == 0 || z == 0 || n_tiles == 0) return;
  LK_CHECK(n_tiles <= 65535, "fp8_gemm: N too large (at most 65535 x 64 columns)");
  LK_CHECK(m_slots < (int64_t(1) << 31), "fp8_gemm: too many rows for one launch");
  LK_CHECK(z <= 65535, "fp8_gemm: at most 65535 groups");
  const dim3 grid{unsigned(m_slots), unsigned(n_tiles), unsigned(z)};
  const bool vec = args.K % 16 == 0 && reinterpret_cast<uintptr_t>(args.a) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(args.b) % 16 == 0;
  if (vec) launch_portable_out<true>(args, grid, stream);
  else launch_portable_out<false>(args, grid, stream);
  LK_CUDA_LAUNCH_CHECK("fp8_gemm");
}

}  // namespace

void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b,
              const float* b_scale, const int32_t* groups, int64_t num_groups, int64_t M,
              int64_t N, int64_t K, void* out, DType out_dtype, int device, void* stream) {
  LK_CHECK(M >= 0 && N >= 0 && K >= 0 && num_groups >= 0, "negative size");
  LK_CHECK(out_dtype == DType::f32 || out_dtype == DType::bf16, "out dtype must be f32 or bf16");
  LK_CHECK(layout == GemmLayout::dense || groups != nullptr, "grouped layouts need group sizes");
  LK_CHECK(layout != GemmLayout::dense || num_groups == 1, "dense layout has one group");
  if (M == 0 || N == 0 || num_groups == 0) return;
  DeviceGuard guard(device);
  const size_t pair_bytes = out_dtype == DType::f32 ? 8 : 4;
  const bool pair_stores = N % 2 == 0 && reinterpret_cast<uintptr_t>(out) % pair_bytes == 0;
  const GemmArgs args{layout, a, a_scale, b, b_scale, groups, num_groups, M, N, K, out, out_dtype, pair_stores};
  cudaStream_t s = as_stream(stream);
  int major = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
  if (major == 9 && dispatch_sm90(args, device, s)) return;
  launch_portable(args, s);
}

}  // namespace lk::cuda
