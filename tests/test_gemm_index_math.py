"""CPU re-implementations of the index math of the CUDA GEMM kernels, checked against the PTX ISA.

The kernels (csrc/cuda/gemm.cu, csrc/cuda/sm90_fp8_gemm.cu) cannot run here, so the address
formulas they use are transcribed below (`_kernel_*`, keep them in sync with the .cu files)
and compared with the fragment tables of the PTX ISA ("Matrix Fragments for mma.m16n8k32" with
.e4m3, "mma.m16n8k16" with .bf16, wgmma "Matrix Fragments for wgmma .m64nNk32" accumulator)
and CUTLASS's Swizzle<B, 4, 3> (the TMA 64B / 128B swizzle). Also emulates, lane by lane,
the warp-0 tile lookup of the portable kernel's contiguous layout (find_contiguous_tile).
"""
from __future__ import annotations

import itertools
import random

import pytest

ROW_BYTES = 144  # gemm.cu kRowBytes: padded shared row of one 128-byte K block


# --------------------------------------------------------------- PTX ISA fragment tables
def _ptx_e4m3_a(lane, i):  # m16n8k32 .e4m3 A: a0..a15 -> (row, col)
    g, t = lane >> 2, lane % 4
    row = g if (i < 4 or 8 <= i < 12) else g + 8
    col = t * 4 + (i & 3) + (16 if i >= 8 else 0)
    return row, col


def _ptx_e4m3_b(lane, i):  # m16n8k32 .e4m3 B: b0..b7 -> (k, n)
    g, t = lane >> 2, lane % 4
    return t * 4 + (i & 3) + (16 if i >= 4 else 0), g


def _ptx_bf16_a(lane, i):  # m16n8k16 .bf16 A: a0..a7 -> (row, col)
    g, t = lane >> 2, lane % 4
    row = g if i in (0, 1, 4, 5) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _ptx_bf16_b(lane, i):  # m16n8k16 .bf16 B: b0..b3 -> (k, n)
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def _ptx_f32_c(lane, i):  # m16n8 f32 C/D (mma.sync) c0..c3 -> (row, col)
    g, t = lane >> 2, lane % 4
    return g + (8 if i >= 2 else 0), t * 2 + (i & 1)


