// Build facts and device discovery for `leankernels info` and cuda_available().
#include <pybind11/stl.h>

#include <thread>

#include "bindings/bindings.h"
#include "cpu/isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef LEANKERNELS_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace lk::bind {

void register_core(py::module_& m) {
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
