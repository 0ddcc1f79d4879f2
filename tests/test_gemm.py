"""FP8 block-scaled GEMMs (dense, grouped contiguous, grouped masked) against leankernels.reference."""
from __future__ import annotations

import pytest
import torch

import leankernels as lk
from leankernels import reference as ref
from conftest import DEVICES, HAS_CUDA, gemm_diff, opcheck, poison, randn, requires_cuda

FP8 = torch.float8_e4m3fn

# DeepSeek-V3 (N, K) pairs scaled down by 8 (2112x7168 -> 264x896, ...), plus hostile ones:
# N and K not multiples of 128 (and K not a multiple of 16, which the GPU loads byte-wise).
SHAPES = [
    (64, 264, 896),     # q/kv down-projection 2112 x 7168, /8
    (17, 3072, 192),    # 24576 x 1536, /8
    (33, 896, 256),     # 7168 x 2048, /8
    (5, 200, 300),      # partial N block, partial K block, K % 16 != 0
    (1, 7, 33),         # tiny
    (130, 130, 129),    # one row / column / K element past a tile
]


def _quant_a(x):
    return lk.quantize_fp8(x, (1, 128))


def _quant_b(w):
    return lk.quantize_fp8(w, (128, 128))


def _operands(M, N, K, E=None, seed=0, device="cpu"):
    """Unquantized x [M, K] / w [(E,) N, K] and their FP8 operands, all on `device`."""
    x = randn(M, K, seed=seed, device=device)
    w = randn(*((E,) if E else ()), N, K, seed=seed + 1, device=device, scale=0.05)
    a, sa = _quant_a(x)
    b, sb = _quant_b(w)
    return x, w, a, sa, b, sb


# fp32 output vs the reference on the same FP8 operands. On the CPU only the fp32 summation
# order differs (products are exact). GPU tensor cores may sum FP8 products inside one mma with
# a narrower accumulator (DeepSeek-V3 reports ~14 bits on Hopper), hence looser but still far
# below the 1e-3 quantization-level metric.
F32_DIFF = {"cpu": 1e-9, "cuda": 1e-6}
F32_RTOL = {"cpu": 1e-4, "cuda": 2e-3}


def _close_f32(got, want):
    dev = got.device.type
    torch.testing.assert_close(got, want, rtol=F32_RTOL[dev], atol=F32_RTOL[dev] * want.abs().max().item())
    assert gemm_diff(got, want) < F32_DIFF[dev]


