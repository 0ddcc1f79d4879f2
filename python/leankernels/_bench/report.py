"""Rendering of benchmark results: the printed table, markdown, JSON and the roofline plot.

Also a small command line to re-render a saved JSON (e.g. after a suite hit its time limit)::

    python -m leankernels._bench.report results.json [--markdown table.md] [--plot roofline.png]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

from .timing import fmt_num, fmt_ratio, fmt_time

COLUMNS = ("case", "shape", "ours", "baseline", "baseline time", "ratio", "TFLOP/s", "GB/s",
           "% of ceiling", "check")


def _check(row: dict) -> str:
    c = row.get("check")
    if row.get("error"):
        return "ERROR"
    return "-" if c is None else ("pass" if c else "FAIL")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


def table_cells(rows: list[dict]) -> list[list[str]]:
    """One list of strings per row, in COLUMNS order. The rates and % are ours; the ratio is
    baseline time / our time (> 1: we are faster)."""
    out = []
    for r in rows:
        pct = _pct(r.get("pct_ceiling"))
        if r.get("ceiling") and pct != "-":
            pct += " " + _short_ceiling(r["ceiling"])
        out.append([
            r["case"], r["shape"], fmt_time(r.get("ours_s")), r.get("baseline") or "-",
            fmt_time(r.get("baseline_s")), fmt_ratio(r.get("ratio")),
            fmt_num(r.get("tflops")) if r.get("flops") else "-",
            fmt_num(r.get("gbs")) if r.get("bytes") else "-",
            pct, _check(r),
        ])
    return out


def _short_ceiling(name: str) -> str:
    return {"copy": "copy", "bf16_matmul": "bf16", "fp32_matmul": "fp32", "fp8_matmul": "fp8"}.get(name, name)


def format_ceilings(results: dict) -> str:
    lines = []
    for c in results.get("ceilings", {}).values():
        lines.append(f"  {c['name']:<12} {fmt_num(c['value']):>8} {c['unit']:<8} {c['how']}")
    return "\n".join(lines)


def format_header(results: dict) -> str:
    from .runner import device_label
    env = results.get("env", {})
    lines = [f"device: {device_label(env)}",
             f"torch {env.get('torch')}, leankernels {env.get('leankernels')}, python {env.get('python')}; "
             f"torch threads {env.get('torch_threads')}, OpenMP threads {env.get('omp_max_threads')}; "
             f"{env.get('date_utc')}"]
    t = results.get("timing", {})
    if t:
        slow = t.get("slow_call_s")
        lines.append(f"timing: {t.get('statistic')} of >= {t.get('min_reps')} runs after {t.get('warmup')} warm-up"
                     + (f" (a callable over {slow:g} s per call after it: 1 run)" if slow else "")
                     + f"; {t.get('method')}")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """The plain-text table printed by the CLI (aligned columns)."""
    rows = [list(COLUMNS)] + table_cells(results.get("rows", []))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    right = {2, 4, 5, 6, 7, 8}
    def fmt(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[1:]]
    lines += _domain_notes(results)
    return "\n".join(lines)


def _row_notes(results: dict) -> list[str]:
    """For cases that ask for it (extra["x_ceiling_note"]): our time as a multiple of the time
    to move the case's bytes at its memory ceiling (e.g. a layer against reading its weights)."""
    out, seen = [], set()
    ceil = results.get("ceilings", {})
    for r in results.get("rows", []):
        what = (r.get("extra") or {}).get("x_ceiling_note")
        key = (r["case"], r["shape"])
        if not what or key in seen or r.get("x_ceiling_time") is None:
            continue
        seen.add(key)
        c = ceil.get(r.get("ceiling"), {})
        out.append(f"{r['case']} {r['shape']}: {fmt_num(r['x_ceiling_time'])}x the time to read {what} "
                   f"({fmt_num(r['bytes'] / 1e6)} MB) at the {r['ceiling']} ceiling ({fmt_num(c.get('value'))} GB/s)")
    return out


