"""Measured ceilings of the device, taken in the same process before the cases run.

- ``copy``: device memory bandwidth seen by a plain copy of a large buffer (GPU: device to
  device ``copy_``; CPU: ``copy_`` between two large tensors), counting bytes read + written.
- ``read``: the bandwidth of a large read-only pass (a reduction torch runs at memory speed
  with negligible compute: the best of fp32 sum, fp32 amax and int64 sum over 512 MiB on the
  CPU, 1 GiB on GPUs, a quarter of that with --quick; median time of each), counting bytes
  read. Decode-shaped GEMMs and the batch-1 MoE only read their weights, so their "% of
  ceiling" is against this one.
- ``read_2m`` (CPU, Linux with transparent huge pages): the same read over 2 MiB huge pages
  (leankernels.memory), the ceiling of weights kept there (leankernels.nn modules, the cases
  marked "2 MiB pages"); in a VM fewer page walks make it the higher one.
- ``bf16_matmul``: the best rate ``torch.matmul`` reaches in bf16 over a few large square shapes.
- ``fp32_matmul`` (CPU only): the same in fp32 (CPUs without bf16 units reach more in fp32).
- ``fp8_matmul`` (GPU sm_89+): ``torch._scaled_mm`` e4m3 x e4m3 -> bf16, per-tensor scales.

Each ceiling is what PyTorch itself reaches here, not a datasheet number, so "% of ceiling"
says how close a kernel gets to the best the same machine and library already do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..memory import empty_hugepages, hugepages_available
from .timing import L2Flusher, TimingConfig, time_one


@dataclass
class Ceiling:
    name: str          # "copy", "bf16_matmul", "fp32_matmul", "fp8_matmul"
    kind: str          # "memory" (value in GB/s) or "compute" (value in TFLOP/s)
    value: float       # GB/s or TFLOP/s
    how: str           # what was measured (shape, op)

    @property
    def unit(self) -> str:
        return "GB/s" if self.kind == "memory" else "TFLOP/s"

    def to_json(self) -> dict:
        d = asdict(self)
        d["unit"] = self.unit
        return d


def _copy(device: str, quick: bool, cfg: TimingConfig, flusher) -> Ceiling:
    cuda = device.startswith("cuda")
    mib = (256 if quick else 1024) if cuda else (64 if quick else 256)
    n = (mib << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    m = time_one(lambda: dst.copy_(src), device, config=cfg, flusher=flusher)
    gbs = 2 * src.numel() * 4 / m.median / 1e9
    return Ceiling("copy", "memory", gbs, f"copy_ of {mib} MiB fp32 (read + write counted)")


def _read(device: str, quick: bool, cfg: TimingConfig, flusher, huge: bool = False) -> Ceiling:
    cuda = device.startswith("cuda")
    mib = (256 if quick else 1024) if cuda else (128 if quick else 512)
    n = (mib << 20) // 4
    if huge:  # written: no zero pages
        src = empty_hugepages(n, dtype=torch.float32).fill_(1.0)
    else:
        src = torch.ones(n, dtype=torch.float32, device=device)
    ops = {"fp32 sum": lambda: src.sum(), "fp32 amax": lambda: src.amax(),
           "int64 sum": lambda: src.view(torch.int64).sum()}
    best, best_op = 0.0, None
    for name, fn in ops.items():
        m = time_one(fn, device, config=cfg, flusher=flusher)
        gbs = src.numel() * 4 / m.median / 1e9
        if gbs > best:
            best, best_op = gbs, name
    del src
    return Ceiling("read_2m" if huge else "read", "memory", best,
                   f"read-only pass over {mib} MiB{' in 2 MiB huge pages' if huge else ''} (bytes read counted): "
                   f"best of {' / '.join(ops)} (best: {best_op})")


_SLOW_CALL_S = 1.0  # a ceiling matmul this slow stops the growing sizes (see _matmul)


def _matmul(device: str, dtype: torch.dtype, sizes, cfg: TimingConfig, flusher) -> Optional[Ceiling]:
    best, best_n, tried = 0.0, None, []
    g = torch.Generator(device=device).manual_seed(0)
    for n in sizes:  # random data (zeros would flatter the rate: less switching power)
        a = torch.randn(n, n, generator=g, device=device).to(dtype)
        b = torch.randn(n, n, generator=g, device=device).to(dtype)
        m = time_one(lambda: torch.matmul(a, b), device, config=cfg, flusher=flusher)
        tried.append(n)
        rate = 2.0 * n ** 3 / m.median / 1e12
        if rate > best:
            best, best_n = rate, n
        del a, b
        # NOTES: a matmul this slow at this size (torch's bf16 on a CPU without bf16 instructions:
        # ~0.7 GFLOP/s on an AVX2-only Zen 1, 3 s per 1024^3 call) is far past the sizes where
        # call overheads matter; the next size (8x the work) would take minutes of the run.
        if m.median > _SLOW_CALL_S:
            break
    if best_n is None:
        return None
    name = {torch.bfloat16: "bf16_matmul", torch.float32: "fp32_matmul"}[dtype]
    skipped = [n for n in sizes if n not in tried]
    return Ceiling(name, "compute", best, f"torch.matmul {str(dtype).replace('torch.', '')}, best of "
                   f"{'/'.join(map(str, tried))} square (best at {best_n})"
                   + (f"; {'/'.join(map(str, skipped))} not run (over {_SLOW_CALL_S:g} s per call at {tried[-1]})"
                      if skipped else ""))


def _fp8_matmul(device: str, sizes, cfg: TimingConfig, flusher) -> Optional[Ceiling]:
    if not hasattr(torch, "_scaled_mm"):
        return None
    if torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
        return None
    best, best_n = 0.0, None
    g = torch.Generator(device=device).manual_seed(1)
    one = torch.ones((), dtype=torch.float32, device=device)
    for n in sizes:
        a = torch.randn(n, n, generator=g, device=device).to(torch.float8_e4m3fn)
        bt = torch.randn(n, n, generator=g, device=device).to(torch.float8_e4m3fn)
        b = bt.t()  # column-major, as _scaled_mm requires
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        try:
            fn()
        except Exception:  # noqa: BLE001 - unsupported on this build/device: no FP8 ceiling
            return None
        m = time_one(fn, device, config=cfg, flusher=flusher)
        rate = 2.0 * n ** 3 / m.median / 1e12
        if rate > best:
            best, best_n = rate, n
        del a, bt, b
    return Ceiling("fp8_matmul", "compute", best, f"torch._scaled_mm e4m3 -> bf16, per-tensor scales, best of "
                   f"{'/'.join(map(str, sizes))} square (best at {best_n})")


def measure(device: str, quick: bool = False, flusher: Optional[L2Flusher] = None) -> dict[str, Ceiling]:
    """Measure the ceilings of ``device`` ("cpu" or "cuda"); returns name -> Ceiling."""
    cuda = device.startswith("cuda")
    cfg = TimingConfig.for_device(device, quick=True)
    if cuda and flusher is None:
        flusher = L2Flusher(device)
    out = {}
    for c in (_copy(device, quick, cfg, flusher), _read(device, quick, cfg, flusher)):
        out[c.name] = c
    if not cuda and hugepages_available():
        out["read_2m"] = _read(device, quick, cfg, flusher, huge=True)
    if cuda:
        sizes = (4096, 8192) if quick else (4096, 8192, 16384)
        for c in (_matmul(device, torch.bfloat16, sizes, cfg, flusher), _fp8_matmul(device, sizes, cfg, flusher)):
            if c is not None:
                out[c.name] = c
    else:
        sizes = (512, 1024) if quick else (1024, 2048)
        for dtype in (torch.bfloat16, torch.float32):
            c = _matmul(device, dtype, sizes, cfg, flusher)
            if c is not None:
                out[c.name] = c
    if cuda:
        torch.cuda.empty_cache()
    return out


def best_compute(ceilings: dict[str, Ceiling]) -> Optional[Ceiling]:
    comp = [c for c in ceilings.values() if c.kind == "compute"]
    return max(comp, key=lambda c: c.value) if comp else None


def ceiling_for(ceilings: dict[str, Ceiling], bound: str, name: Optional[str] = None) -> Optional[Ceiling]:
    """The ceiling a case's "% of ceiling" is taken against: ``name`` when given and measured;
    else "copy" for memory-bound cases and the best measured matmul rate for compute-bound."""
    if name:
        return ceilings.get(name)
    if bound == "compute":
        return best_compute(ceilings)
    return ceilings.get("copy")