def _check(out, a, sa, b, sb, x=None, w=None):
    """out vs the reference on the same FP8 operands (tight) and vs the unquantized product."""
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    if out.dtype == torch.float32:
        _close_f32(out, want)
    else:
        assert gemm_diff(out.float(), want) < 2e-5
    if x is not None and out.numel():
        assert gemm_diff(out.float(), x.float() @ w.float().T) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm(device, M, N, K, out_dtype):
    x, w, a, sa, b, sb = _operands(M, N, K, seed=M + N + K, device=device)
    out = lk.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype)
    assert out.shape == (M, N) and out.dtype == out_dtype and out.device == a.device
    assert not out.isnan().any()
    _check(out, a, sa, b, sb, x, w)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_flattens_leading_dims(device):
    """DeepSeek-V3's kernel.fp8_gemm takes [..., K] activations: same rows as the 2-D call."""
    _, _, a, sa, b, sb = _operands(24, 160, 300, seed=21, device=device)
    out = lk.fp8_gemm(a.view(2, 3, 4, 300), sa.view(2, 3, 4, -1), b, sb)
    assert out.shape == (2, 3, 4, 160)
    assert torch.equal(out.reshape(24, 160), lk.fp8_gemm(a, sa, b, sb))
    with pytest.raises(ValueError, match="a_scale"):
        lk.fp8_gemm(a.view(2, 12, 300), sa.view(3, 8, -1), b, sb)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_gemm_deterministic_and_empty(device):
    _, _, a, sa, b, sb = _operands(40, 96, 384, seed=3, device=device)
    assert torch.equal(lk.fp8_gemm(a, sa, b, sb), lk.fp8_gemm(a, sa, b, sb))
    out = lk.fp8_gemm(a[:0], sa[:0], b, sb)
    assert out.shape == (0, 96)
    # K = 0: an empty sum, so the product is exactly zero.
    z = lk.fp8_gemm(a[:, :0], sa[:, :0], b[:, :0], sb[:, :0], out_dtype=torch.float32)
    assert torch.equal(z, torch.zeros(40, 96, device=a.device))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x = randn(24, 512, seed=5, device=device)
    a_big, sa_big = _quant_a(x)
    a, sa = a_big[:, 128:384], sa_big[:, 1:3]      # row-strided views: K = 256, K blocks 1..2
    w = randn(2, 160, 256, seed=6, device=device, scale=0.05)
    b_c, sb_c = _quant_b(w)
    b = b_c.transpose(1, 2).contiguous().transpose(1, 2)    # same values, column-major storage
    sb = sb_c.transpose(1, 2).contiguous().transpose(1, 2)
    assert not a.is_contiguous() and not sa.is_contiguous() and not b.is_contiguous() and not sb.is_contiguous()
    got = lk.fp8_gemm(a, sa, b[1], sb[1], out_dtype=torch.float32)
    _check(got, a.contiguous(), sa.contiguous(), b_c[1], sb_c[1])
    offs = _offs([10, 14], device)
    got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
    want = lk.fp8_grouped_gemm(a.contiguous(), sa.contiguous(), b_c, sb_c, offs, out_dtype=torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_infinite_scale_gives_inf_like_the_reference(device, out_dtype):
    # Issue 16: an infinite scale must give the reference's +-inf, not NaN (a kernel that scales
    # each of its per-lane partial sums makes 0 * inf and inf - inf). The non-native (portable)
    # CPU path did; the native one already matched.
    a, s = _quant_a(randn(1, 128, seed=71, device=device))
    b, t = _quant_b(randn(1, 128, seed=72, device=device))
    s[0, 0] = float("inf")
    got = lk.fp8_gemm(a, s, b, t, out_dtype=out_dtype).cpu()
    want = ref.fp8_gemm(a.cpu(), s.cpu(), b.cpu(), t.cpu(), out_dtype)
    assert want.isinf().all()
    assert torch.equal(got, want), (got, want)
    # Several rows and K blocks: +-inf where a row's scale is infinite, finite elsewhere.
    M, N, K = 20, 24, 256
    _, _, a, s, b, t = _operands(M, N, K, seed=73, device=device)
    s[3, 1], s[7, 0] = float("inf"), -float("inf")
    got = lk.fp8_gemm(a, s, b, t, out_dtype=torch.float32).cpu()
    want = ref.fp8_gemm(a.cpu(), s.cpu(), b.cpu(), t.cpu(), torch.float32)
    inf_rows = torch.zeros(M, dtype=torch.bool)
    inf_rows[[3, 7]] = True
    assert want[inf_rows].isinf().all() and want[~inf_rows].isfinite().all()
    assert torch.equal(got[inf_rows], want[inf_rows])
    _close_f32(got[~inf_rows], want[~inf_rows])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [300, 4500])
def test_decode_rows_with_extreme_scales(device, K):
    # Experts with 1-4 rows take the CPU decode kernel's register path, whose per-block scaling
    # has a fast path (every |a_scale * b_scale| <= 2^100) and an exact one; a K tail (300) and
    # a second weight block row (N = 136) included. Inf and a huge finite scale must give the
    # reference's values, and only in their own rows.
    counts, N = [1, 2, 3, 0, 4, 2], 136  # K = 4500: weight rows in groups of 4 on the CPU
    M = sum(counts)
    _, _, a, s, b, t = _operands(M, N, K, E=len(counts), seed=81, device=device)
    s[1, 2] = float("inf")               # expert 1 (2 rows), its last (partial) K block
    s[4, 0] = -float("inf")              # expert 2 (3 rows)
    s[6, 1] = 2.0 ** 116                 # expert 4 (4 rows): finite, past the fast path's bound
    offs = _offs(counts, device)
    got = lk.fp8_grouped_gemm(a, s, b, t, offs, out_dtype=torch.float32).cpu()
    want = ref.fp8_grouped_gemm(a.cpu(), s.cpu(), b.cpu(), t.cpu(), offs.cpu(), torch.float32)
    assert want[[1, 4]].isinf().all() and want[6].isfinite().all() and want[6].abs().max() > 2.0 ** 100
    assert torch.equal(got[[1, 4]], want[[1, 4]])
    keep = [r for r in range(M) if r not in (1, 4)]
    _close_f32(got[keep], want[keep])


