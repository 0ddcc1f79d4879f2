// Expert gating and token routing on the CPU: the kernels (see routing.cpp for what each does).
// Compiled once per CPU level by routing.cpp (cpu/variants.h): no include guard, LK_ISA selects
// code; the loops (float64 gate scores, widening, the weighted sums) vectorise per level.

namespace lk::cpu::LK_NS {
namespace {

// NOTES: a parallel region costs a thread wake-up, and on a loaded machine (CI, shared boxes)
// a whole scheduler time slice (~10 ms measured here) when the other core is busy; so regions
// fork only for work of a millisecond or more (~2^18 elements).
constexpr int64_t kParallelWork = 1 << 18;
constexpr int64_t kGateParallel = 1 << 15;
// below this many elements quantize_fp8 runs on the calling thread (its kParallelElems)
constexpr int64_t kDirectQuant = 1 << 16;

// acc[i] += w * y[offset + i] (widened to fp32), one pass over the row.
void accumulate_row(const void* y, DType dtype, int64_t offset, int64_t n, float w, float* acc) {
  switch (dtype) {
    case DType::f32: {
      const float* p = static_cast<const float*>(y) + offset;
      for (int64_t i = 0; i < n; ++i) acc[i] += w * p[i];
      break;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(y) + offset;
      for (int64_t i = 0; i < n; ++i) acc[i] += w * bf16_to_f32(p[i]);
      break;
    }
    default: {
      alignas(64) float row[256];
      for (int64_t i0 = 0; i0 < n; i0 += 256) {
        const int64_t m = std::min<int64_t>(256, n - i0);
        widen_row(y, dtype, offset + i0, m, row);
        for (int64_t i = 0; i < m; ++i) acc[i0 + i] += w * row[i];
      }
    }
  }
}

struct Ranked {
  uint32_t key;
  int32_t index;
};

// Inserts (key, index) into list[0..n) sorted by descending key, ties by ascending index, keeping
// at most cap entries. Candidates arrive in ascending index order, so an equal key goes after.
inline void insert_ranked(Ranked* list, int64_t& n, int64_t cap, uint32_t key, int32_t index) {
  if (n == cap && key <= list[cap - 1].key) return;
  int64_t i = n < cap ? n++ : cap - 1;
  while (i > 0 && list[i - 1].key < key) {
    list[i] = list[i - 1];
    --i;
  }
  list[i] = {key, index};
}

// A lower bound on the L-th (so on the top_k-th, top_k <= L) largest key: the smallest of the
// maxima of L strided subsets. L is a compile-time constant so the max loop vectorises.
template <int L>
uint32_t kth_bound(const uint32_t* key, int64_t E) {
  uint32_t m[L] = {};
  const int64_t full = E / L * L;
  for (int64_t e = 0; e < full; e += L)
    for (int l = 0; l < L; ++l) m[l] = std::max(m[l], key[e + l]);
  for (int64_t e = full; e < E; ++e) m[e - full] = std::max(m[e - full], key[e]);
  uint32_t b = m[0];
  for (int l = 1; l < L; ++l) b = std::min(b, m[l]);
  return b;
}

void scores_row(const float* x, int64_t E, bool sigmoid, float* s, double* tmp) {
  if (sigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = sigmoid_score(x[e]);
    return;
  }
  // softmax over the non-NaN logits; a row without a finite maximum is all NaN, like PyTorch
  float m = kNegInf;
  for (int64_t e = 0; e < E; ++e) m = x[e] > m ? x[e] : m;   // NaN never compares greater
  if (!std::isfinite(m)) {
    for (int64_t e = 0; e < E; ++e) s[e] = __builtin_nanf("");
    return;
  }
  const double md = m;
  for (int64_t e = 0; e < E; ++e) tmp[e] = softmax_term(x[e], md);
  double sum = 0.0;  // in index order: a fixed order keeps the result deterministic
  for (int64_t e = 0; e < E; ++e) sum += x[e] == x[e] ? tmp[e] : 0.0;
  const double inv_sum = 1.0 / sum;
  for (int64_t e = 0; e < E; ++e) s[e] = nan_or(x[e], float(tmp[e] * inv_sum));
}

// sum_i a[i] * b[i] in fp32: 64 partial sums (four 16-lane chains, GCC vector arithmetic at
// the level's width), added pairwise, then the tail in order.
float dot_f32(const float* a, const float* b, int64_t n) {
  typedef float V16 __attribute__((vector_size(64)));
  V16 acc[4] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int c = 0; c < 4; ++c) {
      V16 va, vb;
      std::memcpy(&va, a + i + 16 * c, sizeof(V16));
      std::memcpy(&vb, b + i + 16 * c, sizeof(V16));
      acc[c] += va * vb;
    }
  for (; i + 16 <= n; i += 16) {
    V16 va, vb;
    std::memcpy(&va, a + i, sizeof(V16));
    std::memcpy(&vb, b + i, sizeof(V16));
    acc[0] += va * vb;
  }
  const V16 v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float lanes[16];
  std::memcpy(lanes, &v, sizeof(v));
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  float sum = lanes[0];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

void gate_logits(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride, const float* w, int64_t E,
                 float* out) {
  if (T == 0 || E == 0) return;
  // x widened once ([T, H] fp32), then expert by expert: each weight row is read from memory
  // once and meets every token while it sits in L1.
  std::vector<float> xf(size_t(T * H));
  for (int64_t t = 0; t < T; ++t) widen_row(x, dtype, t * row_stride, H, xf.data() + t * H);
  // NOTES: threads from 32 Ki weight floats x tokens (128 KiB at one token): a decode-step GEMV
  // is a read of the weights, and one core reads far below the machine's rate. 2-core Zen 1
  // EPYC VM, V2-Lite (64 x 2048) at T=1, hot: one thread 64 us, two threads 35 us (F.linear 29).
  parallel_for(E, T * E * H >= kGateParallel, [&](int64_t e) {
    for (int64_t t = 0; t < T; ++t) out[t * E + e] = dot_f32(xf.data() + t * H, w + e * H, H);
  });
}

void route(const void* logits, DType dtype, int64_t T, int64_t E, int64_t row_stride,
           const float* bias, bool sigmoid, int64_t top_k, int64_t n_group, int64_t topk_group,
           bool renormalize, float scale, float* weights, int32_t* ids) {
  LK_CHECK(T >= 0 && E > 0, "route: bad logits shape");
  LK_CHECK(top_k >= 1 && top_k <= E && top_k <= 32, "route: top_k must be in [1, min(num_experts, 32)]");
  LK_CHECK(n_group >= 1 && E % n_group == 0, "route: n_group must divide num_experts");
  LK_CHECK(topk_group >= 1 && topk_group <= n_group, "route: topk_group must be in [1, n_group]");
  const int64_t G = E / n_group;
  LK_CHECK(n_group == 1 || top_k <= topk_group * G, "route: top_k exceeds the experts of the kept groups");
  LK_CHECK(n_group == 1 || bias == nullptr || G >= 2, "route: top-2 group scores need >= 2 experts per group");
  if (T == 0) return;

  // NOTES: the top_k search first takes a lower bound on the k-th best key: the smallest of
  // the maxima of L >= top_k disjoint strided subsets (L distinct elements, all >= it), a
  // vectorised max over L lanes; only keys >= the bound (typically 2-3 x top_k of them) go
  // through the sorted insertion, so the E-long loop is one well-predicted compare each.
  const int64_t L = top_k <= 8 ? 8 : (top_k <= 16 ? 16 : 32);
  parallel_ranges(T, T * E >= kParallelWork, [&](int64_t t_begin, int64_t t_end) {
    // NOTES: stack scratch for the usual expert counts (no allocation per call)
    constexpr int64_t kStackE = 512;
    float x_st[kStackE], s_st[kStackE];
    uint32_t key_st[kStackE];
    std::vector<float> x_v, s_v;
    std::vector<uint32_t> key_v;
    float* x = x_st;
    float* s = s_st;
    uint32_t* k32 = key_st;
    if (E > kStackE) {
      x_v.resize(E), s_v.resize(E), key_v.resize(E);
      x = x_v.data(), s = s_v.data(), k32 = key_v.data();
    }
    std::vector<double> tmp(sigmoid ? 0 : E);
    Ranked groups_st[64], best[32];
    std::vector<Ranked> groups_v;
    Ranked* groups = groups_st;
    if (topk_group > 64) groups_v.resize(topk_group), groups = groups_v.data();
    std::vector<uint8_t> keep(n_group > 1 ? n_group : 0);
    for (int64_t t = t_begin; t < t_end; ++t) {
      widen_row(logits, dtype, t * row_stride, E, x);
      scores_row(x, E, sigmoid, s, tmp.data());
      if (bias) {
        for (int64_t e = 0; e < E; ++e) k32[e] = order_key(s[e] + bias[e]);
      } else {
        for (int64_t e = 0; e < E; ++e) k32[e] = order_key(s[e]);
      }
      if (n_group > 1) {
        int64_t ng = 0;
        for (int64_t g = 0; g < n_group; ++g) {
          const uint32_t* v = k32 + g * G;
          uint32_t a1 = 0, a2 = 0;  // top-2 keys, branch-free (keys order like their values)
          for (int64_t i = 0; i < G; ++i) {
            const uint32_t lo = std::min(a1, v[i]);
            a1 = std::max(a1, v[i]);
            a2 = std::max(a2, lo);
          }
          const uint32_t gk = bias ? order_key(key_value(a1) + key_value(a2)) : a1;
          insert_ranked(groups, ng, topk_group, gk, int32_t(g));
        }
        std::fill(keep.begin(), keep.end(), uint8_t(0));
        for (int64_t i = 0; i < ng; ++i) keep[groups[i].index] = 1;
        for (int64_t g = 0; g < n_group; ++g)
          if (!keep[g]) std::fill(k32 + g * G, k32 + (g + 1) * G, 0u);  // 0: not a candidate
      }
      const uint32_t bound = std::max(1u, L == 8    ? kth_bound<8>(k32, E)
                                          : L == 16 ? kth_bound<16>(k32, E)
                                                    : kth_bound<32>(k32, E));
      int64_t nb = 0;
      for (int64_t e = 0; e < E; ++e)
        if (k32[e] >= bound) insert_ranked(best, nb, top_k, k32[e], int32_t(e));
      float* w = weights + t * top_k;
      int32_t* id = ids + t * top_k;
      float denom = 0.0f;
      for (int64_t k = 0; k < top_k; ++k) {
        id[k] = best[k].index;
        w[k] = s[best[k].index];
        denom = k == 0 ? w[k] : denom + w[k];
      }
      for (int64_t k = 0; k < top_k; ++k) w[k] = (renormalize ? w[k] / denom : w[k]) * scale;
    }
  });
}

void plan(const int32_t* ids, int64_t T, int64_t top_k, int64_t E, int64_t align, int64_t R,
          int32_t* counts, int32_t* offs, int32_t* row_token, int32_t* token_row) {
  LK_CHECK(E > 0 && align >= 1 && T >= 0 && top_k >= 0, "plan: bad sizes");
  const int64_t N = T * top_k;
  LK_CHECK(R >= N + std::min(E, N) * (align - 1), "plan: row_token too small for the bound");
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(parallel_chunks(true), N / kParallelWork + 1));
  const int64_t chunk = ceil_div(std::max<int64_t>(N, 1), chunks);
  std::vector<int64_t> hist(chunks * E, 0);

