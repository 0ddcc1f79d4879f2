"""The CPU GEMM on every CPU path this machine can run (csrc/cpu/isa.h), in one process, against
leankernels.reference: the decode kernel (few rows per weight group, vectorised along K) and the
row-tiled kernels (many rows), hostile bytes included (NaN codes beside finite scales, e4m3
subnormals, Inf and huge scales, K and N tails)."""
from __future__ import annotations

import pytest
import torch

import leankernels as lk
from leankernels import reference as ref
from conftest import gemm_diff, poison, randn

PATHS = lk.cpu_paths()


def _close(got, want):
    if want.numel() == 0:
        assert got.numel() == 0
        return
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got[want.isinf()], want[want.isinf()])
    got, want = got[finite], want[finite]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert gemm_diff(got, want) < 1e-9


def _weights(E, N, K, seed):
    return lk.quantize_fp8(randn(E, N, K, seed=seed, scale=0.05), (128, 128))


@pytest.mark.parametrize("M,N,K", [(1, 264, 896), (2, 200, 300), (3, 7, 33), (8, 132, 1024), (16, 130, 129),
                                   (17, 64, 256), (40, 96, 384)])
def test_dense_every_path(cpu_path, M, N, K):
    a, sa = lk.quantize_fp8(randn(M, K, seed=M))
    b, sb = lk.quantize_fp8(randn(N, K, seed=N, scale=0.05), (128, 128))
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    _close(lk.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32), want)
    torch.testing.assert_close(lk.fp8_gemm(a, sa, b, sb), want.bfloat16(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_grouped_mixed_segments_every_path(cpu_path):
    """One call with empty experts, 1-2 row experts (decode kernel) and a 40-row expert (row
    kernels); rows past offs[-1] untouched."""
    counts = [1, 0, 2, 40, 3, 0, 16, 9, 4, 5]  # 4 | 5: the decode | tile kernel on the amx path
    E, N, K = len(counts), 136, 300
    offs = torch.tensor(counts).cumsum(0).int()
    M = int(offs[-1]) + 3
    a, sa = lk.quantize_fp8(randn(M, K, seed=3))
    b, sb = _weights(E, N, K, 4)
    out = poison(torch.empty(M, N))
    got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32, out=out.clone())
    _close(got[: int(offs[-1])], want[: int(offs[-1])])
    masked = torch.tensor([1, 0, 2, 5, 16, 3, 0, 1, 6, 8], dtype=torch.int32)
    a3, sa3 = lk.quantize_fp8(randn(E, 16, K, seed=5))
    got3 = lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, masked, out_dtype=torch.float32)
    want3 = ref.fp8_grouped_gemm_masked(a3, sa3, b, sb, masked, torch.float32)
    for e, m in enumerate(masked.tolist()):
        _close(got3[e, :m], want3[e, :m])


def test_items_of_several_strips_and_k_ranges_every_path(cpu_path):
    """Prefill-sized calls whose row-tiled items cover several column strips and, on the amx
    path, cut K into ranges whose totals carry over (cpu/gemm_body.h process_item): dense and
    grouped (two experts, row tails), N and K tails."""
    N, K = 2100, 2200
    a, sa = lk.quantize_fp8(randn(300, K, seed=7))
    b, sb = _weights(2, N, K, 8)
    want = ref.fp8_gemm(a, sa, b[0], sb[0], torch.float32)
    _close(lk.fp8_gemm(a, sa, b[0], sb[0], out_dtype=torch.float32), want)
    got = lk.fp8_gemm(a, sa, b[0], sb[0])
    torch.testing.assert_close(got, want.bfloat16(), rtol=1e-2, atol=1e-2 * want.abs().max().item())
    offs = torch.tensor([270, 300], dtype=torch.int32)
    got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
    _close(got, ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32))


def test_items_of_the_most_strips_every_path(cpu_path):
    """Enough rows and columns that an item takes the most strips (cpu/gemm_body.h kMaxStrips:
    16 on amx with 2 threads, so 512 columns per item, the output stage at its widest), with row,
    N and K tails; the output poisoned first."""
    M, N, K = 1040, 4100, 300
    a, sa = lk.quantize_fp8(randn(M, K, seed=9))
    b, sb = _weights(2, N, K, 10)
    want = ref.fp8_gemm(a, sa, b[0], sb[0], torch.float32)
    _close(lk.fp8_gemm(a, sa, b[0], sb[0], out_dtype=torch.float32), want)
    torch.testing.assert_close(lk.fp8_gemm(a, sa, b[0], sb[0]), want.bfloat16(), rtol=1e-2,
                               atol=1e-2 * want.abs().max().item())
    offs = torch.tensor([1000, M], dtype=torch.int32)  # two experts: 1000 and 40 rows
    out = poison(torch.empty(M, N))
    got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32, out=out)
    assert got.data_ptr() == out.data_ptr()
    _close(got, ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32))