def _offs(counts, device):
    return torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)


CONTIGUOUS_CASES = [
    # (counts per expert, extra rows past offs[-1], N, K)
    ([16, 16, 16, 16], 0, 256, 512),      # decode-like: 16 rows per expert
    ([0, 37, 0, 70, 1], 0, 200, 300),     # experts with zero rows, partial blocks
    ([0, 0, 90, 0], 0, 264, 384),         # all rows on one expert
    ([5, 0, 64, 3], 11, 136, 257),        # rows past offs[-1] stay untouched
    ([0, 0, 0], 4, 64, 128),              # no routed rows at all
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counts,extra,N,K", CONTIGUOUS_CASES)
def test_fp8_grouped_gemm(device, counts, extra, N, K):
    E, M = len(counts), sum(counts) + extra
    x, w, a, sa, b, sb = _operands(M, N, K, E=E, seed=M + N, device=device)
    offs = _offs(counts, device)
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32, out=torch.zeros(M, N, device=device))
    end = sum(counts)

    out = poison(torch.empty(M, N, dtype=torch.float32, device=device))
    got = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=out)
    assert got is out
    assert out[end:].isnan().all(), "rows past offs[-1] must not be written"
    assert not out[:end].isnan().any()
    if end:
        _close_f32(out[:end], want[:end])
        start = 0
        for e, c in enumerate(counts):  # against the unquantized per-expert product
            if c:
                assert gemm_diff(out[start:start + c], x[start:start + c] @ w[e].T) < 1e-3
            start += c

    fresh = lk.fp8_grouped_gemm(a, sa, b, sb, offs)  # bf16, new tensor: rows past the end are 0
    assert fresh.dtype == torch.bfloat16 and fresh.shape == (M, N)
    assert torch.equal(fresh[end:], torch.zeros_like(fresh[end:]))
    if end:
        assert gemm_diff(fresh[:end].float(), want[:end]) < 2e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_grouped_gemm_empty(device):
    _, _, a, sa, b, sb = _operands(0, 64, 256, E=3, device=device)
    out = lk.fp8_grouped_gemm(a, sa, b, sb, torch.zeros(3, dtype=torch.int32, device=device))
    assert out.shape == (0, 64)


MASKED_CASES = [
    # (masked_m per expert, M_max, N, K)
    ([16, 16, 16, 16], 16, 256, 512),
    ([0, 24, 7], 24, 200, 300),
    ([0, 0], 8, 64, 128),
    ([65, 1], 80, 136, 257),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked,M_max,N,K", MASKED_CASES)
def test_fp8_grouped_gemm_masked(device, masked, M_max, N, K):
    E = len(masked)
    x = randn(E, M_max, K, seed=N + K, device=device)
    w = randn(E, N, K, seed=N + K + 1, device=device, scale=0.05)
    a, sa = _quant_a(x)
    b, sb = _quant_b(w)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=device)
    out = poison(torch.empty(E, M_max, N, dtype=torch.float32, device=device))
    got = lk.fp8_grouped_gemm_masked(a, sa, b, sb, masked_m, out=out)
    assert got is out
    fresh = lk.fp8_grouped_gemm_masked(a, sa, b, sb, masked_m)
    assert fresh.dtype == torch.bfloat16
    for e, m in enumerate(masked):
        assert out[e, m:].isnan().all(), "rows past masked_m must not be written"
        assert torch.equal(fresh[e, m:], torch.zeros_like(fresh[e, m:]))
        if m:
            want = ref.fp8_gemm(a[e, :m], sa[e, :m], b[e], sb[e], torch.float32)
            _close_f32(out[e, :m], want)
            assert gemm_diff(fresh[e, :m].float(), want) < 2e-5
            assert gemm_diff(out[e, :m], x[e, :m] @ w[e].T) < 1e-3


