// FP8 (e4m3) block-scaled GEMM on the CPU: dense, grouped-contiguous and grouped-masked.
//
// What: out[r, n] = sum_kb (sum_{k in kb} a[r,k] * b[g,n,k]) * (a_scale[r,kb] * b_scale[g,n/128,kb])
// with each block sum in fp32 (e4m3 x e4m3 products are exact in fp32), one 128-wide K block
// at a time: exactly the contract of reference.fp8_gemm.
//
// Two kernels, chosen per weight group (segment) by its row count m:
//
// 1. Decode kernel (m <= decode_kernel_rows: 2-4 on amx, 8 avx512bf16, 12 avx512, 6 avx2, 16 elsewhere), vectorised
//    along K. At decode shapes (1-16 rows per expert) the GEMM is bound by reading its weights,
//    so the kernel's job is to decode each weight byte once, cheaply, and use it for all m rows.
//    Work items are (segment, ~64 KiB of weight rows) in memory order; each thread walks its
//    own contiguous share of them (one long stream for the hardware prefetcher), then takes
//    what is left of the others' shares. Weight rows are walked along K four at a time, each
//    load of a serving four weight rows: with K <= 4096 and 1-4 rows of a, one row from each
//    quarter of the item (decode_spread: four weight streams per thread, which the memory side
//    serves ~1.3x faster than one), else four adjacent rows (K > 4096: already four streams);
//    items that straddle a 128-row weight block with one row of a walk one row at a time,
//    the next weight rows prefetched (kPrefetchHint): each 128-wide block is decoded into
//    registers and used at once (m <= 4 on the zmm levels; 3-4 rows walk 2 weight rows at a
//    time) or decoded into a 4-block L1 panel that register tiles of 2 rows reuse. Lanes
//    of an accumulator are K positions; per block the partial sums are scaled lane-wise (see
//    "decode path" below for why that matches the reference), and one horizontal sum per
//    output remains at the end. a's rows are decoded once per call.
//    Per 64 weight bytes at one row the loop is 5 decode ops + 2 vdpbf16ps; Zen 4 retires
//    about one zmm op per cycle across its vector pipes, so a core decodes ~25-30 GB/s hot and
//    ~17-23 GB/s streaming from DRAM: the two cores of the development VM match its read rate
//    when that is 30-40 GB/s, not when it peaks at 50-54 GB/s.
//    Decode per CPU level: avx512bf16 e4m3 -> bf16 by two vpermt2b byte tables (exact) and
//    vdpbf16ps; avx512/avx2 e4m3 -> fp32 by bit moves (9 integer ops per vector of bytes, the
//    2^-120 offset folded into a and the scale, subnormals exact; avx2 moves two of them with
//    vpshufb), then FMAs (avx2: on rows of a already times their block scales, PreScaledA,
//    where the scales allow); generic a table.
//    Bound at V2-Lite T=1 (6 experts x N=2816 x K=2048, 34.6 MB fp8): the DRAM read of the
//    weights, ~1 ms at 37 GB/s on 2 Zen 4 cores; the decode costs ~12 vector ops per 64 bytes.
//
// 2. Row-tiled kernels (m larger: prefill), vectorised over rows. Work items are (group, rows,
//    1-8 strips of kNTile columns) from a shared counter; an item of several strips runs its K
//    loop in ranges (~1 MiB of a's packed tiles each), every strip per range, so a's tiles are
//    read from L2 by all the strips (process_item).
//    AVX512_BF16 path (Zen 4, Sapphire Rapids, ...): every e4m3 value is exact in bf16, so the
//    products run on `vdpbf16ps` (32 multiply-adds per instruction, fp32 accumulate).
//    - Each 16-row tile of a is decoded and transposed once per call into [k-pair][16 rows]
//      (a_t, with its scales sa_t). The weights stay K-major as stored: per 128-wide K block an
//      item (<= 128 rows x 24 columns) decodes its 24 weight rows into a 6 KiB L1 panel, and the
//      micro-kernels keep 24 zmm accumulators: 4 tiles x 6 columns (2 x 12 or 1 x 24 for the
//      item's last tiles), per k-pair 4 a_t loads and 6 broadcast weight pairs for 24 dot
//      products, no transpose of b and no horizontal sums. After each block, totals += block
//      sums * (a_scale * b_scale): one FMA per accumulator per 1536 dots.
//    - Weight rows of the next K blocks are prefetched while the current block computes.
//    AMX path (amx level: Sapphire Rapids+ with the Linux tile-data grant): the same packed a
//    tiles and decoded weight panels (32 columns, 256-row items), the products on TDPBF16PS
//    tiles (see "AMX" below): ~7x the vdpbf16ps kernel's rate on a 2-core Intel Xeon VM.
//    Other levels (avx512, avx2, generic, neon): the same structure on fp32 multiply-adds, a
//    vector of the level's width per output column of a tile (16, 8 or 4 rows), a decoded with
//    the decode path's bit moves ("row-tiled fp32 kernel" below). On Zen 4 with the paths
//    forced, prefill M=512: avx2 ~1.2x and avx512 ~1.5x torch's fp32 matmul (avx512bf16 ~2.7x).
//
// Measured figures: BENCHMARKS.md ("CPU (2026-11-30)", the "decode" rows).
// Compiled once per CPU level by gemm.cpp (cpu/variants.h): no include guard, LK_ISA selects code.

namespace lk::cpu::LK_NS {
namespace {

constexpr float kSafeScale = 0x1p100f;  // lane-wise block scaling cannot overflow below this
// NOTES: below this many multiply-adds a call runs on the calling thread: an OpenMP region
// costs microseconds on an idle machine but can cost milliseconds when another process holds a
// core (the region's end waits for a descheduled thread), which a decode step cannot afford.
constexpr int64_t kParallelMacs = int64_t(1) << 20;

struct Segment {
  int64_t group, r0, r1;  // rows [r0, r1) of a use b[group]
};

std::vector<Segment> segments(GemmLayout layout, const int32_t* groups, int64_t G, int64_t M) {
  std::vector<Segment> segs;
  if (layout == GemmLayout::dense) {
    if (M > 0) segs.push_back({0, 0, M});
  } else if (layout == GemmLayout::contiguous) {
    // Row r belongs to the first g with offs[g] > r (a running maximum of the ends), the same
    // rule the CUDA kernel's search and the reference follow; ends are clamped to M.
    int64_t start = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t end = std::min<int64_t>(std::max<int64_t>(groups[g], 0), M);
      if (end > start) segs.push_back({g, start, end});
      start = std::max(start, end);
    }
  } else {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t m = std::min<int64_t>(std::max<int64_t>(groups[g], 0), M);
      if (m > 0) segs.push_back({g, g * M, g * M + m});
    }
  }
  return segs;
}

#if LK_ISA >= 3
// Vectorised over rows: a zmm holds one output column for 16 rows. Per k-pair the micro-kernel
// loads a's 16 rows (a "transposed" tile, [k-pair][16 rows] bf16 pairs, built once per call)
// and broadcasts one bf16 pair of each of 24 weight rows, which stay K-major as stored: the
// weights need no transpose, only a byte-table decode.
constexpr int kTileRows = 16;           // rows per zmm (fp32 lanes)
// weight columns per item: accumulators per tile (zmm levels), two 16-row AMX tiles (amx)
constexpr int64_t kNTile = LK_ISA >= 4 ? 32 : 24;
// rows per item (in 16-row tiles) that share one decoded weight panel: 128 (avx512bf16), 256 (amx:
// its tile products are cheap next to the panel decode and the weights' DRAM reads, which each
// item repeats. Dense M=512 N=4096 K=7168 (2 cores, alternating runs): 128 rows 19.9 ms,
// 256 rows 16.3-17.1 ms, 512 rows 17.6-17.8 ms; 256 rows before K ranges: 22.5-23.2 ms)
// NOTES: avx512bf16 64 -> 128 rows (2026-12-03, 2-core Zen 4, scripts/ab_builds.py both ways
// round, 9-11 rounds, the geometric mean of the two paired ratios to cancel the position bias):
// dense K=7168 N=4096 M=128 +6%, M=512 +0%; K=7168 N=896 M=128/256 +3%; K=2048 N=2816 M=128
// +10%, M=256 +6%; 4 experts x 128 rows +2-3%; wgrad E=8 -2%, E=64 +4%; the same M=64 case
// (no code difference) read +4% and -0.2%: the noise.
constexpr int64_t kTilesPerItem = LK_ISA >= 4 ? 16 : 8;
constexpr int kSlots = kQuantGroup / 2; // bf16 pairs per 128-wide K block
constexpr int64_t kPrefetchBlocks = 4;  // how far ahead weight rows are prefetched

// e4m3 -> bf16 as two 128-entry byte tables (low and high byte of the bf16 of each magnitude,
// subnormals and NaN included): `vpermt2b` looks up 64 bytes at once, the sign bit is ignored
// by the lookup and ORed back into the high byte.
struct Decoder {
  __m512i lo[2], hi[2];
  Decoder() {
    alignas(64) uint8_t tl[128], th[128];
    for (int i = 0; i < 128; ++i) {
      const uint16_t v = f32_to_bf16(fp8e4m3_to_f32(uint8_t(i)));
      tl[i] = uint8_t(v & 0xff);
      th[i] = uint8_t(v >> 8);
    }
    lo[0] = _mm512_load_si512(tl);
    lo[1] = _mm512_load_si512(tl + 64);
    hi[0] = _mm512_load_si512(th);
    hi[1] = _mm512_load_si512(th + 64);
  }
  // 64 bytes -> 32 bf16 pairs (dwords) in "slot" order: w0 holds pairs 8*(j/4) + j%4, w1 the
  // same + 4 (the in-lane order of unpacklo/hi_epi8). a and b use the same order, and a dot
  // product does not care about it.
  void operator()(__m512i x, __m512i* w0, __m512i* w1) const {
    // NOTES: vpermi2b overwrites its index operand, and GCC reloaded x from memory for each of
    // the three instructions that read it rather than copy a register: 3 loads per 64 weight
    // bytes where the load ports are busy with a. The empty asm makes x a register value that
    // cannot be reloaded. Hot, one Zen 4 core, one row: K=1408 28.6 -> 32.0 GB/s, K=2048 30.3
    // -> 33.4, K=7168 +3%; 2-4 rows +1-4%; after a cache flush (memory-bound) within +-3%.
#ifndef LK_EMULATE_AVX512  // (x is no register there: cpu/avx512_emu.h)
    asm("" : "+v"(x));
#endif
    const __m512i l = _mm512_permutex2var_epi8(lo[0], x, lo[1]);
    __m512i h = _mm512_permutex2var_epi8(hi[0], x, hi[1]);
    h = _mm512_ternarylogic_epi32(h, x, _mm512_set1_epi8(char(0x80)), 0xf8);  // h | (x & 0x80)
    *w0 = _mm512_unpacklo_epi8(l, h);
    *w1 = _mm512_unpackhi_epi8(l, h);
  }
};

// 16x16 transpose of 32-bit elements: rows[i] lane j -> rows[j] lane i.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4i + j] 128-bit lane L holds column 4L + j of rows 4i..4i+3.
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// Byte order of a 64-byte half for decode_block: bytes 8k..8k+7 to 16k.., 32+8k.. to 16k+8.. (k < 4),
// so that Decoder's in-lane unpacks give slots in K order (see decode_block).
alignas(64) constexpr uint8_t kKOrder[64] = {
    0,  1,  2,  3,  4,  5,  6,  7,  32, 33, 34, 35, 36, 37, 38, 39, 8,  9,  10, 11, 12, 13,
    14, 15, 40, 41, 42, 43, 44, 45, 46, 47, 16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51,
    52, 53, 54, 55, 24, 25, 26, 27, 28, 29, 30, 31, 56, 57, 58, 59, 60, 61, 62, 63};

// 128 e4m3 bytes of K block kb at `src` (zero past K or when !valid) -> 64 slots of bf16 pairs,
// slot s = K positions 2s and 2s + 1 (the bytes permuted by kKOrder before the decode), so a
// block with kv valid positions has all of them in its first ceil(kv / 32) x 16 slots: the
// micro-kernels run 16, 32, 48 or 64 slots (a and the weights take the same order; the decode
// path's kernels keep Decoder's own order).
inline void decode_block(const Decoder& dec, const uint8_t* src, int64_t kv, bool valid, __m512i (&w)[4]) {
  const __m512i order = _mm512_load_si512(kKOrder);
  for (int half = 0; half < 2; ++half) {
    const int64_t n = std::min<int64_t>(64, std::max<int64_t>(0, kv - 64 * half));
    if (n == 0) {  // nothing valid in this half: zero slots
      w[2 * half] = w[2 * half + 1] = _mm512_setzero_si512();
      continue;
    }
    const __mmask64 m = !valid ? 0 : (n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1));
    // Masked-off bytes read as zero and never fault; whole chunks take a plain load.
    const __m512i x = m == ~__mmask64(0) ? _mm512_loadu_si512(src + 64 * half)
                                         : _mm512_maskz_loadu_epi8(m, src + 64 * half);
    dec(_mm512_permutexvar_epi8(order, x), &w[2 * half], &w[2 * half + 1]);
  }
}

// Slots a block with kv valid K positions needs (decode_block's order): 16, 32, 48 or 64.
inline int loop_slots(int64_t kv) { return kv <= 32 ? 16 : kv <= 64 ? 32 : kv <= 96 ? 48 : 64; }

// One 128-wide K block of a 16-row tile: the kv <= 128 bytes at `src` of each of `rows` rows
// (lda bytes apart; zero past kv and past `rows`) -> a_t[slot][16 rows] (bf16 pairs).
void pack_a_block(const Decoder& dec, const uint8_t* src, int64_t lda, int64_t rows, int64_t kv, uint32_t* a_t) {
  __m512i w[4][kTileRows];
  for (int i = 0; i < kTileRows; ++i) {
    __m512i blk[4];
    decode_block(dec, src + i * lda, kv, i < rows, blk);
    for (int q = 0; q < 4; ++q) w[q][i] = blk[q];
  }
  for (int q = 0; q < 4; ++q) {
    transpose16(w[q]);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(a_t + (16 * q + j) * kTileRows, w[q][j]);
  }
}

// The next K block's weight columns, decoded into the other panel while a micro-kernel runs.
struct NextPanel {
  const uint8_t* src[kNTile];  // each column's 128-byte block (any valid pointer past nc)
  int64_t kv;                  // valid bytes per block
  int64_t nc;                  // valid columns; the others decode as zero
  uint32_t* panel;             // [kNTile][kSlots]
};

inline void decode_column(const Decoder& dec, const NextPanel& np, int c) {
  __m512i blk[4];
  decode_block(dec, np.src[c], np.kv, c < np.nc, blk);
  for (int q = 0; q < 4; ++q) _mm512_storeu_si512(np.panel + c * kSlots + 16 * q, blk[q]);
}

