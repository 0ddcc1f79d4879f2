// FP8 (e4m3) block quantization on the CPU.
//
// What: x [batch, rows, K] (fp32/bf16/fp16, row-strided) -> e4m3 bytes + one fp32 scale per
// block_rows x 128 group, scale = max(amax, 1e-4) / 448 (optionally rounded up to 2^k).
// Output is bit-identical to reference.quantize_fp8 (= PyTorch's own x / s, clamp, .to(e4m3)).
//
// How: OpenMP (static) over (batch, row block). With AVX-512 or AVX2 enabled at compile time
// (-march=native builds) an explicit SIMD codec runs on every full 128-wide group:
//  * 1x128: fused. A group is loaded and widened once into 8 zmm (16 ymm) registers (bf16 ->
//    fp32 is a zero-extend + shift, fp16 is vcvtph2ps, both exact), reduced to its |x| max on
//    the raw bits (integer max, NaN-propagating), turned into a scale and encoded from the same
//    registers: one read of x, one write of q, no scratch row. avx2 (16 ymm registers hold
//    one group but not two): the |x| range on x's raw bits, then the encode re-reads the group
//    from L1 (see GroupRange and quantize_direct_row), for bf16, fp16 and fp32 alike.
//  * 128x128: pass 1 keeps a per-group lane-wise |x| max over the block's 128 rows, pass 2
//    re-reads each row and encodes (2 reads + 1 byte write per element).
//  * codec (AVX-512): the quotient is the IEEE x / s (as torch divides), computed without a
//    division as x * RN(1/s) corrected by two FMAs (see quotient); a finite UE8M0 scale is 2^k,
//    so x * 2^-k is the same correctly rounded number and is used instead. For a finite group |x / s| rounds to < 464, so the clamp and the NaN
//    (>= 480) branch of fp8e4m3_from_f32 cannot change a code and are left out; normal
//    rounding is integer ops on the fp32 bits, the subnormal one the FPU's (|v| + 2^14), the
//    sign goes in with one vpternlogd and vpmovdb packs the low bytes. A group whose min |x|
//    is >= scale * 2^-6 (no quotient below the smallest normal: nearly every group of real
//    activations) skips the subnormal blend and the |v| (10 instead of 14 uops per 16 values;
//    one row of 57344 bf16: 16.8 -> 14.7 us).
//  * groups whose scale is NaN/Inf (a NaN or Inf inside) and the K % 128 tail go through the
//    portable scalar codec (common/fp8.h, shared with CUDA); so does everything in builds
//    without AVX2 (e.g. -DLEANKERNELS_NATIVE=OFF), which is the previous, slower code.
//
// Measured (2-core AMD EPYC Zen 4, bf16 in, min of 7, shared/noisy machine; ms):
//                                 before        after    torch.compile(reference)
//   1x128   4096x7168  1 thread    19.9           9.0        16.6 - 20.8
//                      2 threads   16.1 (noisy)   4.6 - 5.9   9.2 - 14.0
//   128x128 7168x2048  1 thread    10.9           4.2 - 4.7  21.0 - 24.9
//                      2 threads    5.9           2.3 - 2.6  12.8 - 13.9
// (ranges: several runs of the same script while another agent ran tests; 2-thread runs
// suffer most, a descheduled OpenMP thread stalls the static split. schedule(dynamic, 8) was
// no better on a quiet run, so the static split stays.)
// (python call incl. allocating q; ~1.8 ms of the 1x128 time is first-touching the 29 MB
// output.) Kernel alone, 1 thread: 1x128 19.6 -> ~8.5-9 ms, of which ~3.3 ms is reading and
// reducing x: the encode (~13 vector ops per 16 values, 8 vdivps per group) dominates.
// Tried and dropped: software prefetch (no gain), skipping the subnormal path per vector behind
// a branch (slower than the branch-free blend; per group, decided by its min |x|, it pays), 256-bit codec on Zen 4 (AVX2 path: 11-19 ms),
// a bf16 path doing the |x| max on 16-bit words and widening by even/odd split (bit-exact,
// no measurable gain).
// Compiled once per CPU level by quant.cpp (cpu/variants.h): no include guard, LK_ISA selects code.

namespace lk::cpu::LK_NS {
namespace {

constexpr int64_t kParallelElems = 1 << 16;  // below this, one thread (see quantize_fp8)

// ------------------------------------------------------------------------ portable scalar
// Used for the K % 128 tail, for groups whose scale is not finite (NaN/Inf inside), and as
// the whole kernel when neither AVX-512 nor AVX2 is enabled at compile time.
uint32_t group_amax_scalar(const float* v, int64_t n) {
  uint32_t m = 0;
  for (int64_t k = 0; k < n; ++k) m = std::max(m, abs_bits(v[k]));
  return m;
}

void encode_scalar(const float* v, int64_t n, float s, uint8_t* q) {
  for (int64_t k = 0; k < n; ++k) q[k] = fp8_quantize_value(v[k], s);
}

// A scale is "finite" when its group held only finite values: then every |x / s| <= ~448,
// nothing is NaN, and the SIMD codec below needs neither the NaN nor the >= 480 branch.
inline bool finite_scale(float s) { return (f32_bits(s) & 0x7f800000u) != 0x7f800000u; }

// Whether a group whose smallest |x| has fp32 bits amin can give a quotient below 2^-6 (an e4m3
// subnormal or zero) with scale s: the codecs' subnormal path is needed (see encode_group_scaled).
inline bool needs_subnormal(uint32_t amin, float s) { return f32_from_bits(amin) < s * 0.015625f; }

#if LK_ISA >= 2
// ------------------------------------------------------------------------ AVX-512 codec
constexpr int kLanes = 16;
using VecF = __m512;

// 16 consecutive elements -> fp32 (bf16: zero-extend and shift, exact; fp16: vcvtph2ps, exact).
inline VecF load16(const void* x, DType dt, int64_t off) {
  switch (dt) {
    case DType::bf16: {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + off));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case DType::f16: {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + off));
      return _mm512_cvtph_ps(h);
    }
    default:
      return _mm512_loadu_ps(static_cast<const float*>(x) + off);
  }
}