  parallel_for(chunks, chunks > 1, [&](int64_t c) {
    int64_t* h = hist.data() + c * E;
    for (int64_t i = c * chunk, end = std::min(N, (c + 1) * chunk); i < end; ++i) {
      const int32_t e = ids[i];
      if (e >= 0 && e < E) ++h[e];
    }
  });
  int64_t end = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = 0;
    for (int64_t c = 0; c < chunks; ++c) n += hist[c * E + e];
    const int64_t start = end;
    end += ceil_div(n, align) * align;
    counts[e] = int32_t(n);
    offs[e] = int32_t(end);
    int64_t run = start;  // hist becomes each chunk's first row inside expert e
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t h = hist[c * E + e];
      hist[c * E + e] = run;
      run += h;
    }
  }
  std::fill(row_token, row_token + R, -1);
  parallel_for(chunks, chunks > 1, [&](int64_t c) {
    int64_t* h = hist.data() + c * E;
    for (int64_t i = c * chunk, stop = std::min(N, (c + 1) * chunk); i < stop; ++i) {
      const int32_t e = ids[i];
      if (e >= 0 && e < E) {
        const int64_t row = h[e]++;
        token_row[i] = int32_t(row);
        row_token[row] = int32_t(i / top_k);
      } else {
        token_row[i] = -1;
      }
    }
  });
}

