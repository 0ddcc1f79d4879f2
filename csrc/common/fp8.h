// The float8_e4m3fn codec, shared by CPU and CUDA kernels so every device produces the same
// bits as PyTorch's own `tensor.to(torch.float8_e4m3fn)`.
//
// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN;
// largest finite value 448, smallest subnormal 2^-9. Conversion rounds to nearest even.
// Like PyTorch, inputs with |x| >= 480 (Inf included) encode as NaN; the quantizers clamp to
// +-448 first, so only NaN inputs reach that branch there.
#pragma once
#include "common/common.h"

namespace lk {

constexpr float kFp8Max = 448.0f;
constexpr float kScaleFloor = 1e-4f;  // scale = max(amax, 1e-4) / 448 (DeepSeek-V3 recipe)
constexpr int kQuantGroup = 128;      // 1x128 activation groups, 128x128 weight blocks

LK_HD uint8_t fp8e4m3_from_f32(float f) {
  // Written without branches so the CPU loops vectorise and GPU warps do not diverge.
  const uint32_t fp8_max = 1087u << 20;      // 480.0f: rounds past 448 -> NaN
  const uint32_t denorm_mask = 141u << 23;   // 2^14: its ulp is the e4m3 subnormal step 2^-9
  uint32_t bits = f32_bits(f);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  // below 2^-6 (the smallest normal): adding 2^14 makes the FPU round at the subnormal step
  const uint32_t sub = f32_bits(f32_from_bits(bits) + f32_from_bits(denorm_mask)) - denorm_mask;
  // normal: rebias the exponent and round half to even on the 20 dropped mantissa bits
  const uint32_t nrm = (bits + (uint32_t(7 - 127) << 23) + 0x7ffffu + ((bits >> 20) & 1u)) >> 20;
  const uint32_t r = bits >= fp8_max ? 0x7fu : (bits < (121u << 23) ? sub : nrm);
  return uint8_t(r | (sign >> 24));
}

LK_HD float fp8e4m3_to_f32(uint8_t v) {
  const uint32_t sign = uint32_t(v & 0x80u) << 24;
  const uint32_t exp = (v >> 3) & 0xfu;
  const uint32_t man = v & 0x7u;
  if (exp == 0xf && man == 0x7) return f32_from_bits(sign | 0x7fc00000u);  // NaN
  if (exp == 0) {
    float m = float(man) * 0.001953125f;  // man * 2^-9
    return sign ? -m : m;
  }
  return f32_from_bits(sign | ((exp + 120u) << 23) | (man << 20));
}

// NaN-propagating |x| maximum on raw bits: with the sign cleared, the fp32 bit patterns order
// like the values, and every NaN pattern sorts above +Inf. Integer max vectorises.
LK_HD uint32_t abs_bits(float x) { return f32_bits(x) & 0x7fffffffu; }

// Group scale from the group's |x| maximum: max(amax, 1e-4) / 448, optionally rounded up to a
// power of two (UE8M0). NaN stays NaN (as the default quiet NaN 0x7fc00000, the bits PyTorch's
// amax reduction yields whatever the input NaN's payload); Inf stays Inf.
LK_HD float fp8_scale_from_amax(float amax, bool ue8m0) {
  if (!(amax == amax)) return f32_from_bits(0x7fc00000u);
  float s = (amax > kScaleFloor ? amax : kScaleFloor) / kFp8Max;
  if (ue8m0) {
    uint32_t b = f32_bits(s);
    if ((b & 0x7f800000u) != 0x7f800000u && (b & 0x007fffffu) != 0)
      b = (b & 0xff800000u) + 0x00800000u;   // next power of two up
    s = f32_from_bits(b);
  }
  return s;
}

// x / scale clamped to [-448, 448] (NaN passes through), then encoded. A NaN code carries x's
// sign bit, on every device: the quotient's NaN sign is the platform's (x86 gives Inf / Inf a
// negative NaN, CUDA's division returns one positive canonical NaN), so it is not used.
LK_HD uint8_t fp8_quantize_value(float x, float scale) {
  float v = x / scale;
  v = v > kFp8Max ? kFp8Max : (v < -kFp8Max ? -kFp8Max : v);
  const uint8_t code = fp8e4m3_from_f32(v);
  return (code & 0x7fu) == 0x7fu ? uint8_t(0x7fu | ((f32_bits(x) >> 24) & 0x80u)) : code;
}

}  // namespace lk