inline __m512i abs_bits_v(VecF v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
}

inline uint32_t hmax_u32(__m512i m) { return _mm512_reduce_max_epu32(m); }

// The IEEE quotient x / s (correctly rounded) without a division, given y = RN(1/s): q0 = RN(x y)
// is within an ulp of x / s, the FMA remainder x - q0 s is exact, and RN(q0 + r y) is RN(x / s)
// (Markstein's theorem; checked bit for bit against the IEEE division with C's fmaf for every
// bf16 (2.1e9 pairs) and fp16 (1.7e10) mantissa of x against every fp32 mantissa of s, and for
// 4096 random fp32 mantissas of x (6.9e10 pairs): no difference). Where a product underflows
// (|x / s| far below the e4m3 range) the last bits may differ from the IEEE quotient, but every
// such quotient encodes as an e4m3 zero either way; the sign of a zero quotient may differ too,
// so the codecs take the code's sign from x (s > 0). kMul (UE8M0): y = 1/s is exact, the
// quotient is RN(x y). NOTES: one thread of the 2-core Intel Xeon (AMX) VM, bf16 in, old
// (vdivps) -> new: 1x7168 5.5 -> 5.05 us per call, 512x7168 977-990 -> 848-865 us.
template <bool kMul>
inline VecF quotient(VecF x, VecF s, VecF y) {
  const VecF q0 = _mm512_mul_ps(x, y);
  if constexpr (kMul) {
    (void)s;
    return q0;
  } else {
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, s, x), y, q0);
  }
}

// e4m3 codes of x / s for 16 lanes of a group with a finite scale (y = RN(1/s)), written as 16
// bytes. Same result as fp8_quantize_value (the quotient is the IEEE one: see quotient),
// computed with fewer instructions because
//  * every lane is finite and |x| <= m with m = max(amax, 1e-4), s = RN(m / 448) >= m / 448 /
//    (1 + 2^-24), so |x / s| rounds to at most 448 + ulp(448) < 464: the clamp to 448 and the
//    NaN (>= 480) branch of fp8e4m3_from_f32 cannot change a code and are left out;
//  * the subnormal rounding (|v| < 2^-6) is only done for vectors that have such a lane (rare
//    in real data: |x| < amax / 28672); its code is the low byte of bits(|v| + 2^14);
//  * vpmovdb keeps the low byte of each lane, so the rebias/shift results need no masking.
template <bool kMul, bool kSub = true>
inline void encode16(VecF x, VecF s, VecF y, uint8_t* q) {
  const __m512i v = _mm512_castps_si512(quotient<kMul>(x, s, y));
  const __m512i xs = _mm512_srli_epi32(_mm512_castps_si512(x), 24);  // the code's sign: x's
  if constexpr (!kSub) {
    // No lane is subnormal or zero (the caller checked the group's min |x|): the normal
    // rounding on the signed bits. Rebiasing leaves bits 27..30 zero, the shift puts the sign at
    // bit 11 and vpmovdb drops it; the code's sign comes in with the ternlog.
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(v, 20), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(v, _mm512_set1_epi32(int((uint32_t(7 - 127) << 23) + 0x7ffffu)));
    r = _mm512_srli_epi32(_mm512_add_epi32(r, lsb), 20);
    r = _mm512_ternarylogic_epi32(r, xs, _mm512_set1_epi32(0x80), 0xf8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(r));
    return;
  }
  const __m512i a = _mm512_and_si512(v, _mm512_set1_epi32(0x7fffffff));
  // normal: rebias the exponent and round half to even on the 20 dropped mantissa bits
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(a, _mm512_set1_epi32(int((uint32_t(7 - 127) << 23) + 0x7ffffu)));
  r = _mm512_srli_epi32(_mm512_add_epi32(r, lsb), 20);
  const __mmask16 is_sub = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(121 << 23));
  // subnormal: adding 2^14 makes the FPU round at the e4m3 subnormal step 2^-9
  const __m512i sub = _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(16384.0f)));
  r = _mm512_mask_mov_epi32(r, is_sub, sub);
  // r | (sign >> 24 & 0x80): the code's sign bit
  r = _mm512_ternarylogic_epi32(r, xs, _mm512_set1_epi32(0x80), 0xf8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(r));
}

inline void store16(VecF v, float* out) { _mm512_storeu_ps(out, v); }
inline VecF splat(float s) { return _mm512_set1_ps(s); }
inline __m512i vmax(__m512i a, __m512i b) { return _mm512_max_epu32(a, b); }
inline __m512i vzero() { return _mm512_setzero_si512(); }
#define LK_QUANT_SIMD 1

#elif LK_ISA >= 1
// ------------------------------------------------------------------------ AVX2 codec
constexpr int kLanes = 8;
using VecF = __m256;

inline VecF load16(const void* x, DType dt, int64_t off) {
  switch (dt) {
    case DType::bf16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + off));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
#if LK_ISA >= 1
    case DType::f16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + off));
      return _mm256_cvtph_ps(h);
    }
#else
    case DType::f16: {
      alignas(32) float t[8];
      const uint16_t* p = static_cast<const uint16_t*>(x) + off;
      for (int i = 0; i < 8; ++i) t[i] = f16_to_f32(p[i]);
      return _mm256_load_ps(t);
    }
#endif
    default:
      return _mm256_loadu_ps(static_cast<const float*>(x) + off);
  }
}