void permute(const void* x, int64_t elem_size, int64_t T, int64_t H, int64_t row_stride,
             const int32_t* row_token, int64_t R, void* out) {
  const char* src = static_cast<const char*>(x);
  char* dst = static_cast<char*>(out);
  const int64_t row_bytes = H * elem_size;
  parallel_for(R, R * row_bytes >= 32 * kParallelWork, [&](int64_t r) {
    const int32_t t = row_token[r];
    char* d = dst + r * row_bytes;
    if (t >= 0 && t < T)
      std::memcpy(d, src + t * row_stride * elem_size, size_t(row_bytes));
    else
      std::memset(d, 0, size_t(row_bytes));
  });
}

void permute_fp8(const void* x, DType dtype, int64_t T, int64_t H, int64_t row_stride,
                 const int32_t* row_token, int64_t R, uint8_t* q, float* scale, bool ue8m0) {
  const int64_t groups = ceil_div(H, kQuantGroup);
  const float pad_scale = fp8_scale_from_amax(0.0f, ue8m0);
  const auto pad_row = [&](int64_t r) {  // a padding row: zeros
    std::memset(q + r * H, 0, size_t(H));
    std::fill(scale + r * groups, scale + (r + 1) * groups, pad_scale);
  };
  if (R >= T && T > 0 && T * H < kDirectQuant) {
    // Decode size: each token is quantized straight into its first row and that row copied to
    // its other rows; no scratch (T=1, top-8, H=7168: ~0.3 us of a 2.7 us call).
    const int64_t elem = dtype == DType::f32 ? 4 : 2;
    std::vector<int64_t> first(size_t(T), -1);
    for (int64_t r = 0; r < R; ++r) {
      const int32_t t = row_token[r];
      if (t < 0 || t >= T) {
        pad_row(r);
      } else if (first[t] < 0) {
        first[t] = r;
        ::lk::cpu::quantize_fp8(static_cast<const char*>(x) + t * row_stride * elem, dtype, 1, 1, H, 0, 0, 1,
                                q + r * H, scale + r * groups, ue8m0);
      } else {
        std::memcpy(q + r * H, q + first[t] * H, size_t(H));
        std::memcpy(scale + r * groups, scale + first[t] * groups, size_t(groups) * sizeof(float));
      }
    }
    return;
  }
  if (R >= T && T > 0) {
    // NOTES: each token appears top_k times in expert order, so quantize every token once with
    // the SIMD quantizer (bit-identical to the scalar codec below) and copy its codes and
    // scales to each of its rows: top_k times less encoding (T=1, top-8, H=7168: 136 -> ~15 us).
    std::vector<uint8_t> tq(size_t(T * H));
    std::vector<float> ts(size_t(T * groups));
    ::lk::cpu::quantize_fp8(x, dtype, 1, T, H, 0, row_stride, 1, tq.data(), ts.data(), ue8m0);
    parallel_for(R, R * H >= 32 * kParallelWork, [&](int64_t r) {
      const int32_t t = row_token[r];
      if (t >= 0 && t < T) {
        std::memcpy(q + r * H, tq.data() + t * H, size_t(H));
        std::memcpy(scale + r * groups, ts.data() + t * groups, size_t(groups) * sizeof(float));
      } else {
        pad_row(r);
      }
    });
    return;
  }
  parallel_ranges(R, R * H >= 4 * kParallelWork, [&](int64_t r_begin, int64_t r_end) {
    std::vector<float> buf(H);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int32_t t = row_token[r];
      if (t >= 0 && t < T)
        widen_row(x, dtype, t * row_stride, H, buf.data());
      else
        std::fill(buf.begin(), buf.end(), 0.0f);
      uint8_t* qrow = q + r * H;
      float* srow = scale + r * groups;
      for (int64_t g0 = 0, g = 0; g0 < H; g0 += kQuantGroup, ++g) {
        const int64_t n = std::min<int64_t>(kQuantGroup, H - g0);
        const float* v = buf.data() + g0;
        uint32_t m = 0;
        for (int64_t k = 0; k < n; ++k) m = std::max(m, abs_bits(v[k]));
        const float s = fp8_scale_from_amax(f32_from_bits(m), ue8m0);
        srow[g] = s;
        for (int64_t k = 0; k < n; ++k) qrow[g0 + k] = fp8_quantize_value(v[k], s);
      }
    }
  });
}