@pytest.mark.parametrize("M,K", [(3, 640), (40, 680), (150, 680)])
def test_hostile_bytes_every_path(cpu_path, M, K):
    """NaN codes (0x7f / 0xff) with finite scales, every e4m3 subnormal, Inf, NaN and > 2**100
    scales: the same non-finite pattern and values as the reference. M = 3: the decode kernel;
    40 and 150: the row-tiled kernels (an odd number of 16-row tiles, more tiles than one work
    item holds), with a K tail of 40 (a half-empty last block)."""
    N = 260
    a, sa = lk.quantize_fp8(randn(M, K, seed=7))
    b, sb = lk.quantize_fp8(randn(N, K, seed=8, scale=0.05), (128, 128))
    bu, au = b.view(torch.uint8), a.view(torch.uint8)
    bu[3, 70] = 0x7F          # NaN code beside finite scales (the shift decode's 480 must not leak)
    bu[9, 300] = 0xFF
    bu[11, 128:136] = torch.arange(8, dtype=torch.uint8)             # +subnormals (and zero)
    bu[12, 128:136] = torch.arange(8, dtype=torch.uint8) | 0x80      # -subnormals
    au[1, 128:136] = torch.arange(1, 9, dtype=torch.uint8)
    sa[0, 2] = float("inf")   # row 0: +-inf (reference: block sum * inf), never inf - inf = NaN
    sa[2, 1] = 2.0 ** 101 / sb[0, 1]  # scale product 2**101: finite result, exact order needed
    sb[1, 4] = float("nan")   # columns 128..255: NaN
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    assert torch.isnan(want).any() and torch.isinf(want).any() and torch.isfinite(want).any()
    assert torch.isfinite(want[2, 20:30]).all() and want[2, 20:30].abs().max() > 2.0 ** 100
    _close(lk.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32), want)
    # the same bytes as a grouped call (expert 0: one row, the decode kernel; expert 1: the rest)
    offs = torch.tensor([1, M], dtype=torch.int32)
    bb, sbb = torch.stack([b, b]), torch.stack([sb, sb])
    _close(lk.fp8_grouped_gemm(a, sa, bb, sbb, offs, out_dtype=torch.float32),
           ref.fp8_grouped_gemm(a, sa, bb, sbb, offs, torch.float32))


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("counts,N,K", [([1, 2, 4, 1], 160, 5000), ([1, 2], 136, 640)])
def test_decode_nan_codes_and_subnormals_safe_scales_every_path(cpu_path, flush, counts, N, K):
    """Decode shapes (1-4 rows per expert) with every scale finite and small: the fast decode of
    the avx512/avx2 paths (e4m3 bits moved into an fp32, NaN codes flagged per walk and the walk
    redone) must match the reference: NaN only in the columns whose weight row holds a NaN code;
    outputs made of e4m3 subnormals only (a weight row, a row of a) exact, also with
    torch.set_flush_denormal(True) (MXCSR DAZ and FTZ set on the calling thread, which runs the
    whole of the smaller call). K = 5000: weight rows are walked 4 at a time, with a K tail (on
    the amx path the 1-2 row experts take the decode kernel, the 4-row one the tile kernel)."""
    E, M = len(counts), sum(counts)
    a, sa = lk.quantize_fp8(randn(M, K, seed=21))
    b, sb = _weights(E, N, K, 22)
    bu, au = b.view(torch.uint8), a.view(torch.uint8)
    sub = torch.arange(K) % 7 + 1
    bu[1, 9] = (sub | (torch.arange(K) % 2 * 128)).to(torch.uint8)   # expert 1, column 9: +-subnormals
    au[2] = sub.to(torch.uint8)                                     # expert 1's second row: subnormals
    bu[0, 5, K - 3] = 0x7F                                          # expert 0 column 5, in the K tail
    bu[1, 130, 7] = 0xFF                                            # expert 1, second weight block row
    if E > 2:
        bu[2, 17, K - 100] = 0x7F                                   # expert 2: 4 rows, 2 weight rows at a time
    offs = torch.tensor(counts).cumsum(0).int()
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32)
    e2 = slice(3, 3 + counts[2]) if len(counts) > 2 else slice(0, 0)
    assert want[0, 5].isnan() and want[1:3, 130].isnan().all() and want[e2, 17].isnan().all()
    assert want.isnan().sum() == 3 + len(range(M)[e2])
    assert (want[1:3, 9] != 0).all() and (want[2, :128] != 0).all()
    try:
        torch.set_flush_denormal(flush)
        got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
    finally:
        torch.set_flush_denormal(False)
    _close(got, want)
    # made of subnormals: each value within 1e-6 of the sum of its terms' magnitudes
    mag = ref.fp8_grouped_gemm((au & 0x7F).view(a.dtype), sa, (bu & 0x7F).view(b.dtype), sb, offs, torch.float32)
    for r, cols in ((1, [9]), (2, list(range(128)))):
        assert ((got[r, cols] - want[r, cols]).abs() <= 1e-6 * mag[r, cols]).all(), (r, cols)


