// Token groups of the k-grouped (MoE wgrad) layout, shared by the CPU and CUDA kernels of
// quantize_fp8_transposed and fp8_k_grouped_gemm (reference.k_groups is the specification).
//
// Tokens (rows of x, columns of x.T) are the contraction dimension. They are sorted by expert;
// offs (int32 [E], cumulative END offsets) splits them. Expert e's tokens [start_e, end_e) are
// cut into groups of 128 starting at start_e, so no group straddles two experts; the j-th group
// uses scale column floor(start_e / 128) + e + j. No prefix sum over group counts is needed and
// the columns never overlap (floor(s/128) + ceil(m/128) <= ceil((s+m)/128)), so
// ceil(M/128) + E - 1 columns hold all of them. offs == nullptr: one expert with every token.
// Unchecked offs never address outside the tensors: ends are clamped to [0, M] and each start
// is the running maximum of the earlier ends (a decreasing end gives an empty expert).
#pragma once
#include <vector>

#include "common/common.h"
#include "common/fp8.h"

namespace lk {

LK_HD int64_t k_group_columns(int64_t M, int64_t num_experts) {
  return (M + kQuantGroup - 1) / kQuantGroup + num_experts - 1;
}

// Scale column of the first group of an expert starting at token `start`.
LK_HD int64_t k_group_first_column(int64_t start, int64_t expert) { return start / kQuantGroup + expert; }

LK_HD int64_t k_group_end(const int32_t* offs, int64_t e, int64_t M) {
  if (offs == nullptr) return M;
  const int64_t v = offs[e];
  return v < 0 ? 0 : (v > M ? M : v);
}

struct KGroup {
  int64_t expert, t0, t1, col;  // tokens [t0, t1) (at most 128) of `expert`, scale column col
};

// Every group in token order (host; offs readable here).
inline std::vector<KGroup> k_groups(const int32_t* offs, int64_t num_experts, int64_t M) {
  std::vector<KGroup> groups;
  int64_t start = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t end = k_group_end(offs, e, M);
    for (int64_t t0 = start, col = k_group_first_column(start, e); t0 < end; t0 += kQuantGroup, ++col)
      groups.push_back({e, t0, t0 + kQuantGroup < end ? t0 + kQuantGroup : end, col});
    start = end > start ? end : start;
  }
  return groups;
}

}  // namespace lk
