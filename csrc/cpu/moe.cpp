// One MoE layer forward at decode sizes (see moe.h). Why one call: at batch 1 the layer is ten
// small steps around four weight streams, and from Python each step costs an interpreter
// round trip, argument checks and a torch allocation; with the caches cold (a decode step's
// weights have just streamed through them) each such step cost ~30-250 us on a 2-core Xeon VM.
#include "cpu/moe.h"

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
  std::vector<uint8_t> a_q, a2_q, xq, xq2, y, sh;
};

template <class V>
typename V::value_type* sized(V& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

}  // namespace

void moe_decode(const MoeDecodeArgs& p) {
  LK_CHECK(p.T >= 0 && p.H > 0 && p.E > 0 && p.I > 0 && p.top_k >= 1 && p.top_k <= p.E, "moe_decode: bad sizes");
  LK_CHECK(p.out_dtype == DType::f32 || p.out_dtype == DType::bf16, "moe_decode: out must be f32 or bf16");
  LK_CHECK(p.wg == nullptr || p.Is > 0, "moe_decode: bad shared-expert size");
  const int64_t T = p.T, H = p.H, E = p.E, k = p.top_k, I = p.I, R = T * k;
  if (T == 0) return;
  thread_local Workspace w;
  const int64_t KBh = ceil_div(H, kQuantGroup), KBi = ceil_div(I, kQuantGroup);
  const int64_t osize = p.out_dtype == DType::f32 ? 4 : 2;

  float* logits = sized(w.logits, T * E);
  gate_logits(p.x, p.x_dtype, T, H, p.x_stride, p.gate_w, E, logits);
  float* weights = sized(w.weights, T * k);
  int32_t* ids = sized(w.ids, T * k);
  route(logits, DType::f32, T, E, E, p.bias, p.sigmoid, k, p.n_group, p.topk_group, p.renormalize, p.scale,
        weights, ids);
  int32_t* offs = sized(w.offs, E);
  int32_t* row_token = sized(w.row_token, R);
  int32_t* token_row = sized(w.token_row, T * k);
  plan(ids, T, k, E, 1, R, sized(w.counts, E), offs, row_token, token_row);
  uint8_t* a_q = sized(w.a_q, R * H);
  float* a_s = sized(w.a_s, R * KBh);
  permute_fp8(p.x, p.x_dtype, T, H, p.x_stride, row_token, R, a_q, a_s, false);

  const bool shared = p.wg != nullptr;
  const uint8_t* xq = a_q;  // one token: every permuted row is its quantized row
  const float* xs = a_s;
  if (shared && T > 1) {
    xq = sized(w.xq, T * H);
    xs = sized(w.xs, T * KBh);
    quantize_fp8(p.x, p.x_dtype, 1, T, H, 0, p.x_stride, 1, w.xq.data(), w.xs.data(), false);
  }
  // routed and shared steps alternate (the order of the op-by-op forward)
  float* h = sized(w.h, R * 2 * I);
  fp8_gemm(GemmLayout::contiguous, a_q, a_s, p.w13, p.s13, offs, E, R, 2 * I, H, h, DType::f32);
  float* gu = shared ? sized(w.gu, T * 2 * p.Is) : nullptr;
  if (shared) fp8_gemm(GemmLayout::dense, xq, xs, p.wg, p.sg, nullptr, 1, T, 2 * p.Is, H, gu, DType::f32);
  uint8_t* a2_q = sized(w.a2_q, R * I);
  float* a2_s = sized(w.a2_s, R * KBi);
  silu_mul_quantize_fp8(h, DType::f32, R, I, 2 * I, a2_q, a2_s, false);
  uint8_t* xq2 = nullptr;
  float* xs2 = nullptr;
  if (shared) {
    xq2 = sized(w.xq2, T * p.Is);
    xs2 = sized(w.xs2, T * ceil_div(p.Is, kQuantGroup));
    silu_mul_quantize_fp8(gu, DType::f32, T, p.Is, 2 * p.Is, xq2, xs2, false);
  }
  uint8_t* y = sized(w.y, R * H * osize);
  fp8_gemm(GemmLayout::contiguous, a2_q, a2_s, p.w2, p.s2, offs, E, R, H, I, y, p.out_dtype);
  uint8_t* sh = shared ? sized(w.sh, T * H * osize) : nullptr;
  if (shared) fp8_gemm(GemmLayout::dense, xq2, xs2, p.wd, p.sd, nullptr, 1, T, H, p.Is, sh, p.out_dtype);
  unpermute(y, p.out_dtype, R, H, token_row, weights, T, k, p.out);
  if (!shared) return;
  // out + sh, rounded once (as torch adds two bf16 tensors: in fp32, then to bf16)
  const int64_t n = T * H;
  if (p.out_dtype == DType::f32) {
    float* o = static_cast<float*>(p.out);
    const float* s = reinterpret_cast<const float*>(sh);
    for (int64_t i = 0; i < n; ++i) o[i] += s[i];
  } else {
    uint16_t* o = static_cast<uint16_t*>(p.out);
    const uint16_t* s = reinterpret_cast<const uint16_t*>(sh);
    for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(bf16_to_f32(o[i]) + bf16_to_f32(s[i]));
  }
}

}  // namespace lk::cpu