inline __m256i abs_bits_v(VecF v) {
  return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
}

// The largest (kMax) or smallest of 8 unsigned lanes.
template <bool kMax>
inline uint32_t hreduce_u32(__m256i m) {
  auto op = [](__m128i a, __m128i b) { return kMax ? _mm_max_epu32(a, b) : _mm_min_epu32(a, b); };
  __m128i t = op(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  t = op(t, _mm_shuffle_epi32(t, 0x4e));
  t = op(t, _mm_shuffle_epi32(t, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(t));
}
inline uint32_t hmax_u32(__m256i m) { return hreduce_u32<true>(m); }
inline uint32_t hmin_u32(__m256i m) { return hreduce_u32<false>(m); }

// Codes as 32-bit lanes (0..255); packed to bytes by the caller four vectors at a time.
// The IEEE quotient x / s given y = RN(1/s), without a division (see the AVX-512 quotient).
template <bool kMul>
inline VecF quotient(VecF x, VecF s, VecF y) {
  const VecF q0 = _mm256_mul_ps(x, y);
  if constexpr (kMul) {
    (void)s;
    return q0;
  } else {
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, s, x), y, q0);
  }
}

// The codes of |v| = |x| / s for 8 lanes of |x| (no sign): normal rounding on the fp32 bits;
// kSub: blended with the FPU's subnormal rounding (needed where some |v| < 2^-6). No clamp to
// 448: in a finite group |v| rounds to < 464 (see the AVX-512 codec's notes).
template <bool kMul, bool kSub = true>
inline __m256i mag_codes8(VecF ax, VecF s, VecF y) {
  const __m256i a = _mm256_castps_si256(quotient<kMul>(ax, s, y));
  __m256i nrm = _mm256_add_epi32(a, _mm256_set1_epi32(int((uint32_t(7 - 127) << 23) + 0x7ffffu)));
  nrm = _mm256_add_epi32(nrm, _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1)));
  nrm = _mm256_srli_epi32(nrm, 20);
  if constexpr (!kSub) {
    return nrm;
  } else {
    const __m256i sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(16384.0f))),
        _mm256_set1_epi32(141 << 23));
    // a < 2^-6 as a signed compare is fine: a has no sign bit
    const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), a);
    return _mm256_blendv_epi8(nrm, sub, is_sub);
  }
}

// The codes of x / s (sign included) for 8 lanes. |x| / s is the IEEE quotient's magnitude.
template <bool kMul, bool kSub = true>
inline __m256i codes8(VecF x, VecF s, VecF y) {
  const __m256i sign = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(int(0x80000000u)));
  const VecF ax = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_set1_epi32(int(0x80000000u)), _mm256_castps_si256(x)));
  return _mm256_or_si256(mag_codes8<kMul, kSub>(ax, s, y), _mm256_srli_epi32(sign, 24));
}

// ---- bf16 rows (block_rows 1), read straight from x.
// NOTES: the shared path (quantize_row_fused) keeps a group widened in 16 registers (8 with
// AVX-512): with AVX2's 16 registers the group and the next one (software pipelining) live on
// the stack, and each vector is stored and reloaded by the |x| max, the min and the encode. On
// Zen 1 that row ran at ~3.2 cycles per value (1x7168 bf16 ~9.4 us one thread, hot), ~1.4 of
// them in the loads and the reductions alone. Here the |x| max and min are taken on the bf16
// words (16 per vector; bf16 -> fp32 keeps the order of the bits), and the encode re-reads x
// from L1, widens by unpacking under zero words (bf16 bits are the fp32's high half: no
// shift), codes |x| and takes the sign from a saturating pack of x's words (a negative word
// stays negative: the same bytes as the codes' packs, in the same order). Bit-identical codes.
// Raw C call, old and new build alternating in one process (2-core Zen 1 VM, 2026-12-02,
// median of 9): 1x2048 4.5 -> 3.2 us, 1x7168 11.1 -> 6.6 us, 4x7168 39 -> 21 us, 512x7168
// 2.45 -> 1.33 ms; 128x128 blocks (pass 2 below) 2048x7168 10.2 -> 6.9 ms.
struct GroupRange {
  uint32_t amax, amin;  // |x| max and min as fp32 bits
};
inline GroupRange group_range(const uint16_t* x) {
  const __m256i mag = _mm256_set1_epi16(0x7fff);
  __m256i mx = _mm256_setzero_si256(), mn = _mm256_set1_epi16(-1);
  for (int i = 0; i < kQuantGroup / 16; ++i) {
    const __m256i w = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * i)), mag);
    mx = _mm256_max_epu16(mx, w);
    mn = _mm256_min_epu16(mn, w);
  }
  const __m128i ones = _mm_set1_epi16(-1);
  // phminposuw: the smallest word; the largest is the smallest of the complements
  const __m128i m = _mm_xor_si128(_mm_max_epu16(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1)), ones);
  const __m128i n = _mm_min_epu16(_mm256_castsi256_si128(mn), _mm256_extracti128_si256(mn, 1));
  const uint32_t amax = 0xffffu & ~uint32_t(_mm_cvtsi128_si32(_mm_minpos_epu16(m)));
  const uint32_t amin = 0xffffu & uint32_t(_mm_cvtsi128_si32(_mm_minpos_epu16(n)));
  return {amax << 16, amin << 16};
}

