"""Tests of the benchmark runner itself (leankernels._bench): the --quick bench on the CPU for
every domain present (each case must report a ratio and pass its correctness check), the
timing helpers, and the JSON / markdown / plot outputs."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types

import pytest
import torch

from leankernels._bench import cli, report, runner
from leankernels._bench.case import Case, InputSets
from leankernels._bench.timing import (Measurement, TimingConfig, fmt_num, fmt_ratio, fmt_time, median,
                                       time_callables)


# ------------------------------------------------------------------------------ the quick bench

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One in-process `python -m leankernels bench --quick --device cpu --json ... --markdown ...`."""
    out = tmp_path_factory.mktemp("bench")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--quick", "--device", "cpu", "--no-progress",
                              "--json", str(out / "r.json"), "--markdown", str(out / "r.md")])
    t0 = time.perf_counter()
    rc = cli.main(args)
    elapsed = time.perf_counter() - t0
    with open(out / "r.json") as f:
        results = json.load(f)
    return rc, results, (out / "r.md").read_text(), elapsed


def test_quick_bench_every_case_has_ratio_and_passes(quick_run):
    rc, results, _, elapsed = quick_run
    assert rc == 0, results.get("failures")
    assert results["domains"]["quant"]["status"] == "ok"
    for domain, info in results["domains"].items():
        # a domain is either run, or skipped because its module is not there; never an error
        assert info["status"] in ("ok", "skipped"), (domain, info)
        if info["status"] == "ok":
            assert info["cases"] > 0, domain
    ran = {d for d, i in results["domains"].items() if i["status"] == "ok"}
    rows = results["rows"]
    assert {r["domain"] for r in rows} == ran
    for r in rows:
        where = f"{r['case']} {r['shape']} vs {r['baseline']}"
        assert r["error"] is None, where
        assert r["check"] is True, where
        assert r["baseline"], where
        assert r["ratio"] is not None and r["ratio"] > 0, where
        assert r["ours_s"] > 0 and r["baseline_s"] > 0, where
        assert math.isclose(r["ratio"], r["baseline_s"] / r["ours_s"], rel_tol=1e-9)
    print(f"quick bench took {elapsed:.1f}s")


def test_quick_bench_json_is_complete(quick_run):
    _, results, _, _ = quick_run
    for key in ("command", "env", "ceilings", "timing", "domains", "rows", "quick", "failures"):
        assert key in results
    assert results["quick"] is True and results["failures"] == []
    assert results["command"].startswith("python -m leankernels bench")
    env = results["env"]
    for key in ("device", "torch", "date_utc", "torch_threads", "omp_max_threads", "build"):
        assert key in env
    ceil = results["ceilings"]
    assert ceil["copy"]["kind"] == "memory" and ceil["copy"]["value"] > 0
    assert ceil["bf16_matmul"]["kind"] == "compute" and ceil["bf16_matmul"]["value"] > 0
    assert ceil["read"]["kind"] == "memory" and ceil["read"]["value"] > 0
    for r in results["rows"]:   # cases that only stream weights are measured against "read"
        if r["ceiling"] == "read":
            assert r["pct_ceiling"] > 0 and r["x_ceiling_time"] > 0
    quant = [r for r in results["rows"] if r["domain"] == "quant"]
    assert {r["case"].split()[1] for r in quant if r["case"].startswith("quantize_fp8 ")} == {"1x128", "128x128"}
    assert any(r["case"].startswith("silu_mul_quantize_fp8") for r in quant)
    for r in quant:
        assert r["ceiling"] == "copy" and r["gbs"] > 0 and r["pct_ceiling"] > 0
        assert r["bytes"] > 0 and r["flops"] == 0


def test_quick_bench_markdown(quick_run):
    _, results, md, _ = quick_run
    assert "| case | shape | ours | baseline | baseline time | ratio |" in md
    assert "Command: `python -m leankernels bench" in md
    n_rows = sum(1 for line in md.splitlines()  # not quantize_fp8_transposed (gemm)
                 if line.startswith("| quantize_fp8 ") or line.startswith("| silu_mul_quantize_fp8 "))
    assert n_rows == sum(1 for r in results["rows"] if r["domain"] == "quant")


# ------------------------------------------------------------------------------ timing helpers

def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([5]) == 5.0
    assert math.isnan(median([]))
    m = Measurement([0.3, 0.1, 0.2])
    assert m.median == 0.2 and m.reps == 3 and m.min == 0.1 and m.max == 0.3


