// quantize_fp8_transposed on the CPU: x [M, K] -> xt = x.T [K, M] e4m3, quantized in 1x128
// groups along M (tokens), the operand layout of the k-grouped (wgrad) GEMM.
//
// What: group (expert e, j) covers tokens [t0, t1) (<= 128, see common/k_groups.h); for every
// column k of x: scale[k, col] = max(amax, 1e-4) / 448 over x[t0:t1, k] (ue8m0: rounded up to
// 2^n), xt[k, t0:t1] = e4m3(x[t0:t1, k] / scale). Bit-identical to
// reference.quantize_fp8_transposed. Tokens past the last expert's end give 0 codes; scale
// columns no group uses are 0 (every output element is written).
//
// Why this shape: x is read along its rows and xt written along its rows, through a tile of
// 128 tokens x 32 columns (<= 16 KiB fp32 of x, 4 KiB of codes: L1). Pass 1 reads the tile's
// rows and keeps a lane-wise |x| max per column (lanes = columns, so no transpose is needed
// for the reduction); pass 2 re-reads the rows (now in L1) and encodes them with one scale per
// lane (the SIMD codec of quant_body.h, same bits as fp8_quantize_value) into a [128][32] byte
// tile; the tile is written out transposed, one contiguous run of <= 128 bytes per xt row.
// Work units are (K tile, group), OpenMP static; units of one K tile are adjacent so a thread
// writes neighbouring runs of the same xt rows.
// Bound: one read of x (2-4 B/element) and one write of xt (1 B/element): memory bound like
// quantize_fp8, whose codec dominates its compute (bench: transposed-quantize GB/s vs a copy).
// Non-finite scales (a NaN/Inf in the group) and the K % 32 tail use the scalar codec.
// Measured (2026-11-30, 2 shared Zen 4 cores, bf16 x [4096, 2048], 8 experts, min of 9): 7.1 ms,
// vs 7.8 ms for x.T.contiguous() (bf16) and 2.0 ms for quantize_fp8 without the transpose; one
// thread 9.9 ms vs 2.5 ms: the scalar byte transpose of the code tile is most of the difference
// (a VBMI byte-permute transpose is the next step if this shows up in a training step).
// Included by quant_body.h (same translation unit and CPU level): no include guard.