#if LK_ISA >= 1
// One token's weighted sum, sums in registers: per 2 vectors of columns every routed row is
// widened and FMAed into two accumulators (k order, as the slices below), then narrowed once.
// rows[k]: y's row of the k-th routed pair (already offset), n <= kMaxCombine of them.
// NOTES: the slice loop keeps its sums in L1 instead, which costs a load and a store of the
// sums per row and 16 columns: at T=1, top-8, H=7168 (bf16) the zmm stores were its bound
// (~4.5 cycles per 32 columns and row). avx2 had run the slice loop too; on a 2-core Zen 1 VM
// its T=1 unpermute of 8 rows x H=7168 bf16 cost ~15 us more than H=2048 (bench, 2026-12-02),
// 18.7 -> 9.9 us on register sums. There, widening the even and odd columns by a shift (or a
// byte shuffle) and an AND instead of the two unpacks was 6-10% slower (A/B in one process).
constexpr int kMaxCombine = 32;
// The vector ops of the combine: zmm (16 lanes) on the AVX-512 levels, ymm (8) on avx2.
#if LK_ISA >= 2
struct CombineVec {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F splat(float w) { return _mm512_set1_ps(w); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static I load_bf16(const uint16_t* p) { return _mm512_loadu_si512(p); }
  static F widen_lo(I x) { return _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), x)); }
  static F widen_hi(I x) { return _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), x)); }
  static void store_bf16(uint16_t* p, F lo, F hi) {
    _mm512_storeu_si512(p, _mm512_packus_epi32(bf16_bits16(_mm512_castps_si512(lo)),
                                               bf16_bits16(_mm512_castps_si512(hi))));
  }
};
#else
// f32_to_bf16 on 8 lanes (round to nearest even, NaN kept quiet), in each lane's low 16 bits.
inline __m256i bf16_bits8(__m256i u) {
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                                       _mm256_and_si256(hi, _mm256_set1_epi32(1))), 16);
  return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}