def _domain_notes(results: dict) -> list[str]:
    out = _row_notes(results)
    for d, info in results.get("domains", {}).items():
        if info.get("status") != "ok":
            out.append(f"{d}: {info['status']}: {info.get('reason', '').splitlines()[0] if info.get('reason') else ''}")
        if info.get("not_run"):
            out.append(f"{d}: {len(info['not_run'])} case(s) not run (time limit --max-seconds): "
                       + "; ".join(info["not_run"]))
    return out


def markdown_table(results: dict, with_header: bool = True) -> str:
    """A markdown section: device / versions / date / command, ceilings, then the table."""
    from .runner import device_label
    env = results.get("env", {})
    lines = []
    if with_header:
        lines += [
            f"- Device: {device_label(env)}",
            f"- Threads: torch {env.get('torch_threads')}, OpenMP {env.get('omp_max_threads')} "
            f"(of {env.get('cpu_count')} logical CPUs)" if env.get("device_type") == "cpu" else
            f"- Host CPU: {env.get('cpu')}",
            f"- torch {env.get('torch')}, leankernels {env.get('leankernels')}, python {env.get('python')}",
            f"- Date: {env.get('date_utc')}"
            + (f"; 1-minute load average at the start: {env['load_avg_1m']} "
               f"(on {env.get('cpu_count')} logical CPUs)" if env.get("load_avg_1m") is not None else ""),
            f"- Command: `{results.get('command')}`"
            + (f" (run as `{results['invocation']}`)" if results.get("invocation")
               and results["invocation"] != results.get("command") else ""),
            f"- Timing: {results.get('timing', {}).get('statistic', 'median')}; "
            f"{results.get('timing', {}).get('method', '')}",
            "",
            "Ceilings measured in the same run:",
            "",
            "| ceiling | value | what |",
            "| --- | ---: | --- |",
        ]
        for c in results.get("ceilings", {}).values():
            lines.append(f"| {c['name']} | {fmt_num(c['value'])} {c['unit']} | {c['how']} |")
        lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("| " + " | ".join("---:" if i in (2, 4, 5, 6, 7, 8) else "---" for i in range(len(COLUMNS))) + " |")
    for cells in table_cells(results.get("rows", [])):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    notes = _domain_notes(results)
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_json(path: str, results: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(sanitize(results), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    return str(o)


def sanitize(x):
    """NaN/Inf -> None, so the JSON is strict (json.dump(allow_nan=False))."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: sanitize(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sanitize(v) for v in x]
    return x


# ------------------------------------------------------------------------------ plot

def require_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib, which is not installed: "
                           "pip install 'leankernels[bench]' (or: pip install matplotlib)") from e


def plot_roofline(results: dict, path: str) -> None:
    """Roofline chart: arithmetic intensity (FLOP/byte) vs achieved TFLOP/s for cases that do
    arithmetic, ours (filled) and baselines (hollow), measured ceilings as lines. Pure data
    movement cases (0 FLOPs) go in a second panel: achieved GB/s against the copy ceiling."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    rows = results.get("rows", [])
    ceil = results.get("ceilings", {})
    compute_rows = [r for r in rows if r.get("flops") and r.get("bytes") and r.get("ours_s")]
    memory_rows = [r for r in rows if not r.get("flops") and r.get("bytes") and r.get("ours_s")]
    panels = (1 if compute_rows else 0) + (1 if memory_rows else 0) or 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 5.5), squeeze=False, layout="constrained")
    axes = list(axes[0])
    from .runner import device_label
    fig.suptitle(f"leankernels bench: {device_label(results.get('env', {}))}", fontsize=10)
    cmap = plt.get_cmap("tab10")
    markers = "sD^vP*X<>h"
    baseline_names = sorted({r["baseline"] for r in rows if r.get("baseline")})
    bmarker = {b: markers[i % len(markers)] for i, b in enumerate(baseline_names)}

    def case_key(r):
        return f"{r['case']} {r['shape']}"

    if compute_rows:
        ax = axes.pop(0)
        keys = list(dict.fromkeys(case_key(r) for r in compute_rows))
        color = {k: cmap(i % 10) for i, k in enumerate(keys)}
        ai = [r["intensity"] for r in compute_rows]
        bw = ceil.get("copy", {}).get("value")
        peaks = [c["value"] for c in ceil.values() if c["kind"] == "compute"]
        lo, hi = min(ai) / 4, max(ai) * 4
        if bw and peaks:  # show the ridge: where the copy line meets the best compute ceiling
            ridge = max(peaks) * 1e3 / bw
            lo, hi = min(lo, ridge / 8), max(hi, ridge * 4)
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        for name, c in ceil.items():
            if c["kind"] != "compute":
                continue
            ys = [min(c["value"], x * bw / 1e3) if bw else c["value"] for x in xs]
            ax.plot(xs, ys, "--", lw=1, color="gray")
            ax.text(xs[-1], c["value"], f" {name} {fmt_num(c['value'])} TFLOP/s", fontsize=7,
                    va="bottom", ha="right", color="dimgray")
        if bw:
            ax.text(xs[0], xs[0] * bw / 1e3, f" copy {fmt_num(bw)} GB/s", fontsize=7, color="dimgray",
                    va="bottom", rotation=0)
        done = set()
        for r in compute_rows:
            k = case_key(r)
            if k not in done:
                ax.scatter(r["intensity"], r["tflops"], color=color[k], marker="o", s=36, label=f"ours: {k}", zorder=3)
                done.add(k)
            if r.get("baseline_tflops"):
                ax.scatter(r["intensity"], r["baseline_tflops"], facecolors="none", edgecolors=color[k],
                           marker=bmarker[r["baseline"]], s=36, zorder=3)
        for b, m in bmarker.items():
            if any(r.get("baseline") == b for r in compute_rows):
                ax.scatter([], [], facecolors="none", edgecolors="black", marker=m, label=f"baseline: {b}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte of minimal DRAM traffic)")
        ax.set_ylabel("achieved TFLOP/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
        ax.set_title("compute cases (roofline)", fontsize=9)

    if memory_rows:
        ax = axes.pop(0)
        keys = list(dict.fromkeys(case_key(r) for r in memory_rows))
        ys = {k: i for i, k in enumerate(keys)}
        done = set()
        for r in memory_rows:
            k = case_key(r)
            if k not in done:
                ax.scatter(r["gbs"], ys[k], color="tab:blue", marker="o", s=40, zorder=3,
                           label="ours" if not done else None)
                done.add(k)
            if r.get("baseline_gbs"):
                ax.scatter(r["baseline_gbs"], ys[k], facecolors="none", edgecolors="tab:red",
                           marker=bmarker[r["baseline"]], s=40, zorder=3)
        for b, m in bmarker.items():
            if any(r.get("baseline") == b for r in memory_rows):
                ax.scatter([], [], facecolors="none", edgecolors="tab:red", marker=m, label=f"baseline: {b}")
        bw = ceil.get("copy", {}).get("value")
        if bw:
            ax.axvline(bw, ls="--", color="gray", lw=1)
            ax.text(bw, len(keys) - 0.5, f"copy ceiling {fmt_num(bw)} GB/s ", fontsize=7, ha="right", color="dimgray")
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels(keys, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("achieved GB/s (minimal DRAM bytes / time)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("data-movement cases (0 FLOPs): bandwidth vs the copy ceiling", fontsize=9)
        ax.set_ylim(-0.7, len(keys) - 0.3)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------ re-render CLI

def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leankernels._bench.report",
                                description="Render a saved `leankernels bench --json` file.")
    p.add_argument("json", help="results JSON written by `python -m leankernels bench --json`")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown section (header, ceilings, table)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the roofline chart")
    a = p.parse_args(argv)
    with open(a.json) as f:
        results = json.load(f)
    print(format_header(results))
    print(format_ceilings(results))
    print(format_table(results))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown_table(results))
    if a.plot:
        try:
            plot_roofline(results, a.plot)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
