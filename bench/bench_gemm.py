"""pytest-benchmark for the FP8 GEMM family: ours and the PyTorch baselines in the same run.

    PYTHONPATH=python python -m pytest bench/bench_gemm.py --benchmark-only -q          # CPU (+GPU)
    LK_BENCH_QUICK=1 PYTHONPATH=python python -m pytest bench/bench_gemm.py -q           # tiny shapes
    PYTHONPATH=python python -m pytest bench/bench_gemm.py -k "decode and V3" --benchmark-disable  # checks only

Each test benchmarks our op with pytest-benchmark and times every baseline of the case with the
same timer (median of the same number of rounds, synchronising on GPU), then records FLOPs,
bytes, TFLOP/s, GB/s and the ratio baseline_time / our_time in ``benchmark.extra_info``.
Cases come from leankernels._bench.gemm (shared with the CLI bench). With --benchmark-disable
each test is its correctness check (ours against leankernels.reference on a slice; the
decode cases also compare their torch baselines with ours) plus one call.

test_gemm_wgrad runs the training cases (fp8_k_grouped_gemm wgrad at V2-Lite-like shapes,
quantize_fp8_transposed), ids like ``cpu-wgrad-E8-N1408-K2048-T4096``.

test_gemm_decode (CPU only) runs the decode-shaped cases, parametrised by model, projection,
tokens T and layout (ids like ``V3-gateup-T16-contiguous``, ``dense-T1``, ``cpu-paths``,
``prefill``); each allocates its weights only while it runs (a V3 T=16 gate/up case holds
~12 GB: the ~100 experts its tokens chose in FP8, bf16 and int8). Between timed calls of the
decode cases the last-level cache is flushed, as the CLI bench does, and their GB/s is on the
FP8 weight bytes the call must read (``read_pct`` against a read-only pass over 512 MiB, measured
once per session when benchmarking is on).
"""
from __future__ import annotations

import os
import time

import pytest

import leankernels
from leankernels._bench import gemm as bench_cases
from leankernels._bench.timing import synchronized, wall_time

QUICK = os.environ.get("LK_BENCH_QUICK", "0") not in ("", "0")
DEVICES = ["cpu"] + (["cuda"] if leankernels.cuda_available() else [])
ROUNDS = {"cpu": 7, "cuda": 50}


def _params():
    """One param per case, described, not built: each test builds its case (and its inputs) and
    drops it when done, so a session holds one case's tensors at a time."""
    out = []
    for device in DEVICES:
        for spec in bench_cases.base_specs(device, QUICK):
            out.append(pytest.param(device, spec, id=f"{device}-{bench_cases.base_label(spec)}".replace(" ", "_")))
    return out


def _run(benchmark, case, device, rounds, extra=None):
    """Check, benchmark ours, time the baselines; returns our median (None with --benchmark-disable)."""
    if case.setup is not None:
        case.setup()
    try:
        if case.check is not None:
            assert case.check(), f"{case.name} {case.shape}: result does not match the reference"
        ours = synchronized(case.ours, device)
        if case.rotate is None:
            benchmark.pedantic(ours, rounds=rounds, warmup_rounds=1, iterations=1)
        else:  # flush / rotate outside the timed call
            benchmark.pedantic(ours, setup=case.rotate, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: the check above is the whole test
            return None
        t_ours = benchmark.stats.stats.median
        info = benchmark.extra_info
        info.update(shape=case.shape, flops=case.flops, bytes=case.bytes, ours_ms=1e3 * t_ours,
                    tflops=case.flops / t_ours / 1e12, gbps=case.bytes / t_ours / 1e9, **case.extra)
        for name, fn in case.baselines.items():
            t = _median_time(fn, device, rounds, case.rotate)
            info[f"{name} ms"] = 1e3 * t
            info[f"speedup vs {name}"] = t / t_ours
        info.update(extra or {})
        return t_ours
    finally:
        if case.teardown is not None:
            case.teardown()


def _median_time(fn, device, rounds, rotate):
    if rotate is None:
        return wall_time(fn, device, rounds)
    fn()
    times = []
    for _ in range(rounds):
        rotate()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("device,spec", _params())
def test_gemm(benchmark, device, spec):
    _run(benchmark, bench_cases.base_case(spec), device, ROUNDS[device])


# ------------------------------------------------------------------------------ decode shapes

def _decode_params():
    out = [pytest.param(spec, id=bench_cases.spec_id(spec)) for spec in bench_cases.decode_specs(QUICK)]
    out += [pytest.param(("cpu-paths", ()), id="cpu-paths"), pytest.param(("prefill", ()), id="prefill")]
    out += [pytest.param(("prefill-path", (p,)), id=f"prefill-{p}") for p in bench_cases.FP32_PATHS]
    return out


@pytest.fixture(scope="session")
def read_ceiling(request):
    """GB/s of a read-only pass over 512 MiB (the CLI bench's "read" ceiling), measured once;
    None with --benchmark-disable."""
    if request.config.getoption("benchmark_disable", False):
        return None
    from leankernels._bench import ceilings
    from leankernels._bench.timing import TimingConfig
    return ceilings._read("cpu", QUICK, TimingConfig.for_device("cpu", True), None).value


@pytest.mark.parametrize("spec", _decode_params())
def test_gemm_decode(benchmark, spec, read_ceiling):
    kind = spec[0]
    if kind == "cpu-paths":
        case = bench_cases.cpu_paths_case(QUICK)
        if case is None:
            pytest.skip(f"this CPU runs one path only ({leankernels.cpu_path()})")
    elif kind == "prefill":
        case = bench_cases.prefill_case(QUICK)
    elif kind == "prefill-path":
        case = bench_cases.prefill_path_case(spec[1][0], QUICK)
        if case is None:
            pytest.skip(f"path {spec[1][0]} not runnable here or in use ({leankernels.cpu_path()})")
    else:
        case = bench_cases.decode_case(spec, QUICK)
    benchmark.group = f"decode {case.name}"
    t = _run(benchmark, case, "cpu", ROUNDS["cpu"])
    if t is not None and read_ceiling and case.ceiling == "read":
        benchmark.extra_info["read_ceiling_gbps"] = read_ceiling
        benchmark.extra_info["read_pct"] = 100.0 * case.bytes / t / 1e9 / read_ceiling


# ------------------------------------------------------------------------------ training (wgrad)

def _wgrad_params():
    return [pytest.param(device, spec, id=f"{device}-{bench_cases.wgrad_spec_id(spec)}")
            for device in DEVICES for spec in bench_cases.wgrad_specs(device, QUICK)]


@pytest.mark.parametrize("device,spec", _wgrad_params())
def test_gemm_wgrad(benchmark, device, spec):
    """fp8_k_grouped_gemm (MoE wgrad, ~4096 tokens over E experts) against torch bf16 matmuls of
    the same FLOPs, and quantize_fp8_transposed against a bf16 transposed copy."""
    case = bench_cases.wgrad_spec_case(device, spec)
    benchmark.group = f"wgrad {case.name}"
    _run(benchmark, case, device, ROUNDS[device])
