// Shared helpers for the pybind11 bindings: raw pointers cross as integers (data_ptr()),
// streams as integers (torch.cuda.current_stream().cuda_stream), device -1 means CPU.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "common/common.h"

namespace py = pybind11;

namespace lk::bind {

template <typename T>
inline T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
inline void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

[[noreturn]] inline void no_cuda(const char* op) {
  throw std::runtime_error(std::string("leankernels: ") + op +
                           " was called on a CUDA tensor but this build has no CUDA kernels "
                           "(rebuild with nvcc on PATH)");
}

// Runs cpu::op(args...) for CPU tensors (device < 0), else cuda::op(args..., device, stream);
// a build without CUDA raises a clear error for CUDA tensors instead.
#ifdef LEANKERNELS_WITH_CUDA
#define LK_ON_DEVICE(op, device, stream, ...)       \
  ((device) < 0 ? ::lk::cpu::op(__VA_ARGS__)        \
                : ::lk::cuda::op(__VA_ARGS__, (device), ::lk::bind::stream_ptr(stream)))
#else
#define LK_ON_DEVICE(op, device, stream, ...) \
  ((device) < 0 ? ::lk::cpu::op(__VA_ARGS__) : ::lk::bind::no_cuda(#op))
#endif

// One register_<domain>() per domain; module.cpp calls them all.
void register_core(py::module_& m);
void register_quant(py::module_& m);
void register_gemm_sched(py::module_& m);
void register_routing(py::module_& m);
void register_mla(py::module_& m);
void register_gemm(py::module_& m);
void register_moe(py::module_& m);

}  // namespace lk::bind
