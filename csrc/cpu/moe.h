// A whole DeepSeek MoE layer forward at decode sizes on the CPU, in one call (python:
// leankernels.nn.MoE's eager CPU path).
#pragma once
#include "common/common.h"

namespace lk::cpu {

// Every pointer is to contiguous memory (x: rows x_stride apart), checked by the caller.
struct MoeDecodeArgs {
  const void* x;  // [T, H] tokens
  DType x_dtype;
  int64_t T, H, x_stride;
  const float* gate_w;  // [E, H] router weight, fp32
  int64_t E, top_k;
  bool sigmoid;
  const float* bias;  // [E] selection bias or nullptr
  int64_t n_group, topk_group;
  bool renormalize;
  float scale;
  const uint8_t* w13;  // routed experts, gate and up fused: [E, 2I, H] e4m3, [E, ceil(2I/128), ceil(H/128)]
  const float* s13;
  int64_t I;
  const uint8_t* w2;  // routed down: [E, H, I], [E, ceil(H/128), ceil(I/128)]
  const float* s2;
  const uint8_t* wg;  // shared experts' gate_up [2Is, H] (nullptr: no shared experts)
  const float* sg;
  int64_t Is;
  const uint8_t* wd;  // shared down [H, Is]
  const float* sd;
  void* out;  // [T, H] in out_dtype (f32 or bf16): routed + shared
  DType out_dtype;
  bool nan_free;  // w13, w2, wg and wd hold no NaN code (see fp8_gemm's b_nan_free)
};

// The routed experts alone, for tokens routed by the caller (transformers' experts forward):
// ids [T, top_k] int32 or int64 (ids outside [0, E) are not routed here), weights [T, top_k]
// fp32; the down GEMM's output and the weighted sum in fp32, rounded once to out_dtype.
struct MoeExpertsArgs {
  const void* x;
  DType x_dtype;
  int64_t T, H, x_stride;
  const void* ids;
  DType ids_dtype;
  const float* weights;
  int64_t top_k, E;
  const uint8_t* w13;
  const float* s13;
  int64_t I;
  const uint8_t* w2;
  const float* s2;
  void* out;  // [T, H], f32 or bf16
  DType out_dtype;
  bool nan_free;  // w13 and w2 hold no NaN code (see fp8_gemm's b_nan_free)
};

void moe_experts(const MoeExpertsArgs& a);

// The same steps, kernels and order as the op-by-op forward (leankernels.nn.MoE._eager_cpu:
// gate_logits, route, plan, permute_fp8, the grouped GEMMs and silu_mul_quantize_fp8, the
// shared experts beside them, unpermute, the shared add rounded once), so the result is the
// same bitwise; the intermediates live in a per-thread workspace reused across calls.
void moe_decode(const MoeDecodeArgs& a);

}  // namespace lk::cpu
