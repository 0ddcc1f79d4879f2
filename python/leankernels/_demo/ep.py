"""`python -m leankernels demo --ep N`: a DeepSeek-style MoE layer with expert parallelism.

N ranks (N CPU processes on gloo over loopback, or the processes of ``torchrun --nproc-per-node
N -m leankernels demo --ep N``: NCCL when CUDA is present) each own E/N experts. Every rank
routes its own tokens (uneven counts) through the EP layer (``MoE.from_float(plain_moe,
ep_group=...)``: dispatch FP8 rows -> local grouped GEMMs -> combine), and through the
single-process layer (all experts, ``MoE.from_float(plain_moe)``) on the same tokens: the check.
Printed per rank: tokens, expert load (rows per local expert), and bytes on the wire per token,
measured from the buffers dispatch and combine sent: FP8 rows + scales ("ours") against the
same exchange with bf16 rows ("baseline", dispatch(quantize=False) on the same tokens).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from . import print_table
from .gemm import _diff

BOUND = 1e-4   # DeepGEMM diff, EP vs single-process layer (bf16 output rounded per rank: ~1e-6)


def _config(world: int, quick: bool):
    from leankernels.nn import DeepSeekConfig

    E = 8 * world
    return DeepSeekConfig(hidden_size=256 if quick else 1024, num_attention_heads=4, q_lora_rank=128,
                          n_routed_experts=E, n_shared_experts=1, moe_intermediate_size=128 if quick else 256,
                          num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=256)


def _plain_moe(cfg, device):
    from leankernels.nn import plain

    with torch.device("meta"):
        moe = plain.PlainMoE(cfg)
    moe = moe.to_empty(device=device)
    moe.gate.float()
    return plain.init_block_(moe, seed=0)


def _time(fn, reps: int) -> float:
    """Best of reps (the ranks start each rep together; a shared CPU makes the median noisy)."""
    best = float("inf")
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rank_job(rank: int, world: int, quick: bool, device: str) -> dict:
    """One rank's part: build both layers, run, check, measure. Returns the figures."""
    import leankernels.distributed as lkd
    from leankernels.nn import MoE

    cfg = _config(world, quick)
    pm = _plain_moe(cfg, device)
    ep = MoE.from_float(pm, ep_group=dist.group.WORLD)
    single = MoE.from_float(pm)
    tokens = [(48 if quick else 192) + 40 * r for r in range(world)]     # uneven
    T = tokens[rank]
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(100 + rank)).to(device, torch.bfloat16)
    with torch.no_grad():
        got = ep(x)
        h = ep.last_handle
        want = single(x)
        weights, ids = ep.route(x)
        _, h16 = lkd.dispatch(x, weights, ids, cfg.n_routed_experts, quantize=False)   # the bf16 wire
        ep.capacity = max(tokens)   # fixed-capacity mode with room for every token: equals exact mode
        got_cap = ep(x)
        dropped = int(h.dropped.sum()) + int(ep.last_handle.dropped.sum())
        ep.capacity = None
        reps = 2 if quick else 3
        t_ep = _time(lambda: ep(x), reps)
        t_single = _time(lambda: single(x), reps)
    diff = float(_diff(got, want))
    wire = dict(h.wire)
    return {
        "rank": rank, "tokens": T, "local_experts": ep.w13.shape[0],
        "load": h.counts.tolist(), "received": h.received, "rows_sent": wire["rows_sent"],
        "wire": wire, "wire_bf16": dict(h16.wire), "diff": diff, "capacity_equal": bool(torch.equal(got_cap, got)),
        "dropped": dropped, "t_ep": t_ep, "t_single": t_single, "hidden": cfg.hidden_size,
        "top_k": cfg.num_experts_per_tok, "experts": cfg.n_routed_experts,
    }


def _dispatch_bytes(w: dict) -> int:
    return sum(w.get(k, 0) for k in ("rows", "scales", "routing", "counts"))


