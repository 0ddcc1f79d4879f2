// Bindings for MLA over the paged latent cache (python: leankernels.mla via _ops.py).
#include "bindings/bindings.h"
#include "cpu/mla.h"
#ifdef LEANKERNELS_WITH_CUDA
#include "cuda/mla.cuh"
#endif

namespace lk::bind {

void register_mla(py::module_& m) {
  m.def(
      "mla_append",
      [](uintptr_t kv_c, int kv_dtype, int64_t kv_stride, uintptr_t k_pe, int pe_dtype,
         int64_t pe_stride, uintptr_t slot_mapping, int64_t T, uintptr_t norm_weight, float eps,
         uintptr_t cos, uintptr_t sin, uintptr_t positions, int64_t num_positions, uintptr_t cache,
         bool fp8, int64_t num_blocks, int64_t block_size, int64_t block_stride, bool debug,
         uintptr_t error_flag, int device, uintptr_t stream) {
        LK_CHECK(kv_dtype >= 0 && kv_dtype <= 2, "mla_append: kv_c must be float32, bfloat16 or float16");
        LK_CHECK(pe_dtype >= 0 && pe_dtype <= 2, "mla_append: k_pe must be float32, bfloat16 or float16");
        LK_CHECK(T >= 0 && num_blocks >= 0 && block_size >= 0, "mla_append: negative size");
        MlaCache c{ptr<void>(cache), fp8, num_blocks, block_size, block_stride};
        if (device < 0) {
          cpu::mla_append(ptr<const void>(kv_c), DType(kv_dtype), kv_stride, ptr<const void>(k_pe),
                          DType(pe_dtype), pe_stride, ptr<const int64_t>(slot_mapping), T,
                          ptr<const float>(norm_weight), eps, ptr<const float>(cos), ptr<const float>(sin),
                          ptr<const int64_t>(positions), num_positions, c, debug);
          return;
        }
#ifdef LEANKERNELS_WITH_CUDA
        cuda::mla_append(ptr<const void>(kv_c), DType(kv_dtype), kv_stride, ptr<const void>(k_pe),
                         DType(pe_dtype), pe_stride, ptr<const int64_t>(slot_mapping), T,
                         ptr<const float>(norm_weight), eps, ptr<const float>(cos), ptr<const float>(sin),
                         ptr<const int64_t>(positions), num_positions, c, ptr<int32_t>(error_flag),
                         device, stream_ptr(stream));
#else
        no_cuda("mla_append");
#endif
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "mla_decode",
      [](uintptr_t q, int64_t B, int64_t s_q, int64_t H, uintptr_t cache, bool fp8, int64_t num_blocks,
         int64_t block_size, int64_t block_stride, uintptr_t block_table, int64_t max_blocks,
         int64_t bt_stride, uintptr_t seqlens, float softmax_scale, bool causal, int64_t num_splits,
         uintptr_t o_part, uintptr_t lse_part, uintptr_t out, uintptr_t lse, uintptr_t error_flag,
         int device, uintptr_t stream) {
        LK_CHECK(B >= 0 && s_q >= 0 && H >= 0 && max_blocks >= 0 && num_blocks >= 0, "mla_decode: negative size");
        LK_CHECK(block_size >= 1, "mla_decode: cache block_size must be >= 1");
        MlaCache c{ptr<void>(cache), fp8, num_blocks, block_size, block_stride};
        if (device < 0) {
          cpu::mla_decode(ptr<const uint16_t>(q), B, s_q, H, c, ptr<const int32_t>(block_table), max_blocks,
                          bt_stride, ptr<const int32_t>(seqlens), softmax_scale, causal, num_splits,
                          ptr<float>(o_part), ptr<float>(lse_part), ptr<uint16_t>(out), ptr<float>(lse));
          return;
        }
#ifdef LEANKERNELS_WITH_CUDA
        cuda::mla_decode(ptr<const uint16_t>(q), B, s_q, H, c, ptr<const int32_t>(block_table), max_blocks,
                         bt_stride, ptr<const int32_t>(seqlens), softmax_scale, causal, num_splits,
                         ptr<float>(o_part), ptr<float>(lse_part), ptr<uint16_t>(out), ptr<float>(lse),
                         ptr<int32_t>(error_flag), device, stream_ptr(stream));
#else
        no_cuda("mla_decode");
#endif
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "mla_schedule",
      [](uintptr_t seqlens, int64_t B, int64_t num_parts, uintptr_t metadata, uintptr_t num_splits,
         int device, uintptr_t stream) {
        LK_ON_DEVICE(mla_schedule, device, stream, ptr<const int32_t>(seqlens), B, num_parts,
            ptr<int32_t>(metadata), ptr<int32_t>(num_splits));
      },
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace lk::bind