namespace lk::cpu::LK_NS {
namespace {

constexpr int64_t kTCols = 32;  // columns of x (rows of xt) per tile

// Lane-wise |x| max bits of rows [t0, t1) x columns [k0, k0 + kc) of x.
void tile_amax(const void* x, DType dt, int64_t row_stride, int64_t t0, int64_t t1, int64_t k0, int64_t kc,
               uint32_t* amax, float* buf) {
#ifdef LK_QUANT_SIMD
  if (kc == kTCols) {
    VecI m[kVecs32];
    for (int i = 0; i < kVecs32; ++i) m[i] = vzero();
    for (int64_t t = t0; t < t1; ++t)
      for (int i = 0; i < kVecs32; ++i) m[i] = vmax(m[i], abs_bits_v(load16(x, dt, t * row_stride + k0 + i * kLanes)));
    for (int i = 0; i < kVecs32; ++i) sti(amax + i * kLanes, m[i]);
    return;
  }
#endif
  std::fill(amax, amax + kc, 0u);
  for (int64_t t = t0; t < t1; ++t) {
    widen_row(x, dt, t * row_stride + k0, kc, buf);
    for (int64_t c = 0; c < kc; ++c) amax[c] = std::max(amax[c], abs_bits(buf[c]));
  }
}

// Codes of rows [t0, t1) x columns [k0, k0 + kc) with per-column scales s, as codes[t - t0][c].
void tile_encode(const void* x, DType dt, int64_t row_stride, int64_t t0, int64_t t1, int64_t k0, int64_t kc,
                 const float* s, bool ue8m0, uint8_t (*codes)[kTCols], float* buf) {
#ifdef LK_QUANT_SIMD
  bool finite = kc == kTCols;
  for (int64_t c = 0; c < kc && finite; ++c) finite = finite_scale(s[c]);
  if (finite) {
    alignas(64) float sv[kTCols];
    for (int64_t c = 0; c < kTCols; ++c) sv[c] = ue8m0 ? 1.0f / s[c] : s[c];  // see encode_group_scaled
    VecF sc[kVecs32], v[kVecs32];
    for (int i = 0; i < kVecs32; ++i) sc[i] = load16(sv, DType::f32, i * kLanes);
    for (int64_t t = t0; t < t1; ++t) {
      for (int i = 0; i < kVecs32; ++i) v[i] = load16(x, dt, t * row_stride + k0 + i * kLanes);
      if (ue8m0)
        encode32<true>(v, sc, codes[t - t0]);
      else
        encode32<false>(v, sc, codes[t - t0]);
    }
    return;
  }
#else
  (void)ue8m0;
#endif
  for (int64_t t = t0; t < t1; ++t) {
    widen_row(x, dt, t * row_stride + k0, kc, buf);
    for (int64_t c = 0; c < kc; ++c) codes[t - t0][c] = fp8_quantize_value(buf[c], s[c]);
  }
}

}  // namespace

void quantize_fp8_transposed(const void* x, DType dtype, int64_t M, int64_t K, int64_t row_stride,
                             const int32_t* offs, int64_t num_experts, uint8_t* q, float* scale, bool ue8m0) {
  LK_CHECK(M >= 0 && K >= 0 && num_experts >= 1, "quantize_fp8_transposed: bad size");
  LK_CHECK(offs != nullptr || num_experts == 1, "quantize_fp8_transposed: offs=None means one expert");
  LK_CHECK(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16,
           "input must be float32, bfloat16 or float16");
  const int64_t G = k_group_columns(M, num_experts);
  if (K == 0) return;
  const std::vector<KGroup> groups = k_groups(offs, num_experts, M);
  const int64_t covered = groups.empty() ? 0 : groups.back().t1;  // tokens past it: code 0
  std::vector<char> used(size_t(G), 0);
  for (const KGroup& g : groups) used[size_t(g.col)] = 1;
  const int64_t n_groups = int64_t(groups.size()), k_tiles = ceil_div(K, kTCols);
  const int64_t units = n_groups * k_tiles;

#pragma omp parallel if (M * K >= kParallelElems)
  {
    alignas(64) uint8_t codes[kQuantGroup][kTCols];
    alignas(64) uint32_t amax[kTCols];
    alignas(64) float s[kTCols], buf[kTCols];
#pragma omp for schedule(static) nowait
    for (int64_t u = 0; u < units; ++u) {
      const KGroup& g = groups[size_t(u % n_groups)];
      const int64_t k0 = (u / n_groups) * kTCols, kc = std::min(kTCols, K - k0);
      tile_amax(x, dtype, row_stride, g.t0, g.t1, k0, kc, amax, buf);
      for (int64_t c = 0; c < kc; ++c) {
        s[c] = fp8_scale_from_amax(f32_from_bits(amax[c]), ue8m0);
        scale[(k0 + c) * G + g.col] = s[c];
      }
      tile_encode(x, dtype, row_stride, g.t0, g.t1, k0, kc, s, ue8m0, codes, buf);
      const int64_t n = g.t1 - g.t0;
      for (int64_t c = 0; c < kc; ++c) {
        uint8_t* dst = q + (k0 + c) * M + g.t0;
        for (int64_t t = 0; t < n; ++t) dst[t] = codes[t][c];
      }
    }
    // The rest of every xt row / scale row: tokens no expert holds, columns no group uses.
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      if (covered < M) memset(q + k * M + covered, 0, size_t(M - covered));
      for (int64_t c = 0; c < G; ++c)
        if (!used[size_t(c)]) scale[k * G + c] = 0.0f;
    }
  }
}

}  // namespace lk::cpu::LK_NS
