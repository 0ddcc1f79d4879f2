"""Weights in 2 MiB transparent huge pages (Linux), for CPU decode.

A decode step streams every active weight byte from DRAM once, so its speed is the memory
system's. With the default 4 KiB pages every 4 KiB of weights costs a TLB miss, and in a virtual
machine a miss is a two-level page walk: on a 2-core Intel Xeon KVM guest a plain read pass ran
at 22-24 GB/s over 4 KiB pages and 32-34 GB/s over 2 MiB pages, and the FP8 decode GEMMs 11-13%
faster in the bench (up to ~25% in isolated runs; BENCHMARKS.md). ``leankernels.nn`` modules and the transformers integration keep their
FP8 weights this way; ``to_hugepages`` does it for weights a user passes to the raw ops. The CPU
``fp8_k_grouped_gemm`` (wgrad) allocates its outputs of 64 MiB or more this way too, where
first-touching hundreds of MiB in 4 KiB pages cost more than the GEMM.

How: an anonymous private mapping, ``madvise(MADV_HUGEPAGE)`` before its first touch, the tensor
placed at its first 2 MiB boundary (``torch.frombuffer``, which keeps the mapping alive as long
as any tensor uses it). Works wherever transparent huge pages are ``always`` or ``madvise`` (the
usual Linux defaults); elsewhere (``never``, other systems, tensors under 2 MiB, CUDA tensors,
``LEANKERNELS_HUGEPAGES=0``) these functions allocate ordinary memory. The kernel may still
back a region with small pages when it has no free huge page; nothing breaks, only the gain.

Reuse (``empty_hugepages(..., reuse=True)``, what ops use for large outputs they allocate call
after call): the memory comes from a pool in the C++ core (csrc/cpu/host_pool.h) and goes back to
it when the tensor's storage is freed, so the next call of the same size gets pages that are
already mapped instead of first-touching fresh ones (the kernel zeroes each page on its first
write; in a VM the host may fault it in too: ~20-30 ms per 92 MB on a 2-core Zen 4 VM, a fifth of
the wgrad GEMM's time in a MoE training step). Free blocks are kept up to
``LEANKERNELS_CPU_CACHE_MB`` (default 1024; 0 keeps none) and dropped oldest first past it;
``empty_cache()`` drops them all, ``cached_bytes()`` says how much is held.
"""
from __future__ import annotations

import mmap
import os

import torch
import torch.utils.dlpack

from ._lib import _C

HUGE_PAGE = 2 << 20
_THP_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_available: bool | None = None


def hugepages_available() -> bool:
    """Whether huge-page allocation is on here: Linux with transparent huge pages ``always`` or
    ``madvise``, Python's mmap with MADV_HUGEPAGE, and LEANKERNELS_HUGEPAGES not ``0``."""
    global _available
    if _available is None:
        ok = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")
        if ok:
            try:
                with open(_THP_FILE) as f:
                    ok = "[never]" not in f.read()
            except OSError:
                ok = False
        _available = ok
    return _available and os.environ.get("LEANKERNELS_HUGEPAGES", "1") != "0"


def _huge_bytes(nbytes: int) -> torch.Tensor:
    """nbytes of uint8 starting at a 2 MiB boundary of a fresh MADV_HUGEPAGE mapping (untouched)."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(m, dtype=torch.uint8)
    off = -raw.data_ptr() % HUGE_PAGE
    return raw[off: off + nbytes]


_limit_set: str | None = None


def _pool_limit() -> None:
    """Applies LEANKERNELS_CPU_CACHE_MB to the pool (when it changed since the last call)."""
    global _limit_set
    mb = os.environ.get("LEANKERNELS_CPU_CACHE_MB", "1024")
    if mb != _limit_set:
        try:
            nbytes = int(float(mb) * (1 << 20))
        except ValueError:
            raise ValueError(f"LEANKERNELS_CPU_CACHE_MB must be a number of MiB; got {mb!r}") from None
        _C.pool_set_limit(max(nbytes, 0))
        _limit_set = mb


def _pooled_bytes(nbytes: int) -> torch.Tensor:
    """nbytes of uint8 in a pool block (2 MiB aligned; huge pages when available), returned to
    the pool when the storage is freed."""
    _pool_limit()
    return torch.utils.dlpack.from_dlpack(_C.pool_buffer(nbytes, hugepages_available()))


def cached_bytes() -> int:
    """Bytes the CPU buffer pool holds in free blocks (see the module docstring)."""
    return int(_C.pool_cached_bytes())


def empty_cache() -> None:
    """Returns every free block of the CPU buffer pool to the system."""
    _C.pool_empty()


def empty_hugepages(*shape: int, dtype: torch.dtype = torch.uint8, device=None, reuse: bool = False) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, in 2 MiB huge pages when the tensor is
    a CPU tensor of at least 2 MiB and huge pages are available (see the module docstring).
    ``reuse``: from the CPU buffer pool (a CPU tensor of at least 2 MiB, huge pages or not), for
    outputs allocated call after call."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    dev = torch.device("cpu") if device is None else torch.device(device)
    elem = dtype.itemsize
    n = 1
    for d in shape:
        n *= int(d)
    if dev.type == "cpu" and reuse and n * elem >= HUGE_PAGE:
        return _pooled_bytes(n * elem).view(dtype).view(shape)
    if dev.type != "cpu" or n * elem < HUGE_PAGE or not hugepages_available():
        return torch.empty(shape, dtype=dtype, device=dev)
    return _huge_bytes(n * elem).view(dtype).view(shape)


def to_hugepages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in 2 MiB huge pages (same shape, dtype, values; detached), for
    weights that a decode step streams: e.g. ``to_hugepages(w_fp8)`` before ``fp8_gemm``. An
    ordinary contiguous copy where huge pages do not apply (a CUDA tensor, under 2 MiB, no
    transparent huge pages)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor; got {type(t).__name__}")
    out = empty_hugepages(*t.shape, dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out
