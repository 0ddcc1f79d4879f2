// wgmma (sm_90a) wrappers: warpgroup-wide asynchronous matrix multiply-accumulate on the
// tensor cores. A warpgroup is 4 consecutive warps starting at a warp index divisible by 4;
// A and B come from shared memory through 64-bit matrix descriptors, D lives in registers.
// Also setmaxnreg, which moves registers between warpgroups of a running block.
#pragma once
#include <cstdint>

#include "cuda/sm90/mbarrier.cuh"

namespace lk::cuda::sm90 {

// Shared-memory matrix descriptor for a K-major tile stored with the 128-byte swizzle, as TMA
// writes it with CU_TENSOR_MAP_SWIZZLE_128B: rows of 128 bytes (128 fp8 along K), 8-row groups
// of 1024 bytes; the tile must start 1024-byte aligned. Fields: start address >> 4 (bits 0-13),
// leading byte offset >> 4 (16-29; unused for swizzled K-major, set to 1), stride byte offset
// >> 4 (32-45; 1024 B between 8-row groups), base offset (49-51; 0 when 1024-aligned),
// layout (62-63; 1 = 128B swizzle). Step along K inside the 128-byte row by adding bytes >> 4
// to the start address (the hardware applies the swizzle on the full address).
__device__ __forceinline__ uint64_t smem_desc_k128_sw128(const void* tile) {
  uint64_t addr = smem_addr(tile);
  uint64_t desc = 0;
  desc |= (addr & 0x3FFFFull) >> 4;
  desc |= uint64_t(1) << 16;
  desc |= uint64_t(1024 >> 4) << 32;
  desc |= uint64_t(1) << 62;
  return desc;
}

// wgmma.fence: order register accesses to the accumulators before the next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

// wgmma.commit_group: close a group holding the wgmma ops this warpgroup issued so far.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

// wgmma.wait_group N: wait until at most N wgmma groups are pending (their D is then readable
// and their shared-memory operands may be overwritten).
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Compiler-only fence: keeps accumulator reads/writes from moving across wgmma issue/wait.
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// setmaxnreg.dec / .inc: release registers of this warpgroup down to / claim up to N per thread
// (all warps of the warpgroup execute it; needs a register cap at kernel entry).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}

#include "cuda/sm90/wgmma_fp8_ops.inc"

}  // namespace lk::cuda::sm90