def test_formatting():
    assert fmt_time(1.5) == "1.50 s"
    assert fmt_time(0.0123) == "12.3 ms"
    assert fmt_time(0.000456) == "456 us"
    assert fmt_time(2.5e-6) == "2.50 us"
    assert fmt_time(7e-9) == "7.00 ns"
    assert fmt_time(None) == "-" and fmt_time(float("nan")) == "-"
    assert fmt_num(1234.5) == "1234" and fmt_num(12.345) == "12.3" and fmt_num(0.0123) == "0.0123"
    assert fmt_num(None) == "-"
    assert fmt_ratio(3.214) == "3.21x" and fmt_ratio(None) == "-"


def test_time_callables_interleaved_ratio_and_rotation():
    calls = {"rotate": 0, "fast": 0, "slow": 0}

    def rotate():
        calls["rotate"] += 1

    def fast():
        calls["fast"] += 1
        time.sleep(0.002)

    def slow():
        calls["slow"] += 1
        time.sleep(0.008)

    cfg = TimingConfig(warmup=1, min_reps=3, max_reps=40, budget_s=0.05, max_per_round=10)
    mf, ms = time_callables([fast, slow], "cpu", rotate=rotate, config=cfg)
    assert 3 <= mf.reps <= 40 and 3 <= ms.reps <= 40
    assert mf.reps >= ms.reps            # the fast one runs more often per round
    assert calls["fast"] == mf.reps + 1 and calls["slow"] == ms.reps + 1   # + the warm-up
    assert calls["rotate"] == calls["fast"] + calls["slow"]                 # before every call
    assert mf.median >= 0.002 and ms.median >= 0.008
    assert 1.5 < ms.median / mf.median < 6


def test_time_callables_times_a_very_slow_call_once():
    """A callable over slow_call_s per call after its warm-up (a seconds-long baseline) is timed
    once, in round one; a slow warm-up alone (one-off costs) does not count; the others are
    timed as usual."""
    calls = {"fast": 0, "slow": 0, "first": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.001)

    def slow():
        calls["slow"] += 1
        time.sleep(0.03)

    def slow_first():  # a one-off cost in its first call only
        calls["first"] += 1
        time.sleep(0.03 if calls["first"] == 1 else 0.001)

    for warmup in (1, 0):
        calls.update(fast=0, slow=0, first=0)
        cfg = TimingConfig(warmup=warmup, min_reps=3, max_reps=20, budget_s=0.02, max_per_round=10,
                           slow_call_s=0.02)
        mf, ms, m1 = time_callables([fast, slow, slow_first], "cpu", config=cfg)
        assert ms.reps == 1 and calls["slow"] == 1 + warmup and ms.median >= 0.03
        assert 3 <= mf.reps <= 20 and calls["fast"] == mf.reps + warmup and mf.median < 0.02
        assert m1.reps >= (3 if warmup else 1) and calls["first"] == m1.reps + warmup
    cfg = TimingConfig(warmup=1, min_reps=3, max_reps=20, budget_s=0.02, slow_call_s=None)  # off
    calls.update(fast=0, slow=0)
    mf, ms = time_callables([fast, slow], "cpu", config=cfg)
    assert ms.reps >= 3 and calls["slow"] == ms.reps + 1
    cfg = TimingConfig(warmup=1, min_reps=3, max_reps=20, budget_s=0.02, slow_call_s=0.02)  # all slow
    calls.update(fast=0, slow=0)
    (ms,) = time_callables([slow], "cpu", config=cfg)
    assert ms.reps == 1 and calls["slow"] == 2


def test_input_sets_rotate():
    sets = InputSets(["a", "b", "c"])
    seen = []
    for _ in range(4):
        seen.append(sets.current)
        sets.advance()
    assert seen == ["a", "b", "c", "a"]
    with pytest.raises(ValueError):
        InputSets([])


# ------------------------------------------------------------------------------ runner behaviour

def _case(**kw):
    base = dict(domain="fake", name="noop", shape="1", ours=lambda: None,
                baselines={"b": lambda: time.sleep(0.001)}, bytes=1e6, check=lambda: True)
    base.update(kw)
    return Case(**base)


def _ceil():
    from leankernels._bench.ceilings import Ceiling
    return {"copy": Ceiling("copy", "memory", 10.0, "test"), "bf16_matmul": Ceiling("bf16_matmul", "compute", 1.0, "test")}