// totals[c][16 rows] += (a_blk . b_blk[c]) * (sa[16 rows] * sb[c]) for one 16-row tile of a and
// the 24 columns of a panel. a_t: the tile's 64 slots x 16 rows; panel: 24 weight rows x 64
// slots. kLoopSlots 32 when the block holds at most 64 valid K positions (slots 32..63 are its
// second 64 bytes, all zero). Per slot one a load and 24 broadcast weight pairs.
// With `next`, the next block's panel is decoded in between: one column after each pair of
// slots, skipping every fourth pair, so 24 columns spread over the 64 slots (one column per
// pair, all in the first 48 slots: ~4% slower at dense M=16; one per slot, slower still).
// NOTES: software pipelining. The decode (byte-table lookups, unpacks, stores) uses other
// ports than vdpbf16ps, but as a phase of its own between micro-kernels (~350 instructions,
// the scheduler's window) it hardly overlapped them: dense N=4096 K=14336 M=16 spent ~20% of
// its time there. Spread through the slot loop it runs beside the dot products.
// NOTES: vdpbf16ps with an embedded {1to16} broadcast operand instead of vpbroadcastd +
// vdpbf16ps: 1.5x slower at dense M=512 and M=16 (2-core Zen 4, scripts/ab_builds.py both ways
// round). micro_kernel_tiles<1, 24> (the same loop written for kT tiles) ran dense M=16 K=14336
// ~4% slower than this (21 rounds both ways round), so one tile keeps its own kernel.
template <int kLoopSlots = kSlots>
void micro_kernel(const uint32_t* a_t, const uint32_t* panel, const float* sa, const float* sb, float* totals,
                  const Decoder* dec = nullptr, const NextPanel* next = nullptr) {
  static_assert(kLoopSlots % 16 == 0 && kLoopSlots <= kSlots, "whole 32-position quarters of a block");
  __m512 acc[kNTile];
#pragma GCC unroll 24
  for (int c = 0; c < kNTile; ++c) acc[c] = _mm512_setzero_ps();
  int col = 0;
  for (int s = 0; s < kLoopSlots; s += 2) {
    for (int u = 0; u < 2; ++u) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a_t + (s + u) * kTileRows);
#pragma GCC unroll 24
      for (int c = 0; c < kNTile; ++c)
        acc[c] = _mm512_dpbf16_ps(acc[c], av, (__m512bh)_mm512_set1_epi32(int(panel[c * kSlots + s + u])));
    }
    if (next != nullptr && col < kNTile && (s >> 1) % 4 != 3) decode_column(*dec, *next, col++);
  }
  if (next != nullptr)
    for (; col < kNTile; ++col) decode_column(*dec, *next, col);
  // NOTES: the scales multiplied here, not stored per tile beforehand: 2 fewer memory ops per
  // column and block (dense prefill M=512 N=4096 K=7168 ~2.5% faster in alternating runs).
  const __m512 sav = _mm512_loadu_ps(sa);
#pragma GCC unroll 24
  for (int c = 0; c < kNTile; ++c)
    _mm512_storeu_ps(totals + c * kTileRows, _mm512_fmadd_ps(acc[c], _mm512_mul_ps(sav, _mm512_set1_ps(sb[c])),
                                                             _mm512_loadu_ps(totals + c * kTileRows)));
}

// The same for kT >= 2 tiles of a at once (a_in[t], their scales sa[t], totals tot[t]): the
// panel's columns in passes of kCols (kT x kCols = 24 accumulators), per slot kT a loads and
// kCols broadcast weight pairs, each used by kT dot products. With `next`, each pass decodes
// its kCols columns of the next panel, spread over its first min(32, 2 kCols) slot pairs.
// NOTES: 4 tiles x 6 columns (item_products): 10 loads per 24 dot products where one tile x 24
// columns takes 25 (the broadcasts are loads: vpbroadcastd from memory). Dense M=512 / 128 / 64
// N=4096 K=7168 (2-core Zen 4, scripts/ab_builds.py both ways round, 7 rounds, geometric mean of
// the paired ratios): 2 tiles x 12 columns against 1 x 24 +10% / +8% / -; 4 x 6 against 2 x 12
// +3.7% / +3% / +2.4%; 3 x 8 against 2 x 12 +0-2%. The decode spread over 30 slot pairs instead
// of 12 (4 x 6): -1.5% at M=512.
template <int kT, int kCols, int kLoopSlots = kSlots>
void micro_kernel_tiles(const uint32_t* const* a_in, const uint32_t* panel, const float* const* sa, const float* sb,
                        float* const* tot, const Decoder* dec = nullptr, const NextPanel* next = nullptr) {
  static_assert(kLoopSlots % 16 == 0 && kLoopSlots <= kSlots, "whole 32-position quarters of a block");
  static_assert(kT >= 2 && kNTile % kCols == 0 && kT * kCols <= 24, "whole passes, accumulators in registers");
  // NOTES: copied, so the tile pointers stay in registers (read through a_in, they were reloaded
  // after every panel store of the decode)
  const uint32_t* a[kT];
  for (int t = 0; t < kT; ++t) a[t] = a_in[t];
  constexpr int kPasses = int(kNTile / kCols);
  constexpr int kPairs = std::min(kLoopSlots / 2, 2 * kCols);  // slot pairs a pass's decode spreads over
  int col = 0;
  for (int h = 0; h < kPasses; ++h) {
    __m512 acc[kT][kCols];
#pragma GCC unroll 24
    for (int t = 0; t < kT; ++t)
#pragma GCC unroll 24
      for (int c = 0; c < kCols; ++c) acc[t][c] = _mm512_setzero_ps();
    const uint32_t* pp = panel + h * kCols * kSlots;
    for (int s = 0; s < kLoopSlots; s += 2) {
      for (int u = 0; u < 2; ++u) {
        __m512bh av[kT];
#pragma GCC unroll 24
        for (int t = 0; t < kT; ++t) av[t] = (__m512bh)_mm512_loadu_si512(a[t] + (s + u) * kTileRows);
#pragma GCC unroll 24
        for (int c = 0; c < kCols; ++c) {
          const __m512bh w = (__m512bh)_mm512_set1_epi32(int(pp[c * kSlots + s + u]));
#pragma GCC unroll 24
          for (int t = 0; t < kT; ++t) acc[t][c] = _mm512_dpbf16_ps(acc[t][c], av[t], w);
        }
      }
      if (next != nullptr && col < h * kCols + std::min(kCols, ((s / 2 + 1) * kCols + kPairs - 1) / kPairs))
        decode_column(*dec, *next, col++);
    }
    if (next != nullptr)
      for (; col < (h + 1) * kCols; ++col) decode_column(*dec, *next, col);
    // the scales as in micro_kernel
#pragma GCC unroll 24
    for (int t = 0; t < kT; ++t) {
      const __m512 st = _mm512_loadu_ps(sa[t]);
#pragma GCC unroll 24
      for (int c = 0; c < kCols; ++c) {
        float* o = tot[t] + (h * kCols + c) * kTileRows;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(acc[t][c], _mm512_mul_ps(st, _mm512_set1_ps(sb[h * kCols + c])),
                                            _mm512_loadu_ps(o)));
      }
    }
  }
}

#if LK_ISA >= 4
// AMX (TDPBF16PS): the weights are the A operand and a the B operand, so neither is transposed
// for the tiles: a weight tile is 16 decoded panel rows x 16 slots (one 64-byte row each, the
// panel's 256-byte stride), a's tile is 16 slots x 16 rows of the a_t layout (contiguous), and
// C[c][r] (16 weight columns x 16 rows of a, fp32) is the totals layout [column][16 rows].
// A step is one K block of two 16-row a tiles against an item's 32 weight columns. Tiles: 0-3
// C (weight tile 0/1 x a tile 0/1), 4-5 weights, 6-7 a; all 16 rows x 64 bytes.
// Per 128-wide K block every C tile is stored and scaled into fp32 totals (a_scale x b_scale
// differ per block), as the zmm kernels do: per step 16 tile products, 4 tile stores and 64
// scaled adds, plus the panel decode shared by the item's 8 a tiles.
// NOTES: measured on a 2-core Intel Xeon VM (AMX-BF16): one tile product ~5 ns (16x16x32
// MACs, ~3.3 TFLOP/s per core hot), but vector arithmetic did not overlap with the tile
// products: in a microbenchmark, 16 products plus 64 zmm FMAs (or ymm FMAs, or vpermt2b)
// took the sum of both times, while 64 zmm stores did overlap; and
// interleaving the scaling and decode between the products (amx_step) gained nothing
// measurable over running them after the products. Left out in a test build, the scaling and
// the decode each cost ~5 ms of dense M=512 N=4096 K=7168's ~21 ms (2 cores, bf16 out; ~11 ms
// without both). Also tried: one a tile x four weight tiles per step (64-column items): the
// same at M=512, 2x slower at M=16.
// NOTES: a's tiles are loaded with the streaming hint (TILELOADDT1): each is read once per
// strip and comes from L2 (an item's K range of a is 1 MiB), and the plain loads pulled them
// into L1, over the panels and the totals that are reused there. Dense M=2048 N=4096 K=7168,
// 5 alternating process pairs (2026-12-02): 78.1-81.3 -> 73.5-81.5 ms, against torch bf16 in
// the same runs 0.765-0.793 -> 0.798-0.902; M=512 and M=64 within noise. The bound seen in a
// test build with every a tile in L1 (wrong results): 57-59 ms; with every step's totals in
// L1: 73-77 ms. Also tried: prefetcht0 of the next step's a tiles (no gain); each pair of a
// tiles run against 2 or 4 strips' panels in turn (a from L1, the totals from L2): slower.
// NOTES: GCC 12's tile intrinsics are asm statements without a "memory" clobber (and
// _tile_loadconfig claims to read 8 bytes of the 64): the compiler barriers below keep the
// panel, a_t and config stores before the tile loads, and the C-tile stores before their reads.
// The tile state is configured per item and released after it: another library's AMX code
// (oneDNN under torch) may load its own configuration on the same thread between our calls.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void amx_configure() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  asm volatile("" ::: "memory");
  _tile_loadconfig(&cfg);
}

// An AMX step's C tiles, stored, waiting to be scaled into the totals by the next step.
struct AmxPending {
  const float* cbuf;  // [2 a tiles][kNTile columns][16 rows]
  const float* sa[2];  // a scales of the step's a tiles (16 rows each)
  const float* sb;     // weight scale per column for the step's K block
  float* totals;       // the first a tile's totals ([kNTile][16 rows]; the second follows)
  bool two;
  bool uniform;        // every column's scale is sb[0] (a strip inside one 128-row weight block)
};

// totals[t][c][16 rows] += C[t][c][16 rows] * (sa[t][16 rows] * sb[c]) for columns [c0, c1).
// NOTES: out of line: inlined into item_products, GCC 12 kept the loop counter and the
// pointers in stack slots (register pressure), ~5% of dense M=512 in alternating runs.
__attribute__((noinline)) void amx_scale_columns(const AmxPending& p, int c0, int c1) {
  const float* __restrict sb = p.sb;
  for (int t = 0; t < 1 + int(p.two); ++t) {
    const __m512 sav = _mm512_loadu_ps(p.sa[t]);
    const float* __restrict cb = p.cbuf + t * kNTile * kTileRows;
    float* __restrict tt = p.totals + t * kNTile * kTileRows;
    if (p.uniform) {  // NOTES: dense M=32 N=4096 K=14336 cold, 6 alternating pairs: 3.59-3.72 -> 3.41-3.54 ms
      const __m512 sv = _mm512_mul_ps(sav, _mm512_set1_ps(sb[0]));
#pragma GCC unroll 8
      for (int c = c0; c < c1; ++c)
        _mm512_storeu_ps(tt + c * kTileRows, _mm512_fmadd_ps(_mm512_loadu_ps(cb + c * kTileRows), sv,
                                                             _mm512_loadu_ps(tt + c * kTileRows)));
      continue;
    }
#pragma GCC unroll 8
    for (int c = c0; c < c1; ++c)
      _mm512_storeu_ps(tt + c * kTileRows, _mm512_fmadd_ps(_mm512_loadu_ps(cb + c * kTileRows),
                                                           _mm512_mul_ps(sav, _mm512_set1_ps(sb[c])),
                                                           _mm512_loadu_ps(tt + c * kTileRows)));
  }
}

// One step: C tiles = one K block of the panel's 32 columns x a tiles a0 (and a1 when `two`),
// stored to cbuf_out; `half`: the block holds at most 64 valid K positions (slots 32..63 are
// zero). Between the tile products the vector pipes do the rest, a quarter per 32-wide K
// step: the previous step's scaling (prev) and, when given, the decode of the next block's
// panel (next).
inline void amx_step(const uint32_t* panel, const uint32_t* a0, const uint32_t* a1, bool two, bool half,
                     const AmxPending* prev, const Decoder& dec, const NextPanel* next, float* cbuf_out) {
  asm volatile("" ::: "memory");
  _tile_zero(0);
  _tile_zero(1);
  if (two) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int steps = half ? kSlots / 32 : kSlots / 16;
  constexpr int kChunk = kNTile / 4;  // columns of vector work per quarter
  for (int j = 0; j < steps; ++j) {
    _tile_loadd(4, panel + 16 * j, kSlots * 4);
    _tile_stream_loadd(6, a0 + 16 * j * kTileRows, kTileRows * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, panel + 16 * kSlots + 16 * j, kSlots * 4);
    _tile_dpbf16ps(1, 5, 6);
    if (two) {
      _tile_stream_loadd(7, a1 + 16 * j * kTileRows, kTileRows * 4);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    for (int q = j * 4 / steps; q < (j + 1) * 4 / steps; ++q) {
      if (prev != nullptr) amx_scale_columns(*prev, q * kChunk, (q + 1) * kChunk);
      if (next != nullptr)
        for (int c = q * kChunk; c < (q + 1) * kChunk; ++c) decode_column(dec, *next, c);
    }
  }
  asm volatile("" ::: "memory");
  _tile_stored(0, cbuf_out, kTileRows * 4);
  _tile_stored(1, cbuf_out + 16 * kTileRows, kTileRows * 4);
  if (two) {
    _tile_stored(2, cbuf_out + kNTile * kTileRows, kTileRows * 4);
    _tile_stored(3, cbuf_out + (kNTile + 16) * kTileRows, kTileRows * 4);
  }
  asm volatile("" ::: "memory");
}
#endif
#endif  // LK_ISA >= 3

struct WorkItem {
  int64_t group, r0, r1, n0, tile;  // tile: first a tile of the item (PackedA)
  int64_t n1 = 0;                   // columns [n0, n1) (strips of kNTile)
};

struct Problem {
  const uint8_t* a;
  const float* a_scale;
  const uint8_t* b;
  const float* b_scale;
  int64_t N, K, KB, NB;
  void* out;
  DType out_dtype;
  bool b_nan_free = false;  // the caller knows b holds no NaN code: the walks skip the NaN mark
  bool accumulate = false;  // f32 out only (fp8_k_grouped_gemm): out += v instead of out = v
};

inline void store_out(const Problem& p, int64_t row, int64_t col, float v) {
  if (p.out_dtype == DType::f32) {
    float& o = static_cast<float*>(p.out)[row * p.N + col];
    o = p.accumulate ? o + v : v;
  } else {
    static_cast<uint16_t*>(p.out)[row * p.N + col] = f32_to_bf16(v);
  }
}

// Allocator adaptor whose construct() without a value default-initializes: a vector of it grows
// without zeroing, for buffers whose every element is written before it is read (PackedA).
// NOTES: PackedA's zeroing was a memset of the whole buffer per call, 1.4% of a dense M=16
// K=14336 profile on avx512bf16 before pack_a_block wrote every element again; an A/B of the
// change both ways round (ab_builds, 15 rounds) was within its noise (+2% / -1..3%).
template <class T, class A = std::allocator<T>>
struct NoZero : A {
  using A::A;
  NoZero() = default;
  template <class U, class B>
  NoZero(const NoZero<U, B>& o) : A(static_cast<const B&>(o)) {}
  template <class U>
  struct rebind {
    using other = NoZero<U, typename std::allocator_traits<A>::template rebind_alloc<U>>;
  };
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    std::allocator_traits<A>::construct(static_cast<A&>(*this), p, std::forward<Args>(args)...);
  }
};

