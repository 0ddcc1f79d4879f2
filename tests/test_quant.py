"""quantize_fp8 / dequantize_fp8: bit-exactness against the reference and PyTorch's own e4m3."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import leankernels as lk
from leankernels import reference as ref

from conftest import DEVICES, HAS_CUDA, opcheck, randn, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKS = [(1, 128), (128, 128)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def assert_same_quant(got, want):
    q, s = got
    qr, sr = want
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert q.shape == qr.shape and s.shape == sr.shape
    # bit for bit, NaN codes included: their sign is the input's on every device (fp8.h)
    assert torch.equal(bits(q.cpu()), bits(qr.cpu())), "fp8 codes differ from the reference"
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ the codec
def test_codec_matches_torch_on_every_float_pattern_class():
    """The C++ codec equals torch's float8_e4m3fn conversion on a dense sweep of fp32 values,
    including subnormals, ties (round half to even), the saturation edge and signed zeros."""
    pos = torch.cat([
        torch.linspace(0, 1, 20001),
        torch.linspace(0, 448, 20001),
        torch.logspace(-12, math.log10(448), 20001),
        # exact midpoints between adjacent e4m3 values: ties must round to even
        (lambda v: (v[1:] + v[:-1]) / 2)(torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()),
        torch.tensor([0.0, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10, 2.0**-6, 447.9, 448.0]),
    ])
    vals = torch.cat([pos, -pos]).reshape(1, -1)
    # scale exactly 1: pad the row with a group amax of 448 so x / scale == x
    K = vals.shape[1]
    x = vals.clone()
    x[0, ::128] = 448.0
    q, s = lk.quantize_fp8(x)
    assert torch.all(s == 1.0)
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(bits(q), bits(want))
    # decode: every byte pattern
    allq = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    d = lk.dequantize_fp8(allq, torch.ones(2, 1))
    torch.testing.assert_close(d, allq.float(), rtol=0, atol=0, equal_nan=True)
    assert K > 0


def test_codec_normal_only_groups_round_half_to_even():
    """Groups whose every |x / scale| is a normal e4m3 (>= 2^-6) take the AVX-512 codec's path
    without the subnormal branch: ties between adjacent normal codes, one fp32 ulp either side
    of each tie, both signs, with fp32 and UE8M0 scales (scale 1 and 2^-3 * a power of two)."""
    codes = torch.arange(8, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 2^-6 .. 448
    mid = (codes[1:] + codes[:-1]) / 2
    vals = torch.cat([codes, mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    vals = vals[(vals >= 2.0**-6) & (vals <= 448)]
    vals = torch.cat([vals, -vals])
    vals = vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(3))]
    n = -(-vals.numel() // 127)
    x = torch.full((n * 127,), 1.0)  # pad with an ordinary normal value
    x[: vals.numel()] = vals
    x = torch.cat([torch.full((n, 1), 448.0), x.reshape(n, 127)], 1).reshape(1, -1)  # one 448 per group
    for fmt, mult in (("fp32", 1.0), ("ue8m0", 2.0**-3)):
        xs = x * mult
        q, s = lk.quantize_fp8(xs, scale_fmt=fmt)
        assert_same_quant((q, s), ref.quantize_fp8(xs, (1, 128), fmt))
        if fmt == "fp32":
            assert torch.all(s == 1.0)
            assert torch.equal(bits(q), bits(x.to(torch.float8_e4m3fn)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codec_division_near_ties_every_cpu_path(dtype):
    """The SIMD codecs' quotient (no vdivps: x * RN(1/s) corrected by two FMAs) must be the IEEE
    x / s: groups with random non-power-of-two scales whose values are x = RN(t * s) for every
    e4m3 tie point t and its neighbours, so x / s lands within an ulp of a tie; signed zeros and
    values far below the e4m3 range included; every CPU path, 1x128 and 128x128 blocks and the
    transposed quantization, against PyTorch's own x / s and e4m3 conversion."""
    g = torch.Generator().manual_seed(11)
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ties = torch.cat([(codes[1:] + codes[:-1]) / 2, codes[1:]])
    t = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    t = torch.cat([t, -t, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0**-10, -(2.0**-10)])])
    groups = -(-t.numel() // 127)
    amax = torch.rand(groups, generator=g, dtype=torch.float64) * 1e3 + 1e-3   # any scale
    s = (amax.float() / 448).double()
    x = torch.zeros(groups, 128, dtype=torch.float64)
    x[:, 0] = amax.float().double()                          # the group's amax: scale = RN(amax / 448)
    tt = torch.zeros(groups * 127, dtype=torch.float64)
    tt[: t.numel()] = t[torch.randperm(t.numel(), generator=g)].double()
    x[:, 1:] = (tt.reshape(groups, 127) * s[:, None]).clamp(-amax[:, None], amax[:, None])
    x = x.to(dtype).reshape(1, -1)
    xt = torch.cat([x.reshape(groups, 128)] * 2, 0)[:128].contiguous()   # 128 rows for the 128x128 / transposed cases
    old = lk.cpu_path()
    try:
        for path in lk.cpu_paths():
            lk.set_cpu_path(path)
            for inp, block in ((x, (1, 128)), (xt, (128, 128))):
                q, sc = lk.quantize_fp8(inp, block)
                qr, sr = ref.quantize_fp8(inp, block)
                assert torch.equal(sc, sr), path
                assert torch.equal(bits(q), bits(qr)), (path, block)
            qt, st_ = lk.quantize_fp8_transposed(xt)
            qtr, str_ = ref.quantize_fp8_transposed(xt)
            assert torch.equal(st_, str_) and torch.equal(bits(qt), bits(qtr)), path
    finally:
        lk.set_cpu_path(old)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_matches_reference(device, dtype, block, scale_fmt):
    shape = (3, 200, 300) if block == (128, 128) else (5, 33, 300)  # K, N not multiples of 128
    x = randn(*shape, seed=hash((str(dtype), block, scale_fmt)) % 1000, dtype=dtype, device=device, scale=3.0)
    got = lk.quantize_fp8(x, block, scale_fmt)
    want = ref.quantize_fp8(x.cpu(), block, scale_fmt)
    assert_same_quant(got, want)
    if scale_fmt == "ue8m0":
        s = got[1]
        assert torch.equal(s, torch.exp2(torch.log2(s).round())), "ue8m0 scales must be powers of two"
    deq = lk.dequantize_fp8(*got, block)
    assert deq.device.type == device
    torch.testing.assert_close(deq.cpu(), ref.dequantize_fp8(*want, block), rtol=0, atol=0)
    # the round trip is within half an e4m3 step of the original (relative 2^-4 of the group max)
    err = (deq.cpu() - x.cpu().float()).abs()
    bound = ref.expand_scale(want[1], x.shape, block) * 448 * 2.0**-4 + 1e-6
    assert torch.all(err <= bound)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    K=st.integers(1, 700),
    dtype=st.sampled_from(DTYPES),
    scale=st.floats(1e-6, 1e4),
    ue8m0=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_1x128_bit_exact(lead, K, dtype, scale, ue8m0, seed):
    x = randn(*lead, K, seed=seed, dtype=dtype, scale=scale)
    fmt = "ue8m0" if ue8m0 else "fp32"
    assert_same_quant(lk.quantize_fp8(x, (1, 128), fmt), ref.quantize_fp8(x, (1, 128), fmt))


@settings(max_examples=25, deadline=None)
@given(
    E=st.integers(0, 3), N=st.integers(1, 300), K=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), three_d=st.booleans(),
)
def test_hypothesis_128x128_bit_exact(E, N, K, dtype, seed, three_d):
    shape = (E, N, K) if three_d else (N, K)
    x = randn(*shape, seed=seed, dtype=dtype)
    assert_same_quant(lk.quantize_fp8(x, (128, 128)), ref.quantize_fp8(x, (128, 128)))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = randn(64, 1000, seed=3, device=device)
    views = [
        base[:, 100:900],          # row-strided
        base[::2, :700],           # every other row
        base.t()[:300, :40].t(),   # transposed (column stride != 1)
        base.reshape(8, 8, 1000)[:, 1::2, 13:600],  # 3-D, leading dims that do not collapse
    ]
    for v in views:
        assert_same_quant(lk.quantize_fp8(v), ref.quantize_fp8(v.cpu()))
    w = randn(3, 300, 400, seed=4, device=device)[:, 10:290, 7:390]
    assert_same_quant(lk.quantize_fp8(w, (128, 128)), ref.quantize_fp8(w.cpu(), (128, 128)))
    wt = randn(260, 140, seed=5, device=device).t()
    assert_same_quant(lk.quantize_fp8(wt, (128, 128)), ref.quantize_fp8(wt.cpu(), (128, 128)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,block", [((0, 256), (1, 128)), ((4, 0, 7168), (1, 128)), ((0, 130), (128, 128)),
                                         ((2, 0, 64), (128, 128)), ((0, 5, 9), (128, 128))])
