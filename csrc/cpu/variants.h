// Compiles one kernel body once per CPU level (see isa.h). Use, in a kernel's .cpp file, after
// every standard header the body needs (and <immintrin.h> on x86):
//
//   #define LK_VARIANT_BODY "cpu/gemm_body.h"
//   #include "cpu/variants.h"
//
// The body defines its functions inside `namespace lk::cpu::LK_NS` and selects code with
// `#if LK_ISA >= n` (4 amx, 3 avx512bf16, 2 avx512, 1 avx2, 0 generic), never with __AVX512F__
// and friends: in C++ GCC does not update those macros under `#pragma GCC target`. On arm64 the
// neon level is LK_ISA 0 with LK_NEON defined (a separate copy only where the .cpp defines
// LK_VARIANT_NEON; elsewhere `neon` is an alias of generic).
// The .cpp then forwards each entry point with LK_CPU_DISPATCH.
// Level 4 (amx) is compiled only where the .cpp defines LK_VARIANT_AMX first (the GEMMs); in
// every other kernel file the amx path runs the avx512bf16 code (a namespace alias).
//
// NOTES: target regions (`#pragma GCC target`), not one translation unit per -m flag: inline
// functions and template instantiations shared by several units (std::vector<float>,
// lk::f32_to_bf16, ...) would be emitted once per unit and the linker could keep the AVX-512
// copy for everyone (SIGILL on an AVX2 CPU). In a region, only functions defined there get the
// target; headers included before it keep the baseline for their out-of-line copies, and the
// OpenMP bodies outlined from a region inherit its target.
// No include guard: included once per kernel file.
#ifndef LK_VARIANT_BODY
#error "define LK_VARIANT_BODY before including cpu/variants.h"
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define LK_VARIANTS_X86 1
#define LK_TARGET_AVX2_ "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#ifdef LK_EMULATE_AVX512
// Test-only build (cpu/avx512_emu.h): the AVX-512 levels' bodies on AVX2 instructions.
#include "cpu/avx512_emu.h"
#define LK_TARGET_AVX512_ LK_TARGET_AVX2_
#define LK_TARGET_AVX512BF16_ LK_TARGET_AVX2_
#else
#define LK_TARGET_AVX512_ "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd"
#define LK_TARGET_AVX512BF16_ "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512vbmi,avx512bf16"
#endif
#ifdef LK_VARIANT_AMX
#define LK_ISA 4
#define LK_NS amx
#define LK_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512vbmi,avx512bf16,amx-tile,amx-bf16"
#include "cpu/variant_region.h"
#endif
#define LK_ISA 3
#define LK_NS avx512bf16
#define LK_TARGET LK_TARGET_AVX512BF16_
#include "cpu/variant_region.h"
#define LK_ISA 2
#define LK_NS avx512
#define LK_TARGET LK_TARGET_AVX512_
#include "cpu/variant_region.h"
#define LK_ISA 1
#define LK_NS avx2
#define LK_TARGET LK_TARGET_AVX2_
#include "cpu/variant_region.h"
#ifndef LK_VARIANT_AMX
namespace lk::cpu {
namespace amx = avx512bf16;
}  // namespace lk::cpu
#endif
#endif  // x86

#if defined(__aarch64__)
#define LK_VARIANTS_ARM64 1
#ifdef LK_VARIANT_NEON
// arm64 level 1: the generic body with hand-written Advanced SIMD where the .cpp asks for it
// (LK_VARIANT_NEON: the GEMMs' e4m3 decode). Advanced SIMD is part of every arm64 CPU, so no
// target region and no run-time check are needed.
#define LK_ISA 0
#define LK_NEON 1
#define LK_NS neon
#include LK_VARIANT_BODY
#undef LK_ISA
#undef LK_NEON
#undef LK_NS
#endif
#endif  // arm64

#define LK_ISA 0
#define LK_NS generic
#include LK_VARIANT_BODY
#undef LK_ISA
#undef LK_NS
#undef LK_VARIANT_BODY

#if defined(__aarch64__) && !defined(LK_VARIANT_NEON)
namespace lk::cpu {
namespace neon = generic;
}  // namespace lk::cpu
#endif

#ifndef LK_CPU_DISPATCH
#ifdef LK_VARIANTS_X86
#define LK_CPU_DISPATCH(fn, ...)                                    \
  switch (::lk::cpu::isa_active()) {                                \
    case 4: return ::lk::cpu::amx::fn(__VA_ARGS__);                 \
    case 3: return ::lk::cpu::avx512bf16::fn(__VA_ARGS__);          \
    case 2: return ::lk::cpu::avx512::fn(__VA_ARGS__);              \
    case 1: return ::lk::cpu::avx2::fn(__VA_ARGS__);                \
    default: return ::lk::cpu::generic::fn(__VA_ARGS__);            \
  }
#elif defined(LK_VARIANTS_ARM64)
#define LK_CPU_DISPATCH(fn, ...)                                    \
  switch (::lk::cpu::isa_active()) {                                \
    case 1: return ::lk::cpu::neon::fn(__VA_ARGS__);                \
    default: return ::lk::cpu::generic::fn(__VA_ARGS__);            \
  }
#else
#define LK_CPU_DISPATCH(fn, ...) return ::lk::cpu::generic::fn(__VA_ARGS__);
#endif
#endif