def test_run_case_reports_failed_check_and_errors():
    cfg = TimingConfig(warmup=1, min_reps=3, max_reps=5, budget_s=0.01)

    def boom():
        raise RuntimeError("baseline broke")

    rows = runner.run_case(_case(check=lambda: False, baselines={"ok": lambda: None, "bad": boom}),
                           "cpu", cfg, None, _ceil())
    assert [r["baseline"] for r in rows] == ["ok", "bad"]
    assert all(r["check"] is False for r in rows)
    ok, bad = rows
    assert ok["error"] is None and ok["ratio"] > 0          # the working baseline still timed
    assert "baseline broke" in bad["error"] and bad["ratio"] is None
    assert bad["ours_s"] is not None  # ours still timed
    res = {"domains": {"fake": {"status": "ok"}}, "rows": rows}
    problems = runner.failures(res)
    assert any("correctness check failed" in p for p in problems)
    assert any("baseline broke" in p for p in problems)
    assert report.format_table(res).count("ERROR") == 1


def test_run_case_setup_and_teardown():
    cfg = TimingConfig(warmup=0, min_reps=3, max_reps=5, budget_s=0.01)
    log = []
    state = {}

    def setup():
        log.append("setup")
        state["x"] = 1

    def teardown():
        log.append("teardown")
        state.clear()

    def check():
        log.append("check")
        return state.get("x") == 1

    rows = runner.run_case(_case(setup=setup, teardown=teardown, check=check, ours=lambda: state["x"]),
                           "cpu", cfg, None, _ceil())
    assert log[:2] == ["setup", "check"] and log[-1] == "teardown" and log.count("teardown") == 1
    assert rows[0]["check"] is True and rows[0]["error"] is None and state == {}

    def bad_setup():
        raise MemoryError("needs 99 GB")

    log.clear()
    rows = runner.run_case(_case(setup=bad_setup, teardown=teardown), "cpu", cfg, None, _ceil())
    assert log == ["teardown"]
    assert "setup failed" in rows[0]["error"] and "needs 99 GB" in rows[0]["error"]
    assert rows[0]["ours_s"] is None and rows[0]["ratio"] is None


def test_moe_case_runs_in_one_inference_mode_and_leaves_it():
    """The batch-1 MoE case times the layer inside one inference mode entered by its setup (as a
    model's layers run), leaves it in teardown, and the shared cache flusher's buffer stays a
    normal tensor (usable by the cases after it, outside inference mode)."""
    import leankernels._bench.timing as timing
    from leankernels._bench import nn as bnn
    flusher = timing.LLCFlusher(1 << 20)
    case = bnn.moe_decode_case(True)
    case.rotate = flusher
    seen = []
    ours = case.ours
    case.ours = lambda: (seen.append(torch.is_inference_mode_enabled()), ours())[1]
    cfg = TimingConfig(warmup=0, min_reps=3, max_reps=3, budget_s=0.01)
    rows = runner.run_case(case, "cpu", cfg, None, _ceil())
    assert rows and all(r["error"] is None and r["check"] is True for r in rows), [(r["error"], r["check"], r.get("check_error")) for r in rows]
    assert seen and all(seen) and not torch.is_inference_mode_enabled()
    assert flusher.buffer is not None and not flusher.buffer.is_inference()
    flusher()  # in place, outside inference mode


@pytest.mark.parametrize("changed", [False, True])
def test_train_case_requantizes_only_when_weights_changed(changed, monkeypatch):
    """The train cases: "weights unchanged" reuses the FP8 weight copies between calls (no weight
    quantization), "weights changed" marks the parameters modified so every call quantizes all
    four expert weights (routed w13, w2; shared gate_up, down) as after an optimizer step."""
    import leankernels.nn.layers as layers
    from leankernels._bench import train as btrain
    calls = []
    quantize = layers.quantize_fp8
    monkeypatch.setattr(layers, "quantize_fp8", lambda *a, **k: (calls.append(1), quantize(*a, **k))[1])
    st = btrain.MoeTrainStep(btrain.QUICK, 64, "cpu", weights_changed=changed)
    st.setup()
    st.run_ours()
    calls.clear()
    for _ in range(2):
        st.run_ours()
    assert len(calls) == (8 if changed else 0)
    assert st.check()
    st.teardown()


def test_rows_rates_and_ceiling():
    cfg = TimingConfig(warmup=0, min_reps=3, max_reps=5, budget_s=0.01)
    rows = runner.run_case(_case(flops=2e9, bound="compute"), "cpu", cfg, None, _ceil())
    (r,) = rows
    assert r["ceiling"] == "bf16_matmul" and r["check"] is True
    assert math.isclose(r["tflops"], 2e9 / r["ours_s"] / 1e12)
    assert math.isclose(r["pct_ceiling"], 100 * r["tflops"] / 1.0)
    assert math.isclose(r["intensity"], 2e9 / 1e6)


