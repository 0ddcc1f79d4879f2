// transpose_bytes: [batch, rows, cols] bytes -> [batch, cols, rows], the FP8 weight transpose of
// the dgrad GEMM (W^T's 128x128 blocks are W's blocks transposed: leankernels._ops).
//
// 16x16 byte tiles transposed in registers with the compiler's baseline SIMD (SSE2 on x86-64,
// Advanced SIMD on arm64), so no CPU-level dispatch: four rounds of "interleave row i with row
// i + 8" (unpacklo/hi_epi8, vzip1q/vzip2q_u8). One round moves the element at 8-bit address
// (row r3..r0, column c3..c0) to (r2 r1 r0 c3, c2 c1 c0 r3): the address rotated left by one bit;
// four rounds rotate it by four, which swaps row and column. Tiles go four at a time down a
// 64-row band, so each destination row gets a whole 64-byte line per band. Ragged edges (rows or
// columns not a multiple of 16) take a scalar loop.
// NOTES: torch's strided uint8 copy (w.transpose(-1, -2).contiguous()) ran at ~1.9 GB/s on the
// 2-core Zen 4 VM for [16, 1408, 1024] (24 ms), ~6% of a MoE training step there.
#include "cpu/quant.h"

#include <algorithm>
#include <cstring>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define LK_TRANSPOSE_SSE2 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define LK_TRANSPOSE_NEON 1
#endif

#include "cpu/parallel.h"

namespace lk::cpu {
namespace {

constexpr int64_t kT = 16;     // tile edge
constexpr int64_t kBand = 64;  // source rows per work item

// src tile at s (row stride ls) -> dst tile at d (row stride ld), 16x16 bytes.
inline void tile16(const uint8_t* s, int64_t ls, uint8_t* d, int64_t ld) {
#if defined(LK_TRANSPOSE_SSE2)
  __m128i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * ls));
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm_unpacklo_epi8(r[i], r[i + 8]);
      t[2 * i + 1] = _mm_unpackhi_epi8(r[i], r[i + 8]);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
  for (int i = 0; i < 16; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i * ld), r[i]);
#elif defined(LK_TRANSPOSE_NEON)
  uint8x16_t r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = vld1q_u8(s + i * ls);
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = vzip1q_u8(r[i], r[i + 8]);
      t[2 * i + 1] = vzip2q_u8(r[i], r[i + 8]);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
  for (int i = 0; i < 16; ++i) vst1q_u8(d + i * ld, r[i]);
#else
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d[j * ld + i] = s[i * ls + j];
#endif
}

}  // namespace

void transpose_bytes(const uint8_t* src, uint8_t* dst, int64_t batch, int64_t rows, int64_t cols) {
  LK_CHECK(batch >= 0 && rows >= 0 && cols >= 0, "transpose_bytes: bad size");
  if (batch == 0 || rows == 0 || cols == 0) return;
  const int64_t bands = (rows + kBand - 1) / kBand;
  const int64_t full_cols = cols / kT * kT;
  parallel_for(batch * bands, batch * rows * cols >= (int64_t(1) << 18), [&](int64_t item) {
    const int64_t b = item / bands, r0 = item % bands * kBand, r1 = std::min(rows, r0 + kBand);
    const uint8_t* s = src + b * rows * cols;
    uint8_t* d = dst + b * rows * cols;
    const int64_t full_r1 = r0 + (r1 - r0) / kT * kT;
    for (int64_t c = 0; c < full_cols; c += kT)
      for (int64_t r = r0; r < full_r1; r += kT) tile16(s + r * cols + c, cols, d + c * rows + r, rows);
    // the band's ragged edges: rows past the last whole tile, columns past the last whole tile
    for (int64_t r = full_r1; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) d[c * rows + r] = s[r * cols + c];
    for (int64_t r = r0; r < full_r1; ++r)
      for (int64_t c = full_cols; c < cols; ++c) d[c * rows + r] = s[r * cols + c];
  });
}

}  // namespace lk::cpu
