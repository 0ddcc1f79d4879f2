"""`python -m leankernels demo`: the main job, on the best device present.

Each domain contributes a section module (quant, gemm, routing, mla) exposing
``run(device, quick) -> list[dict]``; a section whose module is absent is skipped. Every row
carries its own correctness check against leankernels.reference; the demo fails (exit 1)
when any check fails.
"""
from __future__ import annotations

import importlib
import time

import torch

SECTIONS = ["quant", "gemm", "routing", "mla"]
COLUMNS = ["what", "ours", "baseline", "ratio", "detail", "check"]


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "ok" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def print_table(rows: list[dict], title: str) -> None:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(device: str | None = None, quick: bool = False, sections=None) -> int:
    import leankernels

    if device is None:
        device = "cuda" if leankernels.cuda_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"leankernels {leankernels.__version__} demo on {device} ({name})")
    ok = True
    for sec in sections or SECTIONS:
        try:
            mod = importlib.import_module(f"leankernels._demo.{sec}")
        except ModuleNotFoundError:
            continue
        t0 = time.perf_counter()
        rows = mod.run(device, quick)
        print_table(rows, f"[{sec}] ({time.perf_counter() - t0:.1f} s)")
        ok &= all(r.get("check", True) is not False for r in rows)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1
