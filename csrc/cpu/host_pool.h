// Large host buffers kept for reuse (leankernels.memory.empty_hugepages(..., reuse=True)).
//
// An op that returns a large fresh CPU output every call (the wgrad GEMM: 46-1500 MB of fp32 per
// call) pays for first-touching it each time: the kernel zeroes every page on its first write,
// and in a VM the host may fault it in as well (2-core Zen 4 VM: ~20-30 ms per 92 MB, a fifth of
// the wgrad GEMM's time in a MoE training step). The pool hands a block whose previous tensor is
// gone back out for the same size instead, its pages still mapped. Blocks are anonymous private
// mappings (2 MiB aligned, MADV_HUGEPAGE when asked) on Linux, aligned heap memory elsewhere.
// Freed blocks are kept while their total stays within the limit (pool_set_limit); a release past
// it unmaps the oldest free blocks at once. Thread-safe: a block may be released on any thread
// (a tensor's storage freed by an autograd worker).
#pragma once
#include <cstddef>

namespace lk::cpu {

// A block of at least `bytes` (a multiple of 2 MiB), 2 MiB aligned: a free one of that size from
// the pool, else a new mapping. Throws std::bad_alloc when the system has no memory for it.
void* pool_acquire(size_t bytes, bool huge);
// Returns a block from pool_acquire (with the same `bytes`) to the pool.
void pool_release(void* p, size_t bytes);
// Free bytes the pool keeps at most (0: none, every release unmaps).
void pool_set_limit(size_t bytes);
// Bytes held in free blocks now.
size_t pool_cached_bytes();
// Unmaps every free block.
void pool_empty();

}  // namespace lk::cpu
