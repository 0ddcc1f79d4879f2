// Hopper FP8 block-scaled GEMM (sm_90a): out[M, N] = a[M, K] @ b[N, K]^T, e4m3 inputs with
// 1x128 (a) and 128x128 (b) fp32 scales, fp32 accumulation, bf16 or fp32 output; dense,
// grouped-contiguous (offs) and grouped-masked (masked_m) layouts.
//
// Design note
// - Work split: one persistent CTA per SM (grid = #SMs) walks output tiles t = blockIdx.x,
//   + gridDim.x, ... in the banded order of common/gemm_sched.h. Each CTA has one producer
//   warpgroup (one thread issues every TMA load; setmaxnreg drops it to 40 registers) and 1 or 2
//   consumer warpgroups (setmaxnreg raises them to 232), each computing a 64 x WG_N sub-tile
//   with wgmma m64nWG_Nk32 (e4m3 x e4m3 -> fp32, A and B from 128B-swizzled shared memory).
// - Pipeline: a ring of S >= 3 stages (as many as fit in 227 KB), each holding the A tile
//   [BLOCK_M x 128] and the B tile [BLOCK_N x 128] of one 128-wide K step, guarded by a full
//   barrier (TMA transaction bytes) and an empty barrier (one arrival per consumer warp).
//   The producer runs ahead across tile boundaries, so the next tile's loads overlap this
//   tile's epilogue.
// - Scales (DeepSeek's promotion): every K step is accumulated by 4 wgmma into a fresh fp32
//   accumulator, which the CUDA cores add into the tile accumulator times a_scale[m, kb] *
//   b_scale[nb, kb]; the two warpgroups interleave so the tensor cores stay busy during the
//   other's promotion. Scales are read straight from global memory (L1/L2 hits) one K step
//   ahead into registers, so their latency hides behind the current step. A partial last K step is zero-filled by
//   TMA, which contributes nothing to the product. A tile N-range spans at most two 128-wide
//   weight-scale blocks (checked by static_assert on the compiled widths).
// - Epilogue: accumulators -> bf16/fp32 into a swizzled staging buffer per warpgroup (32-column
//   chunks: 64B swizzle for bf16, 128B for fp32, so the fragment writes are bank-conflict
//   free), then one thread TMA-stores each 64 x 32 chunk (N and the tensor end clip it).
//   Grouped layouts: a tile never covers two groups' rows in its computation, but its box can
//   extend past its group's last row into the next expert's rows (contiguous) or into rows
//   >= masked_m (masked). Those boundary sub-tiles are written with plain 16-byte stores under
//   a row mask instead of TMA (choice: simpler than per-expert tensor maps and costs one partial
//   tile per expert); full sub-tiles, and dense tiles clipped at the tensor end, use TMA.
// - Scheduler: dense has one group; grouped layouts read offs / masked_m on the device at
//   kernel start (no host sync): each CTA clamps them into shared memory and warp 0 scans the
//   per-group m-block counts; tile -> (group, m_block, n_block) by binary search (gemm_sched.h).
// - Traffic and bound, per CTA tile and K step: (BM + BN) * 128 bytes in, 2 * BM * BN * 128
//   FLOPs; BM = BN = 128 gives 64 FLOP/byte from L2, above the H100 FP8 ridge from HBM (~590
//   FLOP/byte at 1979 TFLOP/s / 3.35 TB/s) only thanks to the banded L2 reuse. Large shapes
//   should be tensor-core bound (target >= 1300 TFLOP/s grouped); M = 64/128 decode shapes are
//   bound by reading b once (N * K bytes at ~3 TB/s).
// - Measured: not yet measured on a GPU (written without one; compiled for sm_90a and its SASS
//   checked for QGMMA / UTMALDG by tests/test_sass.py).
// - To do on a GPU, in order: tests/test_gemm_sm90.py (every config, all layouts), the
//   compute-sanitizer recipe in its docstring, bench/bench_gemm_sm90.py; then tune the
//   heuristic constants (gemm_sched.h), the band width, and consider TMA multicast over a
//   2-CTA cluster, loading scales by TMA, and overlapping the promotion with the next wgmma.
#include "cuda/sm90_fp8_gemm.cuh"

#include <cuda.h>  // CUtensorMap and driver enums: types only, libcuda is never linked
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <mutex>

