"""Hopper FP8 GEMM (csrc/cuda/sm90_fp8_gemm.cu) on the DeepSeek-V3 shapes of DESIGN.md.

    PYTHONPATH=python python -m pytest bench/bench_gemm_sm90.py --benchmark-columns=median,rounds

GPU-only (skipped elsewhere). Each case times the raw sm90 path and, for dense, in the same
run the baseline PyTorch F.scaled_mm with BlockWise1x128 x BlockWise128x128 scales (cuBLAS);
when the installed PyTorch rejects that call (its scale-layout rules were written here without
a GPU), extra_info["baseline_error"] says why and the bf16 matmul of the dequantized operands
is timed instead. Grouped baselines (F.scaled_grouped_mm, row-wise) belong to the GEMM family's
bench/bench_gemm.py. The pytest-benchmark callables synchronise (wall clock incl. launch);
extra_info's TFLOP/s, GB/s and ratio come from CUDA-event medians (_time), which exclude the
Python overhead that dominates the small decode shapes.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import leankernels
from leankernels._lib import C

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = pytest.mark.skipif(not (HOPPER and leankernels.cuda_available() and C().sm90_available()),
                                reason="needs an sm_90 GPU and a CUDA build with the sm90 kernels")

NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE = [(M, N, K) for M in (64, 128, 4096) for N, K in NK]
GROUPED_NK = [(4096, 7168), (7168, 2048)]
CONTIG = [(E, rows, N, K) for E, rows in ((4, 8192), (8, 4096)) for N, K in GROUPED_NK]
MASKED = [(E, m, N, K) for E, m in ((1, 1024), (2, 512), (4, 256)) for N, K in GROUPED_NK]


def _quant(shape_x, shape_w):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*shape_x, device="cuda", generator=g)
    w = torch.randn(*shape_w, device="cuda", generator=g) * 0.05
    a, a_s = leankernels.quantize_fp8(x, (1, 128))
    b, b_s = leankernels.quantize_fp8(w, (128, 128))
    return a, a_s, b, b_s


def _sm90(layout, a, a_s, b, b_s, out, M, N, K, G, info):
    stream = torch.cuda.current_stream().cuda_stream
    ptr = 0 if info is None else info.data_ptr()

    def run():
        C().sm90_fp8_gemm(layout, a.data_ptr(), a_s.data_ptr(), b.data_ptr(), b_s.data_ptr(), out.data_ptr(), False,
                          M, N, K, G, ptr, out.device.index, stream)

    def run_sync():
        run()
        torch.cuda.synchronize()

    return run, run_sync


def _record(benchmark, run, flops, nbytes, baseline_s, extra):
    t = _time(run)
    benchmark.extra_info.update(extra)
    benchmark.extra_info.update(flops=flops, bytes=nbytes, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9,
                                baseline_s=baseline_s, ratio_vs_baseline=baseline_s / t if baseline_s else None,
                                device=torch.cuda.get_device_name())


_FLUSH = None


def _time(fn, iters=20):
    """Median seconds of fn over CUDA events, L2 flushed (256 MB write) before each run."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        _FLUSH.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _dense_baseline(a, a_s, b, b_s):
    try:
        rec_a, rec_b = F.ScalingType.BlockWise1x128, F.ScalingType.BlockWise128x128
        sa = a_s.t().contiguous().t()  # cuBLAS wants the 1x128 scales outer-dim-major
        fn = lambda: F.scaled_mm(a, b.t(), sa, rec_a, b_s, rec_b, output_dtype=torch.bfloat16)  # noqa: E731
        fn()
        return fn, {}
    except Exception as e:  # noqa: BLE001 - the baseline API moves between PyTorch versions
        x = leankernels.dequantize_fp8(a, a_s, (1, 128)).bfloat16()
        w = leankernels.dequantize_fp8(b, b_s, (128, 128)).bfloat16()
        return (lambda: x @ w.T), {"baseline_error": repr(e)[:200], "baseline": "bf16 matmul"}


@pytest.mark.parametrize("M,N,K", DENSE)
def test_dense(benchmark, M, N, K):
    a, a_s, b, b_s = _quant((M, K), (N, K))
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    base, extra = _dense_baseline(a, a_s, b, b_s)
    baseline_s = _time(base)
    run, run_sync = _sm90("dense", a, a_s, b, b_s, out, M, N, K, 1, None)
    benchmark(run_sync)
    _record(benchmark, run, 2 * M * N * K, M * K + N * K + 2 * M * N, baseline_s,
            {**extra, "config": C().sm90_gemm_config(M, N, K, 1, torch.cuda.get_device_properties(0).multi_processor_count)})


@pytest.mark.parametrize("E,rows,N,K", CONTIG)
def test_contiguous(benchmark, E, rows, N, K):
    M = E * rows
    a, a_s, b, b_s = _quant((M, K), (E, N, K))
    offs = torch.tensor(list(itertools.accumulate([rows] * E)), dtype=torch.int32, device="cuda")
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    run, run_sync = _sm90("contiguous", a, a_s, b, b_s, out, M, N, K, E, offs)
    benchmark(run_sync)
    _record(benchmark, run, 2 * M * N * K, M * K + E * N * K + 2 * M * N, None, {})


@pytest.mark.parametrize("E,m,N,K", MASKED)
def test_masked(benchmark, E, m, N, K):
    a, a_s, b, b_s = _quant((E, m, K), (E, N, K))
    masked_m = torch.full((E,), m, dtype=torch.int32, device="cuda")
    out = torch.empty(E, m, N, dtype=torch.bfloat16, device="cuda")
    run, run_sync = _sm90("masked", a, a_s, b, b_s, out, m, N, K, E, masked_m)
    benchmark(run_sync)
    _record(benchmark, run, 2 * E * m * N * K, E * m * K + E * N * K + 2 * E * m * N, None, {})