struct CombineVec {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F splat(float w) { return _mm256_set1_ps(w); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static I load_bf16(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F widen_lo(I x) { return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), x)); }
  static F widen_hi(I x) { return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), x)); }
  static void store_bf16(uint16_t* p, F lo, F hi) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm256_packus_epi32(bf16_bits8(_mm256_castps_si256(lo)), bf16_bits8(_mm256_castps_si256(hi))));
  }
};
#endif
constexpr int64_t kCombineLanes = CombineVec::kLanes;
// kCombineLanes * NV columns from h: NV independent FMA chains (the k order is fixed within each).
// bf16: each load of 2 * kCombineLanes columns is widened by two unpacks with zero (the bf16 in
// the high half of a dword is its fp32), in the unpacks' in-lane order, which the saturating
// pack of the narrowing undoes (values < 2^16, so it saturates nothing).
template <int NV>
inline void combine_cols(const void* const* rows, const float* w, int n, DType dtype, int64_t h, void* out) {
  using V = CombineVec;
  constexpr int L = V::kLanes;
  typename V::F s[NV];
  for (int v = 0; v < NV; ++v) s[v] = V::zero();
  if (dtype == DType::f32) {
    for (int k = 0; k < n; ++k) {
      const typename V::F wk = V::splat(w[k]);
      for (int v = 0; v < NV; ++v) s[v] = V::fma(wk, V::load(static_cast<const float*>(rows[k]) + h + L * v), s[v]);
    }
    for (int v = 0; v < NV; ++v) V::store(static_cast<float*>(out) + h + L * v, s[v]);
    return;
  }
  static_assert(NV % 2 == 0, "bf16 columns go two vectors at a time");
  for (int k = 0; k < n; ++k) {
    const typename V::F wk = V::splat(w[k]);
    for (int v = 0; v < NV; v += 2) {
      const typename V::I x = V::load_bf16(static_cast<const uint16_t*>(rows[k]) + h + L * v);
      s[v] = V::fma(wk, V::widen_lo(x), s[v]);
      s[v + 1] = V::fma(wk, V::widen_hi(x), s[v + 1]);
    }
  }
  for (int v = 0; v < NV; v += 2) V::store_bf16(static_cast<uint16_t*>(out) + h + L * v, s[v], s[v + 1]);
}
void combine_token(const void* const* rows, const float* w, int n, DType dtype, int64_t H, void* out) {
  // NOTES: 8 chains: with 2 (32 columns) the FMA latency bound the loop (~48 cycles per 32
  // columns of 8 rows, measured on AVX-512).
  constexpr int64_t kBig = 8 * kCombineLanes, kSmall = 2 * kCombineLanes;
  int64_t h = 0;
  for (; h + kBig <= H; h += kBig) combine_cols<8>(rows, w, n, dtype, h, out);
  for (; h + kSmall <= H; h += kSmall) combine_cols<2>(rows, w, n, dtype, h, out);
  if (h < H) {  // the last H % kSmall columns
    alignas(64) float acc[kSmall] = {};
    for (int k = 0; k < n; ++k) accumulate_row(rows[k], dtype, h, H - h, w[k], acc);
    const int64_t es = dtype == DType::f32 ? 4 : 2;
    narrow_row(acc, dtype, H - h, static_cast<char*>(out) + h * es);
  }
}
#endif

