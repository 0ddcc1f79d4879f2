// The CPU FP8 GEMMs and quantization on every CPU level this machine runs, without Python: what
// checks the arm64 build (cross-compiled, run under qemu-aarch64 by scripts/arm64_check.sh, where
// there is no arm64 torch), and runs natively on x86 too. Each case compares the kernel against
// a reference written here from the numerics contract (leankernels.reference):
// - fp8_gemm: per 128-wide K block, the fp32 sum of exact e4m3 products times a_scale *
//   b_scale, accumulated in fp32; random bytes (every e4m3 code but NaN: subnormals, zeros,
//   +-448), outputs poisoned before the call. Hostile cases: NaN codes in a and b, Inf / huge /
//   zero scales, K and N tails, empty and skipped groups (whose rows must stay poisoned), bf16
//   output, b_nan_free, subnormal weights under a flush-to-zero caller.
// - quantize_fp8 (1x128 and 128x128, fp32 and ue8m0 scales) and dequantize_fp8: bit-exact, with
//   NaN, Inf, zero groups, tails and a strided input.
// - fp8_k_grouped_gemm (MoE wgrad): hostile token splits, f32 / bf16 out, accumulate.
// - transpose_bytes (the dgrad weight transpose; baseline SIMD, no levels): whole and ragged tiles.
// Exit status 0 when all pass.
//
//   build: g++ -O2 -fopenmp -Icsrc tests/cpp/cpu_gemm_check.cpp csrc/cpu/*.cpp
//   run:   ./a.out        (LK_CHECK_QUICK=1: fewer shapes)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "common/fp8.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/quant.h"

namespace {

using lk::DType;
using lk::GemmLayout;

constexpr int kGroup = 128;
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  // any e4m3 code but the NaN codes (0x7f, 0xff)
  uint8_t code() {
    for (;;) {
      const uint8_t v = uint8_t(g() & 0xff);
      if ((v & 0x7f) != 0x7f) return v;
    }
  }
  // mostly moderate codes (|v| in [2^-4, 2^4]: exponent field 3..11), so sums are not dominated by
  // a few 448s; every code (subnormals, zeros) one time in four
  uint8_t weight_code() {
    if (g() % 4 == 0) return code();
    const uint8_t e = uint8_t(3 + g() % 9), m = uint8_t(g() % 8), s = uint8_t(g() % 2);
    return uint8_t(s << 7 | e << 3 | m);
  }
  float scale() { return std::ldexp(1.0f + float(g() % 1024) / 1024.0f, -int(g() % 12)); }
};

struct Case {
  std::string name;
  GemmLayout layout;
  int64_t G, M, N, K;          // masked: a [G, M, K]; contiguous: a [M, K]; dense: G = 1
  std::vector<int32_t> groups; // contiguous: cumulative ends; masked: rows per group
  DType out_dtype = DType::f32;
  int nan_a = 0, nan_b = 0;    // NaN codes planted in a / b
  bool hostile_scales = false; // Inf, huge and zero scales
  bool b_nan_free = false;     // the caller vouches b has no NaN code
  bool subnormal_b = false;    // b: e4m3 subnormal codes only (exponent field 0)
  bool flush_caller = false;   // called with flush-to-zero / denormals-are-zero set (as after
                               // torch.set_flush_denormal(True)): subnormals must still count
  bool tiny_scales = false;    // scales ~2^-66: every output an fp32 subnormal
};

// The calling thread's flush-to-zero and denormals-are-zero bits on (x86 MXCSR FTZ + DAZ,
// arm64 FPCR FZ + FZ16) or back to `saved`; returns the previous state.
uint64_t set_flush(bool on, uint64_t saved = 0) {
#if defined(__x86_64__)
  const uint64_t old = _mm_getcsr();
  _mm_setcsr(on ? unsigned(old | 0x8040u) : unsigned(saved));
  return old;
#elif defined(__aarch64__)
  uint64_t old;
  asm volatile("mrs %0, fpcr" : "=r"(old));
  const uint64_t v = on ? old | (uint64_t(1) << 24) | (uint64_t(1) << 19) : saved;
  asm volatile("msr fpcr, %0" ::"r"(v));
  return old;
#else
  return on ? 0 : saved;
#endif
}

