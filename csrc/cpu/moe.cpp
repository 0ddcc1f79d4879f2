// One MoE layer forward at decode sizes (see moe.h). Why one call: at batch 1 the layer is ten
// small steps around four weight streams, and from Python each step costs an interpreter
// round trip, argument checks and a torch allocation; with the caches cold (a decode step's
// weights have just streamed through them) each such step cost ~30-250 us on a 2-core Xeon VM.
#include "cpu/moe.h"

#include <algorithm>
#include <vector>

#include "common/fp8.h"
#include "cpu/gemm.h"
#include "cpu/quant.h"
#include "cpu/routing.h"

namespace lk::cpu {
namespace {

struct Workspace {
  std::vector<float> logits, weights, h, gu, a_s, a2_s, xs, xs2;
  std::vector<int32_t> ids, counts, offs, row_token, token_row;
  std::vector<uint8_t> a_q, a2_q, xq, xq2, y, sh, u;
};

template <class V>
typename V::value_type* sized(V& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

struct SharedWeights {  // the shared experts' operands (moe_decode)
  const uint8_t* wg;
  const float* sg;
  int64_t Is;
  const uint8_t* wd;
  const float* sd;
};

struct Tokens {
  const void* x;
  DType dtype;
  int64_t T, H, stride;
};

// plan -> permute + quantize -> gate/up GEMM -> SiLU x up + quantize -> down GEMM (y_dtype) ->
// unpermute into out (out_dtype: y_dtype, or f32 y rounded once to bf16); the shared experts'
// steps beside the routed ones and their output added (rounded once) when sh is given.
void experts_steps(Workspace& w, const Tokens& x, const int32_t* ids, const float* weights, int64_t k, int64_t E,
                   const uint8_t* w13, const float* s13, int64_t I, const uint8_t* w2, const float* s2,
                   const SharedWeights* sh, DType y_dtype, void* out, DType out_dtype, bool nan_free) {
  const int64_t T = x.T, H = x.H, R = T * k;
  const int64_t KBh = ceil_div(H, kQuantGroup), KBi = ceil_div(I, kQuantGroup);
  const int64_t ysize = y_dtype == DType::f32 ? 4 : 2;
  int32_t* offs = sized(w.offs, E);
  int32_t* row_token = sized(w.row_token, R);
  int32_t* token_row = sized(w.token_row, T * k);
  plan(ids, T, k, E, 1, R, sized(w.counts, E), offs, row_token, token_row);
  const int64_t routed = std::min<int64_t>(std::max<int64_t>(offs[E - 1], 0), R);  // rows past it: padding
  uint8_t* a_q = sized(w.a_q, R * H);
  float* a_s = sized(w.a_s, R * KBh);
  permute_fp8(x.x, x.dtype, T, H, x.stride, row_token, R, a_q, a_s, false);

  const uint8_t* xq = a_q;  // one token: every permuted row is its quantized row
  const float* xs = a_s;
  if (sh != nullptr && T > 1) {
    quantize_fp8(x.x, x.dtype, 1, T, H, 0, x.stride, 1, sized(w.xq, T * H), sized(w.xs, T * KBh), false);
    xq = w.xq.data();
    xs = w.xs.data();
  }
  // routed and shared steps alternate (the order of the op-by-op forward); padding rows are
  // zeros, as the grouped GEMM op leaves them
  float* h = sized(w.h, R * 2 * I);
  std::fill(h + routed * 2 * I, h + R * 2 * I, 0.0f);
  fp8_gemm(GemmLayout::contiguous, a_q, a_s, w13, s13, offs, E, R, 2 * I, H, h, DType::f32, nan_free);
  float* gu = sh != nullptr ? sized(w.gu, T * 2 * sh->Is) : nullptr;
  if (sh != nullptr)
    fp8_gemm(GemmLayout::dense, xq, xs, sh->wg, sh->sg, nullptr, 1, T, 2 * sh->Is, H, gu, DType::f32, nan_free);
  uint8_t* a2_q = sized(w.a2_q, R * I);
  float* a2_s = sized(w.a2_s, R * KBi);
  silu_mul_quantize_fp8(h, DType::f32, R, I, 2 * I, a2_q, a2_s, false);
  uint8_t* xq2 = nullptr;
  float* xs2 = nullptr;
  if (sh != nullptr) {
    xq2 = sized(w.xq2, T * sh->Is);
    xs2 = sized(w.xs2, T * ceil_div(sh->Is, kQuantGroup));
    silu_mul_quantize_fp8(gu, DType::f32, T, sh->Is, 2 * sh->Is, xq2, xs2, false);
  }
  uint8_t* y = sized(w.y, R * H * ysize);
  std::fill(y + routed * H * ysize, y + R * H * ysize, uint8_t(0));
  fp8_gemm(GemmLayout::contiguous, a2_q, a2_s, w2, s2, offs, E, R, H, I, y, y_dtype, nan_free);
  uint8_t* shy = sh != nullptr ? sized(w.sh, T * H * ysize) : nullptr;
  if (sh != nullptr)
    fp8_gemm(GemmLayout::dense, xq2, xs2, sh->wd, sh->sd, nullptr, 1, T, H, sh->Is, shy, y_dtype, nan_free);
  const int64_t n = T * H;
  if (out_dtype != y_dtype) {  // f32 y, bf16 out: the sum in f32, rounded once
    float* u = reinterpret_cast<float*>(sized(w.u, n * 4));
    unpermute(y, y_dtype, R, H, token_row, weights, T, k, u);
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(u[i]);
    return;
  }
  unpermute(y, y_dtype, R, H, token_row, weights, T, k, out);
  if (sh == nullptr) return;
  // out + sh, rounded once (as torch adds two bf16 tensors: in fp32, then to bf16)
  if (out_dtype == DType::f32) {
    float* o = static_cast<float*>(out);
    const float* s = reinterpret_cast<const float*>(shy);
    for (int64_t i = 0; i < n; ++i) o[i] += s[i];
  } else {
    uint16_t* o = static_cast<uint16_t*>(out);
    const uint16_t* s = reinterpret_cast<const uint16_t*>(shy);
    for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(bf16_to_f32(o[i]) + bf16_to_f32(s[i]));
  }
}

}  // namespace

void moe_decode(const MoeDecodeArgs& p) {
  LK_CHECK(p.T >= 0 && p.H > 0 && p.E > 0 && p.I > 0 && p.top_k >= 1 && p.top_k <= p.E, "moe_decode: bad sizes");
  LK_CHECK(p.out_dtype == DType::f32 || p.out_dtype == DType::bf16, "moe_decode: out must be f32 or bf16");
  LK_CHECK(p.wg == nullptr || p.Is > 0, "moe_decode: bad shared-expert size");
  const int64_t T = p.T, E = p.E, k = p.top_k;
  if (T == 0) return;
  thread_local Workspace w;
  float* logits = sized(w.logits, T * E);
  gate_logits(p.x, p.x_dtype, T, p.H, p.x_stride, p.gate_w, E, logits);
  float* weights = sized(w.weights, T * k);
  int32_t* ids = sized(w.ids, T * k);
  route(logits, DType::f32, T, E, E, p.bias, p.sigmoid, k, p.n_group, p.topk_group, p.renormalize, p.scale,
        weights, ids);
  const SharedWeights sh{p.wg, p.sg, p.Is, p.wd, p.sd};
  experts_steps(w, {p.x, p.x_dtype, T, p.H, p.x_stride}, ids, weights, k, E, p.w13, p.s13, p.I, p.w2, p.s2,
                p.wg != nullptr ? &sh : nullptr, p.out_dtype, p.out, p.out_dtype, p.nan_free);
}

void moe_experts(const MoeExpertsArgs& p) {
  LK_CHECK(p.T >= 0 && p.H > 0 && p.E > 0 && p.I > 0 && p.top_k >= 1, "moe_experts: bad sizes");
  LK_CHECK(p.out_dtype == DType::f32 || p.out_dtype == DType::bf16, "moe_experts: out must be f32 or bf16");
  LK_CHECK(p.ids_dtype == DType::i32 || p.ids_dtype == DType::i64, "moe_experts: ids must be int32 or int64");
  const int64_t T = p.T, E = p.E, k = p.top_k;
  if (T == 0) return;
  thread_local Workspace w;
  const int32_t* ids = static_cast<const int32_t*>(p.ids);
  if (p.ids_dtype == DType::i64) {  // clamped to [-1, E] first: every id out of range stays out of range
    const int64_t* src = static_cast<const int64_t*>(p.ids);
    int32_t* dst = sized(w.ids, T * k);
    for (int64_t i = 0; i < T * k; ++i) dst[i] = int32_t(std::min<int64_t>(std::max<int64_t>(src[i], -1), E));
    ids = dst;
  }
  experts_steps(w, {p.x, p.x_dtype, T, p.H, p.x_stride}, ids, p.weights, k, E, p.w13, p.s13, p.I, p.w2, p.s2,
                nullptr, DType::f32, p.out, p.out_dtype, p.nan_free);
}

}  // namespace lk::cpu
