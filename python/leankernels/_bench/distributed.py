"""Expert-parallel dispatch + combine on torch.distributed against a naive all_gather baseline.

Not a ``python -m leankernels bench`` domain: the runner times callables inside one process,
and this needs W processes. Run ``python bench/bench_distributed.py [--quick] [--ranks 2,4]``
(or ``pytest bench/bench_distributed.py``, the quick run with its checks).

Per world size W (W gloo processes on loopback, T tokens each, DeepSeek-V3 routing shape:
256 experts, top-8, random distinct ids; identity experts so that only the exchange is timed):
  ours:     dispatch(quantize=True) -> combine (FP8 + scales on the wire), exact mode; the same
            with capacity=T (fixed buffers), and with bf16 rows. Checked with identity experts
            (dequantize the received rows), timed without expert work (combine of a ready y);
  baseline: all_gather of every rank's x, ids and weights; each rank lays the tokens routed to
            its experts out by expert (plan + permute: the grouped GEMM's input, as dispatch's
            recv) and combines them back (unpermute, weighted) for all W*T tokens, then
            reduce_scatter returns each rank's sums (what EP looks like without an all-to-all).
Both compute out = x * sum of the routed weights (identity experts); the check compares them.
Both timed runs produce the per-expert row layout and combine from it (ours from a ready y). Times: per rank the
median over reps of (barrier, op), then the slowest rank; bytes: what one rank's buffers send to
the other ranks (rows for its own experts stay in memory), per token of that rank.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

E, TOP_K, V3_HIDDEN = 256, 8, 7168


def _inputs(rank: int, T: int, H: int):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, E, generator=g).topk(TOP_K, dim=1).indices.int()
    w = torch.rand(T, TOP_K, generator=g)
    return x, w, ids


def _timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _ours(x, w, ids, quantize: bool, capacity=None):
    import leankernels.distributed as lkd

    recv, h = lkd.dispatch(x, w, ids, E, quantize=quantize, capacity=capacity)
    rows = lkd.dequantize(recv, h) if quantize else recv
    return lkd.combine(rows, h), h


def _naive(x, w, ids, rank: int, W: int):
    """all_gather everything, lay the tokens routed to local experts out by expert (plan +
    permute, the grouped GEMM's input), combine them (unpermute with identity experts),
    reduce_scatter the partial sums back."""
    import leankernels as lk

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    T, H = x.shape
    xs = x.new_empty(W * T, H)
    ws, ids_all = w.new_empty(W * T, TOP_K), ids.new_empty(W * T, TOP_K)
    gather(xs, x)
    gather(ws, w)
    gather(ids_all, ids)
    El = E // W
    local = (ids_all.long() // El) == rank
    p = lk.plan(torch.where(local, ids_all - rank * El, -1).int(), El)
    part = lk.unpermute(lk.permute(xs, p), p, ws)
    out = x.new_empty(T, H)
    scatter(out, part)
    # to other ranks: x, w, ids to each of W-1 peers; the W-1 peers' shares of the partial sums
    return out, (W - 1) * (x.nbytes + w.nbytes + ids.nbytes) + part.nbytes * (W - 1) // W


def rank_job(rank: int, W: int, T: int, H: int, reps: int) -> dict:
    x, w, ids = _inputs(rank, T, H)
    want = (x.float() * w.sum(1, keepdim=True)).to(x.dtype)
    res = {"rank": rank}
    cases = {"ours FP8 exact": (True, None), "ours FP8 capacity=T": (True, T), "ours bf16 exact": (False, None),
             "baseline all_gather+permute+reduce_scatter": None}
    for name, mode in cases.items():
        if mode is None:
            def fn():
                return _naive(x, w, ids, rank, W)
            out, info = fn()
        else:
            out, info = _ours(x, w, ids, *mode)        # checked with identity experts
            y = torch.randn(info.recv_plan.row_token.shape[0], H, generator=torch.Generator().manual_seed(rank))
            y = y.to(x.dtype)

            def fn(mode=mode, y=y):                    # timed: the exchange only (no expert work)
                import leankernels.distributed as lkd
                _, h = lkd.dispatch(x, w, ids, E, quantize=mode[0], capacity=mode[1])
                return lkd.combine(y, h)
        ok = torch.allclose(out.float(), want.float(), rtol=0.07 if "FP8" in name else 0.02, atol=0.05)
        if name.startswith("ours"):
            wire = info.wire
            sent = sum(info.bytes_to_other_ranks().values())
            res[name] = {"check": bool(ok), "bytes_per_token": sent / T, "dropped": int(info.dropped.sum()),
                         "row_bytes": (wire["rows"] + wire.get("scales", 0)) / max(1, wire["rows_sent"])}
        else:
            res[name] = {"check": bool(ok), "bytes_per_token": info / T}
        res[name]["seconds"] = _timed(fn, reps)
    # DeepSeek-V3's hidden size: the row bytes of one dispatch, FP8 + scales against bf16
    xv, wv, idsv = _inputs(rank, 4, V3_HIDDEN)
    for q in (True, False):
        _, h = _ours(xv, wv, idsv, q)
        res[f"v3_row_bytes_{'fp8' if q else 'bf16'}"] = (h.wire["rows"] + h.wire.get("scales", 0)) / h.wire["rows_sent"]
    return res


def run(worlds=(2, 4), quick: bool = False) -> list[dict]:
    """One table row per (world size, case): slowest-rank median time, ratio to the baseline,
    bytes per token, check."""
    from leankernels.distributed import launch_local

    T, H, reps = (64, 1024, 3) if quick else (256, V3_HIDDEN, 10)
    rows = []
    for W in worlds:
        per_rank = launch_local(rank_job, W, args=(T, H, reps), timeout=600.0)
        base_name = "baseline all_gather+permute+reduce_scatter"
        t_base = max(r[base_name]["seconds"] for r in per_rank)
        for name in per_rank[0]:
            if not isinstance(per_rank[0][name], dict):
                continue
            t = max(r[name]["seconds"] for r in per_rank)
            rows.append({"ranks": W, "case": name, "T": T, "H": H, "seconds": t,
                         "ratio": t_base / t if name != base_name else None,
                         "bytes_per_token": max(r[name]["bytes_per_token"] for r in per_rank),
                         "row_bytes": per_rank[0][name].get("row_bytes"),
                         "dropped": sum(r[name].get("dropped", 0) for r in per_rank),
                         "check": all(r[name]["check"] for r in per_rank)})
        rows.append({"ranks": W, "case": "DeepSeek-V3 row (H=7168): FP8+scales vs bf16 bytes",
                     "row_bytes": per_rank[0]["v3_row_bytes_fp8"], "row_bytes_bf16": per_rank[0]["v3_row_bytes_bf16"],
                     "check": per_rank[0]["v3_row_bytes_fp8"] == V3_HIDDEN + 4 * V3_HIDDEN // 128})
    return rows


def format_rows(rows: list[dict]) -> str:
    from .timing import fmt_time

    lines = [f"{'ranks':>5}  {'case':<42} {'time':>9} {'vs baseline':>11} {'B/token':>9} {'B/row':>7}  check"]
    for r in rows:
        if "row_bytes_bf16" in r:
            lines.append(f"{r['ranks']:>5}  {r['case']:<42} {r['row_bytes']:.0f} B vs {r['row_bytes_bf16']:.0f} B "
                         f"({r['row_bytes_bf16'] / r['row_bytes']:.2f}x)  {'ok' if r['check'] else 'FAIL'}")
            continue
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        row_b = f"{r['row_bytes']:.0f}" if r.get("row_bytes") else "-"
        lines.append(f"{r['ranks']:>5}  {r['case']:<42} {fmt_time(r['seconds']):>9} {ratio:>11} "
                     f"{r['bytes_per_token']:>9.0f} {row_b:>7}  {'ok' if r['check'] else 'FAIL'}")
    return "\n".join(lines)
