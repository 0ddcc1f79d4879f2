"""leankernels.memory: weights in 2 MiB transparent huge pages (values, alignment, the kernel's
THP eligibility of the mapping, release on free, the fallback) and the nn modules using it."""
from __future__ import annotations

import gc
import io

import pytest
import torch

import leankernels as lk
from leankernels import memory
from conftest import randn

HUGE = memory.HUGE_PAGE
needs_thp = pytest.mark.skipif(not memory.hugepages_available(), reason="no transparent huge pages here")


def _vma(addr: int) -> dict | None:
    """The /proc/self/smaps entry (fields as text) of the mapping holding addr, or None."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    cur = None
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            cur = {"range": (lo, hi)} if lo <= addr < hi else None
        elif cur is not None and ":" in line:
            k, v = line.split(":", 1)
            cur[k.strip()] = v.strip()
            if k.strip() == "VmFlags":
                return cur
    return cur


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.int8, torch.float32])
def test_to_hugepages_same_values(dtype):
    t = randn(1024, 2560, seed=1).to(dtype)   # 2.5-10 MiB
    h = lk.to_hugepages(t)
    assert h.shape == t.shape and h.dtype == dtype and h.is_contiguous() and h.data_ptr() != t.data_ptr()
    assert torch.equal(h.view(torch.uint8), t.view(torch.uint8))
    tt = lk.to_hugepages(t.t())                # a transposed (non-contiguous) view: a contiguous copy
    assert tt.is_contiguous() and torch.equal(tt.view(torch.uint8), t.t().contiguous().view(torch.uint8))


@needs_thp
def test_hugepage_tensor_is_aligned_eligible_and_freed():
    t = randn(2048, 2048, seed=2).to(torch.float8_e4m3fn)   # 4 MiB
    h = lk.to_hugepages(t)
    addr = h.data_ptr()
    assert addr % HUGE == 0
    vma = _vma(addr)
    if vma is None:
        pytest.skip("no /proc/self/smaps")
    assert vma.get("THPeligible") == "1", vma          # madvise(MADV_HUGEPAGE) reached the kernel
    assert torch.equal(h.view(torch.uint8), t.view(torch.uint8))
    # the mapping lives as long as a tensor (or a view of one) uses it, and is unmapped after
    v = h[1000:1001]
    del h
    gc.collect()
    assert _vma(addr) is not None and v.view(torch.uint8).equal(t[1000:1001].view(torch.uint8))
    del v
    gc.collect()
    assert _vma(addr) is None


def test_fallbacks_small_meta_disabled(monkeypatch):
    small = randn(100, 100, seed=3).bfloat16()            # under 2 MiB: ordinary memory
    assert torch.equal(lk.to_hugepages(small), small)
    monkeypatch.setenv("LEANKERNELS_HUGEPAGES", "0")
    assert not memory.hugepages_available()
    big = randn(1024, 2048, seed=4).bfloat16()
    assert torch.equal(lk.to_hugepages(big), big)
    e = memory.empty_hugepages(4, 5, dtype=torch.float32, device="meta")
    assert e.is_meta and e.shape == (4, 5)
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        lk.to_hugepages([1, 2, 3])


@needs_thp
def test_nn_fp8_weights_in_hugepages_state_dict_round_trip():
    from leankernels.nn import Fp8Linear

    lin = Fp8Linear(2048, 2048)   # 4 MiB of FP8 weight
    assert lin.weight.data_ptr() % HUGE == 0
    w = randn(2048, 2048, seed=5).bfloat16()
    q, s = lk.quantize_fp8(w, (128, 128))
    lin.load_state_dict({"weight": q, "weight_scale_inv": s}, strict=False)
    assert lin.weight.data_ptr() % HUGE == 0 and torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8))
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert torch.equal(sd["weight"].view(torch.uint8), q.view(torch.uint8))
    x = randn(3, 2048, seed=6).bfloat16()
    with torch.inference_mode():   # the forward reads the huge-page weight: the product of x and q
        got = lin(x).float()
    a, sa = lk.quantize_fp8(x)
    want = lk.reference.fp8_gemm(a, sa, q, s, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())   # bf16 out


# ------------------------------------------------------------------------ the CPU buffer pool
MIB = 1 << 20


@pytest.fixture
def pool(monkeypatch):
    """An empty pool with the default limit; emptied again afterwards."""
    monkeypatch.delenv("LEANKERNELS_CPU_CACHE_MB", raising=False)
    memory.empty_cache()
    yield
    monkeypatch.delenv("LEANKERNELS_CPU_CACHE_MB", raising=False)
    memory._pool_limit()
    memory.empty_cache()


def test_pool_reuses_a_freed_block_of_the_same_size(pool):
    a = memory.empty_hugepages(3, MIB, dtype=torch.float32, reuse=True)  # 12 MiB
    assert a.shape == (3, MIB) and a.dtype == torch.float32 and a.is_contiguous()
    assert a.data_ptr() % memory.HUGE_PAGE == 0
    a.fill_(2.5)
    assert float(a.sum()) == 2.5 * 3 * MIB
    ptr = a.data_ptr()
    assert memory.cached_bytes() == 0
    del a
    assert memory.cached_bytes() == 12 * MIB
    b = memory.empty_hugepages(3 * MIB, dtype=torch.float32, reuse=True)  # same bytes, another shape
    assert b.data_ptr() == ptr and memory.cached_bytes() == 0
    c = memory.empty_hugepages(5 * MIB, dtype=torch.uint8, reuse=True)  # another size: a new block
    assert c.data_ptr() != ptr
    del b, c
    assert memory.cached_bytes() == 12 * MIB + 6 * MIB  # (5 MiB rounds up to 6)
    memory.empty_cache()
    assert memory.cached_bytes() == 0


def test_pool_never_lends_a_live_block(pool):
    """A block goes back only when no tensor uses its storage: a view keeps it lent, and so does a
    tensor held by autograd; a storage freed on another thread returns it."""
    a = memory.empty_hugepages(4 * MIB, reuse=True)
    view = a[MIB:]
    ptr = a.data_ptr()
    del a
    assert memory.cached_bytes() == 0
    b = memory.empty_hugepages(4 * MIB, reuse=True)
    assert b.data_ptr() != ptr
    del view
    assert memory.cached_bytes() == 4 * MIB
    import threading
    t = threading.Thread(target=lambda box: box.clear(), args=([b],))
    del b  # the thread's list now holds the only reference
    assert memory.cached_bytes() == 4 * MIB
    t.start()
    t.join()
    gc.collect()
    assert memory.cached_bytes() == 8 * MIB


def test_pool_limit(pool, monkeypatch):
    monkeypatch.setenv("LEANKERNELS_CPU_CACHE_MB", "5")
    a = memory.empty_hugepages(4 * MIB, reuse=True)
    b = memory.empty_hugepages(4 * MIB, reuse=True)
    del a
    assert memory.cached_bytes() == 4 * MIB
    del b  # past the 5 MiB limit: the oldest free block is unmapped
    assert memory.cached_bytes() == 4 * MIB
    monkeypatch.setenv("LEANKERNELS_CPU_CACHE_MB", "0")
    c = memory.empty_hugepages(4 * MIB, reuse=True)  # applies the new limit first
    assert memory.cached_bytes() == 0
    del c
    assert memory.cached_bytes() == 0
    monkeypatch.setenv("LEANKERNELS_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="LEANKERNELS_CPU_CACHE_MB"):
        memory.empty_hugepages(4 * MIB, reuse=True)


def test_pool_small_and_non_cpu_fall_back(pool):
    small = memory.empty_hugepages(1000, dtype=torch.float32, reuse=True)  # under 2 MiB: torch.empty
    assert small.shape == (1000,)
    del small
    assert memory.cached_bytes() == 0
    meta = memory.empty_hugepages(4 * MIB, device="meta", reuse=True)
    assert meta.is_meta and meta.shape == (4 * MIB,)
