"""The benchmark runner: ceilings first, then every case of every domain, ours and baselines
timed interleaved in the same process on the same inputs.

Library use::

    from leankernels._bench import runner
    results = runner.run(["quant"], device="cpu", quick=True)
    results["rows"]  # one dict per (case, baseline)
"""
from __future__ import annotations

import dataclasses

import datetime as _dt
import importlib
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Iterable, Optional

import torch

from . import ceilings as _ceilings
from .case import Case
from .timing import L2Flusher, Measurement, TimingConfig, time_callables

DOMAINS = ("quant", "gemm", "routing", "mla", "nn", "train")


# ------------------------------------------------------------------------------ environment

def default_device() -> str:
    try:
        import leankernels
        return "cuda" if leankernels.cuda_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(query: str) -> Optional[str]:
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(device: str) -> dict:
    """Everything needed to judge and reproduce a table: device, versions, threads, date."""
    import leankernels
    try:
        info = dict(leankernels.build_info())
    except Exception as e:  # noqa: BLE001
        info = {"error": str(e)}
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_max_threads": info.get("omp_max_threads"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "leankernels": getattr(leankernels, "__version__", "?"),
        "build": info,
        "platform": platform.platform(),
    }
    try:  # a busy machine slows every figure; say how busy it was
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        pass
    if device.startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env.update({
            "device": torch.cuda.get_device_name(dev),
            "compute_capability": "%d.%d" % torch.cuda.get_device_capability(dev),
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1),
            "cuda_runtime": torch.version.cuda,
            "driver": _nvidia_smi("driver_version"),
        })
    else:
        env["device"] = f"{env['cpu']} ({env['torch_threads']} torch threads, " \
                        f"{env['omp_max_threads']} OpenMP threads)"
    return env


def device_label(env: dict) -> str:
    if env.get("device_type") == "cuda":
        bits = [env.get("device", "GPU"), f"sm_{env.get('compute_capability', '?').replace('.', '')}",
                f"driver {env.get('driver') or '?'}", f"CUDA {env.get('cuda_runtime')}"]
        return ", ".join(bits)
    return env.get("device", "cpu")


# ------------------------------------------------------------------------------ loading cases

def load_cases(domain: str, device: str, quick: bool) -> tuple[str, str, list[Case]]:
    """(status, reason, cases): status is "ok", "skipped" (module or its op not available) or
    "error" (the module is there but building its cases failed)."""
    modname = f"leankernels._bench.{domain}"
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        return "skipped", f"{modname} not available ({type(e).__name__}: {e})", []
    fn = getattr(mod, "cases", None)
    if fn is None:
        return "skipped", f"{modname} has no cases(device, quick)", []
    try:
        cases = list(fn(device, quick))
    except ImportError as e:
        return "skipped", f"{modname}.cases needs something missing ({type(e).__name__}: {e})", []
    except Exception as e:  # noqa: BLE001 - report, do not crash the other domains
        return "error", f"{modname}.cases failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}", []
    return "ok", "", cases


# ------------------------------------------------------------------------------ rows

def _rate(work: float, seconds: Optional[float], scale: float) -> Optional[float]:
    if not work or seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return work / seconds / scale


def _pct(case: Case, tflops, gbs, ceil) -> Optional[float]:
    if ceil is None:
        return None
    v = gbs if ceil.kind == "memory" else tflops
    return None if v is None else 100.0 * v / ceil.value


