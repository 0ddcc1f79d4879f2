// parallel_for: OpenMP only when the work is worth a parallel region.
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lk::cpu {

// NOTES: `#pragma omp parallel if (false)` still enters libgomp (~0.3 us per region measured on
// Zen 4), which a decode-size routing call paid up to three times; below the threshold the body
// runs as a plain loop on the calling thread.
template <class Body>
inline void parallel_for(int64_t n, bool parallel, const Body& body) {
#ifdef _OPENMP
  if (parallel && n > 1) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) body(i);
}

// How many chunks parallel_for should split work into: the thread count, or 1 below the threshold.
inline int64_t parallel_chunks(bool parallel) {
#ifdef _OPENMP
  return parallel ? omp_get_max_threads() : 1;
#else
  (void)parallel;
  return 1;
#endif
}

}  // namespace lk::cpu
