// Host/device logic of the Hopper FP8 GEMM (csrc/cuda/sm90_fp8_gemm.cu) that needs no GPU:
// the tile-shape heuristic, the per-group row ranges, and the persistent scheduler's mapping
// tile index -> (group, m_block, n_block). The kernel and the CPU binding (for unit tests,
// csrc/bindings/gemm_sched.cpp) call the same functions, so the tests check what runs.
//
// Tile space. Every group g has rows [row_begin(g), row_end(g)) (dense: one group [0, M);
// contiguous: expert e owns [offs[e-1], offs[e]); masked: [0, masked_m[e]) inside expert e's
// M_max rows) cut into ceil(rows / BLOCK_M) m-blocks; the m-blocks of all groups are
// concatenated (mblock_prefix[g] = m-blocks before group g) into one virtual column of
// total_m = mblock_prefix[G] blocks, times num_n = ceil(N / BLOCK_N) n-blocks. A tile never
// spans two groups: the last m-block of a group is partial and its extra rows are masked.
//
// Rasterisation (L2 reuse). Tiles are numbered band by band: a band is `band` consecutive
// n-blocks (the last band may be narrower); inside a band the index runs along N fastest,
// then down the m-blocks. A wave of num_sms consecutive tiles therefore touches `band`
// n-blocks of B and about num_sms / band m-blocks of A, both small enough to stay in L2 while
// the wave runs, and B's band stays hot for every group's rows before the next band starts.
// Persistent CTA b runs tiles b, b + grid, b + 2 grid, ... (grid = #SMs), so consecutive
// tiles run concurrently on different SMs.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "common/common.h"