def _ptx_wgmma_d(tid, i):  # wgmma m64nN f32 D: d_i of warpgroup thread tid -> (row, col)
    warp, lane = tid // 32, tid % 32
    g, t = lane >> 2, lane % 4
    return warp * 16 + g + 8 * ((i % 4) >= 2), (i // 4) * 8 + t * 2 + (i & 1)


# --------------------------------------------------------------- kernel address math (gemm.cu)
def _kernel_e4m3_a(lane, reg):  # byte offset of register reg's lowest byte, 16x32 tile at 0
    g, t = lane // 4, lane % 4
    p = g * ROW_BYTES + t * 4
    return [p, p + 8 * ROW_BYTES, p + 16, p + 8 * ROW_BYTES + 16][reg]


def _kernel_e4m3_b(lane, reg):
    g, t = lane // 4, lane % 4
    p = g * ROW_BYTES + t * 4
    return [p, p + 16][reg]


def _kernel_bf16_a(lane, reg):  # lds16 of two fp8 bytes, decoded to a bf16 pair
    g, t = lane // 4, lane % 4
    p = g * ROW_BYTES + t * 2
    return [p, p + 8 * ROW_BYTES, p + 8, p + 8 * ROW_BYTES + 8][reg]


def _kernel_bf16_b(lane, reg):
    g, t = lane // 4, lane % 4
    p = g * ROW_BYTES + t * 2
    return [p, p + 8][reg]


def _rc(off):  # shared byte offset -> (row, k) of the padded tile
    return off // ROW_BYTES, off % ROW_BYTES


@pytest.mark.parametrize("lane", range(32))
def test_portable_fragments_match_the_ptx_tables(lane):
    # e4m3: 4 bytes per 32-bit register, lowest byte = lowest element index
    for reg, b in itertools.product(range(4), range(4)):
        assert _rc(_kernel_e4m3_a(lane, reg) + b) == _ptx_e4m3_a(lane, 4 * reg + b)
    for reg, b in itertools.product(range(2), range(4)):
        k_n = _rc(_kernel_e4m3_b(lane, reg) + b)  # B is stored [n][k] (col-major operand)
        assert (k_n[1], k_n[0]) == _ptx_e4m3_b(lane, 4 * reg + b)
    # bf16 (sm_80): 2 elements per register
    for reg, b in itertools.product(range(4), range(2)):
        assert _rc(_kernel_bf16_a(lane, reg) + b) == _ptx_bf16_a(lane, 2 * reg + b)
    for reg, b in itertools.product(range(2), range(2)):
        k_n = _rc(_kernel_bf16_b(lane, reg) + b)
        assert (k_n[1], k_n[0]) == _ptx_bf16_b(lane, 2 * reg + b)
    # accumulator: the kernel scales c[v] with the a_scale of row g + 8 * (v / 2) and stores
    # c[2h], c[2h + 1] at row g + 8h, columns tig * 2 + {0, 1}
    g, t = lane // 4, lane % 4
    for v in range(4):
        assert _ptx_f32_c(lane, v) == (g + 8 * (v // 2), t * 2 + (v % 2))


def test_portable_fragment_loads_are_aligned_and_conflict_free():
    for reg in range(4):
        offs = [_kernel_e4m3_a(lane, reg) for lane in range(32)]
        assert all(o % 4 == 0 for o in offs)
        assert len({(o // 4) % 32 for o in offs}) == 32  # 32 distinct banks
    for reg in range(2):
        offs = [_kernel_e4m3_b(lane, reg) for lane in range(32)]
        assert len({(o // 4) % 32 for o in offs}) == 32
    assert ROW_BYTES % 16 == 0  # cp.async 16-byte destinations stay aligned


def test_wgmma_accumulator_layout_matches_the_epilogue():
    # sm90_fp8_gemm.cu: d[4j + {0,1}] at row warp*16 + lane/4, cols 8j + 2*(lane%4) + {0,1};
    # d[4j + {2,3}] 8 rows below; the promotion picks b_scale by the column 8j (+ n0).
    for tid, j, e in itertools.product(range(128), range(20), range(4)):
        warp, lane = tid // 32, tid % 32
        row = warp * 16 + lane // 4 + (8 if e >= 2 else 0)
        col = 8 * j + 2 * (lane % 4) + (e & 1)
        assert _ptx_wgmma_d(tid, 4 * j + e) == (row, col)


def _cutlass_swizzle(bbits, off):  # Swizzle<B, 4, 3>: bits [7, 7+B) XOR into bits [4, 4+B)
    mask = ((1 << bbits) - 1) << 7
    return off ^ ((off & mask) >> 3)


def _kernel_swizzled(row_bytes, row, byte):  # sm90_fp8_gemm.cu swizzled<kRowBytes>
    off = row * row_bytes + byte
    mask = 7 if row_bytes == 128 else 3
    return off ^ (((off >> 7) & mask) << 4)


@pytest.mark.parametrize("row_bytes,bbits", [(64, 2), (128, 3)])  # bf16 64B, fp32 128B staging
def test_epilogue_staging_swizzle_is_the_tma_swizzle(row_bytes, bbits):
    seen = set()
    for row, byte in itertools.product(range(64), range(row_bytes)):
        s = _kernel_swizzled(row_bytes, row, byte)
        assert s == _cutlass_swizzle(bbits, row * row_bytes + byte)
        assert s // 16 == _kernel_swizzled(row_bytes, row, byte - byte % 16) // 16  # 16 B units move whole
        seen.add(s)
    assert seen == set(range(64 * row_bytes))  # a permutation of the 64-row chunk


# --------------------------------------------------------------- contiguous tile lookup (gemm.cu)
def _find_contiguous_tile(offs, M, t, block_m=64):
    """Lane-by-lane emulation of find_contiguous_tile (shfl_up scans, ballot, shfl)."""
    G = len(offs)
    tiles_before, carry = 0, 0
    for base in range(0, G, 32):
        end = [min(max(offs[base + l], 0), M) if base + l < G else 0 for l in range(32)]
        run = end[:]
        d = 1
        while d < 32:
            run = [max(run[l], run[l - d]) if l >= d else run[l] for l in range(32)]
            d *= 2
        run = [max(r, carry) for r in run]
        start = [carry] + run[:31]
        carry = run[31]
        rows = [e - s if e > s else 0 for e, s in zip(end, start)]
        my = [(r + block_m - 1) // block_m for r in rows]
        incl = list(itertools.accumulate(my))
        first = [tiles_before + incl[l] - my[l] for l in range(32)]
        hit = [l for l in range(32) if my[l] > 0 and first[l] <= t < first[l] + my[l]]
        if hit:
            src = hit[0]
            row0 = start[src] + (t - first[src]) * block_m
            return base + src, row0, min(block_m, end[src] - row0)
        tiles_before += incl[31]
        if tiles_before > t:
            break
    return None


def _reference_owner(offs, M):
    """Row -> expert as reference.fp8_grouped_gemm assigns it (first end exceeding the row)."""
    owner, start = {}, 0
    for e, v in enumerate(offs):
        end = min(max(v, 0), M)
        for r in range(start, end):
            owner[r] = e
        start = max(start, end)
    return owner


@pytest.mark.parametrize("case", range(40))
def test_contiguous_tile_lookup_matches_the_reference(case):
    rng = random.Random(case)
    E = rng.choice([1, 3, 31, 32, 33, 70])
    if case % 2 == 0:  # valid: non-decreasing ends, possibly < M
        sizes = [rng.choice([0, 1, 63, 64, 65, rng.randint(0, 200)]) for _ in range(E)]
        offs = list(itertools.accumulate(sizes))
        M = offs[-1] + rng.randint(0, 70)
    else:  # unchecked bad offs: decreasing, negative, past M
        M = rng.randint(1, 600)
        offs = [rng.randint(-50, M + 100) for _ in range(E)]
    if M == 0:
        M = 1
    slots = -(-M // 64) + E  # grid.x of launch_portable
    owner = {}
    for t in range(slots):
        tile = _find_contiguous_tile(offs, M, t)
        if tile is None:
            continue
        g, row0, rows = tile
        assert 0 < rows <= 64 and 0 <= row0 and row0 + rows <= M
        for r in range(row0, row0 + rows):
            assert r not in owner, "two tiles write the same row"
            owner[r] = g
    assert owner == _reference_owner(offs, M)
