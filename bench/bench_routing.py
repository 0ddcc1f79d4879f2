"""pytest-benchmark for expert gating and token routing: ours and the baselines in one run.

    PYTHONPATH=python python -m pytest bench/bench_routing.py --benchmark-group-by=group
    LEANKERNELS_BENCH_QUICK=1 PYTHONPATH=python python -m pytest bench/bench_routing.py

Cases come from leankernels._bench.routing (DeepSeek-V3: 256 experts, 8 groups, top-4 groups,
top-8, hidden 7168; T in {1, 128, 4096, 16384}). pytest-benchmark times our op; each baseline
is timed in the same test with the same synchronising wrapper (median of `rounds` calls), and
benchmark.extra_info gets bytes, GB/s and `ratio[<baseline>]` = baseline time / our time.
"""
from __future__ import annotations

import os

import pytest

import leankernels
from leankernels._bench import routing
from leankernels._bench.timing import synchronized, wall_time

QUICK = os.environ.get("LEANKERNELS_BENCH_QUICK", "0") == "1"
DEVICES = ["cpu"] + (["cuda"] if leankernels.cuda_available() else [])


_CASES = {}


def _cases(device):
    if device not in _CASES:
        _CASES[device] = routing.cases(device, QUICK)
    return _CASES[device]


def _ids():
    out = []
    for device in DEVICES:
        # cases are built lazily (inputs are large); ids need only names, so build once here
        for i, c in enumerate(_cases(device)):
            out.append(pytest.param(device, i, id=f"{device}-{c.name}-{c.shape}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("device,index", _ids())
def test_routing(benchmark, device, index):
    case = _cases(device)[index]
    benchmark.group = f"{case.name} {case.shape}"
    ours = synchronized(case.ours, device)
    if case.check is not None:
        assert case.check(), f"{case.name} {case.shape}: ours disagrees with the reference"
    ours()
    benchmark(ours)
    info = benchmark.extra_info
    info.update({"device": device, "shape": case.shape, "bytes": case.bytes, **case.extra})
    if benchmark.stats is None:  # --benchmark-disable
        return
    med = benchmark.stats.stats.median
    if case.bytes:
        info["gbps"] = case.bytes / med / 1e9
    rounds = 5 if device == "cpu" else 50
    for name, fn in case.baselines.items():
        t = wall_time(fn, device, rounds)
        info[f"time[{name}]"] = t
        info[f"ratio[{name}]"] = t / med
