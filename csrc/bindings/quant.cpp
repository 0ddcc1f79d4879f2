// Bindings for FP8 quantization (python: leankernels.quant via _ops.py).
#include "bindings/bindings.h"
#include "cpu/quant.h"
#ifdef LEANKERNELS_WITH_CUDA
#include "cuda/quant.cuh"
#endif

namespace lk::bind {

void register_quant(py::module_& m) {
  m.def(
      "quantize_fp8",
      [](uintptr_t x, int dtype, int64_t batch, int64_t rows, int64_t K, int64_t batch_stride,
         int64_t row_stride, int64_t block_rows, uintptr_t q, uintptr_t scale, bool ue8m0,
         int device, uintptr_t stream) {
        LK_CHECK(dtype >= 0 && dtype <= 2, "quantize_fp8: x must be float32, bfloat16 or float16");
        LK_ON_DEVICE(quantize_fp8, device, stream, ptr<const void>(x), DType(dtype), batch, rows, K,
            batch_stride, row_stride, block_rows, ptr<uint8_t>(q), ptr<float>(scale), ue8m0);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "silu_mul_quantize_fp8",
      [](uintptr_t h, int dtype, int64_t rows, int64_t I, int64_t row_stride, uintptr_t q, uintptr_t scale,
         bool ue8m0) {
        LK_CHECK(dtype >= 0 && dtype <= 2, "silu_mul_quantize_fp8: h must be float32, bfloat16 or float16");
        ::lk::cpu::silu_mul_quantize_fp8(ptr<const void>(h), DType(dtype), rows, I, row_stride, ptr<uint8_t>(q),
                                         ptr<float>(scale), ue8m0);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "silu_mul",
      [](uintptr_t h, int dtype, int64_t rows, int64_t I, int64_t row_stride, uintptr_t out) {
        LK_CHECK(dtype == 0 || dtype == 1, "silu_mul: h must be float32 or bfloat16");
        ::lk::cpu::silu_mul(ptr<const void>(h), DType(dtype), rows, I, row_stride, ptr<void>(out));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "silu_mul_backward",
      [](uintptr_t h, uintptr_t grad, int dtype, int64_t rows, int64_t I, int64_t h_stride, int64_t grad_stride,
         uintptr_t dh) {
        LK_CHECK(dtype == 0 || dtype == 1, "silu_mul_backward: h must be float32 or bfloat16");
        ::lk::cpu::silu_mul_backward(ptr<const void>(h), ptr<const void>(grad), DType(dtype), rows, I, h_stride,
                                     grad_stride, ptr<void>(dh));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_fp8",
      [](uintptr_t q, uintptr_t scale, int64_t batch, int64_t rows, int64_t K, int64_t block_rows,
         uintptr_t out, int device, uintptr_t stream) {
        LK_ON_DEVICE(dequantize_fp8, device, stream, ptr<const uint8_t>(q), ptr<const float>(scale),
            batch, rows, K, block_rows, ptr<float>(out));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "quantize_fp8_transposed",
      [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t row_stride, uintptr_t offs, int64_t num_experts,
         uintptr_t q, uintptr_t scale, bool ue8m0, int device, uintptr_t stream) {
        LK_CHECK(dtype >= 0 && dtype <= 2, "quantize_fp8_transposed: x must be float32, bfloat16 or float16");
        LK_ON_DEVICE(quantize_fp8_transposed, device, stream, ptr<const void>(x), DType(dtype), M, K, row_stride,
            ptr<const int32_t>(offs), num_experts, ptr<uint8_t>(q), ptr<float>(scale), ue8m0);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "transpose_bytes",
      [](uintptr_t src, uintptr_t dst, int64_t batch, int64_t rows, int64_t cols) {
        ::lk::cpu::transpose_bytes(ptr<const uint8_t>(src), ptr<uint8_t>(dst), batch, rows, cols);
      },
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace lk::bind
