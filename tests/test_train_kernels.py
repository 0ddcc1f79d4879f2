"""The GEMM pieces of FP8 training (DeepSeek-V3 Wgrad): quantize_fp8_transposed and
fp8_k_grouped_gemm against leankernels.reference, on every device and (per-path test) every
CPU kernel path: bit-exact quantization, tight GEMM agreement, hostile expert splits."""
from __future__ import annotations

import math

import pytest
import torch

import leankernels as lk
from leankernels import reference as ref
from conftest import DEVICES, HAS_CUDA, gemm_diff, opcheck, poison, randn, requires_cuda

FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Per-expert token counts: empty experts, 1 / 127 / 128 / 129 / odd counts, all in one expert.
COUNTS = [
    None,                      # dense: one group list over all tokens
    [0, 1, 127, 128, 129, 0, 77, 3],
    [300],                     # all tokens in one expert
    [0, 0, 300, 0],
    [5, 250, 1, 44],
]


def _offs(counts, device="cpu"):
    return None if counts is None else torch.tensor(counts, dtype=torch.int32).cumsum(0).int().to(device)


def _assert_same_quant(got, want):
    """fp8 codes bit for bit (NaN codes compare as NaN, their sign is the platform's) and scales exactly."""
    q, s = got
    qr, sr = want
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert q.shape == qr.shape and s.shape == sr.shape
    a, b = q.cpu().view(torch.uint8), qr.cpu().view(torch.uint8)
    nan_a, nan_b = (a & 0x7F) == 0x7F, (b & 0x7F) == 0x7F
    assert torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b]), "fp8 codes differ from the reference"
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=0, atol=0, equal_nan=True)