float bf16_round(float f) { return lk::bf16_to_f32(lk::f32_to_bf16(f)); }

struct Failure {
  int count = 0;
  void report(const std::string& what) {
    if (count++ < 20) std::printf("    FAIL %s\n", what.c_str());
  }
};

// One case on the active level; returns the number of mismatches.
int run_case(const Case& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t KB = cdiv(c.K, kGroup), NB = cdiv(c.N, kGroup);
  const int64_t R = c.layout == GemmLayout::masked ? c.G * c.M : c.M;
  std::vector<uint8_t> a(size_t(R * c.K)), b(size_t(c.G * c.N * c.K));
  std::vector<float> sa(size_t(R * KB)), sb(size_t(c.G * NB * KB));
  for (auto& v : a) v = rng.code();
  for (auto& v : b) v = c.subnormal_b ? uint8_t((rng.g() & 0x87)) : rng.weight_code();
  for (auto& v : sa) v = rng.scale();
  for (auto& v : sb) v = rng.scale();
  if (c.tiny_scales)
    for (auto* s : {&sa, &sb})
      for (auto& v : *s) v = std::ldexp(v, -66);
  for (int i = 0; i < c.nan_a; ++i) a[size_t(rng.g() % a.size())] = (rng.g() & 1) ? 0x7f : 0xff;
  for (int i = 0; i < c.nan_b; ++i) b[size_t(rng.g() % b.size())] = (rng.g() & 1) ? 0x7f : 0xff;
  if (c.hostile_scales) {
    const float special[] = {INFINITY, -INFINITY, 0x1p120f, 0x1p101f, 0.0f, 0x1p-120f};
    for (int i = 0; i < 6; ++i) sa[size_t(rng.g() % sa.size())] = special[rng.g() % 6];
    for (int i = 0; i < 3; ++i) sb[size_t(rng.g() % sb.size())] = special[rng.g() % 6];
  }
  // which rows of a use which group (-1: skipped)
  std::vector<int64_t> group_of(size_t(R), -1);
  if (c.layout == GemmLayout::dense) {
    for (auto& g : group_of) g = 0;
  } else if (c.layout == GemmLayout::contiguous) {
    int64_t start = 0;
    for (int64_t g = 0; g < c.G; ++g) {
      const int64_t end = std::min<int64_t>(c.groups[size_t(g)], c.M);
      for (int64_t r = start; r < end; ++r) group_of[size_t(r)] = g;
      start = std::max(start, end);
    }
  } else {
    for (int64_t g = 0; g < c.G; ++g) {
      const int64_t m = std::min<int64_t>(std::max<int64_t>(c.groups[size_t(g)], 0), c.M);
      for (int64_t r = 0; r < m; ++r) group_of[size_t(g * c.M + r)] = g;
    }
  }
  const size_t osize = c.out_dtype == DType::f32 ? 4 : 2;
  std::vector<uint8_t> out(size_t(R * c.N) * osize, 0xa5);  // poison: 0xa5a5a5a5 (-2.9e-16 / -2.9e-16 bf16)
  const std::vector<uint8_t> poison = out;
  const uint64_t fp_state = c.flush_caller ? set_flush(true) : 0;
  lk::cpu::fp8_gemm(c.layout, a.data(), sa.data(), b.data(), sb.data(),
                    c.layout == GemmLayout::dense ? nullptr : c.groups.data(), c.G, c.M, c.N, c.K, out.data(),
                    c.out_dtype, c.b_nan_free);
  if (c.flush_caller) set_flush(false, fp_state);
  Failure fail;
  double want_max = 0.0;
  std::vector<float> want(size_t(R * c.N), 0.0f);
  // outputs whose terms or sum come near fp32's overflow (huge scales): the order of the sums
  // decides between a large finite value, Inf and NaN, so they are not compared
  std::vector<char> marginal(size_t(R * c.N), 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = group_of[size_t(r)];
    if (g < 0) continue;
    for (int64_t n = 0; n < c.N; ++n) {
      float acc = 0.0f;
      double dacc = 0.0;
      bool near_overflow = false;
      for (int64_t kb = 0; kb < KB; ++kb) {
        // exact e4m3 products summed in double, then rounded once: within fp32 rounding of any
        // fp32 summation order
        double blk = 0.0;
        for (int64_t k = kb * kGroup; k < std::min<int64_t>(c.K, (kb + 1) * kGroup); ++k)
          blk += double(lk::fp8e4m3_to_f32(a[size_t(r * c.K + k)])) *
                 double(lk::fp8e4m3_to_f32(b[size_t((g * c.N + n) * c.K + k)]));
        const float s = sa[size_t(r * KB + kb)] * sb[size_t((g * NB + n / kGroup) * KB + kb)];
        acc += float(blk) * s;
        const double term = blk * double(s);
        if (std::isfinite(term)) near_overflow = near_overflow || std::fabs(term) > 0x1p120;
        dacc += term;
      }
      near_overflow = near_overflow || (std::isfinite(dacc) && std::fabs(dacc) > 0x1p120);
      marginal[size_t(r * c.N + n)] = near_overflow;
      want[size_t(r * c.N + n)] = acc;
      if (std::isfinite(acc) && !near_overflow) want_max = std::max(want_max, std::fabs(double(acc)));
    }
  }
  const bool nan_vouched = c.b_nan_free && c.nan_b > 0;  // b broke the promise: finite garbage allowed
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < c.N; ++n) {
      const size_t i = size_t(r * c.N + n);
      char where[96];
      std::snprintf(where, sizeof(where), "row %lld col %lld", (long long)r, (long long)n);
      const bool poisoned = std::memcmp(out.data() + i * osize, poison.data() + i * osize, osize) == 0;
      if (group_of[size_t(r)] < 0) {
        if (!poisoned) fail.report(std::string("skipped row written at ") + where);
        continue;
      }
      if (poisoned) {  // every row of a group is written, whatever the inputs
        fail.report(std::string("not written at ") + where);
        continue;
      }
      float got;
      if (c.out_dtype == DType::f32) {
        std::memcpy(&got, out.data() + i * 4, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, out.data() + i * 2, 2);
        got = lk::bf16_to_f32(h);
      }
      float w = want[i];
      if (c.out_dtype == DType::bf16) w = bf16_round(w);
      if (nan_vouched || marginal[i]) continue;
      if (std::isnan(w) != std::isnan(got) || (std::isinf(w) && got != w) || (!std::isinf(w) && std::isinf(got))) {
        fail.report(std::string(where) + ": got " + std::to_string(got) + ", want " + std::to_string(w));
        continue;
      }
      if (!std::isfinite(w)) continue;
      const double tol = c.out_dtype == DType::f32 ? 1e-4 * (std::fabs(double(w)) + want_max)
                                                   : 1e-2 * (std::fabs(double(w)) + want_max);
      if (std::fabs(double(got) - double(w)) > tol)
        fail.report(std::string(where) + ": got " + std::to_string(got) + ", want " + std::to_string(w));
    }
  return fail.count;
}