def test_reference_masked_matches_dense():
    _, _, a, sa, b, sb = _operands(12, 64, 200, E=2, seed=9)
    a3, sa3 = a.view(2, 6, 200), sa.view(2, 6, -1)
    got = ref.fp8_grouped_gemm_masked(a3, sa3, b, sb, torch.tensor([6, 3], dtype=torch.int32), torch.float32)
    torch.testing.assert_close(got[1, :3], ref.fp8_gemm(a3[1, :3], sa3[1, :3], b[1], sb[1], torch.float32))


# ------------------------------------------------------------------------------ bad inputs
def _bad_setup(device="cpu"):
    _, _, a, sa, b, sb = _operands(20, 64, 256, E=2, seed=11, device=device)
    offs = _offs([8, 12], device)
    return a, sa, b, sb, offs


def test_bad_inputs_dense():
    a, sa, b, sb, _ = _bad_setup()
    with pytest.raises(TypeError, match="a must have dtype"):
        lk.fp8_gemm(a.float(), sa, b[0], sb[0])
    with pytest.raises(TypeError, match="b must have dtype"):
        lk.fp8_gemm(a, sa, b[0].to(torch.bfloat16), sb[0])
    with pytest.raises(TypeError, match="a_scale must have dtype"):
        lk.fp8_gemm(a, sa.double(), b[0], sb[0])
    with pytest.raises(ValueError, match="b has K = 128 but a has K = 256"):
        lk.fp8_gemm(a, sa, b[0][:, :128], sb[0][:, :1])
    with pytest.raises(ValueError, match="a_scale must have shape"):
        lk.fp8_gemm(a, sa[:, :1], b[0], sb[0])
    with pytest.raises(ValueError, match="b_scale must have shape"):
        lk.fp8_gemm(a, sa, b[0], sb[0][:, :1])
    with pytest.raises(ValueError, match="b must have 2 dimensions"):
        lk.fp8_gemm(a, sa, b, sb)
    with pytest.raises(TypeError, match="out_dtype"):
        lk.fp8_gemm(a, sa, b[0], sb[0], out_dtype=torch.float16)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        lk.fp8_gemm([1, 2], sa, b[0], sb[0])