#if LK_ISA >= 3
// 64-byte aligned storage for what tiles and zmm loads read: a tile load whose rows straddle
// cache lines is ~6x slower (2-core Intel Xeon VM: 1 KiB from L1 2.4 ns aligned, 15 ns at
// malloc's 16-byte alignment, against ~4.5 ns per tile product).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <class T>
using AlignedVec = std::vector<T, Aligned64<T>>;

constexpr int64_t kABlock = kSlots * kTileRows;  // PackedA::a_t elements per tile and K block
using ADecoder = Decoder;                         // decodes a for pack_a_block
struct PackedA {  // every 16-row tile of the used rows of a, transposed (pack_a_tile; not zeroed)
  std::vector<uint32_t, NoZero<uint32_t, Aligned64<uint32_t>>> a_t;
  std::vector<float, NoZero<float, Aligned64<float>>> sa_t;
};

struct Scratch {
  AlignedVec<uint32_t> panel = AlignedVec<uint32_t>(2 * kNTile * kSlots);  // this block's and the next's
  // the block's weight scale per column (amx: this block's and the previous one's, alternating)
  std::vector<float> scale = std::vector<float>((LK_ISA >= 4 ? 2 : 1) * kNTile);
  AlignedVec<float> strips;  // the item's totals: kTilesPerItem x kNTile x 16 floats per strip (zeroed)
#if LK_ISA >= 4
  alignas(64) float cbuf[2][2 * kNTile * kTileRows];  // C tiles of the last two steps
#endif
  static constexpr int64_t kStripFloats = kTilesPerItem * kNTile * kTileRows;
  // Totals for n strips (strip j at + j * kStripFloats), the first `tiles` tiles of each zeroed.
  // NOTES: only the tiles in use: at decode sizes on the tile kernel (one 16-row tile) zeroing
  // whole strips was 32 KiB per strip, 4 MiB per call at N=4096 (~5% of dense M=16 hot).
  float* zeroed_strips(int64_t n, int64_t tiles) {
    if (int64_t(strips.size()) < n * kStripFloats) strips.resize(size_t(n * kStripFloats));
    for (int64_t j = 0; j < n; ++j)
      std::fill_n(strips.begin() + j * kStripFloats, tiles * kNTile * kTileRows, 0.0f);
    return strips.data();
  }
};

// The K loop of one item over blocks [kb0, KB): totals[tile][kNTile columns][16 rows] += each
// block's products, in block order (a K range continues the totals of the one before it exactly).
// b_block(c, kb): weight column c's block kb (kv_of(kb) <= 128 valid bytes); sb_of(c, kb): its
// scale for column c (`uniform`: the same for all nc columns, sb_of(0, kb)); packed(t, kb):
// index of the item's tile t, block kb in pa (pack_a_tile).
template <class BBlock, class KvOf, class SbOf, class Packed>
void item_products(const Decoder& dec_in, const PackedA& pa, int64_t tiles, int64_t nc, int64_t kb0, int64_t KB,
                   BBlock b_block, KvOf kv_of, SbOf sb_of, Packed packed, float* totals, Scratch& s,
                   bool uniform = false) {
  // NOTES: a local copy keeps the byte tables in registers (through the reference they were
  // reloaded for every weight row, since the panel stores may alias them).
  const Decoder dec = dec_in;
  // NOTES: weight blocks kPrefetchBlocks ahead, and the item's first blocks up front (with
  // short K loops, k-grouped experts of a few token groups, their misses would otherwise be
  // taken one by one at the top of the loop); a block's third cache line when it starts
  // mid-line (any K, token groups). Written out in place: the same prefetches as a lambda
  // made the dense prefill ~9% slower (GCC 12 codegen).
  for (int64_t kb = kb0; kb < std::min(KB, kb0 + kPrefetchBlocks); ++kb)
    for (int64_t c = 0; c < nc; ++c) {
      const uint8_t* q = b_block(c, kb);
      __builtin_prefetch(q, 0, 1);
      __builtin_prefetch(q + 64, 0, 1);
      if (reinterpret_cast<uintptr_t>(q) & 63) __builtin_prefetch(q + 127, 0, 1);
    }
#if LK_ISA >= 4
  amx_configure();
  AmxPending pending{};
  int64_t step = 0;
#endif
  // Block kb's weight columns and their panel (the two panels alternate); columns past N
  // decode as zero.
  const auto block_panel = [&](int64_t kb) {
    NextPanel bp;
    for (int c = 0; c < kNTile; ++c) bp.src[c] = b_block(std::min<int64_t>(c, nc - 1), kb);
    bp.kv = kv_of(kb);
    bp.nc = nc;
    bp.panel = s.panel.data() + (kb & 1) * kNTile * kSlots;
    return bp;
  };
  {
    const NextPanel first = block_panel(kb0);
    for (int c = 0; c < kNTile; ++c) decode_column(dec, first, c);
  }
  for (int64_t kb = kb0; kb < KB; ++kb) {
    if (kb + kPrefetchBlocks < KB)
      for (int64_t c = 0; c < nc; ++c) {
        const uint8_t* q = b_block(c, kb + kPrefetchBlocks);
        __builtin_prefetch(q, 0, 1);
        __builtin_prefetch(q + 64, 0, 1);
        if (reinterpret_cast<uintptr_t>(q) & 63) __builtin_prefetch(q + 127, 0, 1);
      }
    const int64_t kv = kv_of(kb);
    uint32_t* panel = s.panel.data() + (kb & 1) * kNTile * kSlots;
    const bool has_next = kb + 1 < KB;
    NextPanel np;  // block kb + 1, decoded during the first tile's micro-kernel
    if (has_next) np = block_panel(kb + 1);
#if LK_ISA >= 4
    // The weight scales alternate between two halves: the previous block's are still in use.
    float* scale = s.scale.data() + (kb & 1) * kNTile;
    if (uniform) scale[0] = sb_of(0, kb);
    else for (int64_t c = 0; c < kNTile; ++c) scale[c] = c < nc ? sb_of(c, kb) : 0.0f;
    // Two a tiles per step; each step's C tiles are scaled into the totals during the next.
    for (int64_t t = 0; t < tiles; t += 2) {
      const bool two = t + 1 < tiles;
      const int64_t i0 = packed(t, kb), i1 = two ? packed(t + 1, kb) : i0;
      float* cbuf_out = s.cbuf[step & 1];
      amx_step(panel, pa.a_t.data() + i0 * kSlots * kTileRows, pa.a_t.data() + i1 * kSlots * kTileRows, two,
               kv <= kQuantGroup / 2, step > 0 ? &pending : nullptr, dec, t == 0 && has_next ? &np : nullptr,
               cbuf_out);
      pending = {cbuf_out, {pa.sa_t.data() + i0 * kTileRows, pa.sa_t.data() + i1 * kTileRows}, scale,
                 totals + t * kNTile * kTileRows, two, uniform};
      ++step;
    }
#else
    for (int64_t c = 0; c < kNTile; ++c) s.scale[size_t(c)] = c < nc ? sb_of(c, kb) : 0.0f;
    // 4 tiles at a time, then 2, then 1 (micro_kernel_tiles, micro_kernel); the first call decodes
    // the next panel
    for (int64_t t = 0; t < tiles;) {
      const auto run = [&](auto kt) {
        constexpr int kT = decltype(kt)::value;
        const uint32_t* a[kT];
        const float* sa[kT];
        float* tot[kT];
        for (int q = 0; q < kT; ++q) {
          const int64_t i = packed(t + q, kb);
          a[q] = pa.a_t.data() + i * kSlots * kTileRows;
          sa[q] = pa.sa_t.data() + i * kTileRows;
          tot[q] = totals + (t + q) * kNTile * kTileRows;
        }
        const NextPanel* next = t == 0 && has_next ? &np : nullptr;
        // only the slots holding the block's kv valid positions (decode_block's K order)
        const auto kernel = [&](auto slots) {
          constexpr int kS = decltype(slots)::value;
          if constexpr (kT == 1)
            micro_kernel<kS>(a[0], panel, sa[0], s.scale.data(), tot[0], &dec, next);
          else
            micro_kernel_tiles<kT, 24 / kT, kS>(a, panel, sa, s.scale.data(), tot, &dec, next);
        };
        switch (loop_slots(kv)) {
          case 16: kernel(std::integral_constant<int, 16>{}); break;
          case 32: kernel(std::integral_constant<int, 32>{}); break;
          case 48: kernel(std::integral_constant<int, 48>{}); break;
          default: kernel(std::integral_constant<int, kSlots>{}); break;
        }
        t += kT;
      };
      if (tiles - t >= 4) run(std::integral_constant<int, 4>{});
      else if (tiles - t >= 2) run(std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 1>{});
    }
#endif
  }
#if LK_ISA >= 4
  if (step > 0) amx_scale_columns(pending, 0, kNTile);
  _tile_release();
#endif
}

// fp32 -> bf16 of 16 lanes (cpu/bf16_simd.h), packed.
inline __m256i bf16_of(__m512i u) { return _mm512_cvtepi32_epi16(bf16_bits16(u)); }

// Columns per item at most (process_item, k_grouped_rows): strips of kNTile columns, at most this
// many per item, so that their totals sit in L2 (16 x 32 KiB on amx, beside a's 1 MiB K range).
// NOTES: amx 8 -> 16 strips: a's tiles (the whole K of the item's rows, from L3) are read once
// per item, so half as often. Dense M=2048 N=4096 K=7168 against torch bf16, 9 alternating
// process pairs (2026-12-02): medians 0.809 -> 0.830 (7 of 9 pairs faster); wgrad E=8 0.817-0.827
// -> 0.825-0.836. M <= 512 keeps 8 strips (strips_per_item). Other levels unchanged (not measured).
constexpr int64_t kMaxStrips = LK_ISA >= 4 ? 16 : 8;


// An item's totals (per strip j of kNTile columns: totals + j * Scratch::kStripFloats, [tile][kNTile
// columns][16 rows]) -> out rows [row0, row0 + rows), columns [n0, n1): per 16-row tile, 16x16
// transposes into an L1 stage, then each row's n1 - n0 columns written in whole 64-byte stores.
// NOTES: row by row over all the item's columns, not strip by strip: every output row is its own
// 4 KiB page at these widths, and a store per strip took a TLB miss per row and strip (nested
// paging in a VM: costly). The k-grouped GEMM (E=8 T=4096 N_out=1408 K=2048, bf16 out, output
// pre-faulted) spent ~10 ms of ~28 ms in the strip-wise stores.
void store_item(const Problem& p, const float* totals, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  const bool f32 = p.out_dtype == DType::f32;
  const int64_t width = n1 - n0;
  alignas(64) float stage[kTileRows][kMaxStrips * kNTile + 16];  // f32, or bf16 in its first half
  for (int64_t t = 0; t * kTileRows < rows; ++t) {
    const int64_t tr = std::min<int64_t>(kTileRows, rows - t * kTileRows);
    for (int64_t c = 0; c < width; c += (c % kNTile) + 16 < kNTile ? 16 : kNTile - c % kNTile) {
      const int64_t j = c / kNTile, c0 = c % kNTile;  // strip j's columns c0.. (c0: 0 or 16)
      const float* tt = totals + j * Scratch::kStripFloats + t * kNTile * kTileRows;
      __m512i v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = c0 + i < kNTile ? _mm512_loadu_si512(tt + (c0 + i) * kTileRows) : _mm512_setzero_si512();
      transpose16(v);  // v[r]: columns c.. of the tile's row r
      // columns past the strip (kNTile 24) are overwritten by the next strip's; past n1 not stored
      for (int64_t r = 0; r < tr; ++r) {
        if (f32)
          _mm512_storeu_si512(&stage[r][c], v[r]);
        else
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(stage[r]) + c), bf16_of(v[r]));
      }
    }
    for (int64_t r = 0; r < tr; ++r) {
      const int64_t at = (row0 + t * kTileRows + r) * p.N + n0;
      if (f32) {
        float* dst = static_cast<float*>(p.out) + at;
        for (int64_t c = 0; c < width; c += 16) {
          const __mmask16 m = __mmask16(width - c >= 16 ? 0xffff : (1u << (width - c)) - 1);
          __m512 v = _mm512_load_ps(&stage[r][c]);
          if (p.accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + c), v);
          _mm512_mask_storeu_ps(dst + c, m, v);
        }
      } else {
        uint16_t* dst = static_cast<uint16_t*>(p.out) + at;
        const uint16_t* src = reinterpret_cast<const uint16_t*>(stage[r]);
        for (int64_t c = 0; c < width; c += 32)
          _mm512_mask_storeu_epi16(dst + c, width - c >= 32 ? ~__mmask32(0) : __mmask32((1u << (width - c)) - 1),
                                   _mm512_loadu_si512(src + c));
      }
    }
  }
}