// ---------------------------------------------------------------- k-grouped (MoE wgrad)
// fp8_k_grouped_gemm against the contract (reference.fp8_k_grouped_gemm): expert e's tokens
// [start_e, end_e) (ends clamped to [0, L], starts the running maximum of the earlier ends) cut
// into groups of 128 from start_e, group j with scale column floor(start_e / 128) + e + j; per
// group the sum of exact products times a_scale * b_scale, accumulated in fp32; experts without
// tokens: zeros. accumulate (f32): then called again adding into `base` values, which must give
// base + the first call's output exactly (one fp32 add per element).
int k_grouped_case(int64_t M, int64_t N, int64_t L, const std::vector<int32_t>& offs, DType out_dtype,
                   bool accumulate, uint64_t seed) {
  Rng rng(seed);
  const int64_t E = int64_t(offs.size()), G = (L + kGroup - 1) / kGroup + E - 1;
  std::vector<uint8_t> a(size_t(M * L)), b(size_t(N * L));
  std::vector<float> sa(size_t(M * G)), sb(size_t(N * G));
  for (auto& v : a) v = rng.weight_code();
  for (auto& v : b) v = rng.weight_code();
  for (auto& v : sa) v = rng.scale();
  for (auto& v : sb) v = rng.scale();
  const size_t osize = out_dtype == DType::f32 ? 4 : 2, n_out = size_t(E * M * N);
  std::vector<uint8_t> out(n_out * osize, 0xa5);  // poison
  lk::cpu::fp8_k_grouped_gemm(a.data(), sa.data(), b.data(), sb.data(), offs.data(), E, M, N, L, out.data(),
                              out_dtype);
  std::vector<float> want(n_out, 0.0f);
  double want_max = 0.0;
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t end = std::max(start, std::min<int64_t>(std::max<int64_t>(offs[size_t(e)], 0), L));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int64_t t0 = start, j = 0; t0 < end; t0 += kGroup, ++j) {
          double blk = 0.0;  // exact products summed in double, rounded once
          for (int64_t t = t0; t < std::min(end, t0 + kGroup); ++t)
            blk += double(lk::fp8e4m3_to_f32(a[size_t(m * L + t)])) * double(lk::fp8e4m3_to_f32(b[size_t(n * L + t)]));
          const int64_t col = start / kGroup + e + j;
          acc += float(blk) * (sa[size_t(m * G + col)] * sb[size_t(n * G + col)]);
        }
        want[size_t((e * M + m) * N + n)] = acc;
        want_max = std::max(want_max, std::fabs(double(acc)));
      }
    start = end;
  }
  Failure fail;
  std::vector<float> got(n_out);
  for (size_t i = 0; i < n_out; ++i) {
    float w = want[i];
    if (out_dtype == DType::f32) {
      std::memcpy(&got[i], out.data() + i * 4, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, out.data() + i * 2, 2);
      got[i] = lk::bf16_to_f32(h);
      w = bf16_round(w);
    }
    const double tol = (out_dtype == DType::f32 ? 1e-4 : 1e-2) * (std::fabs(double(w)) + want_max);
    if (!(std::fabs(double(got[i]) - double(w)) <= tol))
      fail.report("element " + std::to_string(i) + ": got " + std::to_string(got[i]) + ", want " + std::to_string(w));
  }
  if (accumulate) {
    std::vector<float> acc(n_out);
    for (auto& v : acc) v = float(want_max) * float(int64_t(rng.g() % 2001) - 1000) / 1000.0f;
    const std::vector<float> base = acc;
    lk::cpu::fp8_k_grouped_gemm(a.data(), sa.data(), b.data(), sb.data(), offs.data(), E, M, N, L, acc.data(),
                                DType::f32, true);
    for (size_t i = 0; i < n_out; ++i) {
      const float expect = base[i] + got[i];
      if (std::memcmp(&expect, &acc[i], 4) != 0)
        fail.report("accumulated element " + std::to_string(i) + ": got " + std::to_string(acc[i]) + ", want " +
                    std::to_string(expect));
    }
  }
  return fail.count;
}

