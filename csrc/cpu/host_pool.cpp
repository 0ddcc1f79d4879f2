// See host_pool.h.
#include "cpu/host_pool.h"

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lk::cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

struct Block {
  void* p;       // what pool_acquire returned (2 MiB aligned)
  size_t bytes;  // its size (a multiple of 2 MiB)
};

// One pool per process, never destroyed: a tensor may release its block during static
// destruction at exit (torch's globals), after a function-local or global of ours would be gone.
struct Pool {
  std::mutex mu;
  std::vector<Block> free_blocks;  // oldest first
  size_t free_bytes = 0;
  size_t limit = size_t(1) << 30;
};
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

size_t round_up(size_t n) { return (n + kHuge - 1) / kHuge * kHuge; }

void* map_block(size_t bytes, bool huge) {
#if defined(__linux__)
  // One spare 2 MiB to align the start; the unaligned head and tail are unmapped again.
  void* raw = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw), aligned = (start + kHuge - 1) / kHuge * kHuge;
  if (aligned > start) munmap(raw, aligned - start);
  if (aligned + bytes < start + bytes + kHuge) munmap(reinterpret_cast<void*>(aligned + bytes), start + kHuge - aligned);
  void* p = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
#else
  (void)huge;
  void* p = ::operator new(bytes, std::align_val_t(kHuge));
  return p;
#endif
}

void unmap_block(const Block& b) {
#if defined(__linux__)
  munmap(b.p, b.bytes);
#else
  ::operator delete(b.p, std::align_val_t(kHuge));
#endif
}

// Drops the oldest free blocks until free_bytes <= limit; the caller holds mu and unmaps them.
std::vector<Block> trim_locked(Pool& p) {
  std::vector<Block> out;
  size_t i = 0;
  while (p.free_bytes > p.limit && i < p.free_blocks.size()) {
    p.free_bytes -= p.free_blocks[i].bytes;
    out.push_back(p.free_blocks[i++]);
  }
  p.free_blocks.erase(p.free_blocks.begin(), p.free_blocks.begin() + std::ptrdiff_t(i));
  return out;
}

}  // namespace

void* pool_acquire(size_t bytes, bool huge) {
  bytes = round_up(bytes == 0 ? 1 : bytes);
  {
    Pool& pl = pool();
    std::lock_guard<std::mutex> lock(pl.mu);
    for (size_t i = pl.free_blocks.size(); i-- > 0;)  // the most recently freed first
      if (pl.free_blocks[i].bytes == bytes) {
        void* p = pl.free_blocks[i].p;
        pl.free_blocks.erase(pl.free_blocks.begin() + std::ptrdiff_t(i));
        pl.free_bytes -= bytes;
        return p;
      }
  }
  return map_block(bytes, huge);
}

void pool_release(void* p, size_t bytes) {
  bytes = round_up(bytes == 0 ? 1 : bytes);
  std::vector<Block> drop;
  {
    Pool& pl = pool();
    std::lock_guard<std::mutex> lock(pl.mu);
    pl.free_blocks.push_back({p, bytes});
    pl.free_bytes += bytes;
    drop = trim_locked(pl);
  }
  for (const Block& b : drop) unmap_block(b);
}

void pool_set_limit(size_t bytes) {
  std::vector<Block> drop;
  {
    Pool& pl = pool();
    std::lock_guard<std::mutex> lock(pl.mu);
    pl.limit = bytes;
    drop = trim_locked(pl);
  }
  for (const Block& b : drop) unmap_block(b);
}

size_t pool_cached_bytes() {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.mu);
  return pl.free_bytes;
}

void pool_empty() {
  std::vector<Block> drop;
  {
    Pool& pl = pool();
    std::lock_guard<std::mutex> lock(pl.mu);
    drop.swap(pl.free_blocks);
    pl.free_bytes = 0;
  }
  for (const Block& b : drop) unmap_block(b);
}

}  // namespace lk::cpu
