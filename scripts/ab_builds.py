"""Compare two builds of the CPU FP8 GEMM in one process (a developer tool, not a test).

On a shared VM whose memory bandwidth drifts by 2x within minutes, two builds timed in two
processes differ by more than most kernel changes do. This loads the `_C` extension of two
package copies into one process under different module names, and times them in alternation
on the same operands, the last-level cache flushed before every call (as a decode step meets
its weights). It prints each build's median weight bytes/s and the median of the paired time
ratios (A's time / B's: above 1, B is faster).

    CUDA=OFF bash scripts/dev_build.sh && cp -r python/leankernels /tmp/a/   # build A
    # ... change the kernel ...
    CUDA=OFF bash scripts/dev_build.sh && cp -r python/leankernels /tmp/b/   # build B
    python scripts/ab_builds.py /tmp/a /tmp/b --rows 1,2,4,8 --kn 2048x2816,1408x2048

Cases: `--experts` groups of `--rows` rows each (grouped-contiguous layout) against random e4m3
weights [experts, N, K], bf16 output. Everything but the two `_C` modules comes from the
leankernels found on sys.path (run it from the checkout with PYTHONPATH=python). Two copies of
the same build gave paired ratios of 1.00-1.05 with 7 rounds on the 2-core VM: take 15 or
more, and repeat a run before trusting a few percent.
"""
from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import os
import statistics
import time


def load_extension(package_dir: str, name: str):
    """The `_C` extension under package_dir/leankernels, imported as module `name`._C."""
    found = glob.glob(os.path.join(package_dir, "leankernels", "_C*.so"))
    if not found:
        raise SystemExit(f"no leankernels/_C*.so under {package_dir}")
    loader = importlib.machinery.ExtensionFileLoader(f"{name}._C", found[0])
    spec = importlib.util.spec_from_loader(f"{name}._C", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="package copy A (a directory holding leankernels/_C*.so)")
    ap.add_argument("b", help="package copy B")
    ap.add_argument("--rows", default="1,2,4", help="rows per expert, comma-separated")
    ap.add_argument("--kn", default="2048x2816", help="KxN weight shapes, comma-separated")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--cpu", default="", help="CPU path both builds run (default: the best here)")
    args = ap.parse_args()

    import torch
    from leankernels import _ops
    from leankernels._bench.timing import LLC_FLUSH

    if args.threads:
        torch.set_num_threads(args.threads)
    builds = {"A": load_extension(args.a, "lk_ab_a"), "B": load_extension(args.b, "lk_ab_b")}
    for mod in builds.values():
        if args.cpu and not mod.set_cpu_path(args.cpu):
            raise SystemExit(f"--cpu {args.cpu}: not a CPU path this machine runs")
    g = torch.Generator().manual_seed(0)
    E = args.experts
    cases = []  # (label, weight bytes, {build: call})
    for kn in args.kn.split(","):
        K, N = (int(v) for v in kn.split("x"))
        w = torch.randint(0, 126, (E, N, K), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
        ws = torch.rand(E, -(-N // 128), -(-K // 128), generator=g) + 0.5
        for m in (int(v) for v in args.rows.split(",")):
            a, s = _ops.quantize_fp8_impl(torch.randn(E * m, K, generator=g).bfloat16(), 1, False)
            offs = torch.arange(1, E + 1, dtype=torch.int32) * m
            out = torch.empty(E * m, N, dtype=torch.bfloat16)
            ptrs = (a.data_ptr(), s.data_ptr(), w.data_ptr(), ws.data_ptr(), offs.data_ptr())
            calls = {}
            for label, mod in builds.items():
                def call(mod=mod, ptrs=ptrs, m=m, N=N, K=K, out=out, keep=(a, s, w, ws, offs)):
                    mod.fp8_gemm(1, *ptrs, E, E * m, N, K, out.data_ptr(), 1, -1, 0)
                calls[label] = call
            cases.append((f"K={K} N={N} {E}x{m} rows", E * N * K, calls))

    times = {(c[0], b): [] for c in cases for b in builds}
    for _ in range(args.rounds):
        for label, _, calls in cases:
            for b, call in calls.items():
                LLC_FLUSH()
                t0 = time.perf_counter()
                call()
                times[(label, b)].append(time.perf_counter() - t0)
    for label, nbytes, _ in cases:
        ta, tb = times[(label, "A")], times[(label, "B")]
        paired = statistics.median(x / y for x, y in zip(ta, tb))
        print(f"{label}: A {nbytes / statistics.median(ta) / 1e9:.1f} GB/s, "
              f"B {nbytes / statistics.median(tb) / 1e9:.1f} GB/s, paired A/B time {paired:.3f}")


if __name__ == "__main__":
    main()