// ---------------------------------------------------------------- quantization
// e4m3 of v (|v| <= 448 or NaN), round to nearest, ties to the even code: the nearest of the 127
// magnitudes (zero, subnormals, normals), found by search.
uint8_t e4m3_of(float v) {
  if (std::isnan(v)) return std::signbit(v) ? 0xff : 0x7f;
  const double m = std::fabs(double(v));
  int best = 0;
  for (int c = 1; c < 0x7f; ++c) {
    const double d = std::fabs(double(lk::fp8e4m3_to_f32(uint8_t(c))) - m);
    const double db = std::fabs(double(lk::fp8e4m3_to_f32(uint8_t(best))) - m);
    if (d < db || (d == db && (c & 1) == 0)) best = c;
  }
  return uint8_t(best | (std::signbit(v) ? 0x80 : 0));
}

float scale_of(float amax, bool ue8m0) {  // reference.fp8_scale
  float s = (std::isnan(amax) ? amax : std::max(amax, 1e-4f)) / 448.0f;
  if (ue8m0 && std::isfinite(s)) {
    int e;
    const float mant = std::frexp(s, &e);
    if (mant != 0.5f) s = std::ldexp(1.0f, e);
  }
  return s;
}

// quantize_fp8 of a [batch, rows, K] fp32 input (row stride `stride`), groups block_rows x 128,
// against the reference; then dequantize_fp8 of the result. Returns the number of mismatches.
int quant_case(int64_t batch, int64_t rows, int64_t K, int64_t stride, int64_t block_rows, bool ue8m0, bool hostile,
               uint64_t seed) {
  Rng rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(batch * rows * stride));
  for (auto& v : x) v = normal(rng.g) * std::ldexp(1.0f, int(rng.g() % 9) - 4);
  const int64_t KB = cdiv(K, kGroup), RB = cdiv(rows, block_rows);
  if (hostile) {  // a NaN group, an Inf group, a zero group, a tiny group
    auto at = [&](int64_t b, int64_t r, int64_t k) -> float& { return x[size_t((b * rows + r) * stride + k)]; };
    for (int64_t k = 0; k < std::min<int64_t>(K, kGroup); ++k) at(batch - 1, rows - 1, k) = 0.0f;
    if (KB > 1)
      for (int64_t k = kGroup; k < std::min<int64_t>(K, 2 * kGroup); ++k) at(0, rows - 1, k) = 1e-7f * normal(rng.g);
    at(0, 0, 0) = NAN;  // last, so that the groups above cannot overwrite them
    at(batch - 1, rows - 1, K - 1) = -INFINITY;
  }
  std::vector<uint8_t> q(size_t(batch * rows * K), 0xa5);
  std::vector<float> sc(size_t(batch * RB * KB), -7.0f);
  lk::cpu::quantize_fp8(x.data(), DType::f32, batch, rows, K, rows * stride, stride, block_rows, q.data(), sc.data(),
                        ue8m0);
  Failure fail;
  std::vector<float> want_s(sc.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t rb = 0; rb < RB; ++rb)
      for (int64_t kb = 0; kb < KB; ++kb) {
        float amax = 0.0f;
        for (int64_t r = rb * block_rows; r < std::min(rows, (rb + 1) * block_rows); ++r)
          for (int64_t k = kb * kGroup; k < std::min(K, (kb + 1) * kGroup); ++k) {
            const float v = std::fabs(x[size_t((b * rows + r) * stride + k)]);
            amax = std::isnan(v) || std::isnan(amax) ? NAN : std::max(amax, v);
          }
        const size_t i = size_t((b * RB + rb) * KB + kb);
        want_s[i] = scale_of(amax, ue8m0);
        if (std::memcmp(&want_s[i], &sc[i], 4) != 0 && !(std::isnan(want_s[i]) && std::isnan(sc[i])))
          fail.report("scale " + std::to_string(i) + ": got " + std::to_string(sc[i]) + ", want " +
                      std::to_string(want_s[i]));
      }
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float v = x[size_t((b * rows + r) * stride + k)];
        const float s = want_s[size_t((b * RB + r / block_rows) * KB + k / kGroup)];
        float y = v / s;
        if (!std::isnan(y)) y = std::min(448.0f, std::max(-448.0f, y));
        uint8_t want = e4m3_of(y);
        if ((want & 0x7f) == 0x7f) want = std::signbit(v) ? 0xff : 0x7f;  // NaN codes: the sign of x
        const uint8_t got = q[size_t((b * rows + r) * K + k)];
        if (got != want)
          fail.report("q[" + std::to_string(b) + "," + std::to_string(r) + "," + std::to_string(k) + "] of " +
                      std::to_string(v) + ": got " + std::to_string(got) + ", want " + std::to_string(want));
      }
  // dequantize_fp8: e4m3(q) * scale, exactly
  std::vector<float> back(q.size(), -7.0f);
  lk::cpu::dequantize_fp8(q.data(), sc.data(), batch, rows, K, block_rows, back.data());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const size_t i = size_t((b * rows + r) * K + k);
        const float want = lk::fp8e4m3_to_f32(q[i]) * sc[size_t((b * RB + r / block_rows) * KB + k / kGroup)];
        if (std::memcmp(&want, &back[i], 4) != 0 && !(std::isnan(want) && std::isnan(back[i])))
          fail.report("dequantized " + std::to_string(i) + ": got " + std::to_string(back[i]) + ", want " +
                      std::to_string(want));
      }
  return fail.count;
}