void unpermute(const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
               const float* weights, int64_t T, int64_t top_k, void* out) {
  const int64_t es = dtype == DType::f32 ? 4 : 2;
#if LK_ISA >= 1
  if (dtype != DType::f16 && top_k <= kMaxCombine) {
    parallel_ranges(T, T * top_k * H >= 4 * kParallelWork, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        const void* rows[kMaxCombine];
        float w[kMaxCombine];
        int n = 0;
        for (int64_t k = 0; k < top_k; ++k) {
          const int32_t r = token_row[t * top_k + k];
          if (r < 0 || r >= R) continue;
          rows[n] = static_cast<const char*>(y) + r * H * es;
          w[n++] = weights[t * top_k + k];
        }
        combine_token(rows, w, n, dtype, H, static_cast<char*>(out) + t * H * es);
      }
    });
    return;
  }
#endif
  // NOTES: H is processed in slices that stay in L1 (acc + one y slice), so the fp32
  // accumulator never goes to memory: y is read once and out written once.
  constexpr int64_t kSlice = 2048;
  parallel_ranges(T, T * top_k * H >= 4 * kParallelWork, [&](int64_t t_begin, int64_t t_end) {
    alignas(64) float acc[kSlice];
    for (int64_t t = t_begin; t < t_end; ++t) {
      for (int64_t h0 = 0; h0 < H; h0 += kSlice) {
        const int64_t n = std::min(kSlice, H - h0);
        std::fill(acc, acc + n, 0.0f);
        for (int64_t k = 0; k < top_k; ++k) {
          const int32_t r = token_row[t * top_k + k];
          if (r < 0 || r >= R) continue;
          const float w = weights[t * top_k + k];
          accumulate_row(y, dtype, r * H + h0, n, w, acc);
        }
        narrow_row(acc, dtype, n, static_cast<char*>(out) + (t * H + h0) * es);
      }
    }
  });
}

