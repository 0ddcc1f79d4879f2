// FP8 block-scaled GEMMs on the CPU: the kernels are in gemm_body.h, compiled once per CPU level
// (cpu/variants.h) and chosen at run time (cpu/isa.h).
#include "cpu/gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "common/fp8.h"
#include "common/k_groups.h"
#include "cpu/bf16_simd.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

// NOTES: GCC 12's AVX-512 headers trip -Wmaybe-uninitialized (and, once inlined into
// pack_a_block, -Wuninitialized) on their own undefined-vector idiom.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#ifdef LK_HAS_AMX  // (CMake: the compiler has the AMX intrinsics)
#define LK_VARIANT_AMX 1  // the row-tiled GEMMs have an AMX level (cpu/isa.h)
#endif
#define LK_VARIANT_NEON 1  // and an arm64 level with an Advanced SIMD e4m3 decode
#define LK_VARIANT_BODY "cpu/gemm_body.h"
#include "cpu/variants.h"

namespace lk::cpu {

void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b,
              const float* b_scale, const int32_t* groups, int64_t num_groups, int64_t M,
              int64_t N, int64_t K, void* out, DType out_dtype, bool b_nan_free) {
  LK_CPU_DISPATCH(fp8_gemm, layout, a, a_scale, b, b_scale, groups, num_groups, M, N, K, out, out_dtype, b_nan_free)
}

bool fp8_nan_free(const uint8_t* b, int64_t n) {
  // NOTES: (byte + byte) is 0xfe exactly for the NaN codes 0x7f / 0xff (see the walks' NanMark);
  // a byte max over 64 KiB pieces vectorizes at the baseline ISA, and the pieces go to the threads.
  constexpr int64_t kPiece = 64 * 1024;
  const int64_t pieces = (n + kPiece - 1) / kPiece;
  std::atomic<bool> found{false};
#pragma omp parallel for schedule(static) if (pieces > 4)
  for (int64_t i = 0; i < pieces; ++i) {
    if (found.load(std::memory_order_relaxed)) continue;
    const uint8_t* q = b + i * kPiece;
    const int64_t len = std::min(kPiece, n - i * kPiece);
    uint8_t mx = 0;
    for (int64_t j = 0; j < len; ++j) mx = std::max<uint8_t>(mx, uint8_t(q[j] + q[j]));
    if (mx == 0xfe) found.store(true, std::memory_order_relaxed);
  }
  return !found.load();
}

void fp8_k_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b, const float* b_scale,
                        const int32_t* offs, int64_t num_experts, int64_t M, int64_t N, int64_t L, void* out,
                        DType out_dtype, bool accumulate) {
  LK_CPU_DISPATCH(fp8_k_grouped_gemm, a, a_scale, b, b_scale, offs, num_experts, M, N, L, out, out_dtype, accumulate)
}

}  // namespace lk::cpu