#include "common/common.h"
#include "common/gemm_sched.h"
#include "cuda/launch.cuh"
#include "cuda/sm90/mbarrier.cuh"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/wgmma.cuh"

namespace lk::cuda::sm90 {
namespace {

using sched::GemmLayoutKind;
static_assert(int(GemmLayout::dense) == int(GemmLayoutKind::dense) &&
                  int(GemmLayout::contiguous) == int(GemmLayoutKind::contiguous) &&
                  int(GemmLayout::masked) == int(GemmLayoutKind::masked),
              "GemmLayout and sched::GemmLayoutKind must agree");

constexpr int kBlockK = 128;        // one scale block along K = one pipeline stage
constexpr int kMaxGroups = 512;     // experts per launch (shared-memory group table)
constexpr int kSmemLimit = 232448;  // 227 KB: the opt-in dynamic shared memory of H100/H200
constexpr int kStoreCols = 32;      // epilogue chunk width = TMA store box inner dim
constexpr int kMaxStages = 8;

struct Params {
  const float* a_scale;
  const float* b_scale;
  void* out;
  const int32_t* group_info;
  int M;  // dense/contiguous rows of a; masked M_max
  int N;
  int num_groups;
  int layout;    // GemmLayoutKind
  int out_rows;  // rows of the a / out 2D views (masked: E * M_max)
  int kb_count;  // ceil(K / 128)
  int nb_count;  // ceil(N / 128): b_scale rows per group
  int band;      // rasterisation band width in n-blocks
};

template <int BM, int BN, int NUM_MATH_WG, int SPLIT_N, bool OUT_F32>
struct Cfg {
  static constexpr int kThreads = 128 * (NUM_MATH_WG + 1);
  static constexpr int kWgN = BN / SPLIT_N;  // N of one warpgroup's wgmma tile
  static_assert(BM == 64 || BM == 128, "BLOCK_M is 64 or 128");
  static_assert((BM / 64) * SPLIT_N == NUM_MATH_WG, "warpgroups must tile the CTA tile exactly");
  static_assert(kWgN % kStoreCols == 0, "per-warpgroup N must be a multiple of the store chunk");
  static_assert(kWgN <= 160, "wgmma + promoted accumulators (kWgN registers) must fit in 232");
  // n0 % 128 is a multiple of 32 (all compiled widths are), so a warpgroup's N range spans at
  // most two 128-wide scale blocks when 96 + kWgN <= 256.
  static_assert(kWgN <= 128 || kWgN == 160, "at most two weight-scale blocks per warpgroup tile");
  static constexpr int kAccum = kWgN / 2;
  static constexpr int kABytes = BM * kBlockK;
  static constexpr int kBBytes = BN * kBlockK;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "128B-swizzled tiles need 1024 B alignment");
  static constexpr int kOutElt = OUT_F32 ? 4 : 2;
  static constexpr int kRowBytes = kStoreCols * kOutElt;  // 64 (bf16, 64B swizzle) or 128 (fp32)
  static constexpr int kChunkBytes = 64 * kRowBytes;
  static constexpr int kChunks = kWgN / kStoreCols;
  static constexpr int kOutBytes = NUM_MATH_WG * kChunks * kChunkBytes;
  static constexpr int kGroupBytes = (2 * kMaxGroups + 2) * 4;
  static constexpr int kBarBytes = 2 * kMaxStages * 8;
  static constexpr int kFixedBytes = 1024 /*alignment slack*/ + kOutBytes + kBarBytes + kGroupBytes;
  static constexpr int kFitStages = (kSmemLimit - kFixedBytes) / kStageBytes;
  static constexpr int kStages = kFitStages < kMaxStages ? kFitStages : kMaxStages;
  static_assert(kStages >= 3, "the pipeline needs at least 3 stages");
  static constexpr int kSmemBytes = kFixedBytes + kStages * kStageBytes;
  static constexpr int kTxBytes = kStageBytes;  // TMA counts zero-filled OOB bytes too
};

// Byte offset of (row, byte) in a 64-row staging chunk as TMA's 64B / 128B swizzle lays it
// out: the 16-byte unit index (bits 4..) is XORed with bits 7.. of the linear offset.
template <int kRowBytes>
__device__ __forceinline__ int swizzled(int row, int byte) {
  int off = row * kRowBytes + byte;
  constexpr int kMask = kRowBytes == 128 ? 7 : 3;
  return off ^ (((off >> 7) & kMask) << 4);
}

template <int BM, int BN, int NUM_MATH_WG, int SPLIT_N, bool OUT_F32>
__global__ void __launch_bounds__(128 * (NUM_MATH_WG + 1), 1)
    sm90_fp8_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                         const __grid_constant__ CUtensorMap map_out, const Params p) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<BM, BN, NUM_MATH_WG, SPLIT_N, OUT_F32>;
  constexpr int S = C::kStages;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem_a + S * C::kABytes;
  uint8_t* smem_out = smem_b + S * C::kBBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_out + C::kOutBytes);
  uint64_t* empty = full + kMaxStages;
  int* group_end_s = reinterpret_cast<int*>(empty + kMaxStages);
  int* prefix_s = group_end_s + kMaxGroups;  // kMaxGroups + 1 entries

  const int tid = threadIdx.x;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform role index
  const GemmLayoutKind layout = GemmLayoutKind(p.layout);
  const int G = p.num_groups;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 4 * NUM_MATH_WG);
    }
    mbar_fence_init();
  }
  if (tid == NUM_MATH_WG * 128) {
    tma_prefetch_map(&map_a);
    tma_prefetch_map(&map_b);
    tma_prefetch_map(&map_out);
  }
  // Group table: clamped end rows, then warp 0 scans the m-block counts (chunk per lane).
  for (int g = tid; g < G; g += C::kThreads)
    group_end_s[g] = int(sched::group_end(layout, p.M, p.group_info ? p.group_info[g] : 0));
  __syncthreads();
  if (tid < 32) {
    const int per = (G + 31) / 32;
    const int g0 = tid * per;
    const int g1 = g0 + per < G ? g0 + per : G;
    if (layout == GemmLayoutKind::contiguous) {
      // Running maximum of the ends: row r belongs to the first expert whose end exceeds r
      // (reference.fp8_grouped_gemm), so unchecked decreasing offs never give a row to two
      // experts (two tiles racing on the same output rows). No-op for valid offs.
      int run = 0;
      for (int g = g0; g < g1; ++g) run = run > group_end_s[g] ? run : group_end_s[g];
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int v = __shfl_up_sync(0xffffffffu, run, d);
        if (tid >= d) run = run > v ? run : v;
      }
      run = __shfl_up_sync(0xffffffffu, run, 1);
      if (tid == 0) run = 0;
      for (int g = g0; g < g1; ++g) {
        run = run > group_end_s[g] ? run : group_end_s[g];
        group_end_s[g] = run;
      }
      __syncwarp();
    }
    int count = 0;
    for (int g = g0; g < g1; ++g)
      count += sched::mblocks_of(sched::group_rows(layout, p.M, g, group_end_s[g], g ? group_end_s[g - 1] : 0), BM);
    int incl = count;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (tid >= d) incl += v;
    }
    int run = incl - count;
    for (int g = g0; g < g1; ++g) {
      prefix_s[g] = run;
      run += sched::mblocks_of(sched::group_rows(layout, p.M, g, group_end_s[g], g ? group_end_s[g - 1] : 0), BM);
    }
    if (tid == 31) prefix_s[G] = incl;
  }
  __syncthreads();

  const int num_n = (p.N + BN - 1) / BN;
  const int total_tiles = prefix_s[G] * num_n;
  const int KB = p.kb_count;

  if (wg == NUM_MATH_WG) {
    // ---------------------------------------------------------------- TMA producer
    // NOTES: a whole warpgroup because setmaxnreg acts per warpgroup; one thread issues.
    if constexpr (NUM_MATH_WG == 2) setmaxnreg_dec<40>();
    if (tid == NUM_MATH_WG * 128) {
      int it = 0;
      for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
        const sched::TileCoord c = sched::tile_coord(t, prefix_s, G, num_n, p.band);
        const sched::GroupRows r = sched::group_rows(layout, p.M, c.group, group_end_s[c.group],
                                                     c.group ? group_end_s[c.group - 1] : 0);
        const int a_row = int(r.base + r.begin) + c.m_block * BM;
        const int b_row = c.group * p.N + c.n_block * BN;
        for (int kb = 0; kb < KB; ++kb, ++it) {
          const int s = it % S;
          mbar_wait(&empty[s], ((it / S) & 1) ^ 1);
          mbar_arrive_expect_tx(&full[s], C::kTxBytes);
          tma_load_2d(smem_a + s * C::kABytes, &map_a, &full[s], kb * kBlockK, a_row);
          tma_load_2d(smem_b + s * C::kBBytes, &map_b, &full[s], kb * kBlockK, b_row);
        }
      }
    }
  } else {
    // ---------------------------------------------------------------- wgmma consumers
    if constexpr (NUM_MATH_WG == 2) setmaxnreg_inc<232>();
    const int wg_m = SPLIT_N == 1 ? wg : 0;
    const int wg_n = SPLIT_N == 1 ? 0 : wg;
    const int lt = tid % 128;
    const int warp = lt / 32;
    const int lane = lt % 32;
    uint8_t* stage_out = smem_out + wg * C::kChunks * C::kChunkBytes;
    float acc[C::kAccum];
    float fin[C::kAccum];
#pragma unroll
    for (int i = 0; i < C::kAccum; ++i) acc[i] = 0.f;
    int it = 0;
    for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
      const sched::TileCoord c = sched::tile_coord(t, prefix_s, G, num_n, p.band);
      const sched::GroupRows r = sched::group_rows(layout, p.M, c.group, group_end_s[c.group],
                                                   c.group ? group_end_s[c.group - 1] : 0);
      const int m_local = int(r.begin) + c.m_block * BM + wg_m * 64;  // group row numbering
      int rows_valid = int(r.end) - m_local;                          // rows this warpgroup owns
      rows_valid = rows_valid < 0 ? 0 : (rows_valid > 64 ? 64 : rows_valid);
      const int row0 = int(r.base) + m_local;  // row in the a / out 2D views
      const int n0 = c.n_block * BN + wg_n * C::kWgN;

      // This thread's accumulator rows (warp*16 + lane/4, +8), clamped inside a_scale.
      int ra = row0 + warp * 16 + lane / 4;
      int rb = ra + 8;
      ra = ra < p.out_rows ? ra : p.out_rows - 1;
      rb = rb < p.out_rows ? rb : p.out_rows - 1;
      const float* sa0 = p.a_scale + int64_t(ra) * KB;
      const float* sa1 = p.a_scale + int64_t(rb) * KB;
      int nb_lo = n0 / 128;
      int nb_hi = nb_lo + 1;
      nb_lo = nb_lo < p.nb_count ? nb_lo : p.nb_count - 1;
      nb_hi = nb_hi < p.nb_count ? nb_hi : p.nb_count - 1;
      const float* sb_lo = p.b_scale + (int64_t(c.group) * p.nb_count + nb_lo) * KB;
      const float* sb_hi = p.b_scale + (int64_t(c.group) * p.nb_count + nb_hi) * KB;
      const int n_in_block = n0 % 128;

#pragma unroll
      for (int i = 0; i < C::kAccum; ++i) fin[i] = 0.f;

      // Scales of K step kb + 1 are loaded while step kb runs (registers, one step ahead).
      float na0 = __ldg(sa0), na1 = __ldg(sa1), nb_l = __ldg(sb_lo), nb_h = __ldg(sb_hi);
      for (int kb = 0; kb < KB; ++kb, ++it) {
        const float a0 = na0, a1 = na1, b_lo = nb_l, b_hi = nb_h;
        if (kb + 1 < KB) {
          na0 = __ldg(sa0 + kb + 1);
          na1 = __ldg(sa1 + kb + 1);
          nb_l = __ldg(sb_lo + kb + 1);
          nb_h = __ldg(sb_hi + kb + 1);
        }
        const int s = it % S;
        mbar_wait(&full[s], (it / S) & 1);
#pragma unroll
        for (int i = 0; i < C::kAccum; ++i) reg_fence(acc[i]);
        wgmma_fence();
        const uint64_t da = smem_desc_k128_sw128(smem_a + s * C::kABytes + wg_m * 64 * kBlockK);
        const uint64_t db = smem_desc_k128_sw128(smem_b + s * C::kBBytes + wg_n * C::kWgN * kBlockK);
#pragma unroll
        for (int k = 0; k < kBlockK / 32; ++k)  // 32 fp8 = 32 bytes = 2 descriptor units
          WgmmaFp8<C::kWgN>::mma(da + 2 * k, db + 2 * k, acc, k > 0);
        wgmma_commit();
#pragma unroll
        for (int i = 0; i < C::kAccum; ++i) reg_fence(acc[i]);
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < C::kAccum; ++i) reg_fence(acc[i]);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[s]);  // this warp no longer reads stage s

        const float s00 = a0 * b_lo, s01 = a0 * b_hi, s10 = a1 * b_lo, s11 = a1 * b_hi;