// An item: rows [r0, r1) x the strips of kNTile columns in [n0, n1). With several strips and
// more than kARangeBytes of a's packed tiles, the K loop is cut into ranges, each run for every
// strip before the next (the totals of all strips wait in s.strips): a's tiles for one range
// stay in L2 while the strips use them, where the whole K of a 256-row item (3.7 MiB bf16 at
// K=7168) does not. Few rows (decode sizes on the tile kernel) keep one range: each strip's
// weight rows stream whole, as the prefetches expect (ranges of 16 blocks made dense decode
// T=4 N=4096 K=14336 ~1.5x slower).
constexpr int64_t kARangeBytes = int64_t(1) << 20;
void process_item(const Problem& p, const Decoder& dec, const PackedA& pa, const WorkItem& w, Scratch& s) {
  const int64_t rows = w.r1 - w.r0, tiles = ceil_div(rows, kTileRows);
  const int64_t strips = ceil_div(w.n1 - w.n0, kNTile);
  const int64_t tile_block_bytes = kSlots * kTileRows * 4;  // one tile's packed a per K block
  const int64_t kb_step = strips == 1 ? p.KB : ceil_div(p.KB, ceil_div(p.KB * tiles * tile_block_bytes, kARangeBytes));
  float* const totals0 = s.zeroed_strips(strips, tiles);
  const float* sbg = p.b_scale + w.group * p.NB * p.KB;
  for (int64_t kb0 = 0; kb0 < p.KB; kb0 += kb_step) {
    const int64_t kb1 = std::min(p.KB, kb0 + kb_step);
    for (int64_t j = 0; j < strips; ++j) {
      const int64_t n0 = w.n0 + j * kNTile, nc = std::min(kNTile, p.N - n0);
      const uint8_t* bg = p.b + (w.group * p.N + n0) * p.K;
      float* totals = totals0 + j * Scratch::kStripFloats;
      // the strip's weight scales: block row n0 / 128, and the next from column `split` on
      // NOTES: item_products reads every column's scale per K block; with a division per read
      // that loop took ~20% of the non-tile work at dense M=16 (one 16-row tile, hot, perf).
      const float* sb0 = sbg + (n0 / kQuantGroup) * p.KB;
      const int64_t split = kQuantGroup - n0 % kQuantGroup;
      item_products(
          dec, pa, tiles, nc, kb0, kb1, [&](int64_t c, int64_t kb) { return bg + c * p.K + kb * kQuantGroup; },
          [&](int64_t kb) { return std::min<int64_t>(kQuantGroup, p.K - kb * kQuantGroup); },
          [&](int64_t c, int64_t kb) { return (c < split ? sb0 : sb0 + p.KB)[kb]; },
          [&](int64_t t, int64_t kb) { return (w.tile + t) * p.KB + kb; }, totals, s, split >= nc);
    }
  }
  store_item(p, totals0, w.r0, rows, w.n0, w.n1);
}
#endif