def _poison_allocator(nbytes, device):
    """Fill memory the next allocations may reuse with NaN, so unwritten outputs show."""
    junk = torch.full((nbytes // 4 + 1,), float("nan"), device=device)
    del junk


# ----------------------------------------------------------------- quantize_fp8_transposed
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("counts", COUNTS)
def test_quantize_transposed_bit_exact(device, dtype, scale_fmt, counts):
    M, K = (300 if counts is None else sum(counts)) + 9, 200  # 9 rows past offs[-1]; K % 32 != 0
    x = randn(M, K, seed=M + len(counts or []), dtype=dtype, device=device, scale=3.0)
    offs = _offs(counts, device)
    _poison_allocator(M * K * 8, device)
    got = lk.quantize_fp8_transposed(x, offs, scale_fmt)
    want = ref.quantize_fp8_transposed(x.cpu(), None if offs is None else offs.cpu(), scale_fmt)
    E = 1 if counts is None else len(counts)
    assert got[0].shape == (K, M) and got[1].shape == (K, math.ceil(M / 128) + E - 1)
    assert got[0].is_contiguous() and got[0].device == x.device
    _assert_same_quant(got, want)
    assert not got[1].isnan().any() and not got[0].float().isnan().any()
    if counts is not None:
        assert (got[0].float()[:, int(offs[-1]):] == 0).all()  # rows past offs[-1]: code 0


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_transposed_groups_match_quantize_fp8(device):
    """A group is quantized exactly as quantize_fp8 quantizes a 1x128 group of x.T."""
    x = randn(256, 64, seed=1, device=device, dtype=torch.bfloat16)
    q, s = lk.quantize_fp8_transposed(x)
    q2, s2 = lk.quantize_fp8(x.T.contiguous())
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_transposed_non_contiguous_and_empty(device):
    base = randn(400, 300, seed=2, device=device)
    offs = _offs([100, 0, 150], device)
    for v in (base[50:350, 10:290], base[::2, :200], base.t()[:250, :200].t(), base[:, ::3]):
        _assert_same_quant(lk.quantize_fp8_transposed(v, offs), ref.quantize_fp8_transposed(v.cpu(), offs.cpu()))
    for M, K, counts in ((0, 64, None), (0, 64, [0, 0]), (5, 0, [2, 5]), (0, 0, [0])):
        q, s = lk.quantize_fp8_transposed(torch.randn(M, K, device=device), _offs(counts, device))
        qr, sr = ref.quantize_fp8_transposed(torch.randn(M, K), _offs(counts))
        assert q.shape == qr.shape and s.shape == sr.shape and (s == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_transposed_nan_inf(device):
    counts = [100, 60, 140]
    x = randn(300, 96, seed=3, device=device)
    x[5, 7] = float("nan")          # expert 0, group 0, column 7
    x[120, 40] = float("inf")       # expert 1 (rows 100..159), column 40
    x[299, 95] = -float("inf")      # expert 2, its second group (rows 288..299)
    offs = _offs(counts, device)
    q, s = lk.quantize_fp8_transposed(x, offs)
    _assert_same_quant((q, s), ref.quantize_fp8_transposed(x.cpu(), offs.cpu()))
    s = s.cpu()
    assert torch.isnan(s[7, 0]) and torch.isinf(s[40, 0 + 1]) and torch.isinf(s[95, 1 + 2 + 1])
    assert torch.isfinite(s[8, :]).all()


def test_quantize_transposed_bad_inputs(monkeypatch):
    x = torch.randn(20, 64)
    with pytest.raises(TypeError, match="x must have dtype"):
        lk.quantize_fp8_transposed(x.double())
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        lk.quantize_fp8_transposed(x[None])
    with pytest.raises(ValueError, match="scale_fmt"):
        lk.quantize_fp8_transposed(x, scale_fmt="e8m0")
    with pytest.raises(TypeError, match="offs must have dtype int32"):
        lk.quantize_fp8_transposed(x, torch.tensor([3, 20]))
    with pytest.raises(ValueError, match="offs must have 1 dimensions"):
        lk.quantize_fp8_transposed(x, torch.tensor([[3, 20]], dtype=torch.int32))
    with pytest.raises(ValueError, match="offs must hold at least one expert"):
        lk.quantize_fp8_transposed(x, torch.zeros(0, dtype=torch.int32))
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        lk.quantize_fp8_transposed(x, torch.tensor([12, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offs\[-1\] = 21 exceeds the number of rows of x"):
        lk.quantize_fp8_transposed(x, torch.tensor([8, 21], dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_transposed_unchecked_offs_follow_the_reference(device, monkeypatch):
    """Without LEANKERNELS_DEBUG offs are not read on the host: decreasing, negative and too-large
    ends are clamped (running maximum) exactly as the reference does; nothing out of bounds."""
    monkeypatch.delenv("LEANKERNELS_DEBUG", raising=False)
    x = randn(200, 40, seed=4, device=device)
    for ends in ([120, 30, 180, 150], [-5, 60, 2**31 - 1, 7], [0, 0, 0, 0]):
        offs = torch.tensor(ends, dtype=torch.int32, device=device)
        _assert_same_quant(lk.quantize_fp8_transposed(x, offs), ref.quantize_fp8_transposed(x.cpu(), offs.cpu()))


# ---------------------------------------------------------------------- fp8_k_grouped_gemm
def _wgrad_operands(T, M, N, counts, seed, device="cpu", dtype=torch.float32):
    """dy [T, M], x [T, N] (tokens sorted by expert) and their k-grouped FP8 operands."""
    dy = randn(T, M, seed=seed, device=device, dtype=dtype)
    x = randn(T, N, seed=seed + 1, device=device, dtype=dtype, scale=0.5)
    offs = _offs(counts, device)
    a, sa = lk.quantize_fp8_transposed(dy, offs)
    b, sb = lk.quantize_fp8_transposed(x, offs)
    return dy, x, offs, a, sa, b, sb


def _unquantized(dy, x, offs):
    """fp64 dW per expert from the unquantized inputs."""
    T = dy.shape[0]
    segs = ref.k_group_segments(None if offs is None else offs.cpu(), T)
    w = torch.stack([dy[s:t].double().T @ x[s:t].double() for s, t in segs]).cpu()
    return w[0] if offs is None else w


F32_TOL = {"cpu": (1e-4, 1e-9), "cuda": (2e-3, 1e-6)}  # rtol, diff (see test_gemm.py: GPU mma order)


def _close(got, want):
    rtol, diff = F32_TOL[got.device.type]
    got = got.cpu()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(want.abs().max().item(), 1e-30))
    assert gemm_diff(got, want) < diff


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("M,N", [(64, 96), (130, 40), (17, 200)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_k_grouped_gemm(device, counts, M, N, out_dtype):
    T = (300 if counts is None else sum(counts)) + 5  # 5 tokens past offs[-1] are ignored
    dy, x, offs, a, sa, b, sb = _wgrad_operands(T, M, N, counts, seed=M + N, device=device)
    _poison_allocator(M * N * 4 * (len(counts) if counts else 1), device)
    out = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out_dtype=out_dtype)
    E = 1 if counts is None else len(counts)
    assert out.shape == ((M, N) if counts is None else (E, M, N)) and out.dtype == out_dtype
    assert not out.isnan().any()
    want = ref.fp8_k_grouped_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), None if offs is None else offs.cpu())
    if out_dtype == torch.float32:
        _close(out, want)
    else:
        assert gemm_diff(out.float().cpu(), want) < 2e-5
    # against the unquantized fp64 product (tokens past offs[-1] excluded by both)
    exact = _unquantized(dy, x, offs)
    nonzero = exact.abs().sum(dim=(-1, -2)) > 0 if counts else None
    if counts is None:
        assert gemm_diff(out.float().cpu(), exact) < 1e-3
    else:
        for e in range(E):
            if nonzero[e]:
                assert gemm_diff(out[e].float().cpu(), exact[e]) < 1e-3
            else:
                assert (out[e] == 0).all()  # experts without tokens: zeros


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_gemm_dequantized_reference(device):
    """Against an fp64 product of the dequantized operands, group by group (a second, independent
    statement of the numerics): tight."""
    counts = [129, 0, 64, 200]
    dy, x, offs, a, sa, b, sb = _wgrad_operands(393, 48, 72, counts, seed=5, device=device)
    out = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs).cpu()
    want = torch.zeros(4, 48, 72, dtype=torch.float64)
    for e, r0, r1, g in ref.k_groups(offs.cpu(), 393):
        da = a.cpu()[:, r0:r1].double() * sa.cpu()[:, g:g + 1].double()
        db = b.cpu()[:, r0:r1].double() * sb.cpu()[:, g:g + 1].double()
        want[e] += da @ db.T
    assert gemm_diff(out, want) < F32_TOL[device][1]


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_gemm_empty_and_degenerate(device):
    for M, N, T, counts in ((0, 8, 100, [50, 100]), (8, 0, 100, None), (8, 16, 0, [0, 0, 0]), (8, 16, 0, None),
                            (3, 5, 1, [1]), (3, 5, 2, [1, 1])):
        _, _, offs, a, sa, b, sb = _wgrad_operands(T, M, N, counts, seed=6, device=device)
        _poison_allocator(4096, device)
        out = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs)
        want = ref.fp8_k_grouped_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), None if offs is None else offs.cpu())
        assert out.shape == want.shape
        if out.numel():
            _close(out, want)


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_gemm_nan_inf(device):
    counts = [100, 60, 140]
    dy = randn(300, 40, seed=7, device=device)
    x = randn(300, 36, seed=8, device=device)
    dy[5, 7] = float("nan")       # expert 0: row 7 of dW[0] is NaN
    x[120, 3] = float("inf")      # expert 1: column 3 of dW[1] is NaN (Inf scale, NaN code)
    offs = _offs(counts, device)
    a, sa = lk.quantize_fp8_transposed(dy, offs)
    b, sb = lk.quantize_fp8_transposed(x, offs)
    out = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs).cpu()
    want = ref.fp8_k_grouped_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), offs.cpu())
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    assert out[0, 7].isnan().all() and out[1, :, 3].isnan().all() and torch.isfinite(out[2]).all()
    _close(out.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_gemm_unchecked_offs_follow_the_reference(device, monkeypatch):
    monkeypatch.delenv("LEANKERNELS_DEBUG", raising=False)
    a, sa = lk.quantize_fp8_transposed(randn(200, 24, seed=10, device=device))
    b, sb = lk.quantize_fp8_transposed(randn(200, 40, seed=11, device=device))
    for ends in ([120, 30, 180, 150], [-5, 60, 2**31 - 1, 7], [0, 0, 0, 0]):
        offs = torch.tensor(ends, dtype=torch.int32, device=device)
        G = math.ceil(200 / 128) + 3
        sa4 = randn(24, G, seed=12, device=device).abs()
        sb4 = randn(40, G, seed=13, device=device).abs()
        out = lk.fp8_k_grouped_gemm(a, sa4, b, sb4, offs)
        _close(out, ref.fp8_k_grouped_gemm(a.cpu(), sa4.cpu(), b.cpu(), sb4.cpu(), offs.cpu()))


def test_k_grouped_gemm_every_cpu_path():
    """The CPU kernel on each CPU path (vdpbf16ps and fp32 micro-kernels), hostile split."""
    counts = [0, 1, 127, 128, 129, 3, 0]
    dy, x, offs, a, sa, b, sb = _wgrad_operands(sum(counts) + 2, 70, 50, counts, seed=14)
    want = ref.fp8_k_grouped_gemm(a, sa, b, sb, offs)
    old = lk.cpu_path()
    try:
        for path in lk.cpu_paths():
            lk.set_cpu_path(path)
            _close(lk.fp8_k_grouped_gemm(a, sa, b, sb, offs), want)
            for dtype in DTYPES:
                xx = randn(300, 70, seed=15, dtype=dtype)
                o = _offs([100, 0, 77, 123])
                _assert_same_quant(lk.quantize_fp8_transposed(xx, o, "ue8m0"), ref.quantize_fp8_transposed(xx, o, "ue8m0"))
    finally:
        lk.set_cpu_path(old)


def test_k_grouped_gemm_items_of_several_strips_every_cpu_path(cpu_path):
    """Wide outputs: each CPU work item covers several strips of columns (row tails, N tail,
    an empty expert), stored row by row (cpu/gemm_body.h store_item), f32 and bf16 out."""
    counts = [300, 0, 129, 77]
    dy, x, offs, a, sa, b, sb = _wgrad_operands(sum(counts), 270, 1100, counts, seed=16)
    want = ref.fp8_k_grouped_gemm(a, sa, b, sb, offs)
    _close(lk.fp8_k_grouped_gemm(a, sa, b, sb, offs), want)
    got = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.bfloat16)
    torch.testing.assert_close(got, want.bfloat16(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counts", [None, [100, 0, 157]])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_k_grouped_gemm_out_and_accumulate(device, counts, out_dtype):
    """out=: the fresh output's values written over poison, in place (experts without tokens:
    zeros); accumulate=True: out + the fresh product, bitwise (one fp32 add per element), an
    expert without tokens untouched (its -0.0 keeps its sign: nothing was added to it)."""
    M, N = 40, 72
    _, _, offs, a, sa, b, sb = _wgrad_operands(300 if counts is None else sum(counts), M, N, counts, seed=31,
                                               device=device)
    want = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out_dtype=out_dtype)
    out = poison(torch.empty(want.shape, dtype=out_dtype, device=device))
    assert lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=out) is out
    assert torch.equal(out, want)
    if out_dtype is not torch.float32:
        return
    base = randn(*want.shape, seed=32, device=device) * want.abs().max()
    if counts is not None:
        base[1] = -0.0
    acc = base.clone()
    assert lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=acc, accumulate=True) is acc
    assert torch.equal(acc, base + want)
    if counts is not None:
        assert acc[1].signbit().all()
    acc2 = base.clone()  # twice: two gradient steps summed
    for _ in range(2):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=acc2, accumulate=True)
    assert torch.equal(acc2, (base + want) + want)