#pragma unroll
        for (int j = 0; j < C::kWgN / 8; ++j) {
          const bool hi = n_in_block + 8 * j >= 128;
          const float sr0 = hi ? s01 : s00;
          const float sr1 = hi ? s11 : s10;
          fin[4 * j + 0] += sr0 * acc[4 * j + 0];
          fin[4 * j + 1] += sr0 * acc[4 * j + 1];
          fin[4 * j + 2] += sr1 * acc[4 * j + 2];
          fin[4 * j + 3] += sr1 * acc[4 * j + 3];
        }
      }

      // ---------------------------------------------------------------- epilogue
      if (rows_valid > 0) {
        const uint32_t bar_id = 1 + wg;
        if (lt == 0) tma_store_wait_read<0>();  // the previous tile's stores left the buffer
        named_barrier_sync(bar_id, 128);
        const int row_a = warp * 16 + lane / 4;
#pragma unroll
        for (int j = 0; j < C::kWgN / 8; ++j) {
          uint8_t* chunk = stage_out + (j / 4) * C::kChunkBytes;
          const int col = 8 * (j % 4) + 2 * (lane % 4);  // column inside the 32-wide chunk
          if constexpr (OUT_F32) {
            *reinterpret_cast<float2*>(chunk + swizzled<C::kRowBytes>(row_a, col * 4)) =
                make_float2(fin[4 * j + 0], fin[4 * j + 1]);
            *reinterpret_cast<float2*>(chunk + swizzled<C::kRowBytes>(row_a + 8, col * 4)) =
                make_float2(fin[4 * j + 2], fin[4 * j + 3]);
          } else {
            // round-to-nearest-even, two values per cvt.rn.bf16x2.f32
            *reinterpret_cast<__nv_bfloat162*>(chunk + swizzled<C::kRowBytes>(row_a, col * 2)) =
                __floats2bfloat162_rn(fin[4 * j + 0], fin[4 * j + 1]);
            *reinterpret_cast<__nv_bfloat162*>(chunk + swizzled<C::kRowBytes>(row_a + 8, col * 2)) =
                __floats2bfloat162_rn(fin[4 * j + 2], fin[4 * j + 3]);
          }
        }
        fence_proxy_async_smem();  // st.shared above -> TMA store reads below
        named_barrier_sync(bar_id, 128);
        // Full sub-tiles, or one ending exactly at the tensor's last row (TMA clips there):
        // TMA store. A sub-tile whose box would reach another group's rows: masked stores.
        if (rows_valid == 64 || row0 + rows_valid == p.out_rows) {
          if (lt == 0) {
#pragma unroll
            for (int ch = 0; ch < C::kChunks; ++ch)
              if (n0 + ch * kStoreCols < p.N) tma_store_2d(&map_out, stage_out + ch * C::kChunkBytes, n0 + ch * kStoreCols, row0);
            tma_store_commit();
          }
        } else {
          constexpr int kVecPerRow = C::kRowBytes / 16;
          constexpr int kVecElems = 16 / C::kOutElt;
          uint8_t* out = static_cast<uint8_t*>(p.out);
          for (int idx = lt; idx < C::kChunks * 64 * kVecPerRow; idx += 128) {
            const int ch = idx / (64 * kVecPerRow);
            const int rem = idx - ch * 64 * kVecPerRow;
            const int row = rem / kVecPerRow;
            const int v = rem - row * kVecPerRow;
            const int col = n0 + ch * kStoreCols + v * kVecElems;
            if (row < rows_valid && col < p.N) {
              const uint4 val =
                  *reinterpret_cast<const uint4*>(stage_out + ch * C::kChunkBytes + swizzled<C::kRowBytes>(row, v * 16));
              *reinterpret_cast<uint4*>(out + ((int64_t(row0) + row) * p.N + col) * C::kOutElt) = val;
            }
          }
        }
      }
    }
    if (lt == 0) tma_store_wait<0>();  // stores complete before the block (and its smem) ends
  }
