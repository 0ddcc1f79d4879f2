// MLA latent-cache geometry and the split/schedule rules shared by the CPU and CUDA kernels.
#pragma once
#include "common/common.h"
#include "common/fp8.h"

namespace lk {

// DeepSeek-V3 MLA geometry: a 512-value latent (also the value) plus 64 RoPE values.
constexpr int kMlaLatent = 512;
constexpr int kMlaRope = 64;
constexpr int kMlaDim = kMlaLatent + kMlaRope;       // 576 bf16 per token (bf16 cache)
constexpr int kMlaFp8Bytes = kMlaLatent + 16 + 128;  // 656 bytes per token (FlashMLA FP8 cache)
constexpr int kMlaSplitAlign = 32;                   // split-KV chunks are multiples of 32 tokens

// The paged cache: num_blocks blocks of block_size tokens; a token is 576 bf16 or 656 bytes;
// blocks start block_stride bytes apart (tokens inside a block are dense).
struct MlaCache {
  void* data;
  bool fp8;
  int64_t num_blocks, block_size, block_stride;
  int64_t token_bytes() const { return fp8 ? kMlaFp8Bytes : 2 * kMlaDim; }
};

// Tokens [s*chunk, (s+1)*chunk) of a length-L sequence go to split s of num_splits.
LK_HD int64_t mla_split_chunk(int64_t L, int64_t num_splits) {
  const int64_t per = (L + num_splits - 1) / num_splits;
  return (per + kMlaSplitAlign - 1) / kMlaSplitAlign * kMlaSplitAlign;
}

// FlashMLA's FP8 cache scale: 2^ceil(log2(max(amax / 448, 1e-4))), exact on the bits. The
// stored scale is the dequantization multiplier (value = e4m3 * scale).
LK_HD float mla_fp8_scale(float amax) {
  if (!(amax == amax)) return amax;
  float s = amax / kFp8Max;
  s = s > kScaleFloor ? s : kScaleFloor;
  uint32_t b = f32_bits(s);
  if ((b & 0x7f800000u) != 0x7f800000u && (b & 0x007fffffu) != 0) b = (b & 0xff800000u) + 0x00800000u;
  return f32_from_bits(b);
}

}  // namespace lk

namespace lk {

// FlashMLA's tile-scheduler metadata (first-release API), computed by one thread: num_parts
// rows of 8 int32 [begin_batch, begin_token, end_batch, end_token, begin_split, 0, 0, 0] and
// num_splits int32 [B + 1], prefix counts of each sequence's splits. Greedy: every part gets an
// equal share of 64-token blocks, each sequence costing 5 blocks of fixed overhead.
LK_HD void mla_schedule_serial(const int32_t* seqlens, int64_t B, int64_t num_parts, int32_t* metadata,
                               int32_t* num_splits) {
  constexpr int64_t kBlockN = 64, kOverhead = 5;
  auto nblocks = [&](int64_t i) -> int64_t {
    const int64_t L = seqlens[i] > 0 ? seqlens[i] : 0;
    return (L + kBlockN - 1) / kBlockN;
  };
  int64_t total = 0;
  for (int64_t i = 0; i < B; ++i) total += nblocks(i) + kOverhead;
  const int64_t parts = num_parts > 0 ? num_parts : 1;
  const int64_t payload = (total + parts - 1) / parts + kOverhead;
  int64_t idx = 0, blk = 0, split = 0, cum = 0;
  num_splits[0] = 0;
  for (int64_t p = 0; p < num_parts; ++p) {
    int32_t* md = metadata + p * 8;
    md[0] = int32_t(idx);
    md[1] = int32_t(blk * kBlockN);
    md[4] = int32_t(split);
    md[5] = md[6] = md[7] = 0;
    int64_t budget = payload;
    while (idx < B) {
      const int64_t left = nblocks(idx) - blk;
      if (budget >= left + kOverhead) {  // the rest of this sequence fits in this part
        cum += split + 1;
        num_splits[idx + 1] = int32_t(cum);
        budget -= left + kOverhead;
        ++idx, blk = 0, split = 0;
      } else {  // cut the sequence here; the next part continues it as a new split
        if (budget - kOverhead > 0) {
          blk += budget - kOverhead;
          ++split;
        }
        break;
      }
    }
    md[2] = int32_t(blk > 0 ? idx : idx - 1);
    md[3] = int32_t(blk > 0 ? blk * kBlockN : (idx > 0 ? seqlens[idx - 1] : 0));
  }
}

}  // namespace lk
