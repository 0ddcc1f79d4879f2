"""pytest-benchmark: FP8 block quantization, ours against the PyTorch reference in the same run.

    PYTHONPATH=python python -m pytest bench/bench_quant.py --benchmark-json=quant.json

Each (device, block, shape) is one benchmark group holding three rows: the eager reference
(leankernels.reference.quantize_fp8), the same under torch.compile, and leankernels. The
leankernels row's extra_info carries bytes, GB/s and the ratios against both references
(reference median / ours median, > 1: ours is faster), timed in this same session.
"""
from __future__ import annotations

import pytest
import torch

import leankernels
from leankernels import reference
from leankernels._bench.quant import quant_bytes
from leankernels._bench.timing import TimingConfig, synchronized, time_one

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not leankernels.cuda_available(), reason="needs a CUDA GPU and a CUDA build"))]

# (block, shape): DeepSeek-V3 activations (tokens x hidden) and an expert down-projection weight.
CASES = [((1, 128), (4096, 7168)), ((128, 128), (7168, 2048))]
IMPLS = ["reference", "reference_compiled", "leankernels"]  # references first: ours reads their times

_medians: dict = {}
_compiled = None


def _impl(name):
    global _compiled
    if name == "leankernels":
        return leankernels.quantize_fp8
    if name == "reference":
        return reference.quantize_fp8
    if _compiled is None:
        _compiled = torch.compile(reference.quantize_fp8, dynamic=False)
    return _compiled


def _id(c):
    block, shape = c
    return f"{block[0]}x{block[1]}-" + "x".join(map(str, shape))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_fp8(benchmark, bench_call, device, case, impl):
    block, shape = case
    benchmark.group = f"quantize_fp8 {device} {_id(case)} bf16"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(torch.bfloat16)
    fn = _impl(impl)
    nbytes = quant_bytes(shape, block)
    extra = {"impl": impl, "block": list(block), "shape": list(shape)}
    if impl == "leankernels":
        q, s = fn(x, block)
        rq, rs = reference.quantize_fp8(x, block)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    med = bench_call(lambda: fn(x, block), device, bytes=nbytes, **extra)
    key = (device, block, shape)
    _medians[key + (impl,)] = med
    if impl == "leankernels" and med is not None:
        cfg = TimingConfig(warmup=1, min_reps=3, max_reps=10, budget_s=1.0)
        for ref in ("reference", "reference_compiled"):
            ref_med = _medians.get(key + (ref,))
            if ref_med is None:  # run on its own (-k): time the reference here, same session
                rf = _impl(ref)
                ref_med = time_one(synchronized(lambda: rf(x, block), device), "cpu", config=cfg).median
            benchmark.extra_info[f"ratio_vs_{ref}"] = ref_med / med