def make_rows(case: Case, ours: Optional[Measurement], base: dict, check, check_error, error,
              ceilings: dict, base_errors: Optional[dict] = None) -> list[dict]:
    ceil = _ceilings.ceiling_for(ceilings, case.bound, case.ceiling)
    ours_s = ours.median if ours is not None else None
    tflops = _rate(case.flops, ours_s, 1e12)
    gbs = _rate(case.bytes, ours_s, 1e9)
    common = {
        "domain": case.domain, "case": case.name, "shape": case.shape,
        "ours_s": ours_s, "ours_reps": ours.reps if ours is not None else 0,
        "ours_min_s": ours.min if ours is not None else None,
        "flops": case.flops, "bytes": case.bytes,
        "intensity": (case.flops / case.bytes) if case.flops and case.bytes else None,
        "bound": case.bound, "ceiling": ceil.name if ceil is not None else None,
        "tflops": tflops, "gbs": gbs, "pct_ceiling": _pct(case, tflops, gbs, ceil),
        # ours / the time to move `bytes` at the memory ceiling (1.3 = 1.3x the read time)
        "x_ceiling_time": (ceil.value / gbs) if (gbs and ceil is not None and ceil.kind == "memory") else None,
        "check": check, "check_error": check_error, "error": error,
        "calls_per_sample": max(1, int(getattr(case, "calls", 1) or 1)),
        "extra": _jsonable(case.extra),
    }
    rows = []
    names = list(case.baselines) or [None]
    for name in names:
        m = base.get(name) if name is not None else None
        b_s = m.median if m is not None else None
        b_tflops = _rate(case.flops, b_s, 1e12)
        b_gbs = _rate(case.bytes, b_s, 1e9)
        row = dict(common)
        row.update({
            "baseline": name, "baseline_s": b_s, "baseline_reps": m.reps if m is not None else 0,
            "ratio": (b_s / ours_s) if (b_s and ours_s) else None,
            "baseline_tflops": b_tflops, "baseline_gbs": b_gbs,
            "baseline_pct_ceiling": _pct(case, b_tflops, b_gbs, ceil),
        })
        if not row["error"] and base_errors and name in base_errors:
            row["error"] = base_errors[name]
        rows.append(row)
    return rows


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def run_case(case: Case, device: str, cfg: TimingConfig, flusher, ceilings: dict) -> list[dict]:
    if case.setup is not None:
        try:
            case.setup()
        except Exception as e:  # noqa: BLE001 - e.g. not enough memory: report, run the rest
            _teardown(case)
            return make_rows(case, None, {}, None, None, f"setup failed: {type(e).__name__}: {e}", ceilings)
    try:
        return _run_case(case, device, cfg, flusher, ceilings)
    finally:
        _teardown(case)


def _teardown(case: Case) -> None:
    if case.teardown is not None:
        case.teardown()


def _run_case(case: Case, device: str, cfg: TimingConfig, flusher, ceilings: dict) -> list[dict]:
    check, check_error = None, None
    if case.check is not None:
        try:
            check = bool(case.check())
        except Exception as e:  # noqa: BLE001
            check, check_error = False, f"{type(e).__name__}: {e}"
    calls = max(1, int(getattr(case, "calls", 1) or 1))
    if getattr(case, "min_reps", 0) > cfg.min_reps:
        cfg = dataclasses.replace(cfg, min_reps=case.min_reps, max_reps=max(cfg.max_reps, case.min_reps))

    def repeated(fn):
        if calls == 1:
            return fn

        def run():
            for _ in range(calls):
                fn()
        return run

    def per_call(m):
        return m if calls == 1 or m is None else Measurement([s / calls for s in m.samples])

    fns = [repeated(case.ours)] + [repeated(f) for f in case.baselines.values()]
    ours, base, error, base_errors = None, {}, None, {}
    try:
        ms = [per_call(m) for m in time_callables(fns, device, rotate=case.rotate, config=cfg, flusher=flusher)]
        ours = ms[0]
        base = dict(zip(case.baselines, ms[1:]))
    except Exception:  # noqa: BLE001 - one broken callable must not sink the table
        # find the culprit: time each callable on its own, keep what works
        def alone(fn):
            try:
                return per_call(time_callables([repeated(fn)], device, rotate=case.rotate, config=cfg,
                                               flusher=flusher)[0]), None
            except Exception as e:  # noqa: BLE001
                return None, f"{type(e).__name__}: {e}"
        ours, error = alone(case.ours)
        if error is not None:
            error = f"ours failed: {error}"
        for name, fn in case.baselines.items():
            m, err = alone(fn)
            if m is not None:
                base[name] = m
            else:
                base_errors[name] = f"baseline failed: {err}"
    return make_rows(case, ours, base, check, check_error, error, ceilings, base_errors)


# ------------------------------------------------------------------------------ progress

