// FP8 (e4m3) block quantization on the CPU.
//
// What: x [batch, rows, K] (fp32/bf16/fp16, row-strided) -> e4m3 bytes + one fp32 scale per
// block_rows x 128 group, scale = max(amax, 1e-4) / 448 (optionally rounded up to 2^k).
// How: OpenMP over (batch, row block). Each row is widened once into an fp32 scratch row,
// then two tight loops run over it: |x| max on the raw bits (integer max, NaN-propagating)
// and divide-clamp-encode (branch-free codec). Both vectorise (AVX2/AVX-512 with -march).
// 128x128 blocks read their 128 rows twice (amax pass, encode pass): 2 reads + 1/4 write per
// element for fp32 in, against ~6 full passes for the eager PyTorch reference.
#include "cpu/quant.h"

#include <algorithm>
#include <vector>

#include "common/fp8.h"
#include "cpu/widen.h"

namespace lk::cpu {
namespace {

// Running NaN-propagating |x| max of each 128-wide group of one row, on raw bits.
void group_amax_bits(const float* row, int64_t K, uint32_t* amax) {
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += kQuantGroup, ++g) {
    const int64_t n = std::min<int64_t>(kQuantGroup, K - g0);
    uint32_t m = amax[g];
    for (int64_t k = 0; k < n; ++k) m = std::max(m, abs_bits(row[g0 + k]));
    amax[g] = m;
  }
}

void encode_row(const float* row, int64_t K, const float* scale, uint8_t* q) {
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += kQuantGroup, ++g) {
    const int64_t n = std::min<int64_t>(kQuantGroup, K - g0);
    const float s = scale[g];
    for (int64_t k = 0; k < n; ++k) q[g0 + k] = fp8_quantize_value(row[g0 + k], s);
  }
}

}  // namespace

void quantize_fp8(const void* x, DType dtype, int64_t batch, int64_t rows, int64_t K,
                  int64_t batch_stride, int64_t row_stride, int64_t block_rows, uint8_t* q,
                  float* scale, bool ue8m0) {
  LK_CHECK(block_rows == 1 || block_rows == kQuantGroup, "block_rows must be 1 or 128");
  LK_CHECK(batch >= 0 && rows >= 0 && K >= 0, "negative size");
  if (batch == 0 || rows == 0 || K == 0) return;
  const int64_t row_blocks = ceil_div(rows, block_rows);
  const int64_t groups = ceil_div(K, kQuantGroup);
  const int64_t units = batch * row_blocks;

#pragma omp parallel
  {
    std::vector<float> buf(K);
    std::vector<uint32_t> amax(groups);
    std::vector<float> sc(groups);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t b = u / row_blocks, rb = u % row_blocks;
      const int64_t r0 = rb * block_rows, r1 = std::min(rows, r0 + block_rows);
      std::fill(amax.begin(), amax.end(), 0u);
      // A 1x128 row is widened once and kept; a 128-row block is widened again in pass two.
      for (int64_t r = r0; r < r1; ++r) {
        widen_row(x, dtype, b * batch_stride + r * row_stride, K, buf.data());
        group_amax_bits(buf.data(), K, amax.data());
      }
      float* srow = scale + u * groups;
      for (int64_t g = 0; g < groups; ++g) {
        sc[g] = fp8_scale_from_amax(f32_from_bits(amax[g]), ue8m0);
        srow[g] = sc[g];
      }
      for (int64_t r = r0; r < r1; ++r) {
        if (block_rows != 1) widen_row(x, dtype, b * batch_stride + r * row_stride, K, buf.data());
        encode_row(buf.data(), K, sc.data(), q + (b * rows + r) * K);
      }
    }
  }
}

void dequantize_fp8(const uint8_t* q, const float* scale, int64_t batch, int64_t rows, int64_t K,
                    int64_t block_rows, float* out) {
  LK_CHECK(block_rows == 1 || block_rows == kQuantGroup, "block_rows must be 1 or 128");
  if (batch == 0 || rows == 0 || K == 0) return;
  float table[256];
  for (int i = 0; i < 256; ++i) table[i] = fp8e4m3_to_f32(uint8_t(i));
  const int64_t row_blocks = ceil_div(rows, block_rows);
  const int64_t groups = ceil_div(K, kQuantGroup);
  const int64_t total_rows = batch * rows;

#pragma omp parallel for schedule(static)
  for (int64_t br = 0; br < total_rows; ++br) {
    const int64_t b = br / rows, r = br % rows;
    const float* srow = scale + (b * row_blocks + r / block_rows) * groups;
    const uint8_t* qrow = q + br * K;
    float* orow = out + br * K;
    for (int64_t g0 = 0, g = 0; g0 < K; g0 += kQuantGroup, ++g) {
      const int64_t n = std::min<int64_t>(kQuantGroup, K - g0);
      const float s = srow[g];
      for (int64_t k = 0; k < n; ++k) orow[g0 + k] = table[qrow[g0 + k]] * s;
    }
  }
}

}  // namespace lk::cpu