def test_empty(device, shape, block):
    x = torch.randn(shape, device=device)
    q, s = lk.quantize_fp8(x, block)
    qr, sr = ref.quantize_fp8(x.cpu(), block)
    assert q.shape == qr.shape and s.shape == sr.shape
    assert lk.dequantize_fp8(q, s, block).shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_output_fully_written(device):
    """Outputs are fresh allocations; poisoning the caching allocator's memory first must not
    leak through (every code and every scale is written)."""
    x = randn(130, 300, seed=9, device=device)
    junk = torch.full((130 * 300 * 4,), float("nan"), device=device)
    del junk
    q, s = lk.quantize_fp8(x)
    assert not torch.isnan(q.float()).any() and not torch.isnan(s).any()


# ------------------------------------------------------------------------------ NaN and Inf
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", BLOCKS)
def test_nan_and_inf_semantics(device, block):
    x = randn(256, 384, seed=11, device=device)
    x[0, 5] = float("nan")        # group (row 0 / block 0, cols 0..127)
    x[200, 300] = float("inf")    # group (row 200 / block 1, cols 256..383)
    x[3, 200] = -float("inf")     # group (row 3 / block 0, cols 128..255)
    q, s = lk.quantize_fp8(x, block)
    assert_same_quant((q, s), ref.quantize_fp8(x.cpu(), block))
    qf, s = q.float().cpu(), s.cpu()
    if block == (1, 128):
        assert torch.isnan(s[0, 0]) and torch.isnan(qf[0, :128]).all()
        assert torch.isinf(s[200, 2]) and torch.isnan(qf[200, 300])
        assert (qf[200, 256:384].nan_to_num(0) == 0).all()
        assert torch.isinf(s[3, 1])
        assert torch.isfinite(s[1]).all()   # other groups unaffected
    else:
        assert torch.isnan(s[0, 0]) and torch.isnan(qf[:128, :128]).all()
        assert torch.isinf(s[1, 2]) and torch.isinf(s[0, 1])
        assert torch.isfinite(s[1, :2]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", BLOCKS)
def test_nan_codes_carry_the_input_sign(device, block):
    """One rule on CPU and CUDA (x86 division gives Inf / Inf a negative NaN, CUDA's a positive
    one): a NaN code is 0x7F for a non-negative input and 0xFF for a negative one."""
    x = randn(128, 256, seed=12, device=device)
    x[0, 0], x[0, 1] = float("inf"), -float("inf")        # Inf group: Inf / Inf is NaN
    x[1, 2], x[1, 3] = float("nan"), -float("nan")         # NaN group
    x[2, 130] = float("nan")                               # a NaN group of positive and negative values
    q, _ = lk.quantize_fp8(x, block)
    b, xs = bits(q.cpu()), x.cpu()
    nan = (b & 0x7F) == 0x7F
    assert nan.any()
    want = torch.where(torch.signbit(xs), 0xFF, 0x7F).to(torch.uint8)
    assert torch.equal(b[nan], want[nan])
    assert bool((b[0, 0] == 0x7F) and (b[0, 1] == 0xFF) and (b[1, 3] == 0xFF))


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 256)
    with pytest.raises(TypeError, match="x"):
        lk.quantize_fp8(torch.randint(0, 5, (4, 256)))
    with pytest.raises(TypeError, match="x"):
        lk.quantize_fp8(x.numpy())
    with pytest.raises(ValueError, match="block"):
        lk.quantize_fp8(x, (1, 64))
    with pytest.raises(TypeError, match="block"):
        lk.quantize_fp8(x, 128)
    with pytest.raises(ValueError, match="scale_fmt"):
        lk.quantize_fp8(x, scale_fmt="e8m0")
    with pytest.raises(ValueError, match="x"):
        lk.quantize_fp8(torch.randn(2, 2, 2, 256), (128, 128))
    with pytest.raises(ValueError, match="x"):
        lk.quantize_fp8(torch.tensor(1.0))
    q, s = lk.quantize_fp8(x)
    with pytest.raises(TypeError, match="x_fp8"):
        lk.dequantize_fp8(x, s)
    with pytest.raises(TypeError, match="scale"):
        lk.dequantize_fp8(q, s.double())
    with pytest.raises(ValueError, match="scale"):
        lk.dequantize_fp8(q, s[:, :1])
    with pytest.raises(ValueError, match="scale"):
        lk.dequantize_fp8(q, s, (128, 128))