template <bool kMul, bool kSub>
inline void encode_direct(const uint16_t* x, VecF s, VecF y, uint8_t* q) {
  const __m256i mag = _mm256_set1_epi16(0x7fff), zero = _mm256_setzero_si256();
  for (int c = 0; c < kQuantGroup / 32; ++c) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * c));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * c + 16));
    const __m256i a0 = _mm256_and_si256(x0, mag), a1 = _mm256_and_si256(x1, mag);
    auto code = [&](__m256i w) { return mag_codes8<kMul, kSub>(_mm256_castsi256_ps(w), s, y); };
    // unpacklo/hi: values 0-3, 8-11 / 4-7, 12-15 of the 16; packus puts them back in order
    const __m256i ab = _mm256_packus_epi32(code(_mm256_unpacklo_epi16(zero, a0)), code(_mm256_unpackhi_epi16(zero, a0)));
    const __m256i cd = _mm256_packus_epi32(code(_mm256_unpacklo_epi16(zero, a1)), code(_mm256_unpackhi_epi16(zero, a1)));
    const __m256i sign = _mm256_and_si256(_mm256_packs_epi16(x0, x1), _mm256_set1_epi8(char(0x80)));
    const __m256i bytes = _mm256_or_si256(_mm256_packus_epi16(ab, cd), sign);  // quads: 0-7, 16-23, 8-15, 24-31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * c), _mm256_permute4x64_epi64(bytes, 0xd8));
  }
}

inline VecF splat(float s) { return _mm256_set1_ps(s); }
inline __m256i vmax(__m256i a, __m256i b) { return _mm256_max_epu32(a, b); }
inline __m256i vzero() { return _mm256_setzero_si256(); }
#define LK_QUANT_SIMD 1
#endif

#ifdef LK_QUANT_SIMD
constexpr int kVecs = kQuantGroup / kLanes;  // vectors per 128-wide group

constexpr int kVecs32 = 32 / kLanes;  // vectors per 32 values

// Encode 32 values held in kVecs32 registers, lane by lane with its own scale s[i] (one scale
// per group: every s[i] equal; quantize_fp8_transposed: one per column).
template <bool kMul, bool kSub = true>
inline void encode32(const VecF* v, const VecF* s, const VecF* y, uint8_t* q) {
#if LK_ISA >= 2
  for (int i = 0; i < kVecs32; ++i) encode16<kMul, kSub>(v[i], s[i], y[i], q + i * kLanes);
#else
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i ab = _mm256_packus_epi32(codes8<kMul, kSub>(v[0], s[0], y[0]), codes8<kMul, kSub>(v[1], s[1], y[1]));
  const __m256i cd = _mm256_packus_epi32(codes8<kMul, kSub>(v[2], s[2], y[2]), codes8<kMul, kSub>(v[3], s[3], y[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), perm));
#endif
}

// Encode one full group held in registers.
template <bool kMul, bool kSub>
inline void encode_group(const VecF* v, VecF s, VecF y, uint8_t* q) {
  VecF ss[kVecs32], yy[kVecs32];
  for (int i = 0; i < kVecs32; ++i) {
    ss[i] = s;
    yy[i] = y;
  }
  for (int i = 0; i < kVecs; i += kVecs32) encode32<kMul, kSub>(v + i, ss, yy, q + i * kLanes);
}

// A finite UE8M0 scale is a power of two 2^k (k in [-21, 127]) whose reciprocal 2^-k is exact
// (2^-127 as a subnormal), so x * (1/s) and x / s are the same real number rounded once: the
// same bits. An fp32 scale gets the IEEE quotient, as PyTorch's division (see quotient).
// amin: the group's smallest |x| bits. When |x| >= s * 2^-6 for every lane, every quotient is
// a normal e4m3 (|x / s| >= 2^-6 exactly: s * 2^-6 is exact and 2^-6 representable), and the
// AVX-512 codec skips its subnormal path (~2 of 11 vector ops; in real activations nearly every
// group: a lane that small is below amax / 28672; zeros always take the full path).
inline void encode_group_scaled(const VecF* v, float s, bool ue8m0, uint8_t* q, uint32_t amin) {
  const bool sub = needs_subnormal(amin, s);
  const VecF sv = splat(s), yv = splat(1.0f / s);
  if (ue8m0) {
    if (sub) encode_group<true, true>(v, sv, yv, q);
    else encode_group<true, false>(v, sv, yv, q);
  } else {
    if (sub) encode_group<false, true>(v, sv, yv, q);
    else encode_group<false, false>(v, sv, yv, q);
  }
}

#if LK_ISA == 1
// ---- fp32 and fp16 rows (block_rows 1) the same way: the |x| range on the raw bits, then the
// encode re-reads the group from L1 (see quantize_direct_row).
inline GroupRange group_range(const float* x) {
  const __m256i mag = _mm256_set1_epi32(0x7fffffff);
  __m256i mx = _mm256_setzero_si256(), mn = _mm256_set1_epi32(-1);
  for (int i = 0; i < kQuantGroup / 8; ++i) {
    const __m256i w = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * i)), mag);
    mx = _mm256_max_epu32(mx, w);
    mn = _mm256_min_epu32(mn, w);
  }
  return {hmax_u32(mx), hmin_u32(mn)};
}
// fp16 rows the same way: the |x| range on the half words (the order of their magnitudes, as
// bf16's), widened once by F16C (exact).
struct Half {
  uint16_t bits;
};
inline GroupRange group_range(const Half* x) {
  const GroupRange r = group_range(reinterpret_cast<const uint16_t*>(x));  // as bf16: the words << 16
  return {f32_bits(_cvtsh_ss(uint16_t(r.amax >> 16))), f32_bits(_cvtsh_ss(uint16_t(r.amin >> 16)))};
}
inline VecF load8(const float* x) { return _mm256_loadu_ps(x); }
inline VecF load8(const Half* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }
template <bool kMul, bool kSub, class T>
inline void encode_direct(const T* x, VecF s, VecF y, uint8_t* q) {
  const VecF ss[kVecs32] = {s, s, s, s}, yy[kVecs32] = {y, y, y, y};
  for (int c = 0; c < kQuantGroup / 32; ++c) {
    VecF v[kVecs32];
    for (int i = 0; i < kVecs32; ++i) v[i] = load8(x + 32 * c + 8 * i);
    encode32<kMul, kSub>(v, ss, yy, q + 32 * c);
  }
}