def test_bad_inputs_grouped(monkeypatch):
    a, sa, b, sb, offs = _bad_setup()
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")  # offs values are read on the host only in debug mode
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        lk.fp8_grouped_gemm(a, sa, b, sb, torch.tensor([12, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offs\[-1\] = 21 exceeds"):
        lk.fp8_grouped_gemm(a, sa, b, sb, torch.tensor([8, 21], dtype=torch.int32))
    monkeypatch.delenv("LEANKERNELS_DEBUG")
    with pytest.raises(TypeError, match="offs must have dtype int32"):
        lk.fp8_grouped_gemm(a, sa, b, sb, offs.long())
    with pytest.raises(ValueError, match="offs must have shape"):
        lk.fp8_grouped_gemm(a, sa, b, sb, offs[:1])
    with pytest.raises(ValueError, match="b_scale must have shape"):
        lk.fp8_grouped_gemm(a, sa, b, sb[0], offs)
    with pytest.raises(ValueError, match="b has K"):
        lk.fp8_grouped_gemm(a, sa, b[:, :, :128], sb[:, :, :1], offs)
    with pytest.raises(ValueError, match="out must have shape"):
        lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=torch.empty(19, 64))
    with pytest.raises(TypeError, match="out must have dtype"):
        lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=torch.empty(20, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=torch.empty(64, 20).T)


def test_bad_inputs_masked(monkeypatch):
    a, sa, b, sb, _ = _bad_setup()
    a3, sa3 = a.view(2, 10, 256), sa.view(2, 10, 2)
    mm = torch.tensor([3, 10], dtype=torch.int32)
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")  # masked_m values are read on the host only in debug mode
    with pytest.raises(ValueError, match="masked_m values must lie in"):
        lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, torch.tensor([3, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="masked_m values must lie in"):
        lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, torch.tensor([-1, 1], dtype=torch.int32))
    monkeypatch.delenv("LEANKERNELS_DEBUG")
    with pytest.raises(ValueError, match="b must hold at least one expert"):
        lk.fp8_grouped_gemm_masked(a3[:0], sa3[:0], b[:0], sb[:0], mm[:0])
    with pytest.raises(ValueError, match="a has 1 groups but b has 2"):
        lk.fp8_grouped_gemm_masked(a3[:1], sa3[:1], b, sb, mm)
    with pytest.raises(ValueError, match="a must have 3 dimensions"):
        lk.fp8_grouped_gemm_masked(a, sa, b, sb, mm)
    with pytest.raises(TypeError, match="masked_m must have dtype int32"):
        lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, mm.float())


def test_scale_shapes_checked_on_the_common_path():
    """The wrappers' one-expression check of plain CPU operands (gemm._operands) lets nothing
    through that the full checks reject: each scale off by one block, in any dim, raises and
    names the argument; Parameters as weights pass."""
    a, sa, b, sb, offs = _bad_setup()  # a [20, 256], b [2, 64, 256]: 2 K blocks, 1 N block
    for bad_sa in (torch.ones(20, 3), torch.ones(21, 2), torch.ones(20, 2, 1)):
        with pytest.raises(ValueError, match="a_scale must have shape"):
            lk.fp8_grouped_gemm(a, bad_sa, b, sb, offs)
    for bad_sb in (torch.ones(2, 1, 3), torch.ones(2, 2, 2), torch.ones(3, 1, 2), torch.ones(1, 2)):
        with pytest.raises(ValueError, match="b_scale must have shape"):
            lk.fp8_grouped_gemm(a, sa, b, bad_sb, offs)
    with pytest.raises(ValueError, match="b_scale must have shape"):
        lk.fp8_gemm(a, sa, b[0], torch.ones(2, 2))
    with pytest.raises(ValueError, match="a_scale must have shape"):
        lk.fp8_grouped_gemm_masked(a.view(2, 10, 256), torch.ones(2, 10, 1), b, sb, offs)
    wp, sp = torch.nn.Parameter(b, requires_grad=False), torch.nn.Parameter(sb, requires_grad=False)
    want = lk.fp8_grouped_gemm(a, sa, b, sb, offs)
    assert torch.equal(lk.fp8_grouped_gemm(a, sa, wp, sp, offs), want)


def test_debug_switch_follows_the_environment(monkeypatch):
    """LEANKERNELS_DEBUG is read on every call: set, "0", "" and unset at run time."""
    from leankernels import _checks
    monkeypatch.delenv("LEANKERNELS_DEBUG", raising=False)
    assert not _checks.debug()
    for value, on in (("1", True), ("0", False), ("", False), ("yes", True)):
        monkeypatch.setenv("LEANKERNELS_DEBUG", value)
        assert _checks.debug() is on, value
    monkeypatch.delenv("LEANKERNELS_DEBUG")
    assert not _checks.debug()
    a, sa, b, sb, _ = _bad_setup()
    bad = torch.tensor([12, 8], dtype=torch.int32)
    lk.fp8_grouped_gemm(a, sa, b, sb, bad)  # unchecked: clamped by the kernel
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        lk.fp8_grouped_gemm(a, sa, b, sb, bad)


@requires_cuda
def test_bad_inputs_devices():
    a, sa, b, sb, offs = _bad_setup()
    with pytest.raises(ValueError, match="b is on cuda"):
        lk.fp8_grouped_gemm(a, sa, b.cuda(), sb, offs)
    with pytest.raises(ValueError, match="offs is on"):
        lk.fp8_grouped_gemm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), offs)


