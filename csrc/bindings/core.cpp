// Build facts and device discovery for `leankernels info` and cuda_available().
#include <pybind11/stl.h>

#include <algorithm>
#include <thread>

#include "bindings/bindings.h"
#include "cpu/host_pool.h"
#include "cpu/isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef LEANKERNELS_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace lk::bind {
namespace {

// The DLPack (v0.x, "dltensor" capsule) structs: enough to hand torch.utils.dlpack.from_dlpack a
// CPU byte buffer whose deleter runs when the tensor's storage is freed.
struct DLDevice {
  int32_t device_type;  // 1: kDLCPU
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 1: kDLUInt
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

// A pool block lent to one tensor: returned to the pool by the deleter (any thread, no GIL needed).
struct PoolLoan {
  DLManagedTensor mt;
  int64_t shape[1];
  size_t bytes;
};

void pool_loan_deleter(DLManagedTensor* mt) {
  PoolLoan* loan = static_cast<PoolLoan*>(mt->manager_ctx);
  ::lk::cpu::pool_release(mt->dl_tensor.data, loan->bytes);
  delete loan;
}

// A capsule nobody consumed (from_dlpack renames what it takes) frees its block itself.
void dltensor_capsule_destructor(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;
  auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (mt != nullptr && mt->deleter != nullptr) mt->deleter(mt);
}

}  // namespace

void register_core(py::module_& m) {
  // Host buffer pool (cpu/host_pool.h): a DLPack capsule of an nbytes uint8 CPU tensor over a
  // pool block.
  m.def("pool_buffer", [](int64_t nbytes, bool huge) {
    LK_CHECK(nbytes >= 0, "pool_buffer: negative size");
    void* p = ::lk::cpu::pool_acquire(size_t(nbytes), huge);
    auto* loan = new PoolLoan{};
    loan->bytes = size_t(nbytes);
    loan->shape[0] = nbytes;
    loan->mt.dl_tensor = DLTensor{p, DLDevice{1, 0}, 1, DLDataType{1, 8, 1}, loan->shape, nullptr, 0};
    loan->mt.manager_ctx = loan;
    loan->mt.deleter = pool_loan_deleter;
    PyObject* cap = PyCapsule_New(&loan->mt, "dltensor", dltensor_capsule_destructor);
    if (cap == nullptr) {
      pool_loan_deleter(&loan->mt);
      throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(cap);
  });
  m.def("pool_set_limit", [](int64_t bytes) { ::lk::cpu::pool_set_limit(size_t(std::max<int64_t>(bytes, 0))); });
  m.def("pool_cached_bytes", []() { return int64_t(::lk::cpu::pool_cached_bytes()); });
  m.def("pool_empty", []() { ::lk::cpu::pool_empty(); });
  m.def("build_info", []() {
    py::dict d;
#ifdef LEANKERNELS_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = std::string(LK_CUDA_ARCHS);
    d["nvcc_version"] = std::string(LK_NVCC_VERSION);
    d["cpu_tune"] = std::string(LK_CPU_TUNE);
#ifdef _OPENMP
    d["openmp"] = true;
    d["omp_max_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["omp_max_threads"] = 1;
#endif
    d["hardware_threads"] = int(std::thread::hardware_concurrency());
    return d;
  });
  // Number of CUDA devices our (static) runtime sees; 0 with no driver or no GPU. Never throws.
  m.def("cuda_device_count", []() {
#ifdef LEANKERNELS_WITH_CUDA
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
#else
    return 0;
#endif
  });
  // CPU paths (cpu/isa.h): the active one, the ones this CPU can run (best first), and a switch.
  m.def("cpu_path", []() { return std::string(cpu::isa_name(cpu::isa_active())); });
  m.def("cpu_paths", []() {
    std::vector<std::string> names;
    for (int l = cpu::isa_supported(); l >= 0; --l)
      if (cpu::isa_name(l)) names.push_back(cpu::isa_name(l));
    return names;
  });
  m.def("set_cpu_path", [](const std::string& name) {
    const int level = cpu::isa_from_name(name);
    if (level < 0 || !cpu::set_isa(level)) return false;
    return true;
  });
  m.def("set_num_threads", [](int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
  });
}

}  // namespace lk::bind