def rows(results: list) -> list[dict]:
    out = []
    for r in results:
        T = max(1, r["tokens"])
        ours, base = _dispatch_bytes(r["wire"]) / T, _dispatch_bytes(r["wire_bf16"]) / T
        per_row = (r["wire"]["rows"] + r["wire"]["scales"]) / max(1, r["rows_sent"])
        per_row16 = r["wire_bf16"]["rows"] / max(1, r["rows_sent"])
        ok = r["diff"] < BOUND and r["capacity_equal"] and r["dropped"] == 0
        out.append({
            "what": f"rank {r['rank']}: {r['tokens']} tokens, experts {r['rank'] * r['local_experts']}.."
                    f"{(r['rank'] + 1) * r['local_experts'] - 1}",
            "ours": f"dispatch {ours:.0f} B/token (FP8 row+scales {per_row:.0f} B)",
            "baseline": f"bf16 dispatch {base:.0f} B/token (row {per_row16:.0f} B)",
            "ratio": f"{base / ours:.2f}x fewer bytes" if ours else "-",
            "detail": f"load {r['load']} rows/local expert; {r['rows_sent']} rows out, {r['received']} in, returned by "
                      f"combine at {r['wire']['combine_rows'] // max(1, r['received'])} B/row (bf16); EP layer "
                      f"{r['t_ep'] * 1e3:.1f} ms, "
                      f"single-process {r['t_single'] * 1e3:.1f} ms",
            "check": ok,
        })
    return out


def _print(results: list, world: int, backend: str, quick: bool, seconds: float) -> bool:
    r0 = results[0]
    title = (f"[ep] MoE layer over {world} ranks ({backend}): {r0['experts']} experts, top-{r0['top_k']}, "
             f"hidden {r0['hidden']}, {r0['local_experts']} experts per rank ({seconds:.1f} s)")
    print_table(rows(results), title)
    print("ours: bytes dispatch sent per token of this rank (FP8 rows + 1x128 scales + routing ids/weights + counts; "
          "rows to its own experts included), measured from the buffers passed to all_to_all_single; baseline: the "
          "same dispatch with bf16 rows (dispatch(quantize=False) on the same tokens); combine returns bf16 rows "
          "either way (detail). check: EP layer output vs the single-process "
          f"layer (all experts) on this rank's tokens, DeepGEMM diff < {BOUND:g} (worst: "
          f"{max(r['diff'] for r in results):.1e}), fixed-capacity mode equal to exact mode, nothing dropped. "
          "Times: best of a few, all ranks sharing this machine's cores; not a speed claim.")
    return all(row["check"] for row in rows(results))


def _torchrun_job(world: int, quick: bool) -> int:
    import leankernels

    cuda = torch.cuda.is_available() and leankernels.cuda_available()
    backend = "nccl" if cuda else "gloo"
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend)
    try:
        if dist.get_world_size() != world:
            raise SystemExit(f"--ep {world} but torchrun started {dist.get_world_size()} processes")
        t0 = time.perf_counter()
        mine = rank_job(rank, world, quick, "cuda" if cuda else "cpu")
        results = [None] * world
        dist.all_gather_object(results, mine)
        ok = True
        if rank == 0:
            ok = _print(results, world, backend, quick, time.perf_counter() - t0)
            print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


def main(world: int, quick: bool = False) -> int:
    import leankernels
    from leankernels.distributed import launch_local

    if world < 1:
        print("error: --ep needs at least 1 rank")
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _torchrun_job(world, quick)
    print(f"leankernels {leankernels.__version__} demo --ep {world}: {world} CPU processes on gloo (loopback)",
          flush=True)
    t0 = time.perf_counter()
    results = launch_local(rank_job, world, args=(quick, "cpu"), timeout=600.0)
    ok = _print(results, world, "gloo", quick, time.perf_counter() - t0)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1