#elif defined(__CUDA_ARCH__)
  // NOTES: wgmma, setmaxnreg and the TMA paths exist only on sm_90a: compiled for any other
  // arch (plain sm_90 included) this kernel would be empty and write nothing. Refuse to build.
  static_assert(BM < 0, "sm90_fp8_gemm.cu must be compiled for sm_90a only (arch=compute_90a,code=sm_90a)");
#endif
}

// ---------------------------------------------------------------- host side

// cuTensorMapEncodeTiled through the runtime's driver entry point: no -lcuda at link time,
// so `import leankernels` works on machines without a driver.
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (q != cudaDriverEntryPointSuccess || f == nullptr)
      throw std::runtime_error("leankernels: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Row-major 2D tensor [outer, inner] (inner contiguous) read/written in boxes [box_outer, box_inner].
CUtensorMap make_map_2d(CUtensorMapDataType dtype, const void* ptr, uint64_t inner, uint64_t outer,
                        uint64_t row_bytes, uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  cuuint64_t dims[2] = {inner, outer};
  cuuint64_t strides[1] = {row_bytes};
  cuuint32_t box[2] = {box_inner, box_outer};
  cuuint32_t elem_strides[2] = {1, 1};
  CUresult r = encode_tiled()(&map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("leankernels: cuTensorMapEncodeTiled failed (error " + std::to_string(int(r)) + ")");
  return map;
}

struct Problem {
  GemmLayoutKind layout;
  const uint8_t* a;
  const uint8_t* b;
  void* out;
  Params p;
  int64_t K;
  int grid;
};

template <int BM, int BN, int NUM_MATH_WG, int SPLIT_N, bool OUT_F32>
void launch(const Problem& pr, int device, cudaStream_t stream) {
  using C = Cfg<BM, BN, NUM_MATH_WG, SPLIT_N, OUT_F32>;
  auto kernel = sm90_fp8_gemm_kernel<BM, BN, NUM_MATH_WG, SPLIT_N, OUT_F32>;
  static std::once_flag attr_once[64];
  std::call_once(attr_once[device & 63], [&] {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes),
          "cudaFuncSetAttribute(sm90_fp8_gemm)");
  });
  const Params& p = pr.p;
  const uint64_t rows_b = uint64_t(p.num_groups) * p.N;
  CUtensorMap map_a = make_map_2d(CU_TENSOR_MAP_DATA_TYPE_UINT8, pr.a, pr.K, p.out_rows, pr.K, kBlockK, BM,
                                  CU_TENSOR_MAP_SWIZZLE_128B);
  CUtensorMap map_b = make_map_2d(CU_TENSOR_MAP_DATA_TYPE_UINT8, pr.b, pr.K, rows_b, pr.K, kBlockK, BN,
                                  CU_TENSOR_MAP_SWIZZLE_128B);
  CUtensorMap map_out =
      make_map_2d(OUT_F32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, pr.out, p.N,
                  p.out_rows, uint64_t(p.N) * C::kOutElt, kStoreCols, 64,
                  OUT_F32 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B);
  kernel<<<pr.grid, C::kThreads, C::kSmemBytes, stream>>>(map_a, map_b, map_out, p);
  LK_CUDA_LAUNCH_CHECK("sm90_fp8_gemm");
}

