// fp8_k_grouped_gemm on the CPU: the MoE wgrad GEMM, contracting over tokens.
//
// What: a [M, L] and b [N, L] e4m3 with per-row 1x128 scales along L (a_scale [M, G],
// b_scale [N, G]), in the layout of quantize_fp8_transposed (common/k_groups.h). For every
// expert e and each of its token groups (tokens [t0, t1) <= 128, scale column g):
//   out[e, m, n] += (sum_{t in group} a[m, t] b[n, t]) * (a_scale[m, g] * b_scale[n, g])
// with the group sum in fp32 (e4m3 x e4m3 products are exact): reference.fp8_k_grouped_gemm.
// out [E, M, N] (offs == nullptr: [M, N], one expert), f32 or bf16; experts without tokens
// give zeros. Every output element is written once, by one thread: deterministic. accumulate
// (f32 out): out += the element's whole sum instead, in the same single store.
//
// How: the row-tiled prefill kernels of gemm_body.h, with each token group playing the part
// of a 128-wide K block (zero padded past its end, starting at any token: no alignment). A
// group's a_scale x b_scale is per (row, column), which those kernels already build per block.
//   avx512bf16: every (16-row tile of a, group) is decoded to bf16 and transposed once per call
//   (pack_a_block); work items are (expert, 64 rows of a, 24 rows of b) from a shared counter;
//   per group an item decodes its 24 b rows into an L1 panel and runs the vdpbf16ps
//   micro-kernel (item_products).
//   other levels: the same with fp32 tiles (pack_a_block of the row-tiled fp32 kernel: 16, 8 or 4
//   rows per tile) and the FMA micro-kernels (item_products).
// Bound: 2*M*N*L flops; a and b are read once per item row / column band, so at wgrad shapes
// (M, N >= 1408, L ~ 4096 tokens) it is compute bound like a prefill GEMM (bench: GFLOP/s
// against torch bf16 matmul of the same FLOPs).
// Measured (2026-11-30, 2 shared Zen 4 cores, load ~5, bench/bench_gemm.py -k wgrad, median of 7;
// T = 4096 tokens, multinomial split, fp32 out): E=8 N_out=1408 K=2048 359 ms = 66 GFLOP/s
// (0.58x torch bf16 matmul of the same FLOPs, 0.66x torch bf16 per-expert mm); E=8 N_out=2816
// 75 GFLOP/s (0.61x / 0.67x); E=64: 20-32 GFLOP/s (0.17x / 0.35-0.54x), dominated by first-touching
// the fresh [64, N_out, 2048] fp32 output (0.74-1.5 GB; allocating and filling 0.74 GB alone
// took 0.67-0.84 s on this machine).
// Included by gemm_body.h (same translation unit and CPU level): no include guard.