def test_k_grouped_gemm_accumulate_every_cpu_path(cpu_path):
    """The accumulating stores of every CPU path (avx512bf16's masked 16-wide stores, the
    others' scalar ones): several strips per item, row and N tails, an empty expert."""
    counts = [300, 0, 129, 77]
    _, _, offs, a, sa, b, sb = _wgrad_operands(sum(counts), 270, 1100, counts, seed=33)
    want = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs)
    _close(want, ref.fp8_k_grouped_gemm(a, sa, b, sb, offs))
    base = randn(*want.shape, seed=34) * want.abs().max()
    acc = base.clone()
    lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=acc, accumulate=True)
    assert torch.equal(acc, base + want)
    assert torch.equal(acc[1], base[1])


def test_k_grouped_gemm_out_bad_inputs():
    _, _, offs, a, sa, b, sb = _wgrad_operands(300, 16, 24, [100, 200], seed=35)
    with pytest.raises(ValueError, match="accumulate=True adds into out"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, accumulate=True)
    with pytest.raises(ValueError, match="out must have shape"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=torch.empty(16, 24))
    with pytest.raises(TypeError, match="out must have dtype"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=torch.empty(2, 16, 24, dtype=torch.float16))
    with pytest.raises(TypeError, match="accumulate=True needs a float32 out"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=torch.empty(2, 16, 24, dtype=torch.bfloat16), accumulate=True)
    with pytest.raises(ValueError, match="out must be contiguous"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=torch.empty(2, 24, 16).transpose(1, 2))
    with pytest.raises(TypeError, match="out must be"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=[[0.0]])
    # the op itself re-checks what would corrupt memory
    ops = torch.ops.leankernels
    with pytest.raises(ValueError, match="out must have shape"):
        ops.fp8_k_grouped_gemm_out(a, sa, b, sb, offs, torch.empty(2, 16, 23), False)
    with pytest.raises(TypeError, match="out has dtype torch.bfloat16"):
        ops.fp8_k_grouped_gemm_out(a, sa, b, sb, offs, torch.empty(2, 16, 24, dtype=torch.bfloat16), True)
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.fp8_k_grouped_gemm_out(a, sa, b, sb, offs, torch.empty(2, 24, 16).transpose(1, 2), False)