// transpose_bytes against the index definition; dst poisoned, and a guard byte past its end.
int transpose_case(int64_t batch, int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const size_t n = size_t(batch * rows * cols);
  std::vector<uint8_t> src(n), dst(n + 1, 0xA5);
  for (uint8_t& v : src) v = uint8_t(rng());
  lk::cpu::transpose_bytes(src.data(), dst.data(), batch, rows, cols);
  int bad = dst[n] != 0xA5;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        bad += dst[size_t((b * cols + c) * rows + r)] != src[size_t((b * rows + r) * cols + c)];
  return bad;
}

std::vector<Case> cases(bool quick) {
  std::vector<Case> out;
  const int64_t dense[][3] = {{1, 264, 896}, {2, 200, 300}, {3, 7, 33}, {4, 130, 4100}, {8, 132, 1024},
                              {16, 130, 129}, {17, 64, 256}, {40, 96, 384}, {1, 2048, 1408}, {5, 48, 7168},
                              // 16-row tiles of a taken 4 + 1 and 4 + 2 + 1 at a time (avx512bf16)
                              {80, 72, 300}, {100, 40, 384}};
  for (const auto& s : dense) {
    if (quick && s[0] * s[1] * s[2] > 2000000) continue;
    out.push_back({"dense M=" + std::to_string(s[0]) + " N=" + std::to_string(s[1]) + " K=" + std::to_string(s[2]),
                   GemmLayout::dense, 1, s[0], s[1], s[2], {}});
  }
  // one call with empty groups, 1-4 row groups (decode kernel) and larger ones (row kernels);
  // rows past the last end stay untouched
  out.push_back({"contiguous mixed", GemmLayout::contiguous, 10, 87, 136, 300, {1, 1, 3, 43, 46, 46, 62, 71, 75, 80}});
  out.push_back({"contiguous decode K=2048", GemmLayout::contiguous, 6, 6, 264, 2048, {1, 2, 3, 4, 5, 6}});
  out.push_back({"masked", GemmLayout::masked, 10, 16, 136, 300, {1, 0, 2, 5, 16, 3, 0, 1, 6, 99}});
  out.push_back({"masked one row K=1408", GemmLayout::masked, 4, 4, 256, 1408, {1, 1, 0, 1}});
  Case bf = out[1];
  bf.name = "dense bf16 out";
  bf.out_dtype = DType::bf16;
  out.push_back(bf);
  for (int64_t m : {1, 2, 4, 20}) {
    out.push_back({"NaN codes in a and b, M=" + std::to_string(m), GemmLayout::dense, 1, m, 200, 700, {},
                   DType::f32, 3, 5});
    out.push_back({"hostile scales, M=" + std::to_string(m), GemmLayout::dense, 1, m, 150, 520, {}, DType::f32, 0, 0,
                   true});
  }
  for (int64_t m : {1, 3, 24}) {
    Case sub = {"subnormal weights, flush-to-zero caller, M=" + std::to_string(m), GemmLayout::dense, 1, m, 160,
                640, {}};
    sub.subnormal_b = sub.flush_caller = true;
    out.push_back(sub);
    // (a caller that sets flush-to-zero gets subnormal results flushed, as from torch's own ops)
    sub.name = "subnormal results, M=" + std::to_string(m);
    sub.subnormal_b = sub.flush_caller = false;
    sub.tiny_scales = true;
    out.push_back(sub);
  }
  Case vouched = {"b_nan_free, clean b", GemmLayout::dense, 1, 1, 264, 2048, {}};
  vouched.b_nan_free = true;
  out.push_back(vouched);
  vouched.name = "b_nan_free, NaN code in b (no crash, every row written)";
  vouched.nan_b = 2;
  out.push_back(vouched);
  return out;
}

}  // namespace