// One group of bf16, fp16 or fp32 x with a finite scale s, y = 1 / s; sub: some |x| < s * 2^-6 (see
// encode_group_scaled).
template <class T>
inline void encode_direct_scaled(const T* x, float s, float y, bool sub, bool ue8m0, uint8_t* q) {
  const VecF sv = _mm256_set1_ps(s), yv = _mm256_set1_ps(y);
  if (ue8m0) {
    if (sub) encode_direct<true, true>(x, sv, yv, q);
    else encode_direct<true, false>(x, sv, yv, q);
  } else {
    if (sub) encode_direct<false, true>(x, sv, yv, q);
    else encode_direct<false, false>(x, sv, yv, q);
  }
}

// The groups of one row of bf16 (T = uint16_t), fp16 (Half) or fp32 x (full of them, each 128
// wide): codes into q, scales into srow.
// NOTES: the next group's |x| range, scale and reciprocal are computed before this group is
// encoded (a chain of two divisions that the encode would otherwise wait for).
// NOTES: fp32 and fp16 had taken quantize_row_fused, which keeps the group and the next one in
// 32 ymm values (16 registers: spilled) and, having no |x| min on avx2, always the subnormal
// path. Raw C call, old and new build alternating in separate processes (2-core Zen 1 VM,
// 2026-12-03, medians of 3 x 9): 1x7168 fp32 10.1 -> 6.3 us, fp16 10.5 -> 7.0 us, 4x7168 fp32
// 37 -> 22 us; 128x128 blocks (pass 2) fp32 256x7168 on 2 threads 1.59 -> 1.24 ms. The avx2
// |x| min also lets silu_mul_quantize_fp8 skip the subnormal path: 2-6% there (the exp costs).
// f(x + off as a pointer to dt's element type): uint16_t (bf16), Half (fp16) or float.
template <class F>
inline void with_direct_rows(const void* x, DType dt, int64_t off, F&& f) {
  if (dt == DType::bf16) f(static_cast<const uint16_t*>(x) + off);
  else if (dt == DType::f16) f(static_cast<const Half*>(x) + off);
  else f(static_cast<const float*>(x) + off);
}

template <class T>
inline void quantize_direct_row(const T* x, int64_t full, bool ue8m0, uint8_t* q, float* srow, float* buf) {
  struct Next {
    float s, y;
    bool sub;
  };
  auto next = [&](int64_t g) {
    const GroupRange r = group_range(x + g * kQuantGroup);
    const float s = fp8_scale_from_amax(f32_from_bits(r.amax), ue8m0);
    return Next{s, 1.0f / s, needs_subnormal(r.amin, s)};
  };
  Next n = full > 0 ? next(0) : Next{};
  for (int64_t g = 0; g < full; ++g) {
    const Next c = n;
    if (g + 1 < full) n = next(g + 1);
    const T* xg = x + g * kQuantGroup;
    uint8_t* qg = q + g * kQuantGroup;
    srow[g] = c.s;
    if (!finite_scale(c.s)) {  // a NaN or Inf inside
      widen_row(xg, std::is_same_v<T, uint16_t> ? DType::bf16 : std::is_same_v<T, Half> ? DType::f16 : DType::f32, 0,
                kQuantGroup, buf);
      encode_scalar(buf, kQuantGroup, c.s, qg);
      continue;
    }
    encode_direct_scaled(xg, c.s, c.y, c.sub, ue8m0, qg);
  }
}
#endif

inline void load_group(const void* x, DType dt, int64_t off, VecF* v) {
  for (int i = 0; i < kVecs; ++i) v[i] = load16(x, dt, off + i * kLanes);
}

inline uint32_t group_amax_v(const VecF* v) {
  auto m = vzero();
  for (int i = 0; i < kVecs; ++i) m = vmax(m, abs_bits_v(v[i]));
  return hmax_u32(m);
}

// The group's smallest |x| bits, for encode_group_scaled.
inline uint32_t group_amin_v(const VecF* v) {
#if LK_ISA >= 2
  __m512i m = abs_bits_v(v[0]);
  for (int i = 1; i < kVecs; ++i) m = _mm512_min_epu32(m, abs_bits_v(v[i]));
  return _mm512_reduce_min_epu32(m);
#else
  __m256i m = abs_bits_v(v[0]);
  for (int i = 1; i < kVecs; ++i) m = _mm256_min_epu32(m, abs_bits_v(v[i]));
  return hmin_u32(m);
#endif
}

