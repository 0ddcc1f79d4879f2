"""`python -m leankernels bench`: the benchmark command line.

    python -m leankernels bench [--domain quant|gemm|routing|mla|nn|train|all] [--device cpu|cuda]
                                [--quick] [--json FILE] [--plot FILE.png] [--markdown FILE]

Measures the device's ceilings, then times every case of the chosen domains against its
baselines in the same process and prints one table. Exit status: 0 when every case ran and
every correctness check passed, 1 otherwise, 2 for a usage problem.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import report, runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", default="all", type=_domains, metavar="{%s,all}" % ",".join(runner.DOMAINS),
                        help="which cases to run, or a comma-separated list (default: all; domains "
                             "whose module is not available are reported as skipped)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when leankernels has CUDA kernels and a GPU is visible, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repetitions: a smoke test (seconds), not figures to quote")
    parser.add_argument("--json", metavar="FILE",
                        help="write everything (rows, ceilings, device, versions, date, command) as JSON; "
                             "rewritten after every case, so a run that is cut off leaves what it measured")
    parser.add_argument("--plot", metavar="FILE.png", help="draw a roofline chart (needs matplotlib)")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as a markdown section")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S",
                        help="start no case after S seconds (the cases left are listed as not run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _domains(text: str) -> str:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in runner.DOMAINS + ("all",)]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown domain {', '.join(bad) or text!r}; choose from "
                                         f"{', '.join(runner.DOMAINS)} or all")
    return "all" if "all" in names else ",".join(dict.fromkeys(names))


def _command(args) -> str:
    parts = ["python -m leankernels bench"]
    if args.domain != "all":
        parts += ["--domain", args.domain]
    if args.device:
        parts += ["--device", args.device]
    if args.quick:
        parts.append("--quick")
    if getattr(args, "max_seconds", None):
        parts += ["--max-seconds", f"{args.max_seconds:g}"]
    for flag in ("json", "plot", "markdown"):
        v = getattr(args, flag, None)
        if v:
            parts += [f"--{flag}", shlex.quote(v)]
    return " ".join(parts)


def _invocation() -> str:
    """How this process was really started (the module form, argv, PYTHONPATH if set)."""
    argv0 = sys.argv[0].replace(os.sep, "/") if sys.argv else ""
    rest = [shlex.quote(a) for a in sys.argv[1:]]
    if argv0.endswith("leankernels/_bench/cli.py"):
        cmd = ["python -m leankernels._bench.cli"] + rest
    elif argv0.endswith("leankernels/__main__.py"):
        cmd = ["python -m leankernels"] + rest
    else:
        cmd = [shlex.quote(a) for a in sys.argv] or ["python"]
    pp = os.environ.get("PYTHONPATH")
    return (f"PYTHONPATH={shlex.quote(pp)} " if pp else "") + " ".join(cmd)


def main(args) -> int:
    device = args.device or runner.default_device()
    domains = list(runner.DOMAINS) if args.domain == "all" else args.domain.split(",")
    if args.plot:
        try:
            report.require_matplotlib()
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if device == "cuda":
        import torch
        import leankernels
        if not torch.cuda.is_available():
            print("error: --device cuda: torch sees no CUDA device", file=sys.stderr)
            return 2
        if not leankernels.build_info().get("cuda"):
            print("error: --device cuda: this leankernels build has no CUDA kernels "
                  "(rebuild with nvcc on PATH)", file=sys.stderr)
            return 2
    for path in (args.json, args.plot, args.markdown):
        d = os.path.dirname(os.path.abspath(path)) if path else None
        if d and not os.path.isdir(d):
            print(f"error: directory {d} does not exist (for {path})", file=sys.stderr)
            return 2

    def on_ceilings(results):
        print(report.format_header(results))
        print("ceilings (measured now):")
        print(report.format_ceilings(results), flush=True)

    def on_update(results):
        if args.json:
            report.write_json(args.json, results)

    results = runner.run(domains, device, args.quick, progress=not getattr(args, "no_progress", False),
                         on_ceilings=on_ceilings, on_update=on_update, command=_command(args),
                         max_seconds=getattr(args, "max_seconds", None), invocation=_invocation())
    print()
    print(report.format_table(results))
    print("ratio = baseline time / our time (> 1: leankernels is faster); TFLOP/s, GB/s and % of ceiling "
          "are ours (FLOPs and minimal DRAM bytes of the op / median time)")
    bad = runner.failures(results)
    results["failures"] = bad
    if args.json:
        report.write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown_table(results))
        print(f"wrote {args.markdown}")
    if args.plot:
        report.plot_roofline(results, args.plot)
        print(f"wrote {args.plot}")
    if bad:
        print("\nPROBLEMS:", file=sys.stderr)
        for b in bad:
            print(f"  {b}", file=sys.stderr)
        return 1
    return 0


def run_standalone(argv=None) -> int:
    """Entry point when the lead's __main__ is not wired yet: python -m leankernels._bench.cli"""
    p = argparse.ArgumentParser(prog="python -m leankernels bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_standalone())