// Instantiates the table of sched::sm90_config (same order; checked below).
template <bool OUT_F32>
void launch_config(int index, const Problem& pr, int device, cudaStream_t stream) {
  switch (index) {
    case 0: return launch<64, 32, 1, 1, OUT_F32>(pr, device, stream);
    case 1: return launch<64, 64, 1, 1, OUT_F32>(pr, device, stream);
    case 2: return launch<64, 128, 1, 1, OUT_F32>(pr, device, stream);
    case 3: return launch<64, 256, 2, 2, OUT_F32>(pr, device, stream);
    case 4: return launch<128, 64, 2, 1, OUT_F32>(pr, device, stream);
    case 5: return launch<128, 96, 2, 1, OUT_F32>(pr, device, stream);
    case 6: return launch<128, 128, 2, 1, OUT_F32>(pr, device, stream);
    case 7: return launch<128, 160, 2, 1, OUT_F32>(pr, device, stream);
  }
  throw std::logic_error("leankernels: bad sm90 GEMM config index");
}
static_assert(sched::kSm90NumConfigs == 8, "launch_config must list every sched::sm90_config");

struct DeviceInfo {
  int num_sms = 0;
  bool is_sm90 = false;
};

DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  static std::once_flag once[64];
  DeviceInfo& d = cache[device & 63];
  std::call_once(once[device & 63], [&] {
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "compute capability");
    d.is_sm90 = major == 9 && minor == 0;
    d.num_sms = num_sms(device);
  });
  return d;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

