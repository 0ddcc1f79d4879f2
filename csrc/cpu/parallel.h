// parallel_for / parallel_ranges: OpenMP only when the work is worth a parallel region.
#pragma once
#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#else  // a build without OpenMP: one thread
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
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

// body(begin, end) over [0, n) in one contiguous range per thread (parallel), or in one range on
// the calling thread: each range sets up its scratch once.
template <class Body>
inline void parallel_ranges(int64_t n, bool parallel, const Body& body) {
  const int64_t chunks = std::min(n, parallel_chunks(parallel));
  parallel_for(chunks, chunks > 1, [&](int64_t c) { body(c * n / chunks, (c + 1) * n / chunks); });
}

}  // namespace lk::cpu