class Progress:
    """A carriage-return progress bar on stderr (one line per step when stderr is no TTY)."""

    def __init__(self, enabled: bool = True, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = width
        self.t0 = time.perf_counter()
        self._last_len = 0

    def update(self, frac: float, text: str) -> None:
        if not self.enabled:
            return
        frac = min(max(frac, 0.0), 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {100 * frac:3.0f}% {time.perf_counter() - self.t0:5.0f}s {text}"
        if self.tty:
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()


# ------------------------------------------------------------------------------ the run

def run(domains: Iterable[str], device: str, quick: bool, *, progress: bool = True,
        on_ceilings: Optional[Callable[[dict], None]] = None,
        on_update: Optional[Callable[[dict], None]] = None, command: Optional[str] = None,
        max_seconds: Optional[float] = None, invocation: Optional[str] = None) -> dict:
    """Measure ceilings, then run every case of ``domains``; returns the results dict (the
    --json payload). ``on_ceilings(results)`` fires once the ceilings are known, and
    ``on_update(results)`` after every case (to print or save partial results). With
    ``max_seconds``, cases that would start after that many seconds are not run (and listed as
    such), so a time-boxed suite ends with a complete table of what it did run."""
    t_start = time.perf_counter()
    domains = list(domains)
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    bar = Progress(progress)
    results = {
        "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
        "invocation": invocation or " ".join([os.path.basename(sys.executable)] + sys.argv),
        "quick": quick,
        "device": device,
        "env": environment(device),
        "timing": {},
        "ceilings": {},
        "domains": {},
        "rows": [],
    }
    cfg = TimingConfig.for_device(device, quick)
    flusher = L2Flusher(device) if cuda else None
    results["timing"] = {
        "method": ("CUDA events on the current stream; L2 flushed (%d MiB buffer overwritten) and inputs "
                   "rotated before every timed call" % (flusher.nbytes >> 20)) if cuda else
                  "wall clock (time.perf_counter) per call; inputs rotated before every call",
        "statistic": "median",
        "interleaved": "ours and the baselines of a case run round-robin in the same process",
        **{k: getattr(cfg, k) for k in ("warmup", "min_reps", "max_reps", "budget_s", "max_per_round",
                                          "slow_call_s")},
    }
    bar.update(0.0, "measuring ceilings")
    ceil = _ceilings.measure(device, quick, flusher=flusher)
    results["ceilings"] = {k: c.to_json() for k, c in ceil.items()}
    bar.close()
    if on_ceilings is not None:
        on_ceilings(results)

    n = max(1, len(domains))
    for di, domain in enumerate(domains):
        bar.update(di / n, f"{domain}: building cases")
        t0 = time.perf_counter()
        status, reason, cases = load_cases(domain, device, quick)
        results["domains"][domain] = {"status": status, "reason": reason, "cases": len(cases)}
        for ci, case in enumerate(cases):
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                info = results["domains"][domain]
                info["not_run"] = info.get("not_run", []) + [f"{case.name} {case.shape}"]
                continue
            bar.update((di + ci / max(1, len(cases))) / n, f"{domain} {ci + 1}/{len(cases)}: {case.name} {case.shape}")
            results["rows"].extend(run_case(case, device, cfg, flusher, ceil))
            cases[ci] = case = None   # free its inputs before the next case builds its own
            if on_update is not None:
                on_update(results)
        results["domains"][domain]["seconds"] = round(time.perf_counter() - t0, 2)
        del cases
        if cuda:
            torch.cuda.empty_cache()
        if on_update is not None:
            on_update(results)
    bar.update(1.0, "done")
    bar.close()
    return results


def failures(results: dict) -> list[str]:
    """Human-readable list of what went wrong (errors, failed checks, errored domains)."""
    out = []
    for d, info in results.get("domains", {}).items():
        if info.get("status") == "error":
            out.append(f"domain {d}: {info.get('reason', '').splitlines()[0]}")
    seen = set()
    for r in results.get("rows", []):
        key = (r["domain"], r["case"], r["shape"])
        if r.get("error"):
            out.append(f"{r['case']} {r['shape']} vs {r.get('baseline')}: {r['error']}")
        if r.get("check") is False and key not in seen:
            seen.add(key)
            out.append(f"{r['case']} {r['shape']}: correctness check failed"
                       + (f" ({r['check_error']})" if r.get("check_error") else ""))
    return out
