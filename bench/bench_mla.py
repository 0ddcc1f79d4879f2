"""pytest-benchmark: MLA decode vs the eager PyTorch reference and vs SDPA over an MHA cache.

    PYTHONPATH=python python -m pytest bench/bench_mla.py --benchmark-columns=min,median,rounds
    PYTHONPATH=python python -m pytest bench/bench_mla.py -k "b4-sq1-h16-sk4096"   # the judged CPU shape

Each case times ours and its baselines in the same run on the same inputs
(leankernels._bench.mla); extra_info carries FLOPs, bytes, GB/s, TFLOP/s and, on the baseline
rows, ratio_vs_ours = baseline median / ours median (ours runs first in the same process).
CPU shapes are small; GPU shapes follow DESIGN.md.
"""
from __future__ import annotations

import functools

import pytest
import torch

from leankernels._bench.mla import decode_case, shapes
from leankernels._bench.timing import synchronized

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["ours", "eager reference", "SDPA over MHA cache"]
_ours_median: dict[tuple, float] = {}


@functools.lru_cache(maxsize=2)
def _case(shape, fp8):
    return decode_case(*shape, fp8, DEVICE, with_reference=DEVICE == "cpu")


def _timed(fn):
    return synchronized(fn, DEVICE)


def _params():
    for shape in shapes(DEVICE, quick=False):
        for fp8 in (False, True):
            for impl in IMPLS:
                if impl == "SDPA over MHA cache" and fp8:
                    continue  # one MHA baseline per shape (on the bf16 rows)
                tag = f"{'fp8' if fp8 else 'bf16'}-b{shape[0]}-sq{shape[1]}-h{shape[2]}-sk{shape[3]}"
                yield pytest.param(shape, fp8, impl, id=f"{tag}-{impl.split()[0].lower()}")


@pytest.mark.parametrize("shape,fp8,impl", list(_params()))
def test_mla_decode(benchmark, shape, fp8, impl):
    case = _case(shape, fp8)
    if impl != "ours" and impl not in case.baselines:
        pytest.skip(f"{impl} not run for this shape (see leankernels._bench.mla)")
    fn = case.ours if impl == "ours" else case.baselines[impl]
    if impl == "ours" and case.check is not None:
        assert case.check(), "ours disagrees with the reference"
    rounds = (3 if impl == "eager reference" else 10) if DEVICE == "cpu" else 50
    benchmark.pedantic(_timed(fn), rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    med = benchmark.stats.stats.median
    info = {"impl": impl, "flops": case.flops, "bytes": case.bytes, "device": DEVICE, **case.extra}
    key = (shape, fp8)
    if impl == "ours":
        _ours_median[key] = med
        info.update(GBps=case.bytes / med / 1e9, TFLOPs=case.flops / med / 1e12)
    elif key in _ours_median:
        info["ratio_vs_ours"] = med / _ours_median[key]
    elif (shape, False) in _ours_median:
        info["ratio_vs_ours_bf16"] = med / _ours_median[(shape, False)]
    benchmark.extra_info.update(info)