// ===================================================================== decode path
// Segments with few rows (decode: 1-16 rows per expert) are vectorised along K instead of
// along rows: every weight byte is decoded once, and each vector of decoded weights meets the
// segment's rows in dot products whose lanes are K positions, so no lane multiplies padding.
// The weights stream from memory once; the work per weight byte is the decode (a few vector
// ops per 16-64 bytes) plus one multiply-add per row, so at decode shapes the kernel runs at
// the memory's read bandwidth.
//
// Per CPU level, a "DV" vector and the decode of one 128-wide K block (weights and a alike):
//   avx512bf16: DV = zmm of 32 bf16; e4m3 -> bf16 by the vpermt2b byte tables (exact, subnormals
//               and NaN included); dot = vdpbf16ps (32 multiply-adds).
//   avx512/avx2: e4m3 -> fp32 by bit moves (value * 2^-120, subnormals exact), then FMAs; NaN
//               codes flagged and decoded by a table (see the level's ChunkDecoder).
//   generic:    a 256-entry float table.
// Per 128-wide K block and (row, column) the lanes hold partial block sums; they are scaled by
// a_scale * b_scale lane-wise. That equals the reference's (block sum) * scale up to rounding
// whenever no lane product can overflow, i.e. |scale| <= 2^100; larger, Inf or NaN scales take
// the exact order (horizontal block sum, then the scale), so Inf/NaN come out as the reference's.
#if LK_ISA >= 3
using DV = __m512;
constexpr int kChunk = 64;          // bytes per decode step
constexpr int kVC = 2;              // DVs per chunk (32 bf16 each)
constexpr float kFix = 1.0f;        // decoded values are exact
constexpr int kDMR = 2;             // rows per register tile
inline DV dv_zero() { return _mm512_setzero_ps(); }
inline DV dv_dot(DV acc, DV a, DV w) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w); }
inline DV dv_add(DV a, DV b) { return _mm512_add_ps(a, b); }
inline DV dv_fma(DV x, float s, DV acc) { return _mm512_fmadd_ps(x, _mm512_set1_ps(s), acc); }
inline float dv_hsum(DV v) { return _mm512_reduce_add_ps(v); }
struct ChunkDecoder {
  Decoder dec;
  void operator()(const uint8_t* src, DV* out) const {  // kChunk readable bytes
    __m512i w0, w1;
    dec(_mm512_loadu_si512(src), &w0, &w1);
    out[0] = _mm512_castsi512_ps(w0);
    out[1] = _mm512_castsi512_ps(w1);
  }
  template <class Mark> void fast(const uint8_t* src, DV* out, Mark&) const { (*this)(src, out); }
};
#elif LK_ISA >= 1 || defined(LK_NEON)
// e4m3 -> fp32 by bit moves, for weights and a alike: a byte's magnitude (4 exponent and 3
// mantissa bits) placed at fp32 bits 26..20 with its sign at bit 31 is the fp32 of value *
// 2^-120; an e4m3 subnormal becomes an fp32 subnormal of the same digits (exact), zero stays
// zero. Per 16-bit word: an arithmetic shift right by 4 puts the high byte's magnitude at bits
// 10..4 and copies its sign into bits 15..11, and an AND with 0x87f0 leaves sign + magnitude,
// a bf16 (the low bytes first move up by 8); its fp32 is the word in the high half of a dword.
// So 9 integer ops give the fp32 of 4 bytes per dword lane, in 4 vectors: dword i of out[j]
// holds byte 4i + kByteOf[j] (a and b use the same order, and the sum does not care).
// NOTES: the fp16 route (sign-extend, shift, mask, vcvtph2ps) needs ~14 ops per 32 bytes and
// was the AVX2 path's bound: 1.9x the avx512bf16 path at V2-Lite T=1.
// a is decoded once per call to value * 2^112 (two exact multiplies), so a product is
// value_a * value_b * 2^-8, always a normal fp32: kFix = 2^8 goes into the block scale. The
// weights' subnormals need MXCSR's DAZ off, which the kernel sets for its threads (FlushGuard).
// NaN codes (0x7f/0xff) would decode as 480: the hot loop only keeps a byte max of
// (byte + byte), whose value 0xfe marks a NaN code; a walk that met one is redone with the table
// (fused_rows), and the panel path checks each chunk.
// arm64 (neon): e4m3 -> fp16 -> fp32 instead (e4m3x16_to_f32: 4 ops per 8 bytes, out[j] lane i
// = byte 4j + i). a is decoded once per call to value (x 2^4 twice), so a product is value_a * value_b * 2^-8
// and kFix is 2^8 there too. fcvtl never flushes an fp16 input (FPCR.FZ16 does not apply to
// conversions), and every product (>= 2^-26) and every nonzero block sum of them is a normal
// fp32, so FPCR needs no change (FlushGuard: none). The NaN mark is the same byte max.
constexpr int kVC = 4;
constexpr float kFix = 256.0f;
#ifdef LK_NEON
constexpr int byte_of(int j, int i) { return 4 * j + i; }  // byte of lane i of out[j]
constexpr int kTableExp = -8;                                 // decoded value = value * 2^kTableExp
constexpr float kAFix = 0x1p4f;     // a: value * 2^-8 -> value in two exact steps
#else
constexpr int kByteOf[kVC] = {3, 1, 2, 0};
constexpr int byte_of(int j, int i) { return 4 * i + kByteOf[j]; }
constexpr int kTableExp = -120;
constexpr float kAFix = 0x1p116f;   // a: value * 2^-120 -> value * 2^112 in two exact steps
#endif
#ifdef LK_NEON
using DV = float32x4_t;
using IV = uint8x16_t;
constexpr int kChunk = 16;
constexpr int kDMR = 2;
inline DV dv_zero() { return vdupq_n_f32(0.0f); }
inline DV dv_dot(DV acc, DV a, DV w) { return vfmaq_f32(acc, a, w); }
inline DV dv_add(DV a, DV b) { return vaddq_f32(a, b); }
inline DV dv_fma(DV x, float s, DV acc) { return vfmaq_n_f32(acc, x, s); }
inline float dv_hsum(DV v) { return vaddvq_f32(v); }
inline IV iv_load(const uint8_t* p) { return vld1q_u8(p); }
inline IV iv_zero() { return vdupq_n_u8(0); }
inline IV iv_nan_mark(IV acc, IV x) { return vmaxq_u8(acc, vaddq_u8(x, x)); }
inline bool iv_nan_any(IV acc) { return vmaxvq_u8(acc) == 0xfe; }
#elif LK_ISA >= 2
using DV = __m512;
using IV = __m512i;
constexpr int kChunk = 64;
constexpr int kDMR = 2;
inline DV dv_zero() { return _mm512_setzero_ps(); }
inline DV dv_dot(DV acc, DV a, DV w) { return _mm512_fmadd_ps(a, w, acc); }
inline DV dv_add(DV a, DV b) { return _mm512_add_ps(a, b); }
inline DV dv_fma(DV x, float s, DV acc) { return _mm512_fmadd_ps(x, _mm512_set1_ps(s), acc); }
inline float dv_hsum(DV v) { return _mm512_reduce_add_ps(v); }
inline IV iv_load(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline IV iv_zero() { return _mm512_setzero_si512(); }
inline IV iv_nan_mark(IV acc, IV x) { return _mm512_max_epu8(acc, _mm512_add_epi8(x, x)); }
inline bool iv_nan_any(IV acc) { return _mm512_cmpeq_epi8_mask(acc, _mm512_set1_epi8(char(0xfe))) != 0; }
#else
using DV = __m256;
using IV = __m256i;
constexpr int kChunk = 32;
constexpr int kDMR = 1;             // 16 ymm registers: one row's sums + totals + 4 weights
inline DV dv_zero() { return _mm256_setzero_ps(); }
inline DV dv_dot(DV acc, DV a, DV w) { return _mm256_fmadd_ps(a, w, acc); }
inline DV dv_add(DV a, DV b) { return _mm256_add_ps(a, b); }
inline DV dv_fma(DV x, float s, DV acc) { return _mm256_fmadd_ps(x, _mm256_set1_ps(s), acc); }
inline float dv_hsum(DV v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline IV iv_load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IV iv_zero() { return _mm256_setzero_si256(); }
inline IV iv_nan_mark(IV acc, IV x) { return _mm256_max_epu8(acc, _mm256_add_epi8(x, x)); }
inline bool iv_nan_any(IV acc) {
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(acc, _mm256_set1_epi8(char(0xfe)))) != 0;
}
#endif
#ifdef LK_NEON
// 16 e4m3 bytes -> the fp32 of each times 2^-8 (exact; NaN codes as +-480), 4 vectors: lane i of
// out[j] is byte 4j + i. Sign-extended and shifted left by 7, a byte holds its magnitude at fp16
// bits 13..7 and its sign at bits 15 and 14; without bit 14 that is the fp16 of value * 2^-8
// (e4m3 subnormals become fp16 subnormals of the same digits), which fcvtl widens exactly.
inline void e4m3x16_to_f32(uint8x16_t x, float32x4_t* out) {
  const int8x16_t s = vreinterpretq_s8_u8(x);
  const int16x8_t keep = vdupq_n_s16(int16_t(0xbfff));
  const float16x8_t lo = vreinterpretq_f16_s16(vandq_s16(vshll_n_s8(vget_low_s8(s), 7), keep));
  const float16x8_t hi = vreinterpretq_f16_s16(vandq_s16(vshll_high_n_s8(s, 7), keep));
  out[0] = vcvt_f32_f16(vget_low_f16(lo));
  out[1] = vcvt_high_f32_f16(lo);
  out[2] = vcvt_f32_f16(vget_low_f16(hi));
  out[3] = vcvt_high_f32_f16(hi);
}
#endif
// kChunk bytes (one IV) -> the fp32 of each, in 4 DVs (see above).
#ifdef LK_NEON
inline void iv_decode(IV x, DV* out) { e4m3x16_to_f32(x, out); }
#elif LK_ISA == 1
// avx2: vpsraw / vpand / vpshufb. NOTES: Zen 1 (AVX2 only) runs vector shifts on one of its four
// 128-bit pipes, so the 5 ymm shifts per 32 bytes of the avx512 level's version below bound the
// decode there. Here two byte moves
// are vpshufb (two pipes) instead: 2 shifts + 3 shuffles. Same bytes out, same order. Measured
// (2026-12-01, 2-core Zen 1 EPYC VM, scripts/ab_builds.py, 9 rounds, cache flushed, 8 experts,
// K=2048 N=2816 and K=1408 N=2048): 1 row +2-3%, 2 rows +21%, 4 rows +16%. Not measured on
// Intel (shuffles on one port there, shifts on two) or Zen 2+.
// Where one row tops out on Zen 1 (2026-12-02, same VM, 2.47 GHz, standalone asm/intrinsics
// loops, weights in L2): reciprocal throughput per ymm op vpsraw 2 cycles, vpshufb 1, vfmadd
// 1, vpmaxub 0.66, vpand 0.5. The one-row loop (this decode + the NaN mark + 4 FMAs per 32
// bytes, 4 weight rows) takes ~11.8 cycles per 32 bytes (2.7 B/cycle, ~6.7 GB/s per core);
// without the NaN mark ~10.4. No gain from: vpmulhw by 2^12 in place of either vpsraw (moves
// the shift to the multiplier pipe), a's vectors pinned in registers, two sums per output, 2
// weight rows instead of 4. So one row is pipe-bound at ~13 GB/s on 2 cores there (the kernel
// reaches 10-12), ~65% of the ~20 GB/s read ceiling; 2+ rows are bound by the FMA pipe.
inline void iv_decode(IV x, DV* out) {
  const __m256i keep = _mm256_set1_epi16(int16_t(0x87f0));
  const __m256i hi = _mm256_set1_epi32(int32_t(0xffff0000u));
  const __m256i dup_lo = _mm256_setr_epi8(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14,
                                          0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
  const __m256i lo_up = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 4, 5, -1, -1, 8, 9, -1, -1, 12, 13,
                                         -1, -1, 0, 1, -1, -1, 4, 5, -1, -1, 8, 9, -1, -1, 12, 13);
  const __m256i odd = _mm256_and_si256(_mm256_srai_epi16(x, 4), keep);
  const __m256i even = _mm256_and_si256(_mm256_srai_epi16(_mm256_shuffle_epi8(x, dup_lo), 4), keep);
  out[0] = _mm256_castsi256_ps(_mm256_and_si256(odd, hi));
  out[1] = _mm256_castsi256_ps(_mm256_shuffle_epi8(odd, lo_up));
  out[2] = _mm256_castsi256_ps(_mm256_and_si256(even, hi));
  out[3] = _mm256_castsi256_ps(_mm256_shuffle_epi8(even, lo_up));
}
#else
// avx512: GCC vector arithmetic (>> of signed lanes is arithmetic): vpsraw / vpand / vpsllw / vpslld.
inline void iv_decode(IV x, DV* out) {
  typedef int16_t I16 __attribute__((vector_size(kChunk)));
  typedef uint16_t U16 __attribute__((vector_size(kChunk)));
  typedef uint32_t U32 __attribute__((vector_size(kChunk)));
  const I16 keep = I16{} + int16_t(0x87f0);
  const U32 odd = U32(((I16)x >> 4) & keep);
  const U32 even = U32((I16)((U16)x << 8) >> 4 & keep);
  out[0] = DV(odd & 0xffff0000u);
  out[1] = DV(odd << 16);
  out[2] = DV(even & 0xffff0000u);
  out[3] = DV(even << 16);
}
#endif
// Flags a NaN code among the chunks `fast` decoded (see above).
struct NanMark {
  IV acc;
  NanMark() : acc(iv_zero()) {}  // NOTES: not a default member initializer, whose implicit
                                 // constructor GCC compiles outside the target region
  bool any() const { return iv_nan_any(acc); }
};
struct ChunkDecoder {
  float table[256];                 // value * 2^kTableExp (NaN kept), for chunks holding a NaN code
  ChunkDecoder() {
    for (int i = 0; i < 256; ++i) table[i] = std::ldexp(fp8e4m3_to_f32(uint8_t(i)), kTableExp);
  }
  template <class Mark>
  void fast(const uint8_t* src, DV* out, Mark& nan) const {  // kChunk readable bytes
    const IV x = iv_load(src);
    if constexpr (std::is_same_v<Mark, NanMark>) nan.acc = iv_nan_mark(nan.acc, x);
    iv_decode(x, out);
  }
  void operator()(const uint8_t* src, DV* out) const {  // checked: NaN codes decode as NaN
    NanMark nan;
    fast(src, out, nan);
    if (__builtin_expect(nan.any(), 0)) {
      alignas(64) float v[kVC][kChunk / 4];
      for (int j = 0; j < kVC; ++j)
        for (int i = 0; i < kChunk / 4; ++i) v[j][i] = table[src[byte_of(j, i)]];
      memcpy(out, v, sizeof(v));
    }
  }
};
// MXCSR with DAZ and FTZ off on this thread while alive: the decoded weights' subnormals must
// count, and so must a product's (torch.set_flush_denormal(True) sets both bits).
#ifdef LK_NEON
struct FlushGuard {};  // see above
#else
struct FlushGuard {
  unsigned saved = _mm_getcsr();
  FlushGuard() { _mm_setcsr(saved & ~0x8040u); }
  ~FlushGuard() { _mm_setcsr(saved); }
};
#endif
#else
typedef float DV __attribute__((vector_size(16)));
constexpr int kChunk = 16;
constexpr int kVC = 4;
constexpr float kFix = 1.0f;
constexpr int kDMR = 1;
inline DV dv_zero() { return DV{}; }
inline DV dv_dot(DV acc, DV a, DV w) { return acc + a * w; }
inline DV dv_add(DV a, DV b) { return a + b; }
inline DV dv_fma(DV x, float s, DV acc) { return acc + x * s; }
inline float dv_hsum(DV v) { return (v[0] + v[1]) + (v[2] + v[3]); }
struct ChunkDecoder {
  float table[256];
  ChunkDecoder() {
    for (int i = 0; i < 256; ++i) table[i] = fp8e4m3_to_f32(uint8_t(i));
  }
  void operator()(const uint8_t* src, DV* out) const {
    for (int v = 0; v < kVC; ++v) out[v] = DV{table[src[4 * v]], table[src[4 * v + 1]], table[src[4 * v + 2]], table[src[4 * v + 3]]};
  }
  template <class Mark> void fast(const uint8_t* src, DV* out, Mark&) const { (*this)(src, out); }
};
#endif
#if (LK_ISA == 0 && !defined(LK_NEON)) || LK_ISA >= 3  // exact decoders: a needs no fix, no chunk needs a check
constexpr float kAFix = 1.0f;
struct NanMark {
  bool any() const { return false; }
};
struct FlushGuard {};               // normal fp32 values (generic), vdpbf16ps ignores MXCSR
#endif
// The walks' mark for weights the caller knows hold no NaN code (Problem::b_nan_free): none.
// NOTES: the avx2 mark is 2 of the one-row walk's ~16 vector ops per 32 weight bytes; without
// it (2-core Zen 1 VM, scripts/ab_builds.py, cache flushed) V2-Lite gate/up 1 row ran 1.055x,
// 2-4 rows 1.06-1.08x, K=7168 1.03-1.05x. Only the levels with a mark (avx2, avx512) have it.
struct NoMark {
  bool any() const { return false; }
};
#ifdef LK_NEON
constexpr bool kNeon = true;
#else
constexpr bool kNeon = false;
#endif
constexpr bool kHasMark = LK_ISA == 1 || LK_ISA == 2 || kNeon;

constexpr int kCB = kQuantGroup / kChunk;  // chunks per 128-wide K block
constexpr int kVB = kCB * kVC;             // DVs per block
constexpr int kNC = 4;                     // most weight rows walked together (see decode_item)
constexpr int64_t kChunkBlocks = 4;        // K blocks per L1 panel (rows > kDMR)
constexpr int64_t kItemBytes = 64 * 1024;  // weight bytes per work item (at least 16 columns)
// Rows per segment up to which the decode kernel runs; above: the row-tiled kernels.
// NOTES: avx512 12 and avx2 6 (were 16) since the fp32 row-tiled kernel: a segment of one tile
// or more of rows is faster there. 2-core Zen 4, paths forced, scripts/ab_builds.py both ways
// round, geometric mean, tile/decode speed: avx512 dense K=7168 N=4096 16 rows 1.26x, 12 rows
// 1.0x, 8 rows 0.76x, 6 rows 0.62x; 6 experts K=2048 N=1408 16 rows 1.26x, 8 rows 0.75x. avx2:
// 16 rows 1.28x, 12 1.0x, 8 1.17x, 6 0.94x; 6 experts 16 rows 1.18x, 8 rows 1.10x.
// generic/neon unmeasured (16 kept).
constexpr int64_t kDecodeMaxRows = LK_ISA >= 3 ? 8 : LK_ISA == 2 ? 12 : LK_ISA == 1 ? 6 : 16;
// Segments up to decode_kernel_rows(K) rows take the decode kernel. amx: 4, and 2 where K > 4096
// (weight rows walked 4 at a time): there the decode kernel is bound by its dot products from 3
// rows, while the tile kernel stays at the memory rate whatever the rows. Measured on a 2-core
// Intel Xeon (AMX), weights read from DRAM, decode kernel -> tile kernel, ms: dense N=4096
// K=14336 T=3 3.2-3.6 -> 2.9-3.0, T=4 3.6-3.9 -> 3.0, T=2 2.5-2.6 (tile 3.0-3.1); 4 experts
// N=4096 K=7168 T=3 6.3-7.0 -> 6.1-6.2, T=2 5.1-5.6 (tile 6.2-6.3); 8 experts N=2816 K=2048
// T=5 3.9 -> 3.2-3.6, N=2048 K=1408 T=5 2.0-2.2 -> 1.9, T=4 1.6 (tile 1.9).
constexpr int64_t kDecodeKernelRows = LK_ISA >= 4 ? 4 : kDecodeMaxRows;
inline int64_t decode_kernel_rows(int64_t K) { return LK_ISA >= 4 && K > 4096 ? 2 : kDecodeKernelRows; }
// NOTES: up to 4 rows take the register path on the zmm levels: the L1 panel's stores and
// reloads cost ~5% at V2-Lite T=16 (short rows, one weight row at a time). With long rows (4
// weight rows in a group) 3-4 rows x 4 weight rows do not fit the registers, so they walk 2 of
// the group's weight rows at a time: dense K=14336 T=3/T=4 +18-20% (avx512bf16) and +44-49%
// (avx512) against the panel, since the prefetches of the next group go to L2 (before that,
// walking 2 at a time had lost ~10%).
constexpr int kFusedRows = LK_ISA >= 1 || kNeon ? 4 : kDMR;
// Most rows of a segment on the register path, in groups of up to kFusedRows, each walking the
// same weight rows again (from L1/L2, decoded again): avx2 8, else kFusedRows.
// NOTES: avx2 had walked 2+ rows on the L1 panel (1 row x 4 weight rows per register tile), whose
// stores and reloads bound it on Zen 1 (2-core EPYC VM, 2026-12-02, scripts/ab_builds.py, 4
// experts x m rows, cache flushed, 9 rounds; K=2048 N=2816, K=1408 N=2048, K=7168 N=4096):
// register path m=2 +38-46%, m=3 +29-37%, m=4 +28-40%; groups of it m=6 +3-8%, m=8 +8-15%;
// m=12-16 within 1-3% either way, so the panel keeps them. A 4 x 2 register tile on the panel
// (6 loads per 8 FMAs instead of 5 per 4) moved nothing: the panel's cost is not its loads.
constexpr int kFusedMaxRows = LK_ISA == 1 ? 8 : kFusedRows;
// Weight rows the register path walks together at MR rows of a (of NC in a group): zmm levels
// all NC up to 2 rows, else 2; avx2 (16 registers) all at one row, else one.
constexpr int fused_nc(int MR, int NC) {
  return MR == 1 ? NC : LK_ISA == 1 ? 1 : MR <= 2 ? NC : std::min(NC, 2);
}

// A 128-wide K block of `src` with kv <= 128 valid bytes, readable in full: `src` itself when
// the block is whole, else a copy in `buf` zero-padded past kv (the K tail).
inline const uint8_t* whole_block(const uint8_t* src, int64_t kv, uint8_t* buf) {
  if (kv == kQuantGroup) return src;
  memset(buf, 0, kQuantGroup);
  memcpy(buf, src, size_t(kv));
  return buf;
}

// Decode one 128-wide K block of `src` (kv <= 128 valid bytes; the rest decode as zero).
// kTrusted: the bytes hold no NaN code (see NoMark), so no chunk is checked.
template <bool kTrusted = false>
inline void decode_block(const ChunkDecoder& dec, const uint8_t* src, int64_t kv, DV* out) {
  alignas(64) uint8_t buf[kQuantGroup];
  src = whole_block(src, kv, buf);
  [[maybe_unused]] NoMark none;
  for (int c = 0; c < kCB; ++c) {
    if constexpr (kTrusted) dec.fast(src + c * kChunk, out + c * kVC, none);
    else dec(src + c * kChunk, out + c * kVC);
  }
}

// The prefetches of the next group of NC weight rows: one row at a time (the next row, K <= 4096
// bytes on) non-temporal, four at a time (4K-16K bytes on) into L2 only.
// NOTES: measured against prefetcht0 (the same interleaved runs, 2 Zen 4 cores, with the
// avx512bf16 and avx2 paths): four rows at a time +8-18% (V3 gate/up T=1 and T=4, dense T=1: at
// 4 x 7-14 KiB ahead the L1 copies were evicted before use), one row +2-8% (V2-Lite, V3 down).
// One row at a time on the register path also prefetches 16 rows on into L2: +3-6% more at one
// row per expert (V2-Lite gate/up and down, V3 down; 40 interleaved rounds); 8 rows on: +1-3%.
template <int NC>
constexpr int kPrefetchHint = NC == 1 ? 0 : 2;

using Totals = DV[kDecodeMaxRows][kNC];
using Exact = float[kDecodeMaxRows][kNC];

// Adds one K block's sums blk[r][c] (lanes: partial sums) times a_scale * b_scale to the totals.
template <int MR, int NC>
inline void scale_block(DV (&blk)[MR][NC], const float* sa, int64_t sa_stride, float sb, DV (&t)[MR][NC],
                        Exact& exact, int64_t r0, int c0 = 0) {
  for (int r = 0; r < MR; ++r) {
    const float s = sa[r * sa_stride] * sb;
    if (__builtin_expect(std::fabs(s) <= kSafeScale, 1)) {
      for (int c = 0; c < NC; ++c) t[r][c] = dv_fma(blk[r][c], s * kFix, t[r][c]);
    } else {  // Inf / NaN / huge: the reference's order, (block sum) * scale
      for (int c = 0; c < NC; ++c) exact[r0 + r][c0 + c] += (dv_hsum(blk[r][c]) * kFix) * s;
    }
  }
}

// Few rows (m <= kFusedRows): every weight chunk is decoded into registers and used at once.
// sc[r * KB + kb]: the scale of row r's block kb times kFix; kSafe: every |scale| <= kSafeScale,
// so each block's partial sums take one FMA (else scale_block, which checks each).
// NOTES: per 128-byte weight block the loop body is the decode, the dot products and one FMA
// per output: on Zen 4 the kernel is bound by the vector pipes (about one zmm op per cycle), so
// every op left in the block loop costs bandwidth. One or two sums per output and block (see
// kChains: the out-of-order window overlaps consecutive blocks' chains); the scale is precomputed.
// kChecked: every chunk checked for NaN codes (ChunkDecoder::operator()); else the walk flags
// them (NanMark) and, having met one, is redone checked. Unsafe scales always run checked.
// kSpread: the NC weight rows are far apart (decode_spread: one stream each), so each prefetches
// its own next row (K bytes on) and, into L2, `far` bytes on; else the next group of NC rows.
constexpr float kPreFix = 0x1p20f;  // see PreScaledA
// kPre (avx2, see PreScaledA): a_dec holds a's rows times their block scales, so the
// sums run over all of K with no per-block step (kSafe), and the totals come out times kPreFix.
// kTrusted: the weights hold no NaN code (Problem::b_nan_free), so the walk keeps no mark.
template <int MR, int NC, bool kSafe, bool kChecked = !kSafe, bool kSpread = false, bool kPre = false,
          bool kTrusted = false>
void fused_rows(const ChunkDecoder& dec_in, const uint8_t* const* col, int c0, const Problem& p, const DV* a_dec,
                const float* sa, const float* sbrow, const float* sc, Totals& tot, Exact& exact, int64_t far,
                int r0 = 0) {
  static_assert(!kPre || kSafe, "pre-scaled rows have no unsafe scale");
  static_assert(!kTrusted || !kChecked, "a trusted walk is not checked");
#if LK_ISA >= 3
  // NOTES: a local copy, so the byte tables stay in registers: read through the reference,
  // they were reloaded for every chunk (the loop's rare paths store to memory), which more than
  // doubled the loads per weight chunk (+25% hot). The other levels' table serves rare chunks.
  const ChunkDecoder dec = dec_in;
#else
  const ChunkDecoder& dec = dec_in;
#endif
  DV t[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) t[r][c] = dv_zero();
  const int64_t per_row = p.KB * kVB;
  // prefetch distance: the next group (2-8 KiB further: no gain), or each stream's next row
  const int64_t ahead = kSpread ? p.K : NC * p.K;
  constexpr int kHint = kSpread ? kPrefetchHint<1> : kPrefetchHint<NC>;
  std::conditional_t<kTrusted, NoMark, NanMark> nan;
  // NOTES: with one row and one weight row, two partial sums per block (then added): one sum
  // made a block of the fp32 levels a chain of 8-16 dependent FMAs, which bound the avx2 path
  // (+15-25% on 2 cores cold, V2-Lite and V3 down T=1; avx512bf16 +1-5% on one core).
  // avx2's two or three rows of a against one weight row: two sums each too (4 or 6 chains).
  // NOTES: three rows on one chain each were bound by the FMA latency (4 dependent FMAs per 32
  // weight bytes); two chains each (2-core Zen 1 VM, scripts/ab_builds.py, 6 experts, K=2048
  // N=2816, K=1408 N=2048, K=7168 N=4096, cache flushed, 15 rounds): 3 rows +10-13%, 6 rows (two
  // groups of 3) +14-17%, 7 rows (3 + 4) +6-7%, 4 rows unchanged. Four rows with two chains
  // each (8 sums) lost 6-7% there, so they keep one.
  // neon (4 lanes): up to 4 chains per sum, at least 4 sums in flight.
  constexpr int kChains = kNeon ? std::max(1, 4 / (MR * NC))
                          : LK_ISA >= 1 && (MR * NC <= (LK_ISA == 1 ? 2 : 1) || (LK_ISA == 1 && NC == 1 && MR == 3)) ? 2 : 1;
  DV run[MR][NC][kChains];  // kPre: the sums over all of K
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c)
      for (int q = 0; q < kChains; ++q) run[r][c][q] = dv_zero();
  auto block = [&](int64_t kb, const uint8_t* const* src) {
    DV blk[MR][NC];
    DV local[MR][NC][kChains];
    auto& part = kPre ? run : local;
    if constexpr (!kPre)
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NC; ++c)
          for (int q = 0; q < kChains; ++q) part[r][c][q] = dv_zero();
    for (int ch = 0; ch < kCB; ++ch)
      for (int c = 0; c < NC; ++c) {
        DV w[kVC];
        if constexpr (kChecked) dec(src[c] + ch * kChunk, w);
        else dec.fast(src[c] + ch * kChunk, w, nan);
        for (int v = 0; v < kVC; ++v)
          for (int r = 0; r < MR; ++r) {
            DV& acc = part[r][c][(ch * kVC + v) % kChains];
            acc = dv_dot(acc, a_dec[r * per_row + kb * kVB + ch * kVC + v], w[v]);
          }
      }
    if constexpr (kPre) return;
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NC; ++c) {
        blk[r][c] = part[r][c][0];
        for (int q = 1; q < kChains; ++q) blk[r][c] = dv_add(blk[r][c], part[r][c][q]);
      }
    if constexpr (kSafe) {
      for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NC; ++c) t[r][c] = dv_fma(blk[r][c], sc[r * p.KB + kb], t[r][c]);
    } else {
      scale_block<MR, NC>(blk, sa + kb, p.KB, sbrow[kb], t, exact, r0, c0);
    }
  };
  const int64_t whole = p.K / kQuantGroup;
  for (int64_t kb = 0; kb < whole; ++kb) {
    const int64_t k0 = kb * kQuantGroup;
    const uint8_t* src[NC];
    for (int c = 0; c < NC; ++c) {
      src[c] = col[c] + k0;
      // NOTES: the next group of NC weight rows (NC * K bytes on), same block: the streams of a
      // group are short (K bytes each) and the hardware prefetcher would start each cold.
      __builtin_prefetch(src[c] + ahead, 0, kHint);
      __builtin_prefetch(src[c] + ahead + 64, 0, kHint);
      if constexpr (NC == 1) {  // and into L2 16 rows on (see kPrefetchHint)
        __builtin_prefetch(src[c] + 16 * ahead, 0, 2);
        __builtin_prefetch(src[c] + 16 * ahead + 64, 0, 2);
      } else if constexpr (kSpread) {  // and into L2 `far` bytes on
        __builtin_prefetch(src[c] + far, 0, 2);
        __builtin_prefetch(src[c] + far + 64, 0, 2);
      }
    }
    block(kb, src);
  }
  if (whole < p.KB) {  // the K tail, zero padded
    const int64_t k0 = whole * kQuantGroup;
    alignas(64) uint8_t tail[NC][kQuantGroup];
    const uint8_t* src[NC];
    for (int c = 0; c < NC; ++c) src[c] = whole_block(col[c] + k0, p.K - k0, tail[c]);
    block(whole, src);
  }
  if (!kChecked && __builtin_expect(nan.any(), 0)) {  // a NaN code: the walk again, checked
    fused_rows<MR, NC, kSafe, true, kSpread, kPre>(dec, col, c0, p, a_dec, sa, sbrow, sc, tot, exact, far, r0);
    return;
  }
  if constexpr (kPre)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NC; ++c) {
        DV sum = run[r][c][0];
        for (int q = 1; q < kChains; ++q) sum = dv_add(sum, run[r][c][q]);
        t[r][c] = dv_fma(sum, kPreFix, dv_zero());
      }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) tot[r0 + r][c0 + c] = t[r][c];
}

