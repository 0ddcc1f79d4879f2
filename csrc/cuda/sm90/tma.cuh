// TMA (cp.async.bulk.tensor, sm_90) wrappers: the copy engine moves a box of a tensor between
// global and shared memory as described by a CUtensorMap (built on the host, passed as a
// __grid_constant__ kernel parameter). Loads complete on an mbarrier (transaction bytes);
// stores are tracked per thread in bulk groups. Coordinates are element indices, innermost
// first; out-of-bounds box elements are zero-filled on load and skipped on store.
#pragma once
#include <cuda.h>  // CUtensorMap (type only; libcuda is never linked)

#include <cstdint>

#include "cuda/sm90/mbarrier.cuh"

namespace lk::cuda::sm90 {

// prefetch.tensormap: pull a tensor map (kernel parameter) into the descriptor cache early.
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// cp.async.bulk.tensor.2d load: box at (c0, c1) -> shared dst; completes tx bytes on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// cp.async.bulk.tensor.3d load: box at (c0, c1, c2) -> shared dst; completes tx bytes on bar.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// cp.async.bulk.tensor.2d store: shared src -> box at (c0, c1), clipped to the tensor bounds.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(src)), "r"(c0), "r"(c1)
               : "memory");
}

// cp.async.bulk.tensor.3d store: shared src -> box at (c0, c1, c2), clipped to the bounds.
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// cp.async.bulk.commit_group: close the bulk group holding this thread's stores issued so far.
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// cp.async.bulk.wait_group.read N: wait until at most N groups still READ their shared source
// (the buffer may then be overwritten; the global writes may still be in flight).
template <int N>
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// cp.async.bulk.wait_group N: wait until at most N groups are still incomplete (writes done).
template <int N>
__device__ __forceinline__ void tma_store_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// fence.proxy.async.shared::cta: order this thread's generic-proxy shared-memory writes before
// later async-proxy (TMA, wgmma) accesses; needed before a TMA store reads st.shared data.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

}  // namespace lk::cuda::sm90