@pytest.mark.parametrize("device", DEVICES)
def test_k_grouped_gemm_out_opcheck_and_compile(device):
    _, _, offs, a, sa, b, sb = _wgrad_operands(300, 16, 24, [100, 200], seed=36, device=device)
    ops = torch.ops.leankernels
    for acc in (False, True):
        opcheck(ops.fp8_k_grouped_gemm_out.default, (a, sa, b, sb, offs, torch.zeros(2, 16, 24, device=device), acc))
    if device != "cpu":
        return

    def step(a, sa, b, sb, offs, g):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out=g, accumulate=True)
        return g * 2

    g0 = randn(2, 16, 24, seed=37)
    g1, g2 = g0.clone(), g0.clone()
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(a, sa, b, sb, offs, g1)
    want = step(a, sa, b, sb, offs, g2)
    assert torch.equal(got, want) and torch.equal(g1, g2)


def test_k_grouped_gemm_large_cpu_output_in_huge_pages(monkeypatch):
    """A CPU output of 8 MiB or more comes from the CPU buffer pool (_ops._HUGE_OUTPUT_BYTES;
    2 MiB aligned, huge pages where available): the same values as the ordinary allocation,
    against the reference, and writable. A pool block handed out again holds the previous
    output's values: the next call (other inputs, an expert emptied) must overwrite all of it."""
    from leankernels import _ops, memory
    counts = [200, 150]
    M, N = 1024, 2048  # 2 x 1024 x 2048 fp32 = 16 MiB
    assert len(counts) * M * N * 4 >= _ops._HUGE_OUTPUT_BYTES
    _, _, offs, a, sa, b, sb = _wgrad_operands(sum(counts), M, N, counts, seed=21)
    got = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs)
    assert got.data_ptr() % memory.HUGE_PAGE == 0
    monkeypatch.setenv("LEANKERNELS_HUGEPAGES", "0")
    plain = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs)
    assert torch.equal(got, plain)
    _close(got, ref.fp8_k_grouped_gemm(a, sa, b, sb, offs))
    got += 1.0  # an ordinary, writable tensor
    assert torch.equal(got, plain + 1.0)
    # the block again, now full of the previous output: other operands, expert 0 without tokens
    ptrs = {got.data_ptr(), plain.data_ptr()}  # (both from the pool)
    got.fill_(float("nan"))
    plain.fill_(float("nan"))
    del got, plain
    _, _, offs2, a2, sa2, b2, sb2 = _wgrad_operands(sum(counts), M, N, [0, 350], seed=22)
    again = lk.fp8_k_grouped_gemm(a2, sa2, b2, sb2, offs2)
    assert again.data_ptr() in ptrs or memory.cached_bytes() == 0
    assert torch.equal(again[0], torch.zeros(M, N))
    _close(again, ref.fp8_k_grouped_gemm(a2, sa2, b2, sb2, offs2))