// fused_rows for safe scales (kSafe), without the NaN mark where the weights are trusted (and
// the level has a mark: elsewhere the two walks would be the same code).
template <int MR, int NC, bool kSpread, bool kPre>
inline auto safe_walk(bool trusted) {
  if constexpr (kHasMark)
    if (trusted) return &fused_rows<MR, NC, true, false, kSpread, kPre, true>;
  return &fused_rows<MR, NC, true, false, kSpread, kPre>;
}

// More rows: per chunk of K blocks the NC weight rows are decoded once into an L1 panel
// [NC][kChunkBlocks][kVB], then register tiles of MR rows run over it, totals in registers.
// arow / sa: the tile's first row of decoded a / a_scale at the panel's first block; rows are
// a_stride DVs / sa_stride floats apart.
template <int MR, int NC>
inline void panel_rows(const DV* arow, int64_t a_stride, const DV* panel, int64_t nb, const float* sa,
                       int64_t sa_stride, const float* sb, Totals& tot, Exact& exact, int64_t r0) {
  DV t[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) t[r][c] = tot[r0 + r][c];
  for (int64_t kb = 0; kb < nb; ++kb) {
    DV blk[MR][NC];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NC; ++c) blk[r][c] = dv_zero();
    for (int v = 0; v < kVB; ++v) {
      DV av[MR];
      for (int r = 0; r < MR; ++r) av[r] = arow[r * a_stride + kb * kVB + v];
      for (int c = 0; c < NC; ++c) {
        const DV w = panel[(c * kChunkBlocks + kb) * kVB + v];
        for (int r = 0; r < MR; ++r) blk[r][c] = dv_dot(blk[r][c], av[r], w);
      }
    }
    scale_block<MR, NC>(blk, sa + kb, sa_stride, sb[kb], t, exact, r0);
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) tot[r0 + r][c] = t[r][c];
}

#if LK_ISA >= 2
// NOTES: one row of a against short weight rows (one at a time, K <= 4096) ends each output in
// a horizontal sum and a store: ~6.5 ns per output on Zen 4 besides ~0.032 ns per weight byte,
// 10-12% of a V2-Lite row (K = 1408-2048). The totals of 16 consecutive outputs are kept and
// summed together instead: a transposed reduction, 45 vector ops for 16 sums (one
// _mm512_reduce_add_ps is ~8 per sum, each a latency chain at the end of its row).
struct Sums16 {
  __m512 v[16];
  float extra[16];
  int n = 0;
  void add(__m512 t, float e) {
    v[n] = t;
    extra[n] = e;
    ++n;
  }
  // out[row, c0 + i] = (lanes of v[i] summed) + extra[i] for i < n.
  void flush(const Problem& p, int64_t row, int64_t c0) {
    for (int i = n; i < 16; ++i) v[i] = _mm512_setzero_ps(), extra[i] = 0.0f;
    __m512 s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i] and v[2i+1]'s pair sums, interleaved
      s8[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane L: element e = lane L of v[4i + e], summed
      const __m512d a = _mm512_castps_pd(s8[2 * i]), b = _mm512_castps_pd(s8[2 * i + 1]);
      s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i)  // lanes (L0+L1, L2+L3) of s4[2i], then of s4[2i+1]
      s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0x88),
                            _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0xdd));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xdd));
    alignas(64) float out[16];
    _mm512_store_ps(out, r);
    for (int i = 0; i < n; ++i) store_out(p, row, c0 + i, out[i] + extra[i]);
    n = 0;
  }
};
#endif

// sc[r * KB + kb] = a_scale[r][kb] * b_scale[kb] * kFix for rows [0, m) of a (from sa0) against one
// weight block row (sbrow); true when every |product| <= kSafeScale (see fused_rows' kSafe).
inline bool block_row_scales(const Problem& p, const float* sa0, const float* sbrow, int64_t m, float* sc) {
  bool safe = true;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t kb = 0; kb < p.KB; ++kb) {
      const float s = sa0[r * p.KB + kb] * sbrow[kb];
      safe = safe && std::fabs(s) <= kSafeScale;
      sc[r * p.KB + kb] = s * kFix;
    }
  return safe;
}

// avx2: the rows of a times their block scales, for one weight block row: the decode walks'
// dot products then need no step per 128-wide K block. Element v of block kb of row r is
// a_dec * sc * 2^-20 = value_a * s * 2^100 (s = a_scale * b_scale; a_dec is value * 2^112, sc is
// s * kFix), so a product with a decoded weight (value * 2^-120) is value_a * s * value_b *
// 2^-20 and the totals take kPreFix = 2^20. Used when every s is 0 or 2^-80 <= |s| <= 2^18:
// then no element overflows (448 * 2^118 < 2^127) and no nonzero product is subnormal (>= 2^-9 *
// 2^-80 * 2^-9 * 2^-20). Each element is one rounding of a * s, where the block sums had been
// exact products rounded by the sums and once by the scale: the same size of error.
// NOTES: 2-core Zen 1 (avx2), a stand-alone loop of the kernel's one-row walk (4 weight rows,
// 34.6 MB from DRAM): 13.0-13.9 GB/s with the per-block FMA, 14.2-14.4 without. In the kernel
// (scripts/ab_builds.py, cache flushed, paired time ratios): K=2048 and 1408 (four streams) 1
// row +2-4%, 2 rows +8%, 4 rows +5%; K=7168 (four adjacent rows) 1-8 rows +4-7%. The avx512
// level (the same fp32 walk on zmm) could take it too; not done: no AVX-512 CPU to measure it on.
#if LK_ISA == 1
struct PreScaledA {
  std::vector<float> store;
  DV* rows = nullptr;
  const float* key_sb = nullptr;  // what rows were made for: the weight block row and a's rows
  const DV* key_a = nullptr;
  int64_t key_m = 0;
  // rows for a_dec's m rows against sc (block_row_scales'); nullptr when some scale is out of range.
  const DV* make(const Problem& p, const DV* a_dec, int64_t m, const float* sc, const float* sbrow) {
    if (key_sb == sbrow && key_a == a_dec && key_m == m) return rows;
    key_sb = nullptr;
    for (int64_t i = 0; i < m * p.KB; ++i) {
      const float s = std::fabs(sc[i]);
      if (!(s == 0.0f || (s >= 0x1p-72f && s <= 0x1p26f))) return nullptr;  // sc = s * 2^8
    }
    const int64_t per_row = p.KB * kVB;
    const size_t need = size_t(m * per_row) * (sizeof(DV) / sizeof(float)) + 16;
    if (store.size() < need) store.resize(need);
    rows = reinterpret_cast<DV*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t(63));
    for (int64_t r = 0; r < m; ++r)
      for (int64_t kb = 0; kb < p.KB; ++kb) {
        const float f = sc[r * p.KB + kb] * 0x1p-20f;  // exact: |sc| >= 2^-72
        for (int v = 0; v < kVB; ++v)
          rows[r * per_row + kb * kVB + v] = dv_fma(a_dec[r * per_row + kb * kVB + v], f, dv_zero());
      }
    key_sb = sbrow, key_a = a_dec, key_m = m;
    return rows;
  }
};
#else
struct PreScaledA {
  const DV* make(const Problem&, const DV*, int64_t, const float*, const float*) { return nullptr; }
};
#endif

