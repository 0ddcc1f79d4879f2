"""Host-side logic of the Hopper FP8 GEMM, checked on the CPU (common/gemm_sched.h).

The tile heuristic and the persistent scheduler (tile index -> (group, m_block, n_block) and
the rows each tile writes) are the same inline functions the sm90 kernel runs; the binding
_C.sm90_schedule replays every CTA's tile loop on the host. The kernel itself needs a Hopper
GPU: tests/test_gemm_sm90.py.
"""
from __future__ import annotations

import itertools
import math
import random
import re

import pytest

from leankernels._lib import C

SMS = 132  # H100 SXM


def _cdiv(a, b):
    return -(-a // b)


def _group_ranges(layout, M, info):
    """(view_row_begin, view_row_end) of every group, per the contract (DESIGN.md "GEMM")."""
    if layout == "dense":
        return [(0, M)]
    if layout == "masked":
        return [(e * M, e * M + min(max(v, 0), M)) for e, v in enumerate(info)]
    out, prev = [], 0  # row r belongs to the first expert whose end exceeds r (reference)
    for v in info:
        end = max(min(max(v, 0), M), prev)
        out.append((prev, end))
        prev = end
    return out


def _check_schedule(layout, M, N, info, num_sms, bm, bn):
    sched = C().sm90_schedule(layout, M, N, 128, info, num_sms, bm, bn)
    ranges = _group_ranges(layout, M, info)
    num_n = _cdiv(N, bn)
    # every (group, m_block, n_block) exactly once, and exactly the m-blocks each group needs
    keys = [(g, mb, nb) for _, g, mb, nb, _, _ in sched]
    assert len(keys) == len(set(keys))
    expected = {(g, mb, nb) for g, (b, e) in enumerate(ranges) for mb in range(_cdiv(e - b, bm)) for nb in range(num_n)}
    assert set(keys) == expected
    # rows: inside the tile's own group, never past it; each valid row covered once per n-block
    covered = {nb: [] for nb in range(num_n)}
    for _, g, mb, nb, row0, rows in sched:
        b, e = ranges[g]
        assert 0 < rows <= bm
        assert row0 == b + mb * bm
        assert b <= row0 and row0 + rows <= e
        covered[nb].extend(range(row0, row0 + rows))
    valid = sorted(r for b, e in ranges for r in range(b, e))
    for nb in range(num_n):
        assert sorted(covered[nb]) == valid
    return sched


def _prefix(layout, M, info, bm):
    ranges = _group_ranges(layout, M, info)
    pre = [0]
    for b, e in ranges:
        pre.append(pre[-1] + _cdiv(e - b, bm))
    return pre


@pytest.mark.parametrize("M,N,bm,bn", [(1, 8, 64, 32), (64, 2112, 64, 32), (100, 264, 128, 96), (4096, 7168, 128, 160),
                                       (333, 1000, 64, 256), (129, 128, 128, 128)])
def test_dense_schedule_covers_every_tile_once(M, N, bm, bn):
    _check_schedule("dense", M, N, [], SMS, bm, bn)


@pytest.mark.parametrize("sizes", [[0, 0, 5, 0], [300], [128, 128, 128], [1, 127, 129, 0, 64, 200], [0] * 7 + [1000]])
@pytest.mark.parametrize("bm,bn", [(64, 128), (128, 160), (64, 256)])
def test_contiguous_schedule_respects_expert_boundaries(sizes, bm, bn):
    offs = list(itertools.accumulate(sizes))
    M = offs[-1] + 37  # rows past offs[-1] exist and must be left alone
    sched = _check_schedule("contiguous", M, 520, offs, 16, bm, bn)
    assert all(row0 + rows <= offs[-1] for *_, row0, rows in sched)


def test_contiguous_random_many_experts():
    rng = random.Random(3)
    for _ in range(20):
        E = rng.randint(1, 40)
        sizes = [rng.choice([0, 0, 1, rng.randint(1, 300)]) for _ in range(E)]
        offs = list(itertools.accumulate(sizes))
        M = offs[-1] + rng.randint(0, 50)
        if M == 0:
            continue
        bm, bn = rng.choice([(64, 32), (64, 128), (128, 96), (128, 160)])
        _check_schedule("contiguous", M, rng.choice([8, 136, 1000]), offs, rng.choice([1, 7, 132]), bm, bn)


@pytest.mark.parametrize("masked_m", [[0, 1024], [1, 2, 3, 4], [256, 256, 256, 256], [0, 0, 0], [-5, 9999, 17]])
def test_masked_schedule_skips_masked_rows(masked_m):
    # negative and > M_max values are clamped (memory safety); rows >= masked_m are never written
    _check_schedule("masked", 256, 384, masked_m, SMS, 128, 128)
    _check_schedule("masked", 256, 384, masked_m, 5, 64, 64)


def test_bad_offsets_stay_inside_the_tensor():
    # decreasing / out-of-range offs are the caller's bug, but tiles must stay inside [0, M)
    sched = C().sm90_schedule("contiguous", 100, 64, 128, [50, 20, 500, -3], 8, 64, 32)
    assert all(0 <= row0 and row0 + rows <= 100 for *_, row0, rows in sched)
    # and every row goes to exactly one expert, the reference's (first end exceeding the row):
    # a decreasing end must not hand rows [20, 50) to expert 2 as well (two tiles racing)
    for offs in ([50, 20, 500, -3], [64, 10, 64, 200], [300, 0, 100, 299, 301]):
        _check_schedule("contiguous", 300, 64, offs, 8, 64, 32)


def test_rasterisation_is_banded_and_persistent():
    layout, M, N, bm, bn, sms = "dense", 2048, 7168, 128, 128, SMS
    sched = C().sm90_schedule(layout, M, N, 128, [], sms, bm, bn)
    grid = min(sms, _cdiv(M, bm) * _cdiv(N, bn))
    num_m, num_n = _cdiv(M, bm), _cdiv(N, bn)
    band = round(math.sqrt(sms * bm / bn))
    # CTA sm runs t = sm, sm + grid, ... in increasing order; t -> (m, n) banded along N
    per_sm = {}
    for sm, g, mb, nb, _, _ in sched:
        per_sm.setdefault(sm, []).append((mb, nb))
    assert sorted(per_sm) == list(range(grid))
    for sm, tiles in per_sm.items():
        for i, (mb, nb) in enumerate(tiles):
            t = sm + i * grid
            b, i_in = divmod(t, band * num_m)
            width = min(band, num_n - b * band)
            assert (mb, nb) == (i_in // width, b * band + i_in % width)
    # one wave touches `band` n-blocks of B and ~grid/band m-blocks of A
    by_t = {sm + i * grid: tile for sm, tiles in per_sm.items() for i, tile in enumerate(tiles)}
    wave = [by_t[t] for t in range(grid)]
    assert len({nb for _, nb in wave}) == band
    assert len({mb for mb, _ in wave}) == _cdiv(grid, band)


def test_grouped_rasterisation_walks_groups_inside_a_band():
    offs = list(itertools.accumulate([300, 0, 200, 500]))
    sched = C().sm90_schedule("contiguous", offs[-1], 4096, 128, offs, 4, 128, 128)
    pre = _prefix("contiguous", offs[-1], offs, 128)
    num_m, num_n = pre[-1], 32
    band = round(math.sqrt(4 * 128 / 128))
    per_sm = {}
    for sm, g, mb, nb, _, _ in sched:
        per_sm.setdefault(sm, []).append((pre[g] + mb, nb))
    for sm, tiles in per_sm.items():
        for i, (m, nb) in enumerate(tiles):
            t = sm + i * 4
            b, i_in = divmod(t, band * num_m)
            width = min(band, num_n - b * band)
            assert (m, nb) == (i_in // width, b * band + i_in % width)


# ------------------------------------------------------------------------------ heuristic
DS_DENSE = [(M, N, K) for M in (64, 128, 4096)
            for N, K in [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]]

# What the rule in common/gemm_sched.h picks for the DeepSeek-V3 shapes on 132 SMs (a
# regression table: change it together with the rule, after measuring on a GPU).
EXPECTED = {
    ("dense", 64, 2112, 7168, 1): (64, 32), ("dense", 64, 24576, 1536, 1): (64, 256),
    ("dense", 64, 7168, 16384, 1): (64, 64), ("dense", 64, 4096, 7168, 1): (64, 32),
    ("dense", 64, 7168, 2048, 1): (64, 64),
    ("dense", 128, 2112, 7168, 1): (64, 32), ("dense", 128, 24576, 1536, 1): (128, 96),
    ("dense", 128, 7168, 16384, 1): (64, 128), ("dense", 128, 4096, 7168, 1): (64, 64),
    ("dense", 128, 7168, 2048, 1): (64, 128),
    ("dense", 4096, 2112, 7168, 1): (128, 160), ("dense", 4096, 24576, 1536, 1): (128, 128),
    ("dense", 4096, 7168, 16384, 1): (128, 160), ("dense", 4096, 4096, 7168, 1): (128, 128),
    ("dense", 4096, 7168, 2048, 1): (128, 160),
    ("contiguous", 32768, 4096, 7168, 4): (128, 128), ("contiguous", 32768, 7168, 2048, 4): (128, 128),
    ("contiguous", 32768, 4096, 7168, 8): (128, 128), ("contiguous", 32768, 7168, 2048, 8): (128, 128),
    ("masked", 1024, 4096, 7168, 1): (128, 128), ("masked", 1024, 7168, 2048, 1): (128, 160),
    ("masked", 512, 4096, 7168, 2): (128, 128), ("masked", 512, 7168, 2048, 2): (128, 160),
    ("masked", 256, 4096, 7168, 4): (128, 128), ("masked", 256, 7168, 2048, 4): (128, 160),
}


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: "-".join(map(str, k)))
def test_heuristic_deepseek_shapes(key):
    layout, M, N, K, E = key
    cfg = C().sm90_gemm_config(M, N, K, E, SMS, layout=layout)
    assert (cfg["block_m"], cfg["block_n"]) == EXPECTED[key]
    assert 1 <= cfg["band"] <= _cdiv(N, cfg["block_n"])
    assert cfg["grid"] == min(SMS, cfg["tiles_bound"])


def test_heuristic_invariants():
    configs = {(bm, bn) for bm, bn, _, _ in C().sm90_configs()}
    seen = set()
    for M in (1, 8, 64, 65, 128, 200, 256, 512, 1024, 2048, 4096, 16384):
        for N in (8, 64, 256, 576, 1536, 2112, 4096, 7168, 24576):
            for sms in (8, 78, 114, 132):
                cfg = C().sm90_gemm_config(M, N, 7168, 1, sms)
                bm, bn = cfg["block_m"], cfg["block_n"]
                assert (bm, bn) in configs
                assert bm in (64, 128) and bn % 16 == 0 and bn <= 256
                if M <= 64:
                    assert bm == 64  # a 128-row tile would waste half its math
                seen.add((bm, bn))
    assert seen == configs, f"unreachable configs: {configs - seen}"
    for bm, bn, wgs, split in C().sm90_configs():
        assert (bm // 64) * split == wgs and bn // split <= 160


def test_big_problems_use_big_tiles_and_fill_the_gpu():
    cfg = C().sm90_gemm_config(8192, 7168, 7168, 1, SMS)
    assert cfg["block_m"] == 128 and cfg["block_n"] >= 128 and cfg["grid"] == SMS
    small = C().sm90_gemm_config(64, 7168, 7168, 1, SMS)
    assert small["tiles_bound"] >= SMS // 2  # decode: spread the weight reads over the SMs


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout"):
        C().sm90_gemm_config(64, 64, 128, 1, SMS, layout="ragged")
    with pytest.raises(ValueError, match="layout"):
        C().sm90_schedule("ragged", 64, 64, 128, [], SMS, 64, 64)
    with pytest.raises(ValueError, match="group_info"):
        C().sm90_schedule("masked", 64, 64, 128, [], SMS, 64, 64)
    with pytest.raises(ValueError, match="num_groups"):
        C().sm90_gemm_config(64, 64, 128, 0, SMS)


def test_absurd_sizes_raise_naming_the_argument():
    # Issue 16: sizes whose tile counts overflowed int64 (undefined behaviour, garbage configs)
    # are a ValueError naming the argument; the largest accepted ones still give sane answers.
    big = 2**62
    for args, layout, arg in [((big, 7168, 7168, 1), "dense", "M"),
                              ((64, big, 7168, 1), "dense", "N"),
                              ((2**40, 2**40, 128, 1), "dense", "M"),
                              ((64, 64, 128, 2**40), "contiguous", "num_groups"),
                              ((2**20, 2**20, 128, 2**12), "masked", "M * num_groups")]:
        with pytest.raises(ValueError, match=re.escape(arg)):
            C().sm90_gemm_config(*args, SMS, layout=layout)
    with pytest.raises(ValueError, match="M"):
        C().sm90_gemm_config(-1, 64, 128, 1, SMS)
    with pytest.raises(ValueError, match=re.escape("M * num_groups")):
        C().sm90_schedule("masked", 2**30 - 1, 2**30 - 1, 128, [0] * 8, 1, 1, 1)
    top = 2**31 - 1
    for layout, M, E in (("dense", top, 1), ("contiguous", top, top), ("masked", top // 512, 512)):
        cfg = C().sm90_gemm_config(M, top, 128, E, SMS, layout=layout)
        assert cfg["grid"] == SMS and cfg["tiles_bound"] > 0
        assert 1 <= cfg["band"] <= _cdiv(top, cfg["block_n"])