bool fp8_gemm_supported(GemmLayout layout, int64_t M, int64_t N, int64_t K, bool out_fp32, const void* a,
                        const void* b, const void* out, int64_t num_groups) {
  (void)out_fp32;  // N % 8 == 0 keeps the bf16 and the fp32 output rows 16-byte aligned
  if (layout == GemmLayout::dense && num_groups != 1) return false;
  if (num_groups < 1 || num_groups > kMaxGroups) return false;
  if (M < 0 || N <= 0 || K <= 0) return false;
  if (K % 16 != 0 || N % 8 != 0) return false;  // TMA: global row strides are multiples of 16 B
  if (!aligned16(a) || !aligned16(b) || !aligned16(out)) return false;
  if (M >= INT_MAX || N >= INT_MAX || K >= INT_MAX) return false;  // first: the products below stay in int64
  const int64_t rows = layout == GemmLayout::masked ? M * num_groups : M;
  if (rows >= INT_MAX || N * num_groups >= INT_MAX || K >= INT_MAX) return false;
  const int64_t tiles = (sched::cdiv64(M, 64) + num_groups) * num_groups * sched::cdiv64(N, 32);
  return tiles < INT_MAX;
}

void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b, const float* b_scale,
              void* out, bool out_fp32, int64_t M, int64_t N, int64_t K, int64_t num_groups,
              const int32_t* group_info, int device, void* stream, int config_index) {
  LK_CHECK(config_index >= -1 && config_index < sched::kSm90NumConfigs, "sm90 fp8_gemm: bad config_index");
  LK_CHECK(fp8_gemm_supported(layout, M, N, K, out_fp32, a, b, out, num_groups),
           "sm90 fp8_gemm: unsupported problem (see fp8_gemm_supported)");
  LK_CHECK(layout == GemmLayout::dense || group_info != nullptr, "sm90 fp8_gemm: group_info is required");
  const int64_t rows = layout == GemmLayout::masked ? M * num_groups : M;
  if (rows == 0) return;
  DeviceGuard guard(device);
  const DeviceInfo info = device_info(device);
  if (!info.is_sm90) throw std::runtime_error("leankernels: the sm90 FP8 GEMM needs an sm_90 (Hopper) GPU");

  const auto kind = GemmLayoutKind(int(layout));
  int index = config_index;
  if (index < 0) {
    const sched::Sm90GemmConfig pick = sched::sm90_pick_config(kind, M, N, K, num_groups, info.num_sms);
    for (int i = 0; i < sched::kSm90NumConfigs; ++i) {
      const sched::Sm90GemmConfig c = sched::sm90_config(i);
      if (c.block_m == pick.block_m && c.block_n == pick.block_n) index = i;
    }
  }
  const sched::Sm90GemmConfig cfg = sched::sm90_config(index);
  const int64_t num_n = sched::cdiv64(N, cfg.block_n);

  Problem pr;
  pr.layout = kind;
  pr.a = a;
  pr.b = b;
  pr.out = out;
  pr.K = K;
  pr.grid = sched::sm90_grid(kind, M, N, num_groups, cfg, info.num_sms);
  Params& p = pr.p;
  p.a_scale = a_scale;
  p.b_scale = b_scale;
  p.out = out;
  p.group_info = layout == GemmLayout::dense ? nullptr : group_info;
  p.M = int(M);
  p.N = int(N);
  p.num_groups = int(num_groups);
  p.layout = int(kind);
  p.out_rows = int(rows);
  p.kb_count = int(sched::cdiv64(K, kBlockK));
  p.nb_count = int(sched::cdiv64(N, 128));
  p.band = sched::sm90_band_width(info.num_sms, cfg.block_m, cfg.block_n, num_n);

  cudaStream_t st = as_stream(stream);
  if (out_fp32)
    launch_config<true>(index, pr, device, st);
  else
    launch_config<false>(index, pr, device, st);
}

}  // namespace lk::cuda::sm90