#if LK_ISA >= 2
using VecI = __m512i;
inline VecI ldi(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void sti(uint32_t* p, VecI v) { _mm512_storeu_si512(p, v); }
#else
using VecI = __m256i;
inline VecI ldi(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void sti(uint32_t* p, VecI v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
#endif

inline void spill_group(const VecF* v, float* out) {
#if LK_ISA >= 2
  for (int i = 0; i < kVecs; ++i) _mm512_storeu_ps(out + i * kLanes, v[i]);
#else
  for (int i = 0; i < kVecs; ++i) _mm256_storeu_ps(out + i * kLanes, v[i]);
#endif
}
#endif  // LK_QUANT_SIMD

// silu(g) * u of one value: torch's definition, g / (1 + exp(-g)), with the libm exp.
inline float silu_mul_scalar(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

#ifdef LK_QUANT_SIMD
// exp(x) of finite lanes: x clamped to [-87, 88], 2^n * p(r) with r = x - n ln2 (two-part
// ln2) and p the degree-6 Taylor polynomial (|r| <= ln2 / 2: relative error ~2e-7, a few
// ulp). GCC vector arithmetic, the same code at either width.
inline VecF exp_v(VecF x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(VecF))));
  const VecF zero = {};  // (not x - x: NaN for an infinite x; NaN lanes come out finite here)
  x = x < zero + 88.0f ? x : zero + 88.0f;
  x = x > zero - 87.0f ? x : zero - 87.0f;
  const VecF n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (|n| < 2^22)
  const VecF r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  VecF p = zero + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;  // 2^n, n in [-126, 127]
  return p * (VecF)e;
}

// silu(g) * u lane by lane, finite g and u (the caller checks).
inline VecF silu_mul_v(VecF g, VecF u) { return g / (exp_v(-g) + 1.0f) * u; }

// All lanes of the group finite.
inline bool group_finite(const VecF* v) { return group_amax_v(v) < 0x7f800000u; }

#if LK_ISA >= 2  // (avx2 reads its rows straight from x: quantize_direct_row)
// The full groups of one row (block_rows 1) from registers: each group is loaded once, reduced,
// scaled and encoded. x + off: the row.
// NOTES: out of line: inlined into quantize_fp8's loop (beside the avx2 bf16 row), the avx2
// fp32 rows ran ~10% slower (1x7168 and 4x7168, Zen 1, A/B in one process).
__attribute__((noinline)) void quantize_row_fused(const void* x, DType dtype, int64_t off, int64_t full, bool ue8m0,
                                                  uint8_t* qrow, float* srow, float* buf) {
  // NOTES: software pipelined: the next group is loaded and reduced before this one is
  // encoded, so its reductions (a latency chain: |x| max and min, the scale's division)
  // run beside this group's encode. One thread, bf16: 1x7168 2.37 -> 2.03 us, 1x57344
  // 14.8 -> 12.1 us, 512x7168 924 -> 748 us. (Encoding x * RN(1/s) instead of the
  // division, with a division only near an e4m3 tie, was 40% slower: more uops.)
  VecF v[kVecs], nv[kVecs];
  uint32_t amax_g = 0, amin_g = 0;
  if (full > 0) {
    load_group(x, dtype, off, v);
    amax_g = group_amax_v(v);
    amin_g = group_amin_v(v);
  }
  for (int64_t g = 0; g < full; ++g) {
    uint32_t amax_n = 0, amin_n = 0;
    if (g + 1 < full) {
      load_group(x, dtype, off + (g + 1) * kQuantGroup, nv);
      amax_n = group_amax_v(nv);
      amin_n = group_amin_v(nv);
    }
    const float s = fp8_scale_from_amax(f32_from_bits(amax_g), ue8m0);
    srow[g] = s;
    if (finite_scale(s)) {
      encode_group_scaled(v, s, ue8m0, qrow + g * kQuantGroup, amin_g);
    } else {
      spill_group(v, buf);
      encode_scalar(buf, kQuantGroup, s, qrow + g * kQuantGroup);
    }
    for (int i = 0; i < kVecs; ++i) v[i] = nv[i];
    amax_g = amax_n;
    amin_g = amin_n;
  }
}
#endif  // LK_ISA >= 2
#endif

// ---------------------------------------------------------------- SwiGLU for training
// silu_mul / silu_mul_backward: the activation between a MoE expert's two GEMMs and its
// gradient, in fp32 from and to bf16/fp32 rows, with torch's formulas (F.silu(g) * u and
// silu_backward), so the FP8 training layer needs no fp32 copies of h and no cat.
// exp(-g) overflows to Inf in fp32 (and in torch) below this g: silu(g) = g / (1 + Inf) is
// then -0 (NaN at g = -Inf) and sigmoid(g) 0; exp_v clamps instead, so the vector code takes
// those lanes from the overflowed value.
constexpr float kExpOverflowNeg = -88.7228394f;
constexpr int64_t kSwigluChunk = 512;  // values per row piece (fp32 scratch)

inline float sigmoid_scalar(float g) { return 1.0f / (1.0f + std::exp(-g)); }

// du = d * silu(g) (silu as the forward computes it), dg = (d * u) * (s * (1 + g * (1 - s))).
inline void silu_mul_grad_scalar(float g, float u, float d, float* dg, float* du) {
  const float s = sigmoid_scalar(g);
  *du = d * (g / (1.0f + std::exp(-g)));
  *dg = (d * u) * (s * (1.0f + g * (1.0f - s)));
}

#ifdef LK_QUANT_SIMD
inline VecF ldv(const float* p) {
  VecF v;
  memcpy(&v, p, sizeof(v));
  return v;
}
inline void stv(float* p, VecF v) { memcpy(p, &v, sizeof(v)); }

// exp(-g), Inf where fp32 overflows (see kExpOverflowNeg).
inline VecF exp_neg_v(VecF g) {
  const VecF zero = {};
  const VecF e = exp_v(-g);
  return g < zero + kExpOverflowNeg ? zero + __builtin_inff() : e;
}
#endif

}  // namespace

