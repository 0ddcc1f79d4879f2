"""Timing primitives for the benchmark runner.

GPU: CUDA events around each call, warm-up first, the L2 cache flushed (a buffer of twice
the L2 size overwritten) and the inputs rotated before every timed call, median of many.
CPU: wall clock (time.perf_counter) around each call, median of repeated runs.

Several callables (ours and the baselines of one case) are timed *interleaved*: round after
round, each callable runs a few times, so slow drifts of the machine (clock boost, other
processes on a shared CPU) hit ours and the baselines alike instead of biasing the ratio.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


@dataclass
class Measurement:
    """Per-call times (seconds) of one callable; ``median`` is the figure reported."""

    samples: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def reps(self) -> int:
        return len(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else math.nan

    def to_json(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "reps": self.reps}


def median(xs: Sequence[float]) -> float:
    """Median of a sequence (mean of the two middle values for an even count); NaN if empty."""
    xs = [float(x) for x in xs]
    if not xs:
        return math.nan
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------ formatting

def fmt_time(seconds: Optional[float]) -> str:
    """12.3 us / 4.56 ms / 1.23 s, three significant digits; '-' for None or NaN."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 0:
        return "-" + fmt_time(-seconds)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{_sig3(seconds / scale)} {unit}"
    return f"{_sig3(seconds / 1e-9)} ns" if seconds > 0 else "0 s"


def _sig3(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_num(v: Optional[float], digits: int = 3) -> str:
    """A rate or a ratio to about three significant digits; '-' for None, NaN or 0-work."""
    if v is None or not math.isfinite(v):
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.{digits}g}"


def fmt_ratio(v: Optional[float]) -> str:
    """Ratio baseline/ours with an 'x': '3.21x' means we are 3.21 times faster."""
    s = fmt_num(v)
    return s if s == "-" else s + "x"


# ------------------------------------------------------------------------------ GPU helpers