namespace lk::cpu::LK_NS {
namespace {

struct ExpertGroups {
  int64_t expert, g0, g1;  // groups [g0, g1) of the token-ordered list belong to `expert`
};

std::vector<ExpertGroups> expert_ranges(const std::vector<KGroup>& groups) {
  std::vector<ExpertGroups> ranges;
  for (int64_t i = 0; i < int64_t(groups.size()); ++i) {
    if (ranges.empty() || ranges.back().expert != groups[size_t(i)].expert)
      ranges.push_back({groups[size_t(i)].expert, i, i});
    ranges.back().g1 = i + 1;
  }
  return ranges;
}

// Work item: rows [m0, m1) of a, columns [n0, n1) of out (strips of kNTile), for one expert's groups.
struct KItem {
  size_t range;
  int64_t m0, m1, n0, n1;
};

// Runs item(w, scratch) for every (expert, item_rows rows of a, `strips` x kNTile columns)
// (parallel_items).
template <class Item>
void for_each_k_item(const std::vector<ExpertGroups>& ranges, int64_t M, int64_t N, int64_t item_rows, int64_t strips,
                     Item item) {
  std::vector<KItem> items;
  for (size_t e = 0; e < ranges.size(); ++e)
    for (int64_t m0 = 0; m0 < M; m0 += item_rows)
      for (int64_t n0 = 0; n0 < N; n0 += strips * kNTile)
        items.push_back({e, m0, std::min(M, m0 + item_rows), n0, std::min(N, n0 + strips * kNTile)});
  parallel_items(int64_t(items.size()), [&](int64_t it, Scratch& s) { item(items[size_t(it)], s); });
}

// p: the k-grouped problem in the prefill kernels' terms: K = L tokens, KB = G scale columns
// (a_scale [M, G], b_scale [N, G]), out [E * M, N].
// a's tiles per (m tile, group), in pack order m_tile * n_groups + group (pack_a_block).
void pack_k_tiles(const ADecoder& dec, const Problem& p, int64_t M, const std::vector<KGroup>& groups, PackedA& pa) {
  const int64_t n_groups = int64_t(groups.size()), m_tiles = ceil_div(M, kTileRows);
  pa.a_t.resize(size_t(m_tiles * n_groups * kABlock));
  pa.sa_t.resize(size_t(m_tiles * n_groups * kTileRows));
#pragma omp parallel if (m_tiles * n_groups > 1)
  {
    [[maybe_unused]] const FlushGuard no_flush;  // avx2/avx512: a's subnormals pass through fp32 subnormals
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m_tiles * n_groups; ++i) {
      const int64_t mt = i / n_groups, r0 = mt * kTileRows, rows = std::min<int64_t>(kTileRows, M - r0);
      const KGroup& g = groups[size_t(i % n_groups)];
      pack_a_block(dec, p.a + r0 * p.K + g.t0, p.K, rows, g.t1 - g.t0, pa.a_t.data() + i * kABlock);
      for (int r = 0; r < kTileRows; ++r)
        pa.sa_t[size_t(i * kTileRows + r)] = r < rows ? p.a_scale[(r0 + r) * p.KB + g.col] : 0.0f;
    }
  }
}

void k_grouped_rows(const Problem& p, int64_t M, const std::vector<KGroup>& groups) {
  const std::vector<ExpertGroups> ranges = expert_ranges(groups);
  const int64_t n_groups = int64_t(groups.size());
  const ADecoder dec;
  PackedA pa;
  pack_k_tiles(dec, p, M, groups, pa);
  const int64_t item_rows = kTilesPerItem * kTileRows;
  const int64_t strips = strips_per_item(int64_t(ranges.size()) * ceil_div(M, item_rows), p.N);
  for_each_k_item(ranges, M, p.N, item_rows, strips, [&](const KItem& w, Scratch& s) {
    const ExpertGroups& eg = ranges[w.range];
    const int64_t rows = w.m1 - w.m0, mt0 = w.m0 / kTileRows;
    const KGroup* grp = groups.data() + eg.g0;
#if LK_ISA >= 3
    const int64_t n_item = ceil_div(w.n1 - w.n0, kNTile);
    float* const totals = s.zeroed_strips(n_item, ceil_div(rows, kTileRows));
    for (int64_t i = 0; i < n_item; ++i) {
      const int64_t n0 = w.n0 + i * kNTile;
      item_products(
          dec, pa, ceil_div(rows, kTileRows), std::min(kNTile, p.N - n0), 0, eg.g1 - eg.g0,
          [&](int64_t c, int64_t j) { return p.b + (n0 + c) * p.K + grp[j].t0; },
          [&](int64_t j) { return grp[j].t1 - grp[j].t0; },
          [&](int64_t c, int64_t j) { return p.b_scale[(n0 + c) * p.KB + grp[j].col]; },
          [&](int64_t t, int64_t j) { return (mt0 + t) * n_groups + eg.g0 + j; }, totals + i * Scratch::kStripFloats, s);
    }
#else
    item_products(
        p, dec, pa, ceil_div(rows, kTileRows), w.n0, w.n1, eg.g1 - eg.g0,
        [&](int64_t n, int64_t j) { return p.b + n * p.K + grp[j].t0; }, [&](int64_t j) { return grp[j].t1 - grp[j].t0; },
        [&](int64_t n, int64_t j) { return p.b_scale[n * p.KB + grp[j].col]; },
        [&](int64_t t, int64_t j) { return (mt0 + t) * n_groups + eg.g0 + j; }, s);
    const float* const totals = s.totals.data();
#endif
    store_item(p, totals, eg.expert * M + w.m0, rows, w.n0, w.n1);
  });
}

}  // namespace

void fp8_k_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b, const float* b_scale,
                        const int32_t* offs, int64_t num_experts, int64_t M, int64_t N, int64_t L, void* out,
                        DType out_dtype, bool accumulate) {
  LK_CHECK(M >= 0 && N >= 0 && L >= 0 && num_experts >= 1, "fp8_k_grouped_gemm: bad size");
  LK_CHECK(!accumulate || out_dtype == DType::f32, "fp8_k_grouped_gemm: accumulate needs an f32 out");
  LK_CHECK(offs != nullptr || num_experts == 1, "fp8_k_grouped_gemm: offs=None means one expert");
  LK_CHECK(out_dtype == DType::f32 || out_dtype == DType::bf16, "out dtype must be f32 or bf16");
  if (M == 0 || N == 0) return;
  const std::vector<KGroup> groups = k_groups(offs, num_experts, L);
  // Experts without tokens: zeros, or (accumulate) untouched (the kernels below write every row
  // of the others).
  std::vector<char> has(size_t(num_experts), 0);
  for (const KGroup& g : groups) has[size_t(g.expert)] = 1;
  const size_t esize = out_dtype == DType::f32 ? 4 : 2;
  for (int64_t e = 0; e < num_experts && !accumulate; ++e)
    if (!has[size_t(e)]) memset(static_cast<char*>(out) + size_t(e * M * N) * esize, 0, size_t(M * N) * esize);
  if (groups.empty()) return;
  const Problem p{a,   a_scale,   b, b_scale, N, L, k_group_columns(L, num_experts), 0,
                  out, out_dtype, /*b_nan_free=*/false, accumulate};
  k_grouped_rows(p, M, groups);
}

}  // namespace lk::cpu::LK_NS