@requires_cuda
def test_cuda_debug_offs_check(monkeypatch):
    a, sa, b, sb, _ = _bad_setup("cuda")
    bad = torch.tensor([12, 8], dtype=torch.int32, device="cuda")
    lk.fp8_grouped_gemm(a, sa, b, sb, bad)  # unchecked on the device: no error, no OOB access
    torch.cuda.synchronize()
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        lk.fp8_grouped_gemm(a, sa, b, sb, bad)


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_group_sizes_follow_the_reference(device, monkeypatch):
    """Without LEANKERNELS_DEBUG, offs / masked_m are never read on the host (no copy, no sync):
    decreasing, negative or too-large values are clamped by the kernel, as in the reference, and
    rows no expert owns are left untouched (NaN-poisoned out stays NaN there)."""
    monkeypatch.delenv("LEANKERNELS_DEBUG", raising=False)
    _, _, a, sa, b, sb = _operands(40, 136, 257, E=4, seed=41, device=device)
    for ends in ([12, 8, 30, 35], [-3, 20, 50, 7], [0, 0, 0, 2**31 - 1], [41, 41, 41, 41]):
        offs = torch.tensor(ends, dtype=torch.int32, device=device)
        out = poison(torch.empty(40, 136, device=device))
        lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=out)
        want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, out=poison(torch.empty(40, 136, device=device)))
        assert torch.equal(out.isnan(), want.isnan()), ends
        _close_f32(torch.nan_to_num(out), torch.nan_to_num(want))
    a3, sa3 = a.view(4, 10, 257), sa.view(4, 10, -1)
    for mm in ([11, -1, 10, 3], [2**31 - 1, -2**31, 0, 10]):
        masked_m = torch.tensor(mm, dtype=torch.int32, device=device)
        out = poison(torch.empty(4, 10, 136, device=device))
        lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, masked_m, out=out)
        want = ref.fp8_grouped_gemm_masked(a3, sa3, b, sb, masked_m, out=poison(torch.empty(4, 10, 136, device=device)))
        assert torch.equal(out.isnan(), want.isnan()), mm
        _close_f32(torch.nan_to_num(out), torch.nan_to_num(want))


# ------------------------------------------------------------------------ torch integration
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.leankernels
    _, _, a, sa, b, sb = _operands(24, 136, 257, E=3, seed=13, device=device)
    offs = _offs([5, 0, 19], device)
    a3, sa3 = a.view(3, 8, 257), sa.view(3, 8, -1)
    mm = torch.tensor([8, 0, 3], dtype=torch.int32, device=device)
    checks = [
        (ops.fp8_gemm.default, (a, sa, b[0], sb[0], torch.bfloat16)),
        (ops.fp8_grouped_gemm.default, (a, sa, b, sb, offs, torch.float32)),
        (ops.fp8_grouped_gemm_out.default, (a, sa, b, sb, offs, torch.zeros(24, 136, device=device))),
        (ops.fp8_grouped_gemm_masked.default, (a3, sa3, b, sb, mm, torch.bfloat16)),
        (ops.fp8_grouped_gemm_masked_out.default, (a3, sa3, b, sb, mm, torch.zeros(3, 8, 136, device=device))),
    ]
    for op, args in checks:
        opcheck(op, args)  # conftest: opcheck with our own bitwise no-mutation check for fp8 inputs


def test_torch_compile_fullgraph():
    _, _, a, sa, b, sb = _operands(40, 136, 257, E=2, seed=17)
    offs = _offs([15, 25], "cpu")
    mm = torch.tensor([20, 7], dtype=torch.int32)

    def f(a, sa, b, sb, offs, mm):
        y = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
        z = lk.fp8_grouped_gemm_masked(a.view(2, 20, -1), sa.view(2, 20, -1), b, sb, mm)
        d = lk.fp8_gemm(a, sa, b[0], sb[0])
        return y * 2, z.float().sum(), d

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(a, sa, b, sb, offs, mm)
    want = f(a, sa, b, sb, offs, mm)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@requires_cuda