@pytest.mark.parametrize("counts", [[1, 0, 1, 1], [2, 0, 1, 2], [3, 0, 1, 4]])
@pytest.mark.parametrize("N,K", [(141, 2000), (2816, 2048), (77, 1408)])
def test_decode_few_rows_four_streams_every_path(cpu_path, N, K, counts):
    """One to four rows per expert with short weight rows (K <= 4096): work items inside one
    128-row weight block walk their columns as four quarters at once (gemm_body.h
    decode_spread), the last quarter short where the item's width is not a multiple of 4 (N=141:
    an item of 13 columns; N=77: 77 = 4 x 20 - 3); items that straddle a block row walk one
    stream. Hostile bytes in several quarters: a NaN code beside finite scales, +-subnormal
    weights, an Inf and a > 2**100 scale product (the exact-order walk), a K tail (K=2000)."""
    E, M = len(counts), sum(counts)
    a, sa = lk.quantize_fp8(randn(M, K, seed=31))
    b, sb = _weights(E, N, K, 32)
    bu = b.view(torch.uint8)
    q = min(N, 32) // 4  # a quarter of the first item (32 columns or fewer)
    bu[0, 3 * q + 1, 5] = 0x7F                                     # expert 0, last quarter: NaN
    bu[2, q + 2, :] = (torch.arange(K) % 7 + 1 | (torch.arange(K) % 2 * 128)).to(torch.uint8)  # 2nd quarter: subnormals
    bu[3, N - 1, K - 1] = 0xFF                                     # last column, in the K tail
    r2, r3 = counts[0], counts[0] + counts[2]                      # expert 2's row, expert 3's first row
    sa[r2, 0] = float("inf")                                       # expert 2's row: +-inf / NaN outputs
    sa[r3, 1] = 2.0 ** 101 / sb[3, 0, 1]                           # expert 3, first block row: exact order
    offs = torch.tensor(counts).cumsum(0).int()
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32)
    assert want[:counts[0], 3 * q + 1].isnan().all() and want[r3:, N - 1].isnan().all()
    assert not want[r3:, :N - 1].isnan().any() and want[r3, :min(N - 1, 128)].abs().max() > 2.0 ** 100
    for out_dtype in (torch.float32, torch.bfloat16):
        got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=poison(torch.empty(M, N, dtype=out_dtype)))
        if out_dtype is torch.float32:
            _close(got, want)
        else:
            fin = torch.isfinite(want)
            assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isfinite(got), fin)
            torch.testing.assert_close(got[fin].float(), want[fin].bfloat16().float(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("log2_factor", [-122, -70, -62, -55, 0, 30, 36, 40, None])
def test_decode_rows_prescaled_by_their_block_scales_every_path(cpu_path, log2_factor):
    """On the avx2 path the decode kernel's register walk (1-8 rows per weight group) multiplies
    the rows of a by their block scales first (gemm_body.h PreScaledA) when every scale product s is
    0 or 2^-80 <= |s| <= 2^18, else they take the per-block scaling: a's scales times 2^f put the
    products (~2^-18 here) on both sides of both bounds (2^-140: pre-scaled, most products would
    be subnormal; 2^22: some would overflow); None: one block of one row out of range
    (the whole item falls back), another row's scale 0. Each row against the reference by itself.
    K = 2048: the four-stream walk (decode_spread); K = 4224: four adjacent weight rows
    (decode_item), 6 rows in two groups of 3."""
    for N, K, rows in ((264, 2048, (1, 3)), (136, 4224, (1, 6))):
        _prescaled_rows_case(N, K, rows, log2_factor)


def _prescaled_rows_case(N, K, rows, log2_factor):
    b, sb = lk.quantize_fp8(randn(N, K, seed=41, scale=0.05), (128, 128))
    for M in rows:
        a, sa = lk.quantize_fp8(randn(M, K, seed=42 + M))
        if log2_factor is None:
            sa[0, 5] *= 2.0 ** 40
            sa[M - 1] = 0.0 if M > 1 else sa[M - 1]
        else:
            sa *= 2.0 ** log2_factor
        want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
        assert want.isfinite().all() and (want != 0).any()
        got = lk.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32)
        for r in range(M):
            _close(got[r], want[r])


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_amx_path_needs_amx_cpu():
    """The amx path is listed only on a CPU whose cpuid has AMX-BF16 tiles and AVX-512-BF16 (and
    only after Linux granted the tile state: a CPU with the flags may still lack it)."""
    if "amx" in PATHS:
        assert PATHS[:2] == ["amx", "avx512bf16"]
        flags = _cpu_flags()
        if flags:
            assert {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags, sorted(flags)
    elif "avx512bf16" not in PATHS:
        assert "amx" not in PATHS


def test_paths_listed_and_forced():
    assert PATHS[-1] == "generic" and lk.cpu_path() in PATHS
    with pytest.raises(ValueError, match="CPU path must be one of"):
        lk.set_cpu_path("sse9")
    for name in ("amx", "avx512bf16", "avx512", "avx2", "neon"):
        if name not in PATHS:
            with pytest.raises(ValueError, match="cannot run"):
                lk.set_cpu_path(name)
