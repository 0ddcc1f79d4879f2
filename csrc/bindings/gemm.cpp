// Bindings for the FP8 GEMM family (python: leankernels.gemm via _ops.py). One entry point
// serves the three layouts (lk::GemmLayout); the CUDA side picks the kernel for the device.
#include "bindings/bindings.h"
#include "cpu/gemm.h"
#ifdef LEANKERNELS_WITH_CUDA
#include "cuda/gemm.cuh"
#endif

namespace lk::bind {

void register_gemm(py::module_& m) {
  m.def(
      "fp8_gemm",
      [](int layout, uintptr_t a, uintptr_t a_scale, uintptr_t b, uintptr_t b_scale,
         uintptr_t groups, int64_t num_groups, int64_t M, int64_t N, int64_t K, uintptr_t out,
         int out_dtype, int device, uintptr_t stream, bool b_nan_free) {
        LK_CHECK(layout >= 0 && layout <= 2, "fp8_gemm: unknown layout");
        if (device < 0) {  // b_nan_free: see cpu/gemm.h (the CUDA kernels have no use for it)
          cpu::fp8_gemm(GemmLayout(layout), ptr<const uint8_t>(a), ptr<const float>(a_scale), ptr<const uint8_t>(b),
                        ptr<const float>(b_scale), ptr<const int32_t>(groups), num_groups, M, N, K, ptr<void>(out),
                        DType(out_dtype), b_nan_free);
          return;
        }
        LK_ON_DEVICE(fp8_gemm, device, stream, GemmLayout(layout), ptr<const uint8_t>(a),
            ptr<const float>(a_scale), ptr<const uint8_t>(b), ptr<const float>(b_scale),
            ptr<const int32_t>(groups), num_groups, M, N, K, ptr<void>(out), DType(out_dtype));
      },
      py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(),
      py::arg(), py::arg(), py::arg(), py::arg(), py::arg("b_nan_free") = false,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "fp8_nan_free",
      [](uintptr_t b, int64_t n) {
        LK_CHECK(n >= 0, "fp8_nan_free: negative size");
        return cpu::fp8_nan_free(ptr<const uint8_t>(b), n);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "fp8_k_grouped_gemm",
      [](uintptr_t a, uintptr_t a_scale, uintptr_t b, uintptr_t b_scale, uintptr_t offs, int64_t num_experts,
         int64_t M, int64_t N, int64_t L, uintptr_t out, int out_dtype, int device, uintptr_t stream, bool accumulate) {
        if (device < 0) {  // accumulate: the CPU kernels add in their stores (the Python layer adds on a GPU)
          cpu::fp8_k_grouped_gemm(ptr<const uint8_t>(a), ptr<const float>(a_scale), ptr<const uint8_t>(b),
                                  ptr<const float>(b_scale), ptr<const int32_t>(offs), num_experts, M, N, L,
                                  ptr<void>(out), DType(out_dtype), accumulate);
          return;
        }
        LK_CHECK(!accumulate, "fp8_k_grouped_gemm: accumulate is CPU-only here");
        LK_ON_DEVICE(fp8_k_grouped_gemm, device, stream, ptr<const uint8_t>(a), ptr<const float>(a_scale),
            ptr<const uint8_t>(b), ptr<const float>(b_scale), ptr<const int32_t>(offs), num_experts, M, N, L,
            ptr<void>(out), DType(out_dtype));
      },
      py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(), py::arg(),
      py::arg(), py::arg(), py::arg(), py::arg("accumulate") = false, py::call_guard<py::gil_scoped_release>());
}

}  // namespace lk::bind