namespace lk::sched {

enum class GemmLayoutKind : int { dense = 0, contiguous = 1, masked = 2 };

// One compiled kernel configuration. The math warpgroups (each a 64 x block_n/wg_split_n
// wgmma tile) cover the CTA tile as (block_m / 64) x wg_split_n.
struct Sm90GemmConfig {
  int block_m;      // 64 or 128
  int block_n;      // multiple of 32, <= 256
  int num_math_wg;  // 1 or 2 consumer warpgroups (+1 TMA producer warpgroup)
  int wg_split_n;   // 1: warpgroups stacked along M; 2: side by side along N
};

// The configurations sm90_fp8_gemm.cu instantiates (keep the two lists in sync; a test checks
// that every one is reachable). Per-warpgroup N stays <= 160 so that the wgmma accumulator
// plus the promoted fp32 accumulator (N/2 + N/2 registers per thread) fit in 232 registers.
constexpr int kSm90NumConfigs = 8;
LK_HD Sm90GemmConfig sm90_config(int i) {
  constexpr Sm90GemmConfig table[kSm90NumConfigs] = {
      {64, 32, 1, 1},  {64, 64, 1, 1},  {64, 128, 1, 1},  {64, 256, 2, 2},
      {128, 64, 2, 1}, {128, 96, 2, 1}, {128, 128, 2, 1}, {128, 160, 2, 1},
  };
  return table[i];
}

// ceil(a / b) for b > 0. Written so that it cannot overflow near INT64_MAX (a + b - 1 did); the
// same value as (a + b - 1) / b wherever that did not overflow, a <= 0 included.
LK_HD int64_t cdiv64(int64_t a, int64_t b) { return a > 0 ? (a - 1) / b + 1 : (a + b - 1) / b; }

// Sizes the host-side helpers below accept: M, N and num_groups below 2^31, and below 2^31 rows
// in all for the masked layout (M * num_groups). The kernel's own limits (fp8_gemm_supported)
// are tighter. Within these, every count below fits int64 for any block size >= 1: m-blocks
// < 2^32, n-blocks < 2^31, tiles < 2^63. Larger sizes would overflow them (undefined
// behaviour), so they throw ArgError naming the argument (a ValueError in Python). Host only.
constexpr int64_t kSm90SizeLimit = int64_t(1) << 31;  // exclusive
inline void sm90_check_sizes(const char* who, GemmLayoutKind layout, int64_t M, int64_t N, int64_t num_groups) {
  auto fail = [&](const std::string& what) { throw ArgError(std::string("leankernels: ") + who + ": " + what); };
  if (M < 0 || M >= kSm90SizeLimit) fail("M must be in [0, 2^31); got " + std::to_string(M));
  if (N < 1 || N >= kSm90SizeLimit) fail("N must be in [1, 2^31); got " + std::to_string(N));
  if (num_groups < 1 || num_groups >= kSm90SizeLimit)
    fail("num_groups must be in [1, 2^31); got " + std::to_string(num_groups));
  if (layout == GemmLayoutKind::masked && M * num_groups >= kSm90SizeLimit)
    fail("M * num_groups (the masked layout's rows) must be below 2^31; got M=" + std::to_string(M) +
         ", num_groups=" + std::to_string(num_groups));
}

// Upper bound of the m-blocks a problem has before the device knows the group sizes:
// dense ceil(M/BM); contiguous ceil(M/BM) plus one partial block per expert boundary;
// masked E * ceil(M_max/BM) (every expert full). Sizes as sm90_check_sizes accepts.
inline int64_t sm90_mblocks_bound(GemmLayoutKind layout, int64_t M, int64_t num_groups, int block_m) {
  if (layout == GemmLayoutKind::contiguous) return cdiv64(M, block_m) + (num_groups - 1);
  if (layout == GemmLayoutKind::masked) return num_groups * cdiv64(M, block_m);
  return cdiv64(M, block_m);
}

// Tile heuristic. Model of one SM per 128-wide K step of a BLOCK_M x BLOCK_N tile:
//   math  = BM * BN * 128 MACs / 4096 MAC/clk  (H100 dense FP8: ~1979 TFLOP/s over 132 SMs)
//   loads = (BM + BN) * 128 bytes / 64 B/clk   (assumed L2 -> SM rate with the band reuse)
//   step  = max(math, loads)
// The problem costs waves * step, waves = ceil(tiles / num_sms): small problems prefer tiles
// that fill every SM, large ones prefer big tiles (fewer bytes per FLOP). Ties go to the
// larger tile (fewer tiles, less scheduling and epilogue overhead). Not yet measured on a GPU.
inline Sm90GemmConfig sm90_pick_config(GemmLayoutKind layout, int64_t M, int64_t N, int64_t K, int64_t num_groups,
                                       int num_sms) {
  (void)K;  // every tile runs the same K steps: K scales all candidates alike
  sm90_check_sizes("sm90_pick_config", layout, M, N, num_groups);
  Sm90GemmConfig best = sm90_config(0);
  double best_cost = -1;
  int64_t best_tiles = 0;
  for (int i = 0; i < kSm90NumConfigs; ++i) {
    Sm90GemmConfig c = sm90_config(i);
    int64_t tiles = sm90_mblocks_bound(layout, M, num_groups, c.block_m) * cdiv64(N, c.block_n);
    int64_t waves = cdiv64(tiles, num_sms > 0 ? num_sms : 1);
    double math = double(c.block_m) * c.block_n / 32.0;
    double loads = double(c.block_m + c.block_n) * 128.0 / 64.0;
    double cost = double(waves) * (math > loads ? math : loads);
    if (best_cost < 0 || cost < best_cost || (cost == best_cost && tiles < best_tiles)) {
      best = c;
      best_cost = cost;
      best_tiles = tiles;
    }
  }
  return best;
}

// Band width in n-blocks: about sqrt(num_sms * BM / BN), which balances the A rows and B
// columns one wave touches (num_sms/band * BM vs band * BN rows of K bytes each).
// (Clamped in int64 before narrowing: the rounded root reaches 2^31 for absurd block shapes.)
inline int sm90_band_width(int num_sms, int block_m, int block_n, int64_t num_n_blocks) {
  int64_t band = std::llround(std::sqrt(double(num_sms) * block_m / block_n));
  if (band < 1) band = 1;
  if (band > num_n_blocks) band = num_n_blocks;
  return band < 1 ? 1 : int(band);
}

// Rows of group g: [begin, end) in the group's own row numbering, and the row of the A / out
// 2D views (masked: [E * M_max, *]) where that numbering starts.
struct GroupRows {
  int64_t begin;
  int64_t end;
  int64_t base;
};

// The end row of group g from the raw device value (offs[g] or masked_m[g]), clamped so that a
// bad value can never address memory outside a / out.
LK_HD int64_t group_end(GemmLayoutKind layout, int64_t M, int32_t info_g) {
  if (layout == GemmLayoutKind::dense) return M;
  int64_t v = info_g < 0 ? 0 : int64_t(info_g);
  return v > M ? M : v;
}

// begin/end of group g given the clamped end rows of g and g-1 (contiguous groups start where
// the previous one ended; an end below its begin means an empty group). Contiguous callers pass
// the running maximum of the clamped ends (the kernel's group table), so that row r belongs to
// the first group whose end exceeds r, as in reference.fp8_grouped_gemm, even for bad offs.
LK_HD GroupRows group_rows(GemmLayoutKind layout, int64_t M, int g, int64_t end_g, int64_t end_prev) {
  GroupRows r;
  if (layout == GemmLayoutKind::contiguous) {
    r.begin = g == 0 ? 0 : end_prev;
    r.end = end_g < r.begin ? r.begin : end_g;
    r.base = 0;
  } else {
    r.begin = 0;
    r.end = end_g;
    r.base = layout == GemmLayoutKind::masked ? int64_t(g) * M : 0;
  }
  return r;
}

LK_HD int mblocks_of(const GroupRows& r, int block_m) { return int((r.end - r.begin + block_m - 1) / block_m); }

struct TileCoord {
  int group;
  int m_block;  // inside the group
  int n_block;
};

// Banded rasterisation of tile t over total_m x num_n blocks -> (virtual m-block, n-block).
LK_HD void raster_tile(int t, int total_m, int num_n, int band, int& m, int& n) {
  int per_band = band * total_m;
  int b = t / per_band;
  int n_first = b * band;
  int width = num_n - n_first < band ? num_n - n_first : band;
  int i = t - b * per_band;
  m = i / width;
  n = n_first + (i - m * width);
}

// Group of virtual m-block m: the unique g with prefix[g] <= m < prefix[g + 1] (empty groups
// have prefix[g] == prefix[g + 1] and are never returned). prefix has num_groups + 1 entries.
LK_HD int group_of_mblock(const int* prefix, int num_groups, int m) {
  int lo = 0, hi = num_groups;  // invariant: prefix[lo] <= m, and hi == G or prefix[hi] > m
  while (hi - lo > 1) {
    int mid = (lo + hi) / 2;
    if (prefix[mid] <= m)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

LK_HD TileCoord tile_coord(int t, const int* prefix, int num_groups, int num_n, int band) {
  int m, n;
  raster_tile(t, prefix[num_groups], num_n, band, m, n);
  TileCoord c;
  c.group = group_of_mblock(prefix, num_groups, m);
  c.m_block = m - prefix[c.group];
  c.n_block = n;
  return c;
}

// Persistent grid: one CTA per SM, fewer when the problem has fewer tiles even at its
// largest (the grouped layouts' real tile count is only known on the device).
inline int sm90_grid(GemmLayoutKind layout, int64_t M, int64_t N, int64_t num_groups, Sm90GemmConfig c,
                     int num_sms) {
  sm90_check_sizes("sm90_grid", layout, M, N, num_groups);
  int64_t bound = sm90_mblocks_bound(layout, M, num_groups, c.block_m) * cdiv64(N, c.block_n);
  int64_t grid = bound < num_sms ? bound : num_sms;
  return grid < 1 ? 1 : int(grid);
}

}  // namespace lk::sched