void silu_mul(const void* h, DType dtype, int64_t rows, int64_t I, int64_t row_stride, void* out) {
  LK_CHECK(rows >= 0 && I >= 0, "negative size");
  LK_CHECK(dtype == DType::f32 || dtype == DType::bf16, "silu_mul: h must be float32 or bfloat16");
  if (rows == 0 || I == 0) return;
  const int64_t es = dtype == DType::f32 ? 4 : 2;
  parallel_ranges(rows, rows * I >= kParallelElems, [&](int64_t r_begin, int64_t r_end) {
    alignas(64) float g[kSwigluChunk], u[kSwigluChunk];
    for (int64_t r = r_begin; r < r_end; ++r)
      for (int64_t k0 = 0; k0 < I; k0 += kSwigluChunk) {
        const int64_t n = std::min(kSwigluChunk, I - k0);
        widen_row(h, dtype, r * row_stride + k0, n, g);
        widen_row(h, dtype, r * row_stride + I + k0, n, u);
        int64_t k = 0;
#ifdef LK_QUANT_SIMD
        for (; k + kLanes <= n; k += kLanes) {
          const VecF gv = ldv(g + k);
          stv(g + k, gv / (exp_neg_v(gv) + 1.0f) * ldv(u + k));
        }
#endif
        for (; k < n; ++k) g[k] = silu_mul_scalar(g[k], u[k]);
        narrow_row(g, dtype, n, static_cast<char*>(out) + (r * I + k0) * es);
      }
  });
}

void silu_mul_backward(const void* h, const void* grad, DType dtype, int64_t rows, int64_t I, int64_t h_stride,
                       int64_t grad_stride, void* dh) {
  LK_CHECK(rows >= 0 && I >= 0, "negative size");
  LK_CHECK(dtype == DType::f32 || dtype == DType::bf16, "silu_mul_backward: h must be float32 or bfloat16");
  if (rows == 0 || I == 0) return;
  const int64_t es = dtype == DType::f32 ? 4 : 2;
  parallel_ranges(rows, rows * I >= kParallelElems, [&](int64_t r_begin, int64_t r_end) {
    alignas(64) float g[kSwigluChunk], u[kSwigluChunk], d[kSwigluChunk];
    for (int64_t r = r_begin; r < r_end; ++r)
      for (int64_t k0 = 0; k0 < I; k0 += kSwigluChunk) {
        const int64_t n = std::min(kSwigluChunk, I - k0);
        widen_row(h, dtype, r * h_stride + k0, n, g);
        widen_row(h, dtype, r * h_stride + I + k0, n, u);
        widen_row(grad, dtype, r * grad_stride + k0, n, d);
        int64_t k = 0;
#ifdef LK_QUANT_SIMD
        for (; k + kLanes <= n; k += kLanes) {
          const VecF gv = ldv(g + k), uv = ldv(u + k), dv = ldv(d + k);
          const VecF e1 = exp_neg_v(gv) + 1.0f, s = 1.0f / e1;
          stv(u + k, dv * (gv / e1));                          // du
          stv(g + k, (dv * uv) * (s * (1.0f + gv * (1.0f - s))));  // dg
        }
#endif
        for (; k < n; ++k) silu_mul_grad_scalar(g[k], u[k], d[k], &g[k], &u[k]);
        narrow_row(g, dtype, n, static_cast<char*>(dh) + (r * 2 * I + k0) * es);
        narrow_row(u, dtype, n, static_cast<char*>(dh) + (r * 2 * I + I + k0) * es);
      }
  });
}

void silu_mul_quantize_fp8(const void* h, DType dtype, int64_t rows, int64_t I, int64_t row_stride, uint8_t* q,
                           float* scale, bool ue8m0) {
  LK_CHECK(rows >= 0 && I >= 0, "negative size");
  LK_CHECK(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16,
           "input must be float32, bfloat16 or float16");
  if (rows == 0 || I == 0) return;
  const int64_t groups = ceil_div(I, kQuantGroup);
#ifdef LK_QUANT_SIMD
  const int64_t full = I / kQuantGroup;  // groups for the vector path
#endif
  parallel_ranges(rows, rows * I >= kParallelElems, [&](int64_t r_begin, int64_t r_end) {
    std::vector<float> gb(kQuantGroup), ub(kQuantGroup);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t off = r * row_stride;
      uint8_t* qrow = q + r * I;
      float* srow = scale + r * groups;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * kQuantGroup, n = std::min<int64_t>(kQuantGroup, I - k0);
#ifdef LK_QUANT_SIMD
        if (g < full) {
          VecF gv[kVecs], uv[kVecs];
          load_group(h, dtype, off + k0, gv);
          load_group(h, dtype, off + I + k0, uv);
          if (group_finite(gv) && group_finite(uv)) {
            for (int i = 0; i < kVecs; ++i) gv[i] = silu_mul_v(gv[i], uv[i]);
            const float s = fp8_scale_from_amax(f32_from_bits(group_amax_v(gv)), ue8m0);
            srow[g] = s;
            if (finite_scale(s)) {
              encode_group_scaled(gv, s, ue8m0, qrow + k0, group_amin_v(gv));
            } else {  // the product overflowed to Inf
              spill_group(gv, gb.data());
              encode_scalar(gb.data(), kQuantGroup, s, qrow + k0);
            }
            continue;
          }
        }
#endif
        // the K % 128 tail, groups holding a NaN or Inf, builds without SIMD: scalar
        widen_row(h, dtype, off + k0, n, gb.data());
        widen_row(h, dtype, off + I + k0, n, ub.data());
        for (int64_t k = 0; k < n; ++k) gb[size_t(k)] = silu_mul_scalar(gb[size_t(k)], ub[size_t(k)]);
        const float s = fp8_scale_from_amax(f32_from_bits(group_amax_scalar(gb.data(), n)), ue8m0);
        srow[g] = s;
        encode_scalar(gb.data(), n, s, qrow + k0);
      }
    }
  });
}

