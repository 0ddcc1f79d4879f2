// Launch helpers shared by the CUDA kernels: error checks and the device guard.
//
// NOTES: our cudart is static, so its notion of "current device" is separate from PyTorch's.
// Every launcher therefore sets the device of its tensors before launching on the stream
// PyTorch handed us (streams and pointers are driver objects, shared across runtimes).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace lk::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("leankernels: CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
}

struct DeviceGuard {
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    restore_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(prev_);
  }
  int prev_ = 0;
  bool restore_ = false;
};

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline int num_sms(int device) {
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "SM count");
  return n;
}

#define LK_CUDA_LAUNCH_CHECK(what) ::lk::cuda::check(cudaGetLastError(), what)

}  // namespace lk::cuda