def test_k_grouped_gemm_bad_inputs(monkeypatch):
    _, _, offs, a, sa, b, sb = _wgrad_operands(300, 16, 24, [100, 200], seed=16)
    with pytest.raises(TypeError, match="a must have dtype"):
        lk.fp8_k_grouped_gemm(a.float(), sa, b, sb, offs)
    with pytest.raises(TypeError, match="b_scale must have dtype"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb.double(), offs)
    with pytest.raises(ValueError, match="b has L = 299"):
        lk.fp8_k_grouped_gemm(a, sa, b[:, :299], sb, offs)
    with pytest.raises(ValueError, match="a_scale must have shape"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb)  # G = ceil(L/128) + E - 1 needs offs' E
    with pytest.raises(ValueError, match="b_scale must have shape"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb[:, :-1], offs)
    with pytest.raises(TypeError, match="offs must have dtype int32"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs.long())
    with pytest.raises(ValueError, match="offs must hold at least one expert"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs[:0])
    with pytest.raises(TypeError, match="out_dtype"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="a must have 2 dimensions"):
        lk.fp8_k_grouped_gemm(a[None], sa, b, sb, offs)
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, torch.tensor([200, 100], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offs\[-1\] = 301 exceeds the number of tokens L"):
        lk.fp8_k_grouped_gemm(a, sa, b, sb, torch.tensor([100, 301], dtype=torch.int32))
    # the op itself re-checks what would corrupt memory
    with pytest.raises(ValueError, match="a_scale must have shape"):
        torch.ops.leankernels.fp8_k_grouped_gemm(a, sa[:, :1], b, sb, offs, torch.float32)


@requires_cuda
def test_mixed_devices_rejected():
    _, _, offs, a, sa, b, sb = _wgrad_operands(300, 16, 24, [100, 200], seed=17)
    with pytest.raises(ValueError, match="b is on cuda"):
        lk.fp8_k_grouped_gemm(a, sa, b.cuda(), sb, offs)
    with pytest.raises(ValueError, match="offs is on"):
        lk.fp8_k_grouped_gemm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), offs)
    with pytest.raises(ValueError, match="offs is on"):
        lk.quantize_fp8_transposed(torch.randn(300, 8, device="cuda"), offs)


