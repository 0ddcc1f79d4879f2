// CUDA FP8 block-scaled GEMM launcher (see gemm.cu). Same layouts as cpu/gemm.h.
#pragma once
#include "common/common.h"
#include "cpu/gemm.h"

namespace lk::cuda {

// Entry point for every GPU: picks the kernel for the device (today the portable mma.sync
// kernel on every sm_80+; a Hopper wgmma kernel plugs in via dispatch_sm90 in gemm.cu).
// groups (offs or masked_m) is read on the device only: no host synchronisation.
void fp8_gemm(GemmLayout layout, const uint8_t* a, const float* a_scale, const uint8_t* b,
              const float* b_scale, const int32_t* groups, int64_t num_groups, int64_t M,
              int64_t N, int64_t K, void* out, DType out_dtype, int device, void* stream);

// k-grouped GEMM (MoE wgrad; k_grouped_gemm.cu), same layout as cpu::fp8_k_grouped_gemm; offs read
// on the device only.
void fp8_k_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b, const float* b_scale,
                        const int32_t* offs, int64_t num_experts, int64_t M, int64_t N, int64_t L, void* out,
                        DType out_dtype, int device, void* stream);

}  // namespace lk::cuda
