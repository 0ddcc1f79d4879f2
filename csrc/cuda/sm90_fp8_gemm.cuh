// Hopper (sm_90a) FP8 block-scaled GEMM: TMA + wgmma, warp-specialised, persistent.
// out = a @ b.T with 1x128 activation scales and 128x128 weight scales (DESIGN.md "GEMM"),
// for the dense, grouped-contiguous and grouped-masked layouts. Design note and tile rule:
// sm90_fp8_gemm.cu and common/gemm_sched.h. No CUDA types here, so the dispatch code that
// includes this header compiles without the CUDA headers.
#pragma once
#include <cstdint>

namespace lk::cuda::sm90 {

enum class GemmLayout { dense, contiguous, masked };

// True when this kernel handles the problem (K % 16 == 0 and N % 8 == 0 for TMA strides,
// 16-byte aligned a / b / out, num_groups in [1, 512], sizes within int32); otherwise the
// caller uses the portable kernel. M == 0 is supported (nothing is launched). The caller must
// also check that the device is sm_90 (fp8_gemm throws otherwise).
bool fp8_gemm_supported(GemmLayout layout, int64_t M, int64_t N, int64_t K, bool out_fp32, const void* a,
                        const void* b, const void* out, int64_t num_groups = 1);

// a: dense/contiguous [M, K], masked [E, M, K] e4m3 (row-major, K contiguous);
// a_scale: [rows of a, ceil(K/128)] fp32; b: [(E,) N, K] e4m3; b_scale: [(E,) ceil(N/128),
// ceil(K/128)] fp32; out: [rows of a, N] bf16 (or fp32 when out_fp32), row-major.
// M: dense/contiguous rows of a; masked M_max. num_groups: 1 for dense, E otherwise.
// group_info: device int32 [E]: contiguous cumulative END offsets, masked masked_m; nullptr
// for dense. Rows outside every group are not written. Asynchronous on `stream`.
// config_index: -1 picks the tile shape by the heuristic (common/gemm_sched.h); 0..7 forces
// sched::sm90_config(i) (tests run every compiled configuration this way).
void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b, const float* b_scale,
              void* out, bool out_fp32, int64_t M, int64_t N, int64_t K, int64_t num_groups,
              const int32_t* group_info, int device, void* stream, int config_index = -1);

}  // namespace lk::cuda::sm90