@requires_cuda
def test_mixed_devices_rejected():
    q, s = lk.quantize_fp8(torch.randn(4, 256))
    with pytest.raises(ValueError, match="scale"):
        lk.dequantize_fp8(q, s.cuda())


# ------------------------------------------------------------------------------ torch integration
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = randn(3, 300, seed=21, device=device)
    opcheck(torch.ops.leankernels.quantize_fp8.default, (x, 1, False))
    w = randn(2, 130, 260, seed=22, device=device)
    opcheck(torch.ops.leankernels.quantize_fp8.default, (w, 128, True))
    q, s = lk.quantize_fp8(w, (128, 128))
    opcheck(torch.ops.leankernels.dequantize_fp8.default, (q, s, 128))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(x):
        q, s = lk.quantize_fp8(x * 2)
        return lk.dequantize_fp8(q, s) + 1

    x = randn(16, 300, seed=23, device=device)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(got, f(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ GPU only
@requires_cuda
def test_cuda_matches_cpu_kernel_large():
    x = randn(4096, 7168, seed=31, dtype=torch.bfloat16, device="cuda")
    assert_same_quant(lk.quantize_fp8(x), lk.quantize_fp8(x.cpu()))
    w = randn(4096, 7168, seed=32, dtype=torch.bfloat16, device="cuda")
    assert_same_quant(lk.quantize_fp8(w, (128, 128)), ref.quantize_fp8(w.cpu(), (128, 128)))


@requires_cuda
def test_cuda_unaligned_base_pointer():
    x = randn(40, 1001, seed=33, dtype=torch.bfloat16, device="cuda")[:, 1:]  # 2-byte offset
    assert_same_quant(lk.quantize_fp8(x), ref.quantize_fp8(x.cpu()))


@requires_cuda
def test_cuda_graph_capture():
    x = randn(256, 7168, seed=34, dtype=torch.bfloat16, device="cuda")
    lk.quantize_fp8(x)  # warm-up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, s = lk.quantize_fp8(x)
    x.copy_(randn(256, 7168, seed=35, dtype=torch.bfloat16, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert_same_quant((q, s), ref.quantize_fp8(x.cpu()))


@requires_cuda
def test_cupy_zero_copy():
    cp = pytest.importorskip("cupy")
    xc = cp.random.standard_normal((64, 300), dtype=cp.float32)
    q, s = lk.quantize_fp8(xc)
    assert isinstance(q, cp.ndarray) and q.dtype == cp.uint8 and isinstance(s, cp.ndarray)
    want = ref.quantize_fp8(torch.from_dlpack(xc).cpu())
    assert_same_quant((torch.from_dlpack(q).view(torch.float8_e4m3fn), torch.from_dlpack(s)), want)
    d = lk.dequantize_fp8(q, s)
    assert isinstance(d, cp.ndarray)
    torch.testing.assert_close(torch.from_dlpack(d).cpu(), ref.dequantize_fp8(*want))


# ------------------------------------------------------------------------------ SwiGLU + quantize
def _swiglu_want(h: torch.Tensor, scale_fmt: str = "fp32"):
    g, u = h.float().chunk(2, dim=-1)
    return ref.quantize_fp8(torch.nn.functional.silu(g) * u, (1, 128), scale_fmt)


def _assert_close_quant(got, want, max_code_diffs: int = 0):
    """Scales within an fp32 ulp or two, dequantized values within one e4m3 step of the
    group's scale (a product within a few ulp of a rounding boundary may round the other way),
    and at most max_code_diffs codes different."""
    (q, s), (qr, sr) = got, want
    assert q.dtype == torch.float8_e4m3fn and q.shape == qr.shape and s.shape == sr.shape
    torch.testing.assert_close(s.cpu(), sr, rtol=3e-7, atol=0, equal_nan=True)
    diffs = int((bits(q.cpu()) != bits(qr)).sum())
    assert diffs <= max_code_diffs, f"{diffs} codes differ"
    if diffs:
        d, dr = lk.dequantize_fp8(q.cpu(), s.cpu()), lk.dequantize_fp8(qr, sr)
        step = sr.repeat_interleave(128, dim=-1)[..., : d.shape[-1]] * 32  # e4m3 step at 448: 32
        assert torch.all((d - dr).abs() <= step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 2 * 1408), (33, 2 * 300), (2, 5, 2 * 256), (1, 2 * 64), (0, 2 * 256)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_silu_mul_quantize_matches_unfused(device, dtype, shape, scale_fmt):
    h = randn(*shape, seed=hash((shape, str(dtype), scale_fmt)) % 1000, dtype=dtype, device=device, scale=4.0)
    got = lk.silu_mul_quantize_fp8(h, scale_fmt)
    n = h.numel() // 2
    _assert_close_quant(got, _swiglu_want(h.cpu(), scale_fmt), max_code_diffs=max(1, n // 100000))
    if scale_fmt == "ue8m0" and n:
        assert torch.equal(got[1], torch.exp2(torch.log2(got[1]).round()))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_quantize_sweep_and_row_stride(device):
    """silu over [-100, 100] (exp's clamp, both signs, the tails), u of both signs, several
    group scales; h a row-strided view (gate and up halves of a wider row)."""
    g = torch.linspace(-100, 100, 24 * 256)
    u = torch.linspace(-3, 5, g.numel()).flip(0) * torch.logspace(-3, 3, g.numel())
    wide = torch.zeros(24, 2 * 256 + 7)
    wide[:, 3:259], wide[:, 259:515] = g.reshape(24, 256), u.reshape(24, 256)
    h = wide.to(device)[:, 3:515]
    assert h.stride(0) == 2 * 256 + 7
    _assert_close_quant(lk.silu_mul_quantize_fp8(h), _swiglu_want(h.cpu()), max_code_diffs=2)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_quantize_hostile_values(device):
    h = randn(4, 2 * 384, seed=41, device=device)
    h[0, 5] = float("nan")           # gate NaN: that group NaN
    h[1, 384 + 130] = float("inf")   # up Inf: group 1 of row 1 Inf scale
    h[2, :] = 0.0                    # an all-zero row: zeros with the floor scale
    h[3, 0:128] = -1e4               # silu(-1e4) = -0: the group is zero
    h[3, 128:256] = 3e19             # gate and up 3e19: the products overflow to Inf
    h[3, 384 + 128:384 + 256] = 3e19
    q, s = lk.silu_mul_quantize_fp8(h)
    want = _swiglu_want(h.cpu())
    assert torch.isnan(s[0, 0]) and torch.isinf(s[1, 1]) and torch.isinf(s[3, 1])
    assert torch.equal(s[2].cpu(), want[1][2])
    assert torch.all(bits(q[2]) == 0) and torch.all(bits(q[3, :128]) & 0x7f == 0)
    _assert_close_quant((q, s), want)


def test_silu_mul_quantize_bad_inputs():
    with pytest.raises(ValueError, match="h"):
        lk.silu_mul_quantize_fp8(torch.randn(4, 301))
    with pytest.raises(TypeError, match="h"):
        lk.silu_mul_quantize_fp8(torch.randint(0, 5, (4, 256)))
    with pytest.raises(ValueError, match="scale_fmt"):
        lk.silu_mul_quantize_fp8(torch.randn(4, 256), "e8m0")
    with pytest.raises(ValueError, match="h"):
        lk.silu_mul_quantize_fp8(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="grad"):
        lk.silu_mul_quantize_fp8(torch.randn(2, 256, requires_grad=True))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_quantize_opcheck_and_compile(device):
    h = randn(5, 2 * 300, seed=43, device=device)
    opcheck(torch.ops.leankernels.silu_mul_quantize_fp8.default, (h, False))

    def f(x):
        q, s = lk.silu_mul_quantize_fp8(x * 2)
        return lk.dequantize_fp8(q, s) + 1

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(h), f(h), rtol=0, atol=0)