void unpermute_backward(const void* grad, const void* y, DType dtype, int64_t R, int64_t H, const int32_t* token_row,
                        const float* weights, int64_t T, int64_t top_k, void* dy, float* dw) {
  const int64_t es = dtype == DType::f32 ? 4 : 2;
  // NOTES: per token, its gradient row widened once, in L1-sized slices of H; each pair's dy row
  // written and its dot product with y's row accumulated in 16 fp32 partial sums (lanes) per
  // slice: one pass over grad, y's chosen rows and dy. The composite of torch ops it replaces
  // (repeat_interleave, mul, where, index_copy, index_select, mul, sum) took ~51 ms at T=2048
  // top-4 H=1024 bf16 on the 2-core Zen 4 VM.
  constexpr int64_t kSlice = 2048, kLanes = 16;
  parallel_ranges(T, T * top_k * H >= 4 * kParallelWork, [&](int64_t t_begin, int64_t t_end) {
    alignas(64) float g[kSlice], v[kSlice];
    for (int64_t t = t_begin; t < t_end; ++t) {
      float dots[16][kLanes] = {};
      for (int64_t h0 = 0; h0 < H; h0 += kSlice) {
        const int64_t n = std::min(kSlice, H - h0), n_vec = n / kLanes * kLanes;
        widen_row(grad, dtype, t * H + h0, n, g);
        for (int64_t k = 0; k < top_k; ++k) {
          const int32_t r = token_row[t * top_k + k];
          if (r < 0 || r >= R) continue;
          if (dy != nullptr) {
            const float w = weights[t * top_k + k];
            for (int64_t i = 0; i < n; ++i) v[i] = w * g[i];
            narrow_row(v, dtype, n, static_cast<char*>(dy) + (int64_t(r) * H + h0) * es);
          }
          if (dw != nullptr && k < 16) {
            widen_row(y, dtype, int64_t(r) * H + h0, n, v);
            float* acc = dots[k];
            for (int64_t i = 0; i < n_vec; i += kLanes)
              for (int64_t j = 0; j < kLanes; ++j) acc[j] += g[i + j] * v[i + j];
            for (int64_t i = n_vec; i < n; ++i) acc[i - n_vec] += g[i] * v[i];
          } else if (dw != nullptr) {  // (top_k > 16: one sequential sum)
            widen_row(y, dtype, int64_t(r) * H + h0, n, v);
            float acc = h0 == 0 ? 0.0f : dw[t * top_k + k];
            for (int64_t i = 0; i < n; ++i) acc += g[i] * v[i];
            dw[t * top_k + k] = acc;
          }
        }
      }
      if (dw == nullptr) continue;
      for (int64_t k = 0; k < top_k; ++k) {
        const int32_t r = token_row[t * top_k + k];
        if (r < 0 || r >= R) {
          dw[t * top_k + k] = 0.0f;
        } else if (k < 16) {
          float sum = 0.0f;
          for (int64_t j = 0; j < kLanes; ++j) sum += dots[k][j];
          dw[t * top_k + k] = sum;
        }
      }
    }
  });
}

}  // namespace lk::cpu::LK_NS
