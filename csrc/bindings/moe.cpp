// Bindings for the fused MoE forwards at decode sizes (python: leankernels.nn.MoE's eager CPU
// path, _ops.moe_decode_impl; the transformers integration's experts, _ops.moe_experts_impl). CPU only.
#include "bindings/bindings.h"
#include "cpu/moe.h"

namespace lk::bind {

void register_moe(py::module_& m) {
  m.def(
      "moe_decode",
      [](uintptr_t x, int x_dtype, int64_t T, int64_t H, int64_t x_stride, uintptr_t gate_w, int64_t E,
         int64_t top_k, bool sigmoid, uintptr_t bias, int64_t n_group, int64_t topk_group, bool renormalize,
         float scale, uintptr_t w13, uintptr_t s13, int64_t I, uintptr_t w2, uintptr_t s2, uintptr_t wg,
         uintptr_t sg, int64_t Is, uintptr_t wd, uintptr_t sd, uintptr_t out, int out_dtype, bool nan_free) {
        LK_CHECK(x_dtype >= 0 && x_dtype <= 2, "moe_decode: x must be float32, bfloat16 or float16");
        cpu::moe_decode({ptr<const void>(x), DType(x_dtype), T, H, x_stride, ptr<const float>(gate_w), E, top_k,
                         sigmoid, ptr<const float>(bias), n_group, topk_group, renormalize, scale,
                         ptr<const uint8_t>(w13), ptr<const float>(s13), I, ptr<const uint8_t>(w2),
                         ptr<const float>(s2), ptr<const uint8_t>(wg), ptr<const float>(sg), Is,
                         ptr<const uint8_t>(wd), ptr<const float>(sd), ptr<void>(out), DType(out_dtype), nan_free});
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "moe_experts",
      [](uintptr_t x, int x_dtype, int64_t T, int64_t H, int64_t x_stride, uintptr_t ids, int ids_dtype,
         uintptr_t weights, int64_t top_k, int64_t E, uintptr_t w13, uintptr_t s13, int64_t I, uintptr_t w2,
         uintptr_t s2, uintptr_t out, int out_dtype, bool nan_free) {
        LK_CHECK(x_dtype >= 0 && x_dtype <= 2, "moe_experts: x must be float32, bfloat16 or float16");
        cpu::moe_experts({ptr<const void>(x), DType(x_dtype), T, H, x_stride, ptr<const void>(ids), DType(ids_dtype),
                          ptr<const float>(weights), top_k, E, ptr<const uint8_t>(w13), ptr<const float>(s13), I,
                          ptr<const uint8_t>(w2), ptr<const float>(s2), ptr<void>(out), DType(out_dtype), nan_free});
      },
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace lk::bind