def test_run_case_calls_per_sample():
    """Case.calls: each sample runs ours and every baseline that many times; times are per call."""
    cfg = TimingConfig(warmup=1, min_reps=3, max_reps=5, budget_s=0.01)
    count = {"ours": 0, "base": 0}

    def ours():
        count["ours"] += 1
        time.sleep(0.001)

    def base():
        count["base"] += 1
        time.sleep(0.002)

    (r,) = runner.run_case(_case(ours=ours, baselines={"b": base}, calls=4), "cpu", cfg, None, _ceil())
    assert r["calls_per_sample"] == 4
    assert count["ours"] % 4 == 0 and count["base"] % 4 == 0
    assert count["ours"] == 4 * (cfg.warmup + r["ours_reps"]) and count["base"] == 4 * (cfg.warmup + r["baseline_reps"])
    assert 0.001 <= r["ours_s"] < 0.004 and 0.002 <= r["baseline_s"] < 0.008  # per call, not per 4 calls
    assert 1.0 < r["ratio"] < 4.0


def test_run_case_min_reps():
    """Case.min_reps raises the run's minimum (and maximum) sample count for that case only."""
    cfg = TimingConfig(warmup=1, min_reps=3, max_reps=5, budget_s=0.001)

    def slow():
        time.sleep(0.002)

    (few,) = runner.run_case(_case(ours=slow, baselines={"b": slow}), "cpu", cfg, None, _ceil())
    (many,) = runner.run_case(_case(ours=slow, baselines={"b": slow}, min_reps=9), "cpu", cfg, None, _ceil())
    assert few["ours_reps"] < 9 and many["ours_reps"] >= 9 and many["baseline_reps"] >= 9
    assert cfg.min_reps == 3 and cfg.max_reps == 5


def test_missing_and_broken_domains(monkeypatch):
    status, reason, cases = runner.load_cases("no_such_domain", "cpu", True)
    assert status == "skipped" and cases == [] and "no_such_domain" in reason
    broken = types.ModuleType("leankernels._bench.zz_broken")

    def cases_fn(device, quick):
        raise ValueError("cannot build")

    broken.cases = cases_fn
    monkeypatch.setitem(sys.modules, "leankernels._bench.zz_broken", broken)
    status, reason, cases = runner.load_cases("zz_broken", "cpu", True)
    assert status == "error" and "cannot build" in reason


def test_write_json_is_strict(tmp_path):
    p = tmp_path / "x.json"
    report.write_json(str(p), {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_plot(tmp_path, quick_run):
    _, results, _, _ = quick_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="matplotlib"):
            report.plot_roofline(results, str(tmp_path / "r.png"))
        return
    report.plot_roofline(results, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_domain_argument():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args([]).domain == "all"
    assert parser.parse_args(["--domain", "quant,gemm,quant"]).domain == "quant,gemm"
    assert parser.parse_args(["--domain", "mla,all"]).domain == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["--domain", "nope"])


def test_gpu_suite_script_parses():
    import pathlib
    import shutil
    import subprocess
    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.sh"
    assert script.exists()
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_matmul_ceiling_stops_growing_sizes_once_a_call_is_slow(monkeypatch):
    """A ceiling matmul over _SLOW_CALL_S per call at one size (torch's bf16 on a CPU without
    bf16 instructions) does not go on to the next, 8x larger size; a fast one tries every size."""
    from leankernels._bench import ceilings

    timed = []

    def fake_time_one(fn, device, config=None, flusher=None, seconds=None):
        n = len(timed)
        timed.append(n)
        return Measurement([seconds[n]] * 3)

    cfg = TimingConfig(warmup=0, min_reps=1, max_reps=1, budget_s=0.0)
    for secs, want_tried in (([0.1, 0.5, 2.0], 3), ([2.0, 0.5, 0.1], 1), ([0.5, 1.5, 0.1], 2)):
        timed.clear()
        monkeypatch.setattr(ceilings, "time_one",
                            lambda fn, device, config=None, flusher=None, s=secs: fake_time_one(fn, device, seconds=s))
        c = ceilings._matmul("cpu", torch.float32, (16, 32, 64), cfg, None)
        assert len(timed) == want_tried
        rates = [2.0 * n ** 3 / t / 1e12 for n, t in zip((16, 32, 64)[:want_tried], secs)]
        assert c.value == pytest.approx(max(rates))
        assert ("not run" in c.how) == (want_tried < 3), c.how
