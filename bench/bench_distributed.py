"""Expert-parallel dispatch + combine on gloo (2 and 4 CPU processes) against a naive all_gather
baseline, in the same run; bytes per token from the buffers actually sent.

    PYTHONPATH=python python bench/bench_distributed.py [--quick] [--ranks 2,4] [--json FILE]
    PYTHONPATH=python python -m pytest bench/bench_distributed.py     # the quick run and its checks

Cases and baseline: leankernels._bench.distributed (see its docstring).
"""
from __future__ import annotations

import argparse
import json
import sys

from leankernels._bench import distributed


def test_distributed_quick():
    rows = distributed.run((2,), quick=True)
    print(distributed.format_rows(rows))
    assert all(r["check"] for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T=64 tokens per rank, hidden 1024, 3 reps")
    p.add_argument("--ranks", default="2,4", help="world sizes, comma-separated")
    p.add_argument("--json", metavar="FILE", default=None)
    args = p.parse_args(argv)
    from leankernels._bench.runner import environment

    env = environment("cpu")
    print(f"{env['date_utc']}  {env['device']}  torch {env['torch']}  (load {env.get('load_avg_1m')})")
    rows = distributed.run(tuple(int(w) for w in args.ranks.split(",")), quick=args.quick)
    print(distributed.format_rows(rows))
    print("time: median per rank of (barrier, dispatch -> combine), the slowest "
          "rank; vs baseline = baseline time / this time (> 1: faster); B/token: bytes one rank sends to the other "
          "ranks (dispatch + combine) per token of its own; B/row: token row bytes on the wire "
          "(FP8 + 1x128 scales, or bf16)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2, default=str)
    return 0 if all(r["check"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