def test_cuda_graph_capture():
    x, w, a, sa, b, sb = _operands(96, 256, 512, E=4, seed=19, device="cuda")
    offs = _offs([10, 0, 50, 30], "cuda")
    a3, sa3 = a.view(4, 24, 512), sa.view(4, 24, -1)
    mm = torch.tensor([24, 0, 5, 13], dtype=torch.int32, device="cuda")
    out = poison(torch.empty(96, 256, dtype=torch.float32, device="cuda"))
    out_m = poison(torch.empty(4, 24, 256, dtype=torch.float32, device="cuda"))
    lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=out)  # warm up outside the capture
    lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, mm, out=out_m)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lk.fp8_grouped_gemm(a, sa, b, sb, offs, out=out)
        lk.fp8_grouped_gemm_masked(a3, sa3, b, sb, mm, out=out_m)
    # New group sizes in place: the captured kernels read them on the device.
    offs.copy_(_offs([0, 40, 20, 20], "cuda"))
    mm.copy_(torch.tensor([3, 24, 0, 9], dtype=torch.int32))
    poison(out)
    poison(out_m)
    graph.replay()
    torch.cuda.synchronize()
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32, out=torch.zeros_like(out))
    _close_f32(out[:80], want[:80])
    assert out[80:].isnan().all()
    for e, m in enumerate([3, 24, 0, 9]):
        assert out_m[e, m:].isnan().all()
        if m:
            want_m = ref.fp8_gemm(a3[e, :m], sa3[e, :m], b[e], sb[e], torch.float32)
            _close_f32(out_m[e, :m], want_m)


# "auto" takes the Hopper wgmma kernel on sm_90 where it supports the shape; "portable" forces
# the mma.sync kernel every sm_80+ GPU runs, so a Hopper session tests both.
BACKENDS = ["auto", "portable"]


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,rows,N,K", [(8, 512, 4096, 7168), (4, 300, 7168, 2048), (2, 100, 2112, 7168)])
def test_cuda_deepseek_shapes(E, rows, N, K, backend, monkeypatch):
    """Full DeepSeek-V3 N, K on the GPU (the vector cp.async path), against the reference."""
    monkeypatch.setenv("LEANKERNELS_GEMM_BACKEND", backend)
    x, w, a, sa, b, sb = _operands(E * rows, N, K, E=E, seed=E + N, device="cuda")
    offs = _offs([rows] * E, "cuda")
    out = lk.fp8_grouped_gemm(a, sa, b, sb, offs)
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32, out=torch.zeros(E * rows, N, device="cuda"))
    assert gemm_diff(out.float(), want) < 2e-5
    d = lk.fp8_gemm(a[:rows], sa[:rows], b[0], sb[0], out_dtype=torch.float32)
    _close_f32(d, want[:rows])


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(backend, monkeypatch):
    monkeypatch.setenv("LEANKERNELS_GEMM_BACKEND", backend)
    _, _, a, sa, b, sb = _operands(70, 200, 300, E=3, seed=23)
    offs = _offs([20, 0, 50], "cpu")
    cpu = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
    gpu = lk.fp8_grouped_gemm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), offs.cuda(), out_dtype=torch.float32)
    _close_f32(gpu, cpu.cuda())


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_unchecked_decreasing_offs_follow_the_reference(backend, monkeypatch):
    """CUDA does not check offs (no host sync): a decreasing end must still give every row to one
    expert, the first whose end exceeds it (reference rule), not to two racing tiles."""
    monkeypatch.setenv("LEANKERNELS_GEMM_BACKEND", backend)
    monkeypatch.delenv("LEANKERNELS_DEBUG", raising=False)
    _, _, a, sa, b, sb = _operands(300, 200, 304, E=5, seed=31, device="cuda")
    offs = torch.tensor([150, 40, 290, 100, 999], dtype=torch.int32, device="cuda")
    out = lk.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32)
    want = ref.fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32, out=torch.zeros(300, 200, device="cuda"))
    _close_f32(out, want)