// Output columns [n0, n1) of one small segment; a_dec: its rows, decoded. NC weight rows are
// walked along K together (decode_spread walks most short-row items since; this handles the
// rest). NOTES: one row at a time reads memory in one sequential sweep (better than four
// adjacent rows for one row of a against short rows, K <= 4096: +25% at V2-Lite's K=2048), but for long
// rows a's decoded row no longer stays in L1 beside the stream, and 4 rows sharing each a load
// win (+45% at K=14336). With 2+ rows of a the dot products weigh more than the stream: 4
// weight rows at a time there too (8 experts x m rows, K=2048, after a cache flush, the same
// process alternating builds: m=2 +3%, m=3-4 +4-6%, m=6-8 +41-47%; one core hot, m=2 20.0 ->
// 22.6 GB/s, m=4 13.3 -> 15.0; V2-Lite T=4 / T=16 routing: within 1%).
template <int NC>
void decode_item(const Problem& p, const ChunkDecoder& dec, const DV* a_dec, const Segment& seg, int64_t n0,
                 int64_t n1, float* sc, PreScaledA& pre) {
  const float* sc_row = nullptr;  // the weight block row sc was computed for (m <= kFusedRows)
  bool sc_safe = false;
  const int64_t m = seg.r1 - seg.r0;
  const uint8_t* bg = p.b + seg.group * p.N * p.K;
  const float* sbg = p.b_scale + seg.group * p.NB * p.KB;
  alignas(64) DV panel[NC * kChunkBlocks * kVB];
  Totals tot;
  Exact exact;
#if LK_ISA >= 2
  Sums16 sums;
#endif
  for (int64_t c0 = n0; c0 < n1; c0 += NC) {
    const int nc = int(std::min<int64_t>(NC, n1 - c0));
    const uint8_t* col[NC];
    for (int c = 0; c < NC; ++c) col[c] = bg + (c0 + std::min(c, nc - 1)) * p.K;  // a tail repeats its last column
    const float* sbrow = sbg + (c0 / kQuantGroup) * p.KB;  // NC divides 128: one weight block row
    for (int64_t r = 0; r < m; ++r)
      for (int c = 0; c < NC; ++c) tot[r][c] = dv_zero(), exact[r][c] = 0.0f;
    const float* sa0 = p.a_scale + seg.r0 * p.KB;
    if (m <= kFusedMaxRows && sbrow != sc_row) {  // the rows' block scales for this weight block row
      sc_row = sbrow;
      sc_safe = block_row_scales(p, sa0, sbrow, m, sc);
    }
    // the register path: MR rows from r0, the NC weight rows together or fused_nc at a time
    [[maybe_unused]] const DV* a_pre = m <= kFusedMaxRows && sc_safe ? pre.make(p, a_dec, m, sc, sbrow) : nullptr;
    const auto fused = [&](auto mr, int64_t r0) {
      constexpr int MR = decltype(mr)::value, NCF = fused_nc(MR, NC);
      const int64_t per_row = p.KB * kVB;
      for (int c = 0; c < NC; c += NCF) {
#if LK_ISA == 1
        if (a_pre) {
          safe_walk<MR, NCF, false, true>(p.b_nan_free)(dec, col + c, c, p, a_pre + r0 * per_row, sa0 + r0 * p.KB,
                                                         sbrow, sc + r0 * p.KB, tot, exact, 0, int(r0));
          continue;
        }
#endif
        (sc_safe ? safe_walk<MR, NCF, false, false>(p.b_nan_free) : fused_rows<MR, NCF, false>)(
            dec, col + c, c, p, a_dec + r0 * per_row, sa0 + r0 * p.KB, sbrow, sc + r0 * p.KB, tot, exact, 0, int(r0));
      }
    };
    if (m <= kFusedMaxRows) {
      // groups as even as can be (5 rows: 3 + 2; a 1-row group re-decodes the weights for little)
      const int64_t groups = ceil_div(m, int64_t(kFusedRows));
      for (int64_t g = 0, r0 = 0; g < groups; ++g) {
        const int64_t rows = (m - r0) / (groups - g);
        if (rows >= kFusedRows) fused(std::integral_constant<int, kFusedRows>{}, r0);
        else if (rows == 3) fused(std::integral_constant<int, std::min(3, kFusedRows)>{}, r0);
        else if (rows == 2) fused(std::integral_constant<int, std::min(2, kFusedRows)>{}, r0);
        else fused(std::integral_constant<int, 1>{}, r0);
        r0 += std::min<int64_t>(rows, kFusedRows);
      }
    } else {
      for (int64_t kb0 = 0; kb0 < p.KB; kb0 += kChunkBlocks) {
        const int64_t nb = std::min(kChunkBlocks, p.KB - kb0);
        for (int c = 0; c < NC; ++c)
          for (int64_t kb = 0; kb < nb; ++kb) {
            const int64_t k0 = (kb0 + kb) * kQuantGroup;
            const uint8_t* src = col[c] + k0;
            __builtin_prefetch(src + NC * p.K, 0, kPrefetchHint<NC>);  // the next group (see fused_rows)
            __builtin_prefetch(src + NC * p.K + 64, 0, kPrefetchHint<NC>);
            (kHasMark && p.b_nan_free ? decode_block<kHasMark> : decode_block<false>)(
                dec, src, std::min<int64_t>(kQuantGroup, p.K - k0), panel + (c * kChunkBlocks + kb) * kVB);
          }
        const int64_t per_row = p.KB * kVB;
        for (int64_t r0 = 0; r0 < m; r0 += kDMR) {
          const DV* arow = a_dec + r0 * per_row + kb0 * kVB;
          const float* sa = sa0 + r0 * p.KB + kb0;
          if (m - r0 >= kDMR)
            panel_rows<kDMR, NC>(arow, per_row, panel, nb, sa, p.KB, sbrow + kb0, tot, exact, r0);
          else
            panel_rows<1, NC>(arow, per_row, panel, nb, sa, p.KB, sbrow + kb0, tot, exact, r0);
        }
      }
    }
#if LK_ISA >= 2
    if (m == 1 && NC == 1) {  // the sum waits for 15 more (see Sums16)
      sums.add(tot[0][0], exact[0][0]);
      if (sums.n == 16 || c0 + 1 >= n1) sums.flush(p, seg.r0, c0 + 1 - sums.n);
      continue;
    }
#endif
    for (int64_t r = 0; r < m; ++r)
      for (int c = 0; c < nc; ++c) store_out(p, seg.r0 + r, c0 + c, dv_hsum(tot[r][c]) + exact[r][c]);
  }
}

// One to four rows of a (m <= kFusedRows) against short weight rows (K <= 4096), columns [n0, n1)
// inside one 128-row weight block: the columns are cut in four contiguous quarters walked
// together, one weight row of each at a time, so the weights stream from four places at once.
// NOTES: one stream (one row after the other, or four adjacent rows: K <= 4 KiB apart) leaves
// the memory side idle between the prefetcher's requests. A stand-alone loop on one core of
// the 2-core Intel Xeon VM (this kernel's inner loop, K=2048, 600 MB of weights): one stream
// 10.4-12.2 GB/s, four adjacent rows 10.3-11.7, four streams 14.1-14.7 (a plain one-stream read:
// 13-14; streams >= 2 rows apart all ~14). In the kernel, 2 threads, cold, 2 MiB pages: V2-Lite
// gate/up T=1 24-26 -> 28-29 GB/s, 0.82-0.87 -> 0.96-1.01 of a read of the same experts
// (BENCHMARKS.md); 2 rows per expert 20-21 -> 25 GB/s; 3-4 rows (bound by their dot products,
// walked two streams at a time) 15-18 -> 15-19.
constexpr int64_t kSpreadMin = 8;  // fewer columns: decode_item
template <int MR>
void decode_spread(const Problem& p, const ChunkDecoder& dec, const DV* a_dec, const Segment& seg, int64_t n0,
                   int64_t n1, float* sc, PreScaledA& pre) {
  constexpr int NC = 4;
  const int64_t width = n1 - n0, quarter = ceil_div(width, NC);
  const uint8_t* bg = p.b + seg.group * p.N * p.K;
  const float* sbrow = p.b_scale + (seg.group * p.NB + n0 / kQuantGroup) * p.KB;
  const float* sa0 = p.a_scale + seg.r0 * p.KB;
  const bool safe = block_row_scales(p, sa0, sbrow, MR, sc);
  [[maybe_unused]] const DV* a_pre = safe ? pre.make(p, a_dec, MR, sc, sbrow) : nullptr;
  alignas(64) DV sums[kQuantGroup];  // one row: each column's lanes, in column order
  float extra[kQuantGroup];
  Totals tot;
  Exact exact;
  for (int64_t i = 0; i < quarter; ++i) {
    int64_t cols[NC];
    int nc = 0;
    for (int j = 0; j < NC; ++j)
      if (n0 + i + j * quarter < n1) cols[nc++] = n0 + i + j * quarter;
    const uint8_t* col[NC];
    for (int j = 0; j < NC; ++j) col[j] = bg + cols[std::min(j, nc - 1)] * p.K;  // a short quarter repeats
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NC; ++j) tot[r][j] = dv_zero(), exact[r][j] = 0.0f;
    constexpr int NCF = fused_nc(MR, NC);  // fewer streams at a time from 2-3 rows (registers)
    for (int c = 0; c < NC; c += NCF) {
#if LK_ISA == 1
      if (a_pre) {
        safe_walk<MR, NCF, true, true>(p.b_nan_free)(dec, col + c, c, p, a_pre, sa0, sbrow, sc, tot, exact,
                                                      width * p.K, 0);
        continue;
      }
#endif
      (safe ? safe_walk<MR, NCF, true, false>(p.b_nan_free) : fused_rows<MR, NCF, false, true, true>)(
          dec, col + c, c, p, a_dec, sa0, sbrow, sc, tot, exact, width * p.K, 0);  // far: the next item's rows
    }
    if constexpr (MR == 1) {
      for (int j = 0; j < nc; ++j) sums[cols[j] - n0] = tot[0][j], extra[cols[j] - n0] = exact[0][j];
    } else {
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < nc; ++j) store_out(p, seg.r0 + r, cols[j], dv_hsum(tot[r][j]) + exact[r][j]);
    }
  }
  if constexpr (MR == 1) {
#if LK_ISA >= 2
    Sums16 s16;  // see Sums16
    for (int64_t c = 0; c < width; ++c) {
      s16.add(sums[c], extra[c]);
      if (s16.n == 16 || c + 1 == width) s16.flush(p, seg.r0, n0 + c + 1 - s16.n);
    }
#else
    for (int64_t c = 0; c < width; ++c) store_out(p, seg.r0, n0 + c, dv_hsum(sums[c]) + extra[c]);
#endif
  }
}

void gemm_decode(const Problem& p, const std::vector<Segment>& segs) {
  if (segs.empty()) return;
  const ChunkDecoder dec;
  std::vector<int64_t> first(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) first[i + 1] = first[i] + (segs[i].r1 - segs[i].r0);
  const int64_t rows = first.back(), per_row = p.KB * kVB;
  // std::vector<float> (instantiated for the baseline target, see variants.h), aligned by hand
  std::vector<float> a_store(size_t(rows * per_row) * (sizeof(DV) / sizeof(float)) + 16);
  DV* a_dec = reinterpret_cast<DV*>((reinterpret_cast<uintptr_t>(a_store.data()) + 63) & ~uintptr_t(63));
  // NOTES: items of ~64 KiB of weights: with short rows (V2-Lite down: K=1408) 16 columns are
  // only 22 KiB, and every item start is a cold stream; columns stay a multiple of 16 (kNC).
  const int64_t cols = std::max<int64_t>(16, (kItemBytes / std::max<int64_t>(p.K, 1)) / 16 * 16);
  std::vector<std::pair<int64_t, int64_t>> items;  // (segment, first column)
  for (size_t i = 0; i < segs.size(); ++i)
    for (int64_t n0 = 0; n0 < p.N; n0 += cols) items.push_back({int64_t(i), n0});
  const int64_t n_items = int64_t(items.size());
  // NOTES: each thread walks its own contiguous share of the items (one long sequential stream
  // of weight bytes, which the hardware prefetcher follows across item boundaries), then helps
  // with the others' shares from their fronts. Taking items round-robin from one shared counter
  // broke every thread's stream into 64 KiB pieces: 1.3x from the second core instead of 1.8x.
  constexpr int kMaxShares = 64;
  struct alignas(64) Share { std::atomic<int64_t> next; int64_t end; };
  Share shares[kMaxShares];
  // One parallel region: decode the rows of a, then the items. Small problems run on the
  // calling thread (see kParallelMacs).
#pragma omp parallel if (rows * p.N * p.K >= kParallelMacs)
  {
    [[maybe_unused]] const FlushGuard no_flush;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const size_t s = size_t(std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1);
      const uint8_t* src = p.a + (segs[s].r0 + (i - first[s])) * p.K;
      DV* out = a_dec + i * per_row;
      for (int64_t kb = 0; kb < p.KB; ++kb)
        decode_block(dec, src + kb * kQuantGroup, std::min<int64_t>(kQuantGroup, p.K - kb * kQuantGroup), out + kb * kVB);
      if (kAFix != 1.0f)  // x * 2^116 + 0, twice (exact)
        for (int64_t v = 0; v < per_row; ++v) out[v] = dv_fma(dv_fma(out[v], kAFix, dv_zero()), kAFix, dv_zero());
    }
    const int nt = std::min(omp_get_num_threads(), kMaxShares), me = omp_get_thread_num();
    if (me < nt) {
      shares[me].next.store(n_items * me / nt, std::memory_order_relaxed);
      shares[me].end = n_items * (me + 1) / nt;
    }
#pragma omp barrier
    std::vector<float> sc(size_t(kFusedMaxRows * p.KB));  // decode_item's scale cache
    PreScaledA pre;                                          // decode_spread's rows of a
    for (int v = 0; v < nt; ++v) {  // own share first, then the next ones
      Share& sh = shares[(me + v) % nt];
      for (;;) {
        const int64_t it = sh.next.fetch_add(1, std::memory_order_relaxed);
        if (it >= sh.end) break;
        const Segment& seg = segs[size_t(items[it].first)];
        const int64_t n0 = items[it].second, n1 = std::min(p.N, n0 + cols);
        const DV* a_seg = a_dec + first[size_t(items[it].first)] * per_row;
        const int64_t m = seg.r1 - seg.r0;
        const bool spread = p.K <= 4096 && m <= kFusedRows && n1 - n0 >= kSpreadMin &&
                            n0 / kQuantGroup == (n1 - 1) / kQuantGroup;
        if (spread && m == 1)
          decode_spread<1>(p, dec, a_seg, seg, n0, n1, sc.data(), pre);
        else if (spread && m == 2)
          decode_spread<std::min(2, kFusedRows)>(p, dec, a_seg, seg, n0, n1, sc.data(), pre);
        else if (spread && m == 3)
          decode_spread<std::min(3, kFusedRows)>(p, dec, a_seg, seg, n0, n1, sc.data(), pre);
        else if (spread)
          decode_spread<kFusedRows>(p, dec, a_seg, seg, n0, n1, sc.data(), pre);
        else
          (p.K <= 4096 && m == 1 ? decode_item<1> : decode_item<4>)(p, dec, a_seg, seg, n0, n1, sc.data(), pre);
      }
    }
  }
}


#if LK_ISA < 3
// ===================================================================== row-tiled fp32 kernel
// Prefill on the levels without AVX512_BF16 (avx512, avx2, generic, neon): the avx512bf16
// path's structure on fp32 multiply-adds. Vectorised over rows: a vector of the level's width
// (kTileRows: 16 on avx512, 8 on avx2, 4 on generic/neon) holds one output column of a tile.
// - Each tile of a is decoded once per call (ChunkDecoder: value * 2^112 on avx2/avx512 and
//   neon, the value on generic) into [K block][position][tile rows] (PackedA::a_t), its scales
//   into [K block][tile rows].
// - An item is (group, up to 128 rows, up to kMaxStrips strips of kNTile weight columns). Per K
//   block, each strip's kNTile weight rows are decoded into an L1 panel ([column][position], in
//   the decode's position order, which a_t shares), and the micro-kernel keeps kFT tiles x kFC
//   columns of accumulators: per position kFT vector loads of a and kFC broadcast weights for
//   kFT x kFC multiply-adds. Lanes are rows, so a lane ends a block holding one row's whole block
//   sum: totals += sum * kFix (2^8 or 1, exact) * (a_scale * b_scale), the reference's order.
// - The K block is the outer loop and the strips the inner one, so a's block for the item (128
//   rows x 128 positions, 64 KiB) is read from L2 by every strip.
// NOTES: replaces a 3 x 3 dot-product kernel over whole decoded rows (lanes along K; 6 loads per
// 9 FMAs from rows of 28 KiB at K=7168, past L1, and a horizontal sum per output). Dense M=512 /
// 64 / 32 N=4096 K=7168, 2-core Zen 4, scripts/ab_builds.py --cpu, old/new: avx2 2.02 / 1.76 /
// 1.66, avx512 3.09 / 2.62 / 1.91, generic 1.20 / 1.12 / -. Against torch's fp32 matmul at
// M=512 (same run): avx2 0.56-0.65x -> 1.18x, avx512 0.57x -> 1.55x.
constexpr int kTileRows = LK_ISA == 2 ? 16 : LK_ISA == 1 ? 8 : 4;
typedef float TV __attribute__((vector_size(4 * kTileRows)));
// x in every lane, from memory (vbroadcastss / ld1r; `TV{} + x` added a zero first, 0 + x not
// being x for x = -0: 2x slower on avx2)
template <int... I>
inline TV tv_splat(const float* x, std::integer_sequence<int, I...>) {
  return TV{((void)I, *x)...};
}
inline TV tv_splat(const float* x) { return tv_splat(x, std::make_integer_sequence<int, kTileRows>{}); }
// Tiles per micro-kernel call, and the columns per pass for kT tiles (a divisor of kNTile):
// 16 vector registers (avx2, x86 generic): 2 x 6, 1 x 12; 32 (avx512): 4 x 6, 2 x 12, 1 x 24.
// neon: 4 x 4, 2 x 8, 1 x 12: GCC multiplies by a weight held in a lane (fmla by element), so
// the kC weights take registers too (4 x 6 spilled two accumulators per position).
constexpr int kFT = LK_ISA == 2 || kNeon ? 4 : 2;
constexpr int f_cols(int kT) {
  return kNeon ? (kT == 4 ? 4 : kT == 2 ? 8 : 12) : 6 * kFT / kT;
}
constexpr int64_t kNTile = 24;                            // weight columns per strip
constexpr int64_t kTilesPerItem = 128 / kTileRows;        // 128 rows per item
constexpr int64_t kMaxStrips = 8;                         // strips per item at most
constexpr int64_t kABlock = int64_t(kQuantGroup) * kTileRows;  // PackedA::a_t floats per tile and K block

