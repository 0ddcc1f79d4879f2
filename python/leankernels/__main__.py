"""Command line: python -m leankernels {info,demo,train,bench}."""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return platform.processor() or "unknown"
    keep = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"]
    return " ".join(k for k in keep if k in flags) or "none of avx2/avx512"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or "unknown"


def _nvcc_on_path() -> str:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return ""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError):
        return nvcc


def cmd_info(args) -> int:
    import torch

    import leankernels as lk

    info = lk.build_info()
    print(f"leankernels      {lk.__version__}  ({os.path.dirname(lk.__file__)})")
    print(f"torch            {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"python           {platform.python_version()}")
    print(f"CUDA kernels     {'built' if info['cuda'] else 'not built'}"
          + (f" for {info['cuda_archs']} with nvcc {info['nvcc_version']}" if info["cuda"] else ""))
    nvcc = _nvcc_on_path()
    print(f"nvcc on PATH     {nvcc or 'none'}")
    if lk.cuda_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device           {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.0f} GiB)")
    else:
        why = "no CUDA build" if not info["cuda"] else "no usable CUDA device or driver"
        print(f"device           none ({why}); ops run on the CPU kernels")
    print(f"CPU              {_cpu_model()}; features: {_cpu_features()}")
    forced = os.environ.get("LEANKERNELS_CPU", "").strip()
    print(f"CPU kernels      {lk.cpu_path()} ({'forced by LEANKERNELS_CPU' if forced else 'chosen by cpuid'}); "
          f"this CPU runs: {', '.join(lk.cpu_paths())}; build: {info['cpu_tune']}")
    print(f"threads          OpenMP {info['omp_max_threads'] if info['openmp'] else 'off'}, "
          f"torch {torch.get_num_threads()}, hardware {info['hardware_threads']}")
    if args.check and nvcc and not info["cuda"]:
        print("error: nvcc is on PATH but the CUDA kernels were not built", file=sys.stderr)
        return 1
    if args.check and info["cuda"] and "90a" not in info["cuda_archs"]:
        print("error: CUDA kernels were built without sm_90a", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    if args.ep is not None:
        from ._demo.ep import main as ep_main

        return ep_main(args.ep, quick=args.quick)
    from ._demo import main

    return main(device=args.device, quick=args.quick, preset=args.preset, steps=args.steps, batch=args.batch,
                prompt=args.prompt, experts=args.experts, json_path=args.json, plot_path=args.plot, ops=args.ops,
                block=not args.no_block, fp8_cache=args.fp8_cache)


def cmd_train(args) -> int:
    from ._train import main

    r = main(quick=args.quick, steps=args.steps, json_path=args.json, plot_path=args.plot, layers_n=args.layers,
             batch=args.batch, seq=args.seq, lr=args.lr, balance_rate=args.balance_rate, seed=args.seed)
    if not math.isfinite(r["fp8"]["held_out_loss"]):
        print("error: the FP8 run's loss is not finite", file=sys.stderr)
        return 1
    if args.check:
        from ._train import acceptance

        failures = acceptance(r)
        for f in failures:
            print(f"check failed: {f}", file=sys.stderr)
        if failures:
            return 1
        print("check passed: FP8 held-out loss within 3% of bf16's; bias updates narrow the expert load")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m leankernels", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="build and device facts")
    pi.add_argument("--check", action="store_true", help="exit 1 if nvcc exists but CUDA kernels were not built")
    pd = sub.add_parser("demo", help="the main job on the best device present")
    pd.add_argument("--device", choices=["cpu", "cuda"], default=None)
    pd.add_argument("--quick", action="store_true", help="smaller shapes")
    pd.add_argument("--preset", choices=["cpu", "gpu", "v3", "small"], default=None,
                    help="block dimensions: the device's preset by default (cpu: hidden 1024, 16 heads, 64 experts "
                         "top-6; gpu: hidden 4096, 32 heads); v3 = DeepSeek-V3's real layer (GPU); small = old name of cpu")
    pd.add_argument("--steps", type=int, default=None, help="decode steps")
    pd.add_argument("--batch", type=int, default=None, help="sequences decoded together")
    pd.add_argument("--prompt", type=int, default=None, help="prompt (prefill) tokens per sequence")
    pd.add_argument("--experts", type=int, default=None, help="routed experts (e.g. fewer for memory with --preset v3)")
    pd.add_argument("--fp8-cache", action="store_true", help="run the block on FlashMLA's FP8 latent cache (656 B/token)")
    pd.add_argument("--json", metavar="FILE", default=None, help="write the figures as JSON")
    pd.add_argument("--plot", metavar="FILE.png", default=None, help="draw the figures (needs matplotlib)")
    pd.add_argument("--ops", action="store_true", help="also run the per-domain op sections (quant, gemm, routing, mla)")
    pd.add_argument("--ep", type=int, default=None, metavar="N",
                    help="expert parallelism instead: the MoE layer over N ranks (N CPU processes on gloo, "
                         "or under torchrun with NCCL on GPUs), checked against the single-process layer")
    pd.add_argument("--no-block", action="store_true", help="skip the decoder-block job (with --ops: op sections only)")
    pt = sub.add_parser("train", help="train a small DeepSeek-style LM in FP8 and bf16 side by side (CPU or GPU)")
    pt.add_argument("--quick", action="store_true", help="a short run (200 steps of 8 x 128 bytes; about a minute per run on 2 CPU cores)")
    pt.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 600, --quick 200)")
    pt.add_argument("--layers", type=int, default=None, help="decoder blocks (default 2)")
    pt.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    pt.add_argument("--seq", type=int, default=None, help="bytes per sequence (default 256, --quick 128)")
    pt.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (warm-up, cosine decay)")
    pt.add_argument("--balance-rate", type=float, default=1e-2,
                    help="selection-bias update per step (DeepSeek's aux-loss-free balancing); 0 disables")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--check", action="store_true",
                    help="exit 1 unless FP8's held-out loss is within 3%% of bf16's and balancing narrows the load")
    pt.add_argument("--json", metavar="FILE", default=None, help="write loss curves and figures as JSON")
    pt.add_argument("--plot", metavar="FILE.png", default=None, help="draw the curves (needs matplotlib)")
    try:
        from ._bench import cli as bench_cli
    except ImportError:
        bench_cli = None
    if bench_cli is not None:
        pb = sub.add_parser("bench", help="benchmarks against baselines, with measured ceilings")
        bench_cli.add_arguments(pb)
    args = p.parse_args(argv)
    if args.cmd == "info":
        return cmd_info(args)
    if args.cmd == "demo":
        return cmd_demo(args)
    if args.cmd == "train":
        return cmd_train(args)
    return bench_cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