# ------------------------------------------------------------------------ torch integration
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.leankernels
    x = randn(200, 72, seed=18, device=device)
    offs = _offs([50, 0, 130], device)
    opcheck(ops.quantize_fp8_transposed.default, (x, offs, False))
    opcheck(ops.quantize_fp8_transposed.default, (x, None, True))
    _, _, _, a, sa, b, sb = _wgrad_operands(180, 24, 40, [50, 0, 130], seed=19, device=device)
    opcheck(ops.fp8_k_grouped_gemm.default, (a, sa, b, sb, offs, torch.float32))
    a1, sa1 = lk.quantize_fp8_transposed(randn(180, 24, seed=20, device=device))
    b1, sb1 = lk.quantize_fp8_transposed(randn(180, 40, seed=21, device=device))
    opcheck(ops.fp8_k_grouped_gemm.default, (a1, sa1, b1, sb1, None, torch.bfloat16))


def test_torch_compile_fullgraph():
    dy, x = randn(300, 24, seed=22), randn(300, 40, seed=23)
    offs = _offs([100, 0, 150])

    def wgrad(dy, x, offs):
        a, sa = lk.quantize_fp8_transposed(dy, offs)
        b, sb = lk.quantize_fp8_transposed(x * 2, offs)
        return lk.fp8_k_grouped_gemm(a, sa, b, sb, offs) + 1

    torch._dynamo.reset()
    got = torch.compile(wgrad, fullgraph=True, backend="aot_eager")(dy, x, offs)
    assert torch.equal(got, wgrad(dy, x, offs))