void quantize_fp8(const void* x, DType dtype, int64_t batch, int64_t rows, int64_t K,
                  int64_t batch_stride, int64_t row_stride, int64_t block_rows, uint8_t* q,
                  float* scale, bool ue8m0) {
  LK_CHECK(block_rows == 1 || block_rows == kQuantGroup, "block_rows must be 1 or 128");
  LK_CHECK(batch >= 0 && rows >= 0 && K >= 0, "negative size");
  LK_CHECK(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16,
           "input must be float32, bfloat16 or float16");
  if (batch == 0 || rows == 0 || K == 0) return;
  const int64_t row_blocks = ceil_div(rows, block_rows);
  const int64_t groups = ceil_div(K, kQuantGroup);
  const int64_t units = batch * row_blocks;
#ifdef LK_QUANT_SIMD
  const int64_t full = K / kQuantGroup;  // groups handled by the SIMD codec
#else
  const int64_t full = 0;
#endif
  const int64_t tail0 = full * kQuantGroup;  // first element of the scalar part of a row

  // NOTES: small inputs (decode: one token) run on the calling thread. An OpenMP region costs
  // microseconds on an idle machine but milliseconds when a core is busy with another process
  // (the region waits for a descheduled thread).
  parallel_ranges(units, batch * rows * K >= kParallelElems, [&](int64_t u_begin, int64_t u_end) {
    std::vector<float> buf(K - tail0 > kQuantGroup ? K - tail0 : kQuantGroup);
    std::vector<uint32_t> amax(groups);
    std::vector<float> sc(groups);
#ifdef LK_QUANT_SIMD
    std::vector<uint32_t> amax_lanes(block_rows == 1 ? 0 : full * kLanes);
    VecF v[kVecs];
#endif
    for (int64_t u = u_begin; u < u_end; ++u) {
      const int64_t b = u / row_blocks, rb = u % row_blocks;
      const int64_t r0 = rb * block_rows, r1 = std::min(rows, r0 + block_rows);
      float* srow = scale + u * groups;
#ifdef LK_QUANT_SIMD
      if (block_rows == 1) {
        // Fused: each group is loaded once into registers, reduced, scaled and encoded.
        const int64_t off = b * batch_stride + r0 * row_stride;
        uint8_t* qrow = q + (b * rows + r0) * K;
#if LK_ISA == 1
        with_direct_rows(x, dtype, off, [&](const auto* xr) {  // straight from x (see GroupRange)
          quantize_direct_row(xr, full, ue8m0, qrow, srow, buf.data());
        });
#else
        quantize_row_fused(x, dtype, off, full, ue8m0, qrow, srow, buf.data());
#endif
        if (tail0 < K) {
          widen_row(x, dtype, off + tail0, K - tail0, buf.data());
          const float s = fp8_scale_from_amax(f32_from_bits(group_amax_scalar(buf.data(), K - tail0)), ue8m0);
          srow[full] = s;
          encode_scalar(buf.data(), K - tail0, s, qrow + tail0);
        }
        continue;
      }
      std::fill(amax_lanes.begin(), amax_lanes.end(), 0u);
#endif
      std::fill(amax.begin(), amax.end(), 0u);
      // Pass 1: |x| max per group over the block's rows (lane-wise, reduced once at the end).
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = b * batch_stride + r * row_stride;
#ifdef LK_QUANT_SIMD
        for (int64_t g = 0; g < full; ++g) {
          load_group(x, dtype, off + g * kQuantGroup, v);
          VecI m = ldi(&amax_lanes[g * kLanes]);
          for (int i = 0; i < kVecs; ++i) m = vmax(m, abs_bits_v(v[i]));
          sti(&amax_lanes[g * kLanes], m);
        }
#endif
        if (tail0 < K) {
          widen_row(x, dtype, off + tail0, K - tail0, buf.data());
          for (int64_t g0 = 0, g = full; tail0 + g0 < K; g0 += kQuantGroup, ++g)
            amax[g] = std::max(amax[g], group_amax_scalar(buf.data() + g0,
                                                           std::min<int64_t>(kQuantGroup, K - tail0 - g0)));
        }
      }
#ifdef LK_QUANT_SIMD
      for (int64_t g = 0; g < full; ++g) amax[g] = hmax_u32(ldi(&amax_lanes[g * kLanes]));
#endif
      for (int64_t g = 0; g < groups; ++g) {
        sc[g] = fp8_scale_from_amax(f32_from_bits(amax[g]), ue8m0);
        srow[g] = sc[g];
      }
      // Pass 2: re-read (and re-widen) each row and encode it.
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = b * batch_stride + r * row_stride;
        uint8_t* qrow = q + (b * rows + r) * K;
#ifdef LK_QUANT_SIMD
        for (int64_t g = 0; g < full; ++g) {
          uint8_t* qg = qrow + g * kQuantGroup;
          if (!finite_scale(sc[g])) {
            widen_row(x, dtype, off + g * kQuantGroup, kQuantGroup, buf.data());
            encode_scalar(buf.data(), kQuantGroup, sc[g], qg);
            continue;
          }
#if LK_ISA == 1
          with_direct_rows(x, dtype, off + g * kQuantGroup, [&](const auto* xg) {  // straight from x
            encode_direct_scaled(xg, sc[g], 1.0f / sc[g], needs_subnormal(group_range(xg).amin, sc[g]), ue8m0, qg);
          });
          continue;
#else
          load_group(x, dtype, off + g * kQuantGroup, v);
          encode_group_scaled(v, sc[g], ue8m0, qg, group_amin_v(v));
#endif
        }
#endif
        if (tail0 < K) {
          widen_row(x, dtype, off + tail0, K - tail0, buf.data());
          for (int64_t g0 = 0, g = full; tail0 + g0 < K; g0 += kQuantGroup, ++g)
            encode_scalar(buf.data() + g0, std::min<int64_t>(kQuantGroup, K - tail0 - g0), sc[g],
                          qrow + tail0 + g0);
        }
      }
    }
  });
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

#pragma omp parallel for schedule(static) if (batch * rows * K >= kParallelElems)
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

}  // namespace lk::cpu::LK_NS

#include "cpu/quant_transposed_body.h"
#undef LK_QUANT_SIMD
