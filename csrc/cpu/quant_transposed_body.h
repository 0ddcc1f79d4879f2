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
// Non-finite scales (a NaN/Inf in the group) and the K % 32 tail use the scalar codec. The code
// tile is written out transposed with AVX-512 (gather 16 tokens' 4-column dwords, pshufb + permd
// to group them by column, masked 16-byte stores); scalar byte copies on AVX2 / generic.
// Measured (2026-11-30, 2 shared Zen 4 cores, bf16 x [4096, 2048], 8 experts, min of 9): 3.8 ms
// (2 threads; 7.1 ms with the scalar transpose) vs 7.5 ms for x.T.contiguous() (bf16); one
// thread 6.2 ms vs 2.4 ms for quantize_fp8 without the transpose.
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
    alignas(64) float yv[kTCols];
    for (int64_t c = 0; c < kTCols; ++c) yv[c] = 1.0f / s[c];  // see encode_group_scaled
    VecF sc[kVecs32], yc[kVecs32], v[kVecs32];
    for (int i = 0; i < kVecs32; ++i) {
      sc[i] = load16(s, DType::f32, i * kLanes);
      yc[i] = load16(yv, DType::f32, i * kLanes);
    }
    for (int64_t t = t0; t < t1; ++t) {
      for (int i = 0; i < kVecs32; ++i) v[i] = load16(x, dt, t * row_stride + k0 + i * kLanes);
      if (ue8m0)
        encode32<true>(v, sc, yc, codes[t - t0]);
      else
        encode32<false>(v, sc, yc, codes[t - t0]);
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

// The code tile codes[t][c] (t < n, c < kc) -> xt[k0 + c, t0 + t]: each column c becomes a run of
// n bytes of an xt row.
void store_transposed(uint8_t (*codes)[kTCols], int64_t n, int64_t kc, uint8_t* q, int64_t M, int64_t k0, int64_t t0) {
#if LK_ISA >= 2
  if (kc == kTCols) {
    // 16 tokens x 4 columns at a time: gather the 16 rows' dword j (columns 4j..4j+3), group the
    // bytes by column inside each 128-bit lane (pshufb), then the lanes' dwords by column
    // (permd): lane c of the result is column 4j + c for the 16 tokens, one masked 16-byte store.
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(kTCols / 4));
    const __m512i by_col = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int64_t r0 = 0; r0 < n; r0 += 16) {
      const __mmask16 m = n - r0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - r0)) - 1);
      const int* base = reinterpret_cast<const int*>(codes[r0]);
      for (int j = 0; j < kTCols / 4; ++j) {
        __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, _mm512_add_epi32(rows, _mm512_set1_epi32(j)), base, 4);
        v = _mm512_permutexvar_epi32(lanes, _mm512_shuffle_epi8(v, by_col));
        uint8_t* dst = q + (k0 + 4 * j) * M + t0 + r0;
        _mm_mask_storeu_epi8(dst, m, _mm512_extracti32x4_epi32(v, 0));
        _mm_mask_storeu_epi8(dst + M, m, _mm512_extracti32x4_epi32(v, 1));
        _mm_mask_storeu_epi8(dst + 2 * M, m, _mm512_extracti32x4_epi32(v, 2));
        _mm_mask_storeu_epi8(dst + 3 * M, m, _mm512_extracti32x4_epi32(v, 3));
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < kc; ++c) {
    uint8_t* dst = q + (k0 + c) * M + t0;
    for (int64_t t = 0; t < n; ++t) dst[t] = codes[t][c];
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
      store_transposed(codes, g.t1 - g.t0, kc, q, M, k0, g.t0);
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
