"""Shared fixtures for the pytest-benchmark files (bench/bench_*.py).

Run (not part of the normal test run: pyproject's testpaths is tests/):

    PYTHONPATH=python python -m pytest bench/ --benchmark-json=bench.json
    PYTHONPATH=python python -m pytest bench/bench_quant.py --benchmark-group-by=group

On a GPU every benchmarked callable is wrapped so that it ends with torch.cuda.synchronize():
pytest-benchmark reads a wall clock, and an asynchronous kernel would otherwise look free.
For figures with CUDA events, L2 flushing and ceilings use `python -m leankernels bench`.
"""
from __future__ import annotations

import pytest
import torch

import leankernels

from leankernels._bench.timing import synchronized

HAS_CUDA = leankernels.cuda_available()


@pytest.fixture
def bench_call(benchmark):
    """bench_call(fn, device, flops=0, bytes=0, **extra) -> median seconds (None when
    --benchmark-disable).

    Benchmarks fn with a synchronising wrapper on GPU and stores FLOPs, bytes, the achieved
    TFLOP/s and GB/s (from the median) and any extra keys in benchmark.extra_info."""
    def call(fn, device, flops: float = 0.0, bytes: float = 0.0, **extra):
        run = synchronized(fn, device)
        run()  # warm-up (compiles, allocator) outside the measurement
        benchmark(run)
        info = benchmark.extra_info
        info.update({"device": str(device), "flops": flops, "bytes": bytes})
        if benchmark.stats is None:  # --benchmark-disable: ran once as a plain test
            info.update(extra)
            return None
        med = benchmark.stats.stats.median
        if flops:
            info["tflops"] = flops / med / 1e12
        if bytes:
            info["gbps"] = bytes / med / 1e9
        info.update(extra)
        return med
    return call


def pytest_benchmark_update_machine_info(config, machine_info):
    info = leankernels.build_info()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["omp_max_threads"] = info.get("omp_max_threads")
    machine_info["leankernels_build"] = dict(info)
    if HAS_CUDA:
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["cuda_runtime"] = torch.version.cuda


def pytest_report_header(config):
    return (f"leankernels bench: torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"OpenMP {leankernels.build_info().get('omp_max_threads')}, cuda available={HAS_CUDA}")
