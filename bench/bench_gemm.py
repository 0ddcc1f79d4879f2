"""pytest-benchmark for the FP8 GEMM family: ours and the PyTorch baselines in the same run.

    PYTHONPATH=python python -m pytest bench/bench_gemm.py --benchmark-only -q          # CPU (+GPU)
    LK_BENCH_QUICK=1 PYTHONPATH=python python -m pytest bench/bench_gemm.py -q           # tiny shapes

Each test benchmarks our op with pytest-benchmark and times every baseline of the case with the
same timer (median of the same number of rounds, synchronising on GPU), then records FLOPs,
bytes, TFLOP/s, GB/s and the ratio baseline_time / our_time in ``benchmark.extra_info``.
Cases come from leankernels._bench.gemm (shared with the CLI bench).
"""
from __future__ import annotations

import os

import pytest

import leankernels
from leankernels._bench import gemm as bench_cases
from leankernels._bench.timing import synchronized, wall_time

QUICK = os.environ.get("LK_BENCH_QUICK", "0") not in ("", "0")
DEVICES = ["cpu"] + (["cuda"] if leankernels.cuda_available() else [])
ROUNDS = {"cpu": 7, "cuda": 50}


def _params():
    out = []
    for device in DEVICES:
        for case in bench_cases.cases(device, QUICK):
            out.append(pytest.param(device, case, id=f"{device}-{case.name}-{case.shape}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("device,case", _params())
def test_gemm(benchmark, device, case):
    if case.check is not None:
        assert case.check(), f"{case.name} {case.shape}: result does not match the reference"
    rounds = ROUNDS[device]
    ours = synchronized(case.ours, device)
    benchmark.pedantic(ours, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the check above is the whole test
        return
    t_ours = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(shape=case.shape, flops=case.flops, bytes=case.bytes, ours_ms=1e3 * t_ours,
                tflops=case.flops / t_ours / 1e12, gbps=case.bytes / t_ours / 1e9, **case.extra)
    for name, fn in case.baselines.items():
        t = wall_time(fn, device, rounds)
        info[f"{name} ms"] = 1e3 * t
        info[f"speedup vs {name}"] = t / t_ours