using ADecoder = ChunkDecoder;  // decodes a for pack_a_block
struct PackedA {  // tiles of a, transposed per K block (not zeroed: pack_a_block writes all)
  std::vector<float, NoZero<float>> a_t;   // [tile, block][position][kTileRows]
  std::vector<float, NoZero<float>> sa_t;  // [tile, block][kTileRows] (0 past the tile's rows)
};

// One K block of a tile: the kv <= 128 bytes at `src` of each of `rows` rows (lda bytes apart)
// -> a_t[position][kTileRows] in the decode's position order (zero past kv and past `rows`).
void pack_a_block(const ChunkDecoder& dec, const uint8_t* src, int64_t lda, int64_t rows, int64_t kv, float* a_t) {
  alignas(64) DV buf[kVB];
  const float* v = reinterpret_cast<const float*>(buf);
  for (int r = 0; r < kTileRows; ++r) {
    if (r < rows) {
      decode_block(dec, src + r * lda, kv, buf);
      for (int q = 0; q < kQuantGroup; ++q) a_t[q * kTileRows + r] = v[q] * kAFix * kAFix;  // exact
    } else {
      for (int q = 0; q < kQuantGroup; ++q) a_t[q * kTileRows + r] = 0.0f;
    }
  }
}

// tot[t][c][kTileRows] += (a block . panel column c) * kFix * (sa[t] * sb[c]) for kT tiles and
// the kNTile columns of the panel ([column][128 positions]), in passes of kC columns.
template <int kT, int kC>
__attribute__((noinline)) void micro_kernel(const float* const* a_in, const float* panel, const float* const* sa,
                                            const float* sb, float* const* tot) {
  const float* a[kT];
  for (int t = 0; t < kT; ++t) a[t] = a_in[t];
  for (int h = 0; h < kNTile / kC; ++h) {
    TV acc[kT][kC];
#pragma GCC unroll 24
    for (int t = 0; t < kT; ++t)
#pragma GCC unroll 24
      for (int c = 0; c < kC; ++c) acc[t][c] = TV{};
    const float* pp = panel + h * kC * kQuantGroup;
    for (int q = 0; q < kQuantGroup; ++q) {
      TV av[kT];
#pragma GCC unroll 24
      for (int t = 0; t < kT; ++t) __builtin_memcpy(&av[t], a[t] + q * kTileRows, sizeof(TV));
#pragma GCC unroll 24
      for (int c = 0; c < kC; ++c) {
        const TV w = tv_splat(pp + c * kQuantGroup + q);
#pragma GCC unroll 24
        for (int t = 0; t < kT; ++t) acc[t][c] += av[t] * w;
      }
    }
#pragma GCC unroll 24
    for (int t = 0; t < kT; ++t) {
      TV st;
      __builtin_memcpy(&st, sa[t], sizeof(TV));
#pragma GCC unroll 24
      for (int c = 0; c < kC; ++c) {
        float* o = tot[t] + (h * kC + c) * kTileRows;
        TV v;
        __builtin_memcpy(&v, o, sizeof(TV));
        v += (acc[t][c] * kFix) * (st * tv_splat(sb + h * kC + c));
        __builtin_memcpy(o, &v, sizeof(TV));
      }
    }
  }
}

struct Scratch {
  alignas(64) float panel[kNTile * kQuantGroup];  // one strip's K block: [column][position]
  float sb[kNTile];                               // its weight scale per column
  std::vector<float> totals;                      // [strip][tile][kNTile][kTileRows]
};

// The K loop of one item: `tiles` tiles of a x the strips of kNTile columns in [n0, n1), blocks
// [0, KB). b_block(n, kb): column n's block kb (kv_of(kb) <= 128 valid bytes); sb_of(n, kb): its
// scale; packed(t, kb): index of the item's tile t, block kb in pa. Totals in s.totals (zeroed
// here): strip j at j * tiles * kNTile * kTileRows.
template <class BBlock, class KvOf, class SbOf, class Packed>
void item_products(const Problem& p, const ChunkDecoder& dec, const PackedA& pa, int64_t tiles, int64_t n0,
                   int64_t n1, int64_t KB, BBlock b_block, KvOf kv_of, SbOf sb_of, Packed packed, Scratch& s) {
  [[maybe_unused]] const FlushGuard no_flush;  // the panel holds subnormal fp32 for small weights
  const int64_t strips = ceil_div(n1 - n0, kNTile), strip_floats = tiles * kNTile * kTileRows;
  s.totals.assign(size_t(strips * strip_floats), 0.0f);
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int64_t kv = kv_of(kb);
    for (int64_t j = 0; j < strips; ++j) {
      const int64_t c0 = n0 + j * kNTile, nc = std::min(kNTile, n1 - c0);
      for (int64_t c = 0; c < kNTile; ++c) {
        float* col = s.panel + c * kQuantGroup;
        if (c >= nc) {  // past the item's columns: zero
          std::fill_n(col, kQuantGroup, 0.0f);
          s.sb[c] = 0.0f;
          continue;
        }
        if (kb + 1 < KB) {  // the column's next block
          const uint8_t* q = b_block(c0 + c, kb + 1);
          __builtin_prefetch(q, 0, 1);
          __builtin_prefetch(q + 64, 0, 1);
        }
        (p.b_nan_free ? decode_block<true> : decode_block<false>)(dec, b_block(c0 + c, kb), kv,
                                                                    reinterpret_cast<DV*>(col));
        s.sb[c] = sb_of(c0 + c, kb);
      }
      float* totals = s.totals.data() + j * strip_floats;
      // kFT tiles at a time, then 2 (kFT 4), then 1
      for (int64_t t = 0; t < tiles;) {
        const auto run = [&](auto kt) {
          constexpr int kT = decltype(kt)::value;
          const float* a[kT];
          const float* sa[kT];
          float* tot[kT];
          for (int i = 0; i < kT; ++i) {
            const int64_t at = packed(t + i, kb);
            a[i] = pa.a_t.data() + at * kABlock;
            sa[i] = pa.sa_t.data() + at * kTileRows;
            tot[i] = totals + (t + i) * kNTile * kTileRows;
          }
          micro_kernel<kT, f_cols(kT)>(a, s.panel, sa, s.sb, tot);
          t += kT;
        };
        if (tiles - t >= kFT) run(std::integral_constant<int, kFT>{});
        else if (kFT == 4 && tiles - t >= 2) run(std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 1>{});
      }
    }
  }
}

// The item's totals (item_products) -> out rows [row0, row0 + rows), columns [n0, n1), row by
// row (each output row its own page at these widths).
void store_item(const Problem& p, const float* totals, int64_t row0, int64_t rows, int64_t n0, int64_t n1) {
  const int64_t strip_floats = ceil_div(rows, kTileRows) * kNTile * kTileRows;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j * kNTile < n1 - n0; ++j) {
      const float* src = totals + j * strip_floats + (r / kTileRows) * kNTile * kTileRows + r % kTileRows;
      const int64_t c0 = n0 + j * kNTile, nc = std::min(kNTile, n1 - c0);
      for (int64_t c = 0; c < nc; ++c) store_out(p, row0 + r, c0 + c, src[c * kTileRows]);
    }
}

void process_item(const Problem& p, const ChunkDecoder& dec, const PackedA& pa, const WorkItem& w, Scratch& s) {
  const int64_t rows = w.r1 - w.r0;
  const uint8_t* bg = p.b + w.group * p.N * p.K;
  const float* sbg = p.b_scale + w.group * p.NB * p.KB;
  item_products(
      p, dec, pa, ceil_div(rows, kTileRows), w.n0, w.n1, p.KB,
      [&](int64_t n, int64_t kb) { return bg + n * p.K + kb * kQuantGroup; },
      [&](int64_t kb) { return std::min<int64_t>(kQuantGroup, p.K - kb * kQuantGroup); },
      [&](int64_t n, int64_t kb) { return sbg[(n / kQuantGroup) * p.KB + kb]; },
      [&](int64_t t, int64_t kb) { return (w.tile + t) * p.KB + kb; }, s);
  store_item(p, s.totals.data(), w.r0, rows, w.n0, w.n1);
}
#endif

// One tile of a (rows [r0, r0 + rows)): a_t[kb][...] per K block (pack_a_block, zero rows past
// `rows`) and sa_t[kb][kTileRows] (0 past `rows`).
template <class T>
void pack_a_tile(const ADecoder& dec, const uint8_t* a, const float* a_scale, int64_t r0, int64_t rows, int64_t K,
                 int64_t KB, T* a_t, float* sa_t) {
  for (int64_t kb = 0; kb < KB; ++kb) {
    pack_a_block(dec, a + r0 * K + kb * kQuantGroup, K, rows, std::min<int64_t>(kQuantGroup, K - kb * kQuantGroup),
                 a_t + kb * kABlock);
    for (int i = 0; i < kTileRows; ++i) sa_t[kb * kTileRows + i] = i < rows ? a_scale[(r0 + i) * KB + kb] : 0.0f;
  }
}

// How many strips of kNTile columns an item takes: enough that each thread still gets 16 items.
inline int64_t strips_per_item(int64_t row_items, int64_t N) {
  return std::clamp<int64_t>(row_items * ceil_div(N, kNTile) / (16 * parallel_chunks(true)), 1, kMaxStrips);
}

// Runs item(i, scratch) for i in [0, n): the OpenMP threads (each with its Scratch) take items
// from a shared counter, up to 4 at a time (consecutive items share a's packed tiles) but never
// more than a quarter of what is left per thread, so the threads finish together.
// NOTES: 4 at a time to the end left one of 2 threads idle for ~16% of dense M=16 (35 items).
template <class Item>
void parallel_items(int64_t n, Item item) {
  constexpr int64_t kChunk = 4;
  const int64_t threads = parallel_chunks(n > 1);
  std::atomic<int64_t> next_item{0};
#pragma omp parallel if (n > 1)
  {
    Scratch scratch;
    for (;;) {
      int64_t begin = next_item.load(std::memory_order_relaxed), take = 0;
      do {
        take = std::clamp<int64_t>((n - begin) / (4 * threads), 1, kChunk);
      } while (begin < n && !next_item.compare_exchange_weak(begin, begin + take, std::memory_order_relaxed));
      if (begin >= n) break;
      for (int64_t it = begin; it < std::min(n, begin + take); ++it) item(it, scratch);
    }
  }
}

// Segments with many rows per weight group (prefill): the row-tiled kernels. Tiles of a
// (16 rows; kLanes on the fp32 levels) of every segment, then items of up to 128 or 256 rows x
// `strips` strips of columns (strips_per_item).
void gemm_rows(const Problem& p, const std::vector<Segment>& segs) {
  const int64_t N = p.N, KB = p.KB, item_rows = kTilesPerItem * kTileRows;
  int64_t row_items = 0;
  for (const Segment& s : segs) row_items += ceil_div(s.r1 - s.r0, item_rows);
  const int64_t strips = strips_per_item(row_items, N);
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (first row, rows)
  std::vector<WorkItem> items;
  for (const Segment& s : segs) {
    const int64_t first_tile = int64_t(tiles.size());
    for (int64_t r0 = s.r0; r0 < s.r1; r0 += kTileRows) tiles.push_back({r0, std::min<int64_t>(kTileRows, s.r1 - r0)});
    for (int64_t r0 = s.r0; r0 < s.r1; r0 += item_rows)
      for (int64_t n0 = 0; n0 < N; n0 += strips * kNTile)
        items.push_back({s.group, r0, std::min(s.r1, r0 + item_rows), n0, first_tile + (r0 - s.r0) / kTileRows,
                         std::min(N, n0 + strips * kNTile)});
  }
  const int64_t n_tiles = int64_t(tiles.size());
  const ADecoder dec;
  PackedA pa;
  pa.a_t.resize(size_t(n_tiles * KB * kABlock));
  pa.sa_t.resize(size_t(n_tiles * KB * kTileRows));
#pragma omp parallel if (n_tiles > 1)
  {
    [[maybe_unused]] const FlushGuard no_flush;  // avx2/avx512: a's subnormals pass through fp32 subnormals
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t)
      pack_a_tile(dec, p.a, p.a_scale, tiles[size_t(t)].first, tiles[size_t(t)].second, p.K, KB,
                  pa.a_t.data() + t * KB * kABlock, pa.sa_t.data() + t * KB * kTileRows);
  }
  parallel_items(int64_t(items.size()), [&](int64_t it, Scratch& s) { process_item(p, dec, pa, items[size_t(it)], s); });
}

}  // namespace

void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b,
              const float* b_scale, const int32_t* groups, int64_t num_groups, int64_t M,
              int64_t N, int64_t K, void* out, DType out_dtype, bool b_nan_free) {
  LK_CHECK(M >= 0 && N >= 0 && K >= 0 && num_groups >= 0, "negative size");
  LK_CHECK(out_dtype == DType::f32 || out_dtype == DType::bf16, "out dtype must be f32 or bf16");
  LK_CHECK(layout == GemmLayout::dense || groups != nullptr, "grouped layouts need group sizes");
  LK_CHECK(layout != GemmLayout::dense || num_groups == 1, "dense layout has one group");
  const std::vector<Segment> segs = segments(layout, groups, num_groups, M);
  if (segs.empty() || N == 0) return;
  const int64_t KB = ceil_div(K, kQuantGroup), NB = ceil_div(N, kQuantGroup);
  const Problem p{a, a_scale, b, b_scale, N, K, KB, NB, out, out_dtype, b_nan_free};
  if (K == 0) {  // empty block sums: the product is exactly zero (a and b are never read)
    for (const Segment& s : segs)
      for (int64_t r = s.r0; r < s.r1; ++r)
        for (int64_t n = 0; n < N; ++n) store_out(p, r, n, 0.0f);
    return;
  }
  // Few rows per weight group (decode): vectorised along K; the rest: the row-tiled kernels.
  std::vector<Segment> small, large;
  for (const Segment& s : segs) (s.r1 - s.r0 <= decode_kernel_rows(K) ? small : large).push_back(s);
  gemm_decode(p, small);
  if (large.empty()) return;
  gemm_rows(p, large);
}

}  // namespace lk::cpu::LK_NS

#include "cpu/k_grouped_gemm_body.h"
