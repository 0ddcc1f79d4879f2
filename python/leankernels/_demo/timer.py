"""A small wall-clock timer for the demo sections (the benchmark runner has the careful one)."""
from __future__ import annotations

import statistics
import time

import torch


def median_time(fn, device: str, reps: int = 5, warmup: int = 1, stat=statistics.median) -> float:
    """Median (or `stat`) seconds of fn() over reps runs, synchronising the GPU around each run."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return stat(times)
