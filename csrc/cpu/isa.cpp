// Run-time choice of the CPU path (see isa.h). Compiled for the baseline target only.
#include "cpu/isa.h"

#include <atomic>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lk::cpu {
namespace {

// AMX tile data is off for every process until it asks the kernel (Linux 5.16+) for it: without
// the grant the first tile instruction faults. The grant is process-wide and permanent.
#if defined(__x86_64__) || defined(_M_X64)
bool amx_usable() {
#if defined(LK_HAS_AMX) && defined(__linux__)
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXtileData) != 0) return false;
  unsigned long long perm = 0;
  return syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) == 0 && ((perm >> kXtileData) & 1);
#else
  return false;
#endif
}
#endif

int detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // libgcc's cpu model checks XGETBV too: a feature counts only if the OS saves its registers.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
  // F16C is not in GCC 12's __builtin_cpu_supports list; every AVX2 CPU made has it (Haswell+, Zen+).
#ifdef LK_EMULATE_AVX512
  // Test-only build (cpu/avx512_emu.h): the AVX-512 levels run on AVX2 instructions.
  if (avx2) return 3;
#endif
  if (bf16 && amx_usable()) return 4;
  return bf16 ? 3 : avx512 ? 2 : avx2 ? 1 : 0;
#elif defined(__aarch64__)
  return 1;  // Advanced SIMD is part of every arm64 CPU
#else
  return 0;
#endif
}

std::atomic<int>& active() {
  static std::atomic<int> level{isa_supported()};
  return level;
}

}  // namespace

const char* isa_name(int level) {
#if defined(__x86_64__) || defined(_M_X64)
  static const char* names[kIsaLevels] = {"generic", "avx2", "avx512", "avx512bf16", "amx"};
#elif defined(__aarch64__)
  static const char* names[kIsaLevels] = {"generic", "neon", nullptr, nullptr, nullptr};
#else
  static const char* names[kIsaLevels] = {"generic", nullptr, nullptr, nullptr, nullptr};
#endif
  return level >= 0 && level < kIsaLevels ? names[level] : nullptr;
}

int isa_supported() {
  static const int level = detect();
  return level;
}

int isa_active() { return active().load(std::memory_order_relaxed); }

bool set_isa(int level) {
  if (level < 0 || level > isa_supported()) return false;
  active().store(level, std::memory_order_relaxed);
  return true;
}

int isa_from_name(const std::string& name) {
  for (int l = 0; l < kIsaLevels; ++l)
    if (isa_name(l) && name == isa_name(l)) return l;
  return -1;
}

}  // namespace lk::cpu
