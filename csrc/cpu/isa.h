// CPU paths: every CPU kernel is compiled once per instruction-set level (cpu/variants.h) and
// the level used is picked at run time, so one binary runs on any x86-64 (or arm64) CPU and
// still uses AVX-512-BF16 where the CPU has it. No kernel is compiled with -march=native
// unless the build asks for it (LEANKERNELS_NATIVE=ON, for local builds only).
//
// Levels (x86-64), each a superset of the one below:
//   4 amx         avx512bf16 + AMX-BF16 tiles (Sapphire Rapids+; Linux grants the tile state):
//                 the row-tiled GEMMs run on TDPBF16PS; every other kernel is the avx512bf16 one
//   3 avx512bf16  AVX-512 F/BW/VL/DQ + VBMI + BF16 (Zen 4+, Sapphire Rapids+): vdpbf16ps, vpermt2b
//   2 avx512      AVX-512 F/BW/VL/DQ (Skylake-SP, Cascade Lake, Ice Lake, ...)
//   1 avx2        AVX2 + FMA + F16C (Haswell+, Zen 1+)
//   0 generic     the compiler's baseline (SSE2 on x86-64, Advanced SIMD on arm64)
// Levels (arm64):
//   1 neon        hand-written Advanced SIMD where it pays (the GEMMs' e4m3 decode); every
//                 other kernel is the generic one
//   0 generic     as above
#pragma once
#include <string>
#include <vector>

namespace lk::cpu {

constexpr int kIsaLevels = 5;

// Name of a level ("amx", "avx512bf16", "avx512", "avx2", "generic"); nullptr when out of range.
const char* isa_name(int level);
// The best level this CPU (and OS: the AVX-512 register state must be enabled) can run.
int isa_supported();
// The level kernels dispatch to: isa_supported() unless set_isa() chose another.
int isa_active();
// Force a level (<= isa_supported()); returns false (and changes nothing) if the CPU cannot run it.
bool set_isa(int level);
// Level of a name, or -1.
int isa_from_name(const std::string& name);

}  // namespace lk::cpu