class L2Flusher:
    """Evicts the device's L2 cache by overwriting a buffer of twice its size."""

    def __init__(self, device: torch.device | str = "cuda"):
        device = torch.device(device)
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        self.l2_bytes = l2
        self.nbytes = max(2 * l2, 64 << 20)
        self.buffer = torch.empty(self.nbytes // 4, dtype=torch.int32, device=device)

    def flush(self) -> None:
        self.buffer.zero_()


def llc_bytes() -> int:
    """Size of the CPU's largest (last-level) cache in bytes, from sysfs; 32 MiB if unknown."""
    import glob
    best = 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{d}/size") as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or (32 << 20)


class LLCFlusher:
    """Evicts the CPU caches by reading and writing a buffer of twice the last-level cache (at
    least 64 MiB), so weights a decode-shaped case just read are cold again on the next call,
    as in a real decode step (every other layer's weights stream through the cache in between).
    Call it (or pass it as ``Case.rotate``) outside the timed region. Allocated on first use."""

    def __init__(self, nbytes: Optional[int] = None):
        self.nbytes = int(nbytes or max(2 * llc_bytes(), 64 << 20))
        self.buffer: Optional[torch.Tensor] = None

    def __call__(self) -> None:
        if self.buffer is None:
            with torch.inference_mode(False):  # a normal tensor, whatever mode the first caller is in
                self.buffer = torch.ones(self.nbytes // 4, dtype=torch.int32)
        self.buffer.add_(1)   # read-modify-write: a plain fill may use non-temporal stores


LLC_FLUSH = LLCFlusher()   # one shared instance: its buffer is allocated once, on first use


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """fn followed by torch.cuda.synchronize() on CUDA, so a wall-clock timer (pytest-benchmark)
    sees the asynchronous kernel; fn itself on the CPU."""
    if not str(device).startswith("cuda"):
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


# ------------------------------------------------------------------------------ timing

@dataclass
class TimingConfig:
    warmup: int = 1                 # untimed calls of each callable first (compiles, caches)
    min_reps: int = 3               # at least this many timed calls of each callable
    max_reps: int = 100             # at most this many
    budget_s: float = 1.0           # aim for about this much timed work per callable
    max_per_round: int = 10         # fast callables run up to this many times per round
    slow_call_s: Optional[float] = 5.0  # a call slower than this (after warm-up) is timed once (see time_callables)

    @classmethod
    def for_device(cls, device: str, quick: bool) -> "TimingConfig":
        if str(device).startswith("cuda"):
            return cls(warmup=3, min_reps=10, max_reps=200, budget_s=0.05 if quick else 0.25, max_per_round=20)
        return cls(warmup=1, min_reps=3, max_reps=50, budget_s=0.15 if quick else 1.0, max_per_round=10)


def wall_time(fn: Callable[[], object], device: str, reps: int = 5, warmup: int = 1,
              stat: Callable[[Sequence[float]], float] = median) -> float:
    """Quick wall-clock timing for the demo and the pytest-benchmark baselines: `stat` (median)
    of reps calls after warmup, synchronising the GPU around each call. The runner's careful
    timing (CUDA events, L2 flush, rotation) is time_callables."""
    run = synchronized(fn, device)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return stat(times)


def time_callables(fns: Sequence[Callable[[], object]], device: str, *,
                   rotate: Optional[Callable[[], None]] = None,
                   config: Optional[TimingConfig] = None,
                   flusher: Optional[L2Flusher] = None) -> list[Measurement]:
    """Time several callables interleaved; returns one Measurement per callable.

    On CUDA each timed call is bracketed by CUDA events on the current stream, preceded (outside
    the events) by an L2 flush and ``rotate()``. On the CPU each call is timed with
    perf_counter, preceded by ``rotate()``.
    """
    cuda = str(device).startswith("cuda")
    cfg = config or TimingConfig.for_device(device, quick=False)
    if cuda and flusher is None:
        flusher = L2Flusher(device)

    # NOTES: slow_call_s: a call that takes seconds (torch's bf16 matmul on a CPU without bf16
    # instructions: a prefill-sized baseline ran ~200 s per call on an AVX2-only Zen 1) is far
    # past the sizes where timer noise matters, and min_reps - 1 more calls of it would take most
    # of the run: its round-one call (after the warm-up, which can hold one-off costs such as a
    # first call's weight quantization) is its one sample (reps = 1 in the results); the others
    # are timed as usual.
    for fn in fns:                       # warm-up: compiles, allocator, caches, clocks
        for _ in range(max(0, cfg.warmup)):
            if rotate is not None:
                rotate()
            fn()
    synchronize(device)

    out = [Measurement() for _ in fns]
    # Round one: each callable once; its times size the remaining rounds.
    _round(fns, [1] * len(fns), out, cuda, rotate, flusher)
    slow = cfg.slow_call_s
    once = [slow is not None and m.samples[0] > slow for m in out]
    est = [max(m.samples[0], 1e-7) for m, o in zip(out, once) if not o]
    if not est:
        return out
    slowest = max(est)
    per_round = [max(1, min(cfg.max_per_round, int(slowest / e))) for e in est]
    round_cost = sum(n * e for n, e in zip(per_round, est))
    rounds = math.ceil(cfg.budget_s * len(est) / max(round_cost, 1e-9))
    rounds_min = max(math.ceil((cfg.min_reps - 1) / n) for n in per_round)   # min_reps wins
    rounds_max = max(rounds_min, min((cfg.max_reps - 1) // n for n in per_round))
    rounds = min(max(rounds, rounds_min), rounds_max)
    it = iter(per_round)
    per_round = [0 if o else next(it) for o in once]
    for _ in range(rounds):
        _round(fns, per_round, out, cuda, rotate, flusher)
    return out


def _round(fns, per_round, out, cuda, rotate, flusher) -> None:
    if cuda:
        pending = []
        for i, fn in enumerate(fns):
            for _ in range(per_round[i]):
                if rotate is not None:
                    rotate()
                flusher.flush()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                pending.append((i, start, end))
        torch.cuda.synchronize()
        for i, start, end in pending:
            out[i].samples.append(start.elapsed_time(end) * 1e-3)
    else:
        for i, fn in enumerate(fns):
            for _ in range(per_round[i]):
                if rotate is not None:
                    rotate()
                t0 = time.perf_counter()
                fn()
                out[i].samples.append(time.perf_counter() - t0)


def time_one(fn: Callable[[], object], device: str, **kwargs) -> Measurement:
    return time_callables([fn], device, **kwargs)[0]
