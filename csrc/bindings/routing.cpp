// Bindings for expert gating and token routing (python: leankernels.routing via _ops.py).
#include "bindings/bindings.h"
#include "cpu/routing.h"
#ifdef LEANKERNELS_WITH_CUDA
#include "cuda/routing.cuh"
#endif

namespace lk::bind {

void register_routing(py::module_& m) {
  m.def(
      "route",
      [](uintptr_t logits, int dtype, int64_t T, int64_t E, int64_t row_stride, uintptr_t bias,
         bool sigmoid, int64_t top_k, int64_t n_group, int64_t topk_group, bool renormalize,
         float scale, uintptr_t weights, uintptr_t ids, int device, uintptr_t stream) {
        // dtype checks here, before any kernel: the CPU kernels widen rows inside OpenMP
        // regions, where an exception would terminate the process.
        LK_CHECK(dtype >= 0 && dtype <= 2, "route: logits must be float32, bfloat16 or float16");
        LK_ON_DEVICE(route, device, stream, ptr<const void>(logits), DType(dtype), T, E, row_stride,
            ptr<const float>(bias), sigmoid, top_k, n_group, topk_group, renormalize, scale,
            ptr<float>(weights), ptr<int32_t>(ids));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "gate_logits",
      [](uintptr_t x, int dtype, int64_t T, int64_t H, int64_t row_stride, uintptr_t w, int64_t E, uintptr_t out) {
        LK_CHECK(dtype >= 0 && dtype <= 2, "gate_logits: x must be float32, bfloat16 or float16");
        LK_CHECK(T >= 0 && H >= 0 && E >= 0 && row_stride >= 0, "gate_logits: bad sizes");
        cpu::gate_logits(ptr<const void>(x), DType(dtype), T, H, row_stride, ptr<const float>(w), E, ptr<float>(out));
      },
      py::call_guard<py::gil_scoped_release>());
  // Size in int32 elements of the CUDA plan's workspace (0 on the CPU).
  m.def("plan_workspace_size", [](int64_t T, int64_t top_k, int64_t E) -> int64_t {
#ifdef LEANKERNELS_WITH_CUDA
    return cuda::plan_workspace_size(T, top_k, E);
#else
    return 0;
#endif
  });
  m.def(
      "plan",
      [](uintptr_t ids, int64_t T, int64_t top_k, int64_t E, int64_t align, int64_t R,
         uintptr_t counts, uintptr_t offs, uintptr_t row_token, uintptr_t token_row,
         uintptr_t workspace, int64_t workspace_size, int device, uintptr_t stream) {
        if (device < 0) {
          cpu::plan(ptr<const int32_t>(ids), T, top_k, E, align, R, ptr<int32_t>(counts),
                    ptr<int32_t>(offs), ptr<int32_t>(row_token), ptr<int32_t>(token_row));
          return;
        }
#ifdef LEANKERNELS_WITH_CUDA
        cuda::plan(ptr<const int32_t>(ids), T, top_k, E, align, R, ptr<int32_t>(counts),
                   ptr<int32_t>(offs), ptr<int32_t>(row_token), ptr<int32_t>(token_row),
                   ptr<int32_t>(workspace), workspace_size, device, stream_ptr(stream));
#else
        no_cuda("plan");
#endif
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "permute",
      [](uintptr_t x, int64_t elem_size, int64_t T, int64_t H, int64_t row_stride,
         uintptr_t row_token, int64_t R, uintptr_t out, int device, uintptr_t stream) {
        LK_CHECK(elem_size > 0 && T >= 0 && H >= 0 && R >= 0, "permute: bad sizes");
        LK_ON_DEVICE(permute, device, stream, ptr<const void>(x), elem_size, T, H, row_stride,
            ptr<const int32_t>(row_token), R, ptr<void>(out));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "permute_fp8",
      [](uintptr_t x, int dtype, int64_t T, int64_t H, int64_t row_stride, uintptr_t row_token,
         int64_t R, uintptr_t q, uintptr_t scale, bool ue8m0, int device, uintptr_t stream) {
        LK_CHECK(dtype >= 0 && dtype <= 2, "permute_fp8: x must be float32, bfloat16 or float16");
        LK_ON_DEVICE(permute_fp8, device, stream, ptr<const void>(x), DType(dtype), T, H,
            row_stride, ptr<const int32_t>(row_token), R, ptr<uint8_t>(q), ptr<float>(scale),
            ue8m0);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "unpermute",
      [](uintptr_t y, int dtype, int64_t R, int64_t H, uintptr_t token_row, uintptr_t weights,
         int64_t T, int64_t top_k, uintptr_t out, int device, uintptr_t stream) {
        LK_CHECK(dtype >= 0 && dtype <= 2, "unpermute: y must be float32, bfloat16 or float16");
        LK_ON_DEVICE(unpermute, device, stream, ptr<const void>(y), DType(dtype), R, H,
            ptr<const int32_t>(token_row), ptr<const float>(weights), T, top_k, ptr<void>(out));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "unpermute_backward",
      [](uintptr_t grad, uintptr_t y, int dtype, int64_t R, int64_t H, uintptr_t token_row, uintptr_t weights,
         int64_t T, int64_t top_k, uintptr_t dy, uintptr_t dw) {
        LK_CHECK(dtype == 0 || dtype == 1, "unpermute_backward: y must be float32 or bfloat16");
        ::lk::cpu::unpermute_backward(ptr<const void>(grad), ptr<const void>(y), DType(dtype), R, H,
                                      ptr<const int32_t>(token_row), ptr<const float>(weights), T, top_k,
                                      ptr<void>(dy), ptr<float>(dw));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "update_bias",
      [](uintptr_t bias, uintptr_t counts, int counts_dtype, int64_t E, float rate, uintptr_t out,
         int device, uintptr_t stream) {
        LK_ON_DEVICE(update_bias, device, stream, ptr<const float>(bias), ptr<const void>(counts),
            DType(counts_dtype), E, rate, ptr<float>(out));
      },
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace lk::bind