# ------------------------------------------------------------------------ GPU only
@requires_cuda
def test_cuda_graph_capture():
    """offs live on the device: new expert splits in place, the captured graph follows them."""
    T, M, N = 640, 96, 128
    dy, x = randn(T, M, seed=24, device="cuda"), randn(T, N, seed=25, device="cuda")
    offs = _offs([200, 0, 300, 140], "cuda")
    a, sa = lk.quantize_fp8_transposed(dy, offs)
    out = lk.fp8_k_grouped_gemm(a, sa, *lk.quantize_fp8_transposed(x, offs), offs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a, sa = lk.quantize_fp8_transposed(dy, offs)
        b, sb = lk.quantize_fp8_transposed(x, offs)
        out = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs)
    offs.copy_(_offs([1, 129, 0, 500], "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    oc = offs.cpu()
    ar, sar = ref.quantize_fp8_transposed(dy.cpu(), oc)
    br, sbr = ref.quantize_fp8_transposed(x.cpu(), oc)
    _assert_same_quant((a, sa), (ar, sar))
    _close(out, ref.fp8_k_grouped_gemm(ar, sar, br, sbr, oc))


@requires_cuda
@pytest.mark.parametrize("E,N_out,K", [(8, 1408, 2048), (64, 1408, 2048)])
def test_cuda_v2_lite_wgrad_shapes(E, N_out, K):
    """V2-Lite-like expert wgrad, ~4096 tokens: quantize bit-exact, GEMM against the reference."""
    g = torch.Generator().manual_seed(E)
    counts = torch.multinomial(torch.ones(E), 4096, replacement=True, generator=g).bincount(minlength=E)
    T = int(counts.sum())
    dy, x = randn(T, N_out, seed=26, device="cuda", dtype=torch.bfloat16), randn(T, K, seed=27, device="cuda",
                                                                               dtype=torch.bfloat16)
    offs = counts.cumsum(0).int().cuda()
    a, sa = lk.quantize_fp8_transposed(dy, offs)
    b, sb = lk.quantize_fp8_transposed(x, offs)
    _assert_same_quant((a, sa), ref.quantize_fp8_transposed(dy, offs))  # the reference runs on any device
    _assert_same_quant((b, sb), ref.quantize_fp8_transposed(x, offs))
    out = lk.fp8_k_grouped_gemm(a, sa, b, sb, offs)
    assert gemm_diff(out, ref.fp8_k_grouped_gemm(a, sa, b, sb, offs)) < 1e-6
    exact = torch.stack([dy[s:t].double().T @ x[s:t].double() for s, t in ref.k_group_segments(offs, T)])
    assert gemm_diff(out, exact) < 1e-3
