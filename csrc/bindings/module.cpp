// The one Python extension module, leankernels._C. Each domain registers its functions here;
// this file is the whole Python-facing surface of the C++ core, readable in one place.
#include "bindings/bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "leankernels C++/CUDA kernels (framework-free; called by leankernels._ops)";
  lk::bind::register_core(m);
  lk::bind::register_quant(m);
  lk::bind::register_gemm_sched(m);
  lk::bind::register_routing(m);
  lk::bind::register_mla(m);
  lk::bind::register_gemm(m);
  lk::bind::register_moe(m);
}
