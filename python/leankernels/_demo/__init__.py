"""`python -m leankernels demo`: the main job, on the best device present.

The default run builds a DeepSeek-V3-shaped decoder block (MLA + MoE, scaled to the device;
``preset="v3"`` for the real dimensions) on leankernels ops and the same block in plain
PyTorch with the same weights, prefills, decodes N steps with a progress bar, checks the
outputs against each other and prints a table (time per decode token against the plain block,
tokens/s, KV-cache bytes, weight bytes, active parameters). With ``ops=True`` the per-domain
sections (quant, gemm, routing, mla: modules exposing ``run(device, quick) -> list[dict]``)
follow. The demo fails (exit 1) when any check fails.
"""
from __future__ import annotations

import importlib
import json
import sys
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


def main(device: str | None = None, quick: bool = False, sections=None, preset: str | None = None,
         steps: int | None = None, batch: int | None = None, prompt: int | None = None,
         experts: int | None = None, json_path: str | None = None, plot_path: str | None = None,
         ops: bool = False, block: bool = True, fp8_cache: bool = False) -> int:
    import leankernels

    from . import block as block_demo

    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib, or leankernels[bench])", file=sys.stderr)
            return 2
    if device is None:
        device = "cuda" if leankernels.cuda_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"leankernels {leankernels.__version__} demo on {device} ({name})", flush=True)
    ok = True
    figures = {"version": leankernels.__version__, "device": device, "device_name": name}
    if block:
        t0 = time.perf_counter()
        r = block_demo.run(device, quick, preset, steps, batch, prompt, experts, fp8_cache=fp8_cache)
        cfg = r["config"]
        title = (f"[block] DeepSeek-V3-shaped decoder block ({r['preset']}: hidden {cfg['hidden_size']}, "
                 f"{cfg['num_attention_heads']} heads, q_lora {cfg['q_lora_rank']}, kv_lora {cfg['kv_lora_rank']}, "
                 f"{cfg['n_routed_experts']} experts x {cfg['moe_intermediate_size']} top-{cfg['num_experts_per_tok']}, "
                 f"{cfg['scoring_func']}) ({time.perf_counter() - t0:.1f} s)")
        print_table(block_demo.rows(r), title)
        print(block_demo.legend(r))
        figures["block"] = r
        ok &= r["check"]["passed"]
        if plot_path:
            block_demo.plot(r, plot_path)
            print(f"plot written to {plot_path}")
    if ops or sections:
        figures["ops"] = {}
        for sec in sections or SECTIONS:
            try:
                mod = importlib.import_module(f"leankernels._demo.{sec}")
            except ModuleNotFoundError:
                continue
            t0 = time.perf_counter()
            rows = mod.run(device, quick)
            print_table(rows, f"[{sec}] ({time.perf_counter() - t0:.1f} s)")
            figures["ops"][sec] = rows
            ok &= all(r.get("check", True) is not False for r in rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2, default=str)
        print(f"figures written to {json_path}")
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1