int main() {
  const char* q = std::getenv("LK_CHECK_QUICK");
  const bool quick = q != nullptr && *q != '\0' && std::strcmp(q, "0") != 0;
  const int best = lk::cpu::isa_supported();
  int failed = 0, run = 0;
  {
    struct TCase {
      int64_t batch, rows, cols;
    };
    const TCase tcases[] = {{1, 1, 1}, {3, 17, 33}, {2, 64, 48}, {1, 300, 700}, {2, 1, 100}, {5, 100, 1}, {4, 128, 128}, {3, 200, 520}};
    uint64_t seed = 1000;
    std::printf("== transpose_bytes\n");
    for (const TCase& c : tcases) {
      const int bad = transpose_case(c.batch, c.rows, c.cols, seed++);
      ++run;
      failed += bad != 0;
      std::printf("  %s transpose_bytes %lldx%lldx%lld%s\n", bad ? "FAIL" : "ok  ", (long long)c.batch,
                  (long long)c.rows, (long long)c.cols, bad ? (": " + std::to_string(bad) + " mismatches").c_str() : "");
    }
  }
  for (int level = best; level >= 0; --level) {
    const char* name = lk::cpu::isa_name(level);
    if (name == nullptr) continue;
    if (!lk::cpu::set_isa(level)) {
      std::printf("cannot select level %s\n", name);
      return 2;
    }
    std::printf("== CPU level %s\n", name);
    uint64_t seed = 1;
    struct QuantCase {
      int64_t batch, rows, K, stride, block_rows;
      bool ue8m0, hostile;
    };
    const QuantCase quants[] = {{1, 5, 300, 300, 1, false, true},   {2, 3, 128, 130, 1, false, false},
                                {1, 1, 7168, 7168, 1, true, true},  {1, 200, 260, 260, 128, false, true},
                                {2, 130, 129, 131, 128, true, false}, {1, 1, 1, 1, 1, false, false}};
    for (const QuantCase& c : quants) {
      const int bad = quant_case(c.batch, c.rows, c.K, c.stride, c.block_rows, c.ue8m0, c.hostile, seed++);
      ++run;
      const std::string name = "quantize_fp8 " + std::to_string(c.batch) + "x" + std::to_string(c.rows) + "x" +
                               std::to_string(c.K) + (c.block_rows == 1 ? " 1x128" : " 128x128") +
                               (c.ue8m0 ? " ue8m0" : "") + (c.hostile ? " hostile" : "") +
                               (c.stride != c.K ? " strided" : "");
      failed += bad != 0;
      std::printf("  %s %s%s\n", bad ? "FAIL" : "ok  ", name.c_str(),
                  bad ? (": " + std::to_string(bad) + " mismatches").c_str() : "");
    }
    struct KCase {
      int64_t M, N, L;
      std::vector<int32_t> offs;
      DType out_dtype;
      bool accumulate;
    };
    // hostile splits: empty experts, 1 token, 127/128/129, a decreasing end (an empty expert),
    // an end past L (clamped), tokens past the last end (ignored); row and column tails
    const KCase kcases[] = {{70, 50, 700, {0, 1, 128, 257, 386, 389, 389, 650}, DType::f32, false},
                            {70, 50, 700, {0, 1, 128, 257, 386, 389, 389, 650}, DType::f32, true},
                            {33, 130, 300, {100, 60, 299}, DType::bf16, false},
                            {33, 130, 300, {100, 60, 400}, DType::f32, true},
                            {17, 40, 256, {256}, DType::f32, true},
                            // groups ending in each quarter of a block (16 / 32 / 48 / 64 slots)
                            {40, 60, 600, {20, 70, 150, 240, 340, 440, 600}, DType::f32, false}};
    for (const KCase& c : kcases) {
      const int bad = k_grouped_case(c.M, c.N, c.L, c.offs, c.out_dtype, c.accumulate, seed++);
      ++run;
      const std::string name = "fp8_k_grouped_gemm M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) +
                               " L=" + std::to_string(c.L) + " E=" + std::to_string(c.offs.size()) +
                               (c.out_dtype == DType::bf16 ? " bf16" : " f32") + (c.accumulate ? " accumulate" : "");
      failed += bad != 0;
      std::printf("  %s %s%s\n", bad ? "FAIL" : "ok  ", name.c_str(),
                  bad ? (": " + std::to_string(bad) + " mismatches").c_str() : "");
    }
    for (const Case& c : cases(quick)) {
      const int bad = run_case(c, seed++);
      ++run;
      if (bad) {
        ++failed;
        std::printf("  FAIL %s: %d mismatches\n", c.name.c_str(), bad);
      } else {
        std::printf("  ok   %s\n", c.name.c_str());
      }
    }
  }
  std::printf("%d of %d cases failed\n", failed, run);
  return failed ? 1 : 0;
}
