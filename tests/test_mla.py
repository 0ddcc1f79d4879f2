"""MLA paged latent cache: mla_append and mla_decode against leankernels.reference.

Modelled on FlashMLA's hostile tests: NaN in every cache slot no sequence owns, permuted block
tables padded with -1, zero-length sequences, lengths not multiples of the block size,
s_q in {1, 2, 4}, heads in {16, 32, 64, 128}, block sizes {1, 16, 64, 128}; out and lse
against an fp32 reference (cosine-style diff < 1e-5, FlashMLA's bar).
FP8 cache bound (stated): against the fp32 reference on the same (dequantized) cache bytes the
bar is the same 1e-5; against the unquantized bf16 cache the diff of out is below 2e-3
(measured ~9e-4 on N(0, 1) rows) and of lse below 1e-4 (measured ~2e-6).
"""
from __future__ import annotations

import math

import pytest
import torch

import leankernels
from leankernels import reference as ref
from leankernels.mla import LatentCache, mla_append, mla_decode

from conftest import DEVICES, HAS_CUDA, gemm_diff, poison, randn, requires_cuda, seeded

FP8_VS_BF16_BOUND = 2e-3       # measured ~9e-4 on N(0, 1) cache rows (e4m3: 3 mantissa bits)
FP8_VS_BF16_LSE_BOUND = 1e-4   # measured ~2e-6


def cos_diff(x, y) -> float:
    return gemm_diff(x, y)


def make_paged(seqlens, block_size, fp8, seed, device="cpu", extra_blocks=3, H=None):
    """A cache holding random rows for every (b, t < seqlens[b]), NaN bytes everywhere else,
    blocks assigned in a random permutation, block-table rows padded with -1."""
    g = seeded(seed)
    need = [math.ceil(L / block_size) for L in seqlens]
    nb = sum(need) + extra_blocks
    perm = torch.randperm(nb, generator=g).tolist()
    width = max(max(need), 1) + 1
    table = torch.full((len(seqlens), width), -1, dtype=torch.int32)
    rows = torch.randn(nb, block_size, ref.MLA_DIM, generator=g).to(torch.bfloat16)
    if fp8:
        cache = ref.mla_cache_quantize(rows)
    else:
        cache = rows.clone()
    owned = torch.zeros(nb, block_size, dtype=torch.bool)
    at = 0
    for b, L in enumerate(seqlens):
        blocks = perm[at: at + need[b]]
        at += need[b]
        table[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for t in range(L):
            owned[blocks[t // block_size], t % block_size] = True
    if fp8:
        cache[~owned] = 0xFF          # NaN codes, NaN scales, NaN rope
    else:
        cache[~owned] = float("nan")
    return cache.to(device), table.to(device), torch.tensor(seqlens, dtype=torch.int32, device=device), rows


def check_decode(out, lse, r_out, r_lse, bound=1e-5):
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert out.shape == r_out.shape and lse.shape == r_lse.shape
    fin = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin.cpu()), "rows with no visible key must get lse = +inf"
    assert (lse.cpu()[~fin.cpu()] == float("inf")).all()
    empty = (~fin).transpose(1, 2)  # [B, s_q, H]
    assert (out.cpu()[empty.cpu()] == 0).all(), "rows with no visible key must get out = 0"
    assert not torch.isnan(out).any()
    if fin.any():
        assert cos_diff(out[~empty].float(), r_out[~empty].float()) < bound
        assert cos_diff(lse[fin], r_lse[fin]) < bound
        assert torch.allclose(lse[fin], r_lse[fin], rtol=0, atol=2e-3)


# ------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("block_size", [1, 16, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2, 4])
@pytest.mark.parametrize("H", [16, 32, 64, 128])
def test_decode_matches_reference(device, fp8, block_size, s_q, H):
    seed = hash((fp8, block_size, s_q, H)) % 1000
    seqlens = [37, 0, 130, 3] if H <= 32 else [37, 0, 70]
    cache, table, sl, _ = make_paged(seqlens, block_size, fp8, seed, device)
    q = randn(len(seqlens), s_q, H, 576, seed=seed + 1, dtype=torch.bfloat16, device=device)
    scale = 192 ** -0.5
    out, lse = mla_decode(q, cache, table, sl, scale, causal=True)
    r_out, r_lse = ref.mla_decode(q.float(), cache, table, sl, scale, causal=True)
    check_decode(out, lse, r_out, r_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s_q,H", [(4, 16), (3, 5)], ids=["rows64", "rows15"])
def test_decode_splits_and_causal(device, num_splits, causal, s_q, H):
    seqlens = [1, 200, 0, 65, 2]
    cache, table, sl, _ = make_paged(seqlens, 16, False, 11, device)
    q = randn(5, s_q, H, 576, seed=12, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, cache, table, sl, 0.07, causal=causal, num_splits=num_splits)
    r_out, r_lse = ref.mla_decode(q.float(), cache, table, sl, 0.07, causal=causal)
    check_decode(out, lse, r_out, r_lse)
    # the split count changes the summation order only
    o1, l1 = mla_decode(q, cache, table, sl, 0.07, causal=causal, num_splits=1)
    assert cos_diff(out.float(), o1.float()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 300])
def test_decode_non_finite_scores_give_nan_rows(device, num_splits):
    """One rule on every path: a row with a NaN/Inf visible score gets out NaN and lse NaN (never
    hidden as 0 / +inf, never dropped by the split combine); rows that do not see the bad value
    are unaffected; a row with no visible key still gets 0 / +inf."""
    seqlens = [600, 0, 600]
    cache, table, sl, _ = make_paged(seqlens, 16, False, 21, device)
    s_q, H = 2, 4
    q = randn(3, s_q, H, 576, seed=22, dtype=torch.bfloat16, device=device)
    q[0, 1, 2, 7] = float("nan")                 # one query row of sequence 0
    q[2, 0, 1, 3] = float("inf")                 # an Inf in a query of sequence 2
    blk = int(table[2, 599 // 16])
    cache[blk, 599 % 16, 100] = float("nan")     # the last key of sequence 2: seen only by query 1 (causal)
    out, lse = mla_decode(q, cache, table, sl, 0.07, causal=True, num_splits=num_splits)
    r_out, r_lse = ref.mla_decode(q.float(), cache, table, sl, 0.07, causal=True)
    bad = torch.zeros(3, s_q, H, dtype=torch.bool)
    bad[0, 1, 2] = True
    bad[2, 0, 1] = True
    bad[2, 1, :] = True
    assert torch.equal(torch.isnan(r_lse.cpu()).transpose(1, 2), bad)            # the rule, in the reference
    assert torch.equal(torch.isnan(lse.cpu()).transpose(1, 2), bad)
    assert torch.isnan(out.cpu()[bad]).all() and not torch.isnan(out.cpu()[~bad]).any()
    assert (lse[1].cpu() == float("inf")).all() and (out[1] == 0).all()         # no visible key
    good = ~bad
    assert cos_diff(out.cpu()[good].float(), r_out.cpu()[good].float()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_decode_more_than_256_splits(device):
    """The split combine takes any number of splits (it once kept 256 weights and dropped the rest)."""
    seqlens = [9600]
    cache, table, sl, _ = make_paged(seqlens, 64, False, 31, device)
    q = randn(1, 1, 4, 576, seed=32, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, cache, table, sl, 0.07, causal=True, num_splits=300)
    r_out, r_lse = ref.mla_decode(q.float(), cache, table, sl, 0.07, causal=True)
    check_decode(out, lse, r_out, r_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_causal_fewer_keys_than_queries(device):
    # seqlen 2 with s_q 4: queries 0 and 1 see no key (out 0, lse +inf), 2 sees 1, 3 sees 2
    cache, table, sl, _ = make_paged([2, 4], 16, False, 3, device)
    q = randn(2, 4, 16, 576, seed=4, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, cache, table, sl, 0.1, causal=True)
    assert (lse[0, :, :2] == float("inf")).all() and torch.isfinite(lse[0, :, 2:]).all()
    assert (out[0, :2] == 0).all()
    r_out, r_lse = ref.mla_decode(q.float(), cache, table, sl, 0.1, causal=True)
    check_decode(out, lse, r_out, r_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_all_empty(device):
    cache, table, sl, _ = make_paged([0, 0], 16, True, 5, device)
    q = randn(2, 2, 16, 576, seed=6, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, cache, table, sl, 0.1)
    assert (out == 0).all() and (lse == float("inf")).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_fp8_against_unquantized(device):
    seqlens = [100, 57]
    cache, table, sl, rows = make_paged(seqlens, 16, True, 8, device)
    bf16_cache, _, _, _ = make_paged(seqlens, 16, False, 8, device)
    q = randn(2, 2, 32, 576, seed=9, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, cache, table, sl, 192 ** -0.5)
    r_out, r_lse = ref.mla_decode(q.float(), bf16_cache, table, sl, 192 ** -0.5)
    assert cos_diff(out.float(), r_out) < FP8_VS_BF16_BOUND
    assert cos_diff(lse, r_lse) < FP8_VS_BF16_LSE_BOUND


@pytest.mark.parametrize("device", DEVICES)
def test_decode_noncontiguous_q_and_table(device):
    cache, table, sl, _ = make_paged([40, 9], 8, False, 13, device)
    qbig = randn(2, 1, 32, 600, seed=14, dtype=torch.bfloat16, device=device)
    q = qbig[:, :, ::2, :576]
    wide = torch.full((2, table.shape[1] * 2), -1, dtype=torch.int32, device=device)
    wide[:, ::2] = table
    out, lse = mla_decode(q, cache, wide[:, ::2], sl, 0.1)
    r_out, r_lse = ref.mla_decode(q.float(), cache, table, sl, 0.1)
    check_decode(out, lse, r_out, r_lse)


# ------------------------------------------------------------------------------- append
def _append_inputs(T, seed, device, dtype=torch.bfloat16):
    kv_c = randn(T, 512, seed=seed, dtype=dtype, device=device, scale=2.0)
    k_pe = randn(T, 64, seed=seed + 1, dtype=dtype, device=device)
    w = randn(512, seed=seed + 2, device=device).abs() + 0.5
    ang = torch.rand(T, 32, generator=seeded(seed + 3)) * 6.28
    return kv_c, k_pe, w, ang.cos().to(device), ang.sin().to(device)


def _assert_cache_equal(got, want, fp8):
    """Element by element: bf16 rows within 1 ulp (>= 99.9% bit-identical); FP8 rows: scales and
    RoPE bits equal, codes within one e4m3 step (>= 99.9% identical)."""
    got, want = got.cpu(), want.cpu()
    if not fp8:
        a, b = got.view(torch.int16).int(), want.view(torch.int16).int()
        same = (a == b) | (torch.isnan(got) & torch.isnan(want))
        assert same.float().mean() > 0.999
        assert ((a - b).abs() <= 1)[~same].all()
        return
    a, b = got.view(torch.uint8), want.view(torch.uint8)
    same = a == b
    assert same.float().mean() > 0.999
    lat_a = a[..., :512].view(torch.float8_e4m3fn).float()
    lat_b = b[..., :512].view(torch.float8_e4m3fn).float()
    ok = (lat_a - lat_b).abs() <= lat_b.abs() / 8 + 2 ** -9
    ok |= torch.isnan(lat_a) & torch.isnan(lat_b)
    assert ok.all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("block_size", [1, 16, 64, 128])
@pytest.mark.parametrize("mode", ["plain", "norm", "norm_rope", "rope_positions"])
def test_append_matches_reference(device, fp8, block_size, mode):
    T = 37
    nb = math.ceil(2 * T / block_size) + 1
    width = 656 if fp8 else 576
    if fp8:
        cache = torch.randint(0, 255, (nb, block_size, width), generator=seeded(1), dtype=torch.uint8).to(device)
    else:
        cache = randn(nb, block_size, width, seed=1, dtype=torch.bfloat16, device=device)
    kv_c, k_pe, w, cos, sin = _append_inputs(T, 20 + block_size, device)
    slots = torch.randperm(nb * block_size, generator=seeded(2))[:T].to(device)
    slots[::5] = -1  # padding
    kwargs = {}
    if mode != "plain":
        kwargs.update(norm_weight=w, eps=1e-6)
    if mode == "norm_rope":
        kwargs.update(cos=cos, sin=sin)
    if mode == "rope_positions":
        table_c, table_s = _append_inputs(100, 7, device)[3:]
        pos = torch.randint(0, 100, (T,), generator=seeded(4)).to(device)
        kwargs.update(cos=table_c, sin=table_s, positions=pos)
    want = cache.clone()
    ref.mla_append(want, kv_c, k_pe, slots, **kwargs)
    got = cache.clone()
    mla_append(got, kv_c, k_pe, slots.to(torch.int32), **kwargs)
    _assert_cache_equal(got, want, fp8)
    # slots not written keep their bytes exactly
    untouched = torch.ones(nb * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    assert torch.equal(got.cpu().view(nb * block_size, -1)[untouched], cache.cpu().view(nb * block_size, -1)[untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_append_input_dtypes(device, dtype):
    cache = torch.zeros(4, 16, 576, dtype=torch.bfloat16, device=device)
    kv_c, k_pe, w, cos, sin = _append_inputs(20, 3, device, dtype)
    kv_c = torch.cat([kv_c, kv_c[:, :40]], dim=1)[:, :512]  # row stride 552: not contiguous
    assert not kv_c.is_contiguous()
    slots = torch.arange(20, device=device) * 3
    want = cache.clone()
    ref.mla_append(want, kv_c, k_pe, slots, norm_weight=w, cos=cos, sin=sin)
    mla_append(cache, kv_c, k_pe, slots, norm_weight=w, cos=cos, sin=sin)
    _assert_cache_equal(cache, want, False)


def test_rope_is_deepseek_interleaved():
    """The documented convention: DeepSeek-V3's view_as_complex rotation of (x[2i], x[2i+1])."""
    x = randn(5, 64, seed=1)
    ang = torch.rand(5, 32, generator=seeded(2))
    got = ref.mla_rope(x, ang.cos(), ang.sin())
    z = torch.view_as_complex(x.view(5, 32, 2)) * torch.polar(torch.ones_like(ang), ang)
    assert torch.allclose(got, torch.view_as_real(z).flatten(-2), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_append_out_of_range_slot(device, monkeypatch):
    cache = torch.zeros(2, 4, 576, dtype=torch.bfloat16, device=device)
    kv_c, k_pe, *_ = _append_inputs(3, 5, device)
    slots = torch.tensor([0, 8, 3], device=device)  # 8 is past the 8-slot cache
    mla_append(cache, kv_c, k_pe, slots)
    assert torch.equal(cache[0, 0], torch.cat([kv_c[0], k_pe[0]]))
    assert torch.equal(cache[0, 3], torch.cat([kv_c[2], k_pe[2]]))
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="slot_mapping"):
        mla_append(cache, kv_c, k_pe, slots)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_latent_cache_end_to_end(device, fp8):
    """Allocate with LatentCache, append prompt tokens, decode: equals attention over the rows."""
    bs = 16
    lc = LatentCache(num_blocks=12, block_size=bs, fp8=fp8, device=device)
    assert lc.bytes_per_token == (656 if fp8 else 1152)
    lens = [21, 40]
    blocks = [lc.allocate(lc.blocks_for(L)) for L in lens]
    assert lc.num_free_blocks == 12 - sum(len(b) for b in blocks)
    kv_c, k_pe, w, cos, sin = _append_inputs(sum(lens), 31, device)
    slots = torch.cat([lc.slot_mapping(b, 0, L) for b, L in zip(blocks, lens)])
    mla_append(lc.kv, kv_c, k_pe, slots, norm_weight=w, cos=cos, sin=sin)
    table = LatentCache.block_table(blocks, device=device, pad=-1)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(2, 1, 16, 576, seed=32, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, lc.kv, table, sl, 0.1)
    rows = ref.mla_cache_dequantize(lc.kv)  # what the cache holds
    r_out, r_lse = ref.mla_decode(q.float(), rows.to(torch.bfloat16) if not fp8 else lc.kv, table, sl, 0.1)
    check_decode(out, lse, r_out, r_lse)
    lc.free(blocks[0])
    assert lc.num_free_blocks == 12 - len(blocks[1])
    with pytest.raises(ValueError, match="num_blocks"):
        lc.allocate(100)


# ------------------------------------------------------------------------------- bad inputs
def _good(device="cpu"):
    cache, table, sl, _ = make_paged([5, 9], 16, False, 1, device)
    q = randn(2, 1, 16, 576, seed=2, dtype=torch.bfloat16, device=device)
    return q, cache, table, sl


def test_decode_bad_inputs():
    q, cache, table, sl = _good()
    with pytest.raises(ValueError, match="q must have head dim 576"):
        mla_decode(q[..., :512], cache, table, sl, 0.1)
    with pytest.raises(TypeError, match="q must have dtype"):
        mla_decode(q.float(), cache, table, sl, 0.1)
    with pytest.raises(ValueError, match="cache"):
        mla_decode(q, cache[..., :512], table, sl, 0.1)
    with pytest.raises(ValueError, match="block_table has 1 rows but q has batch 2"):
        mla_decode(q, cache, table[:1], sl, 0.1)
    with pytest.raises(ValueError, match="seqlens has 3 entries"):
        mla_decode(q, cache, table, torch.tensor([1, 2, 3], dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match="block_table must have dtype int32"):
        mla_decode(q, cache, table.long(), sl, 0.1)
    bad = table.clone()
    bad[1, 0] = cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        mla_decode(q, cache, bad, sl, 0.1)
    with pytest.raises(ValueError, match="seqlens"):
        mla_decode(q, cache, table, torch.tensor([5, 10_000], dtype=torch.int32), 0.1)
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode(q, cache, table, sl, 0.1, num_splits=0)


def test_append_bad_inputs():
    cache = torch.zeros(2, 4, 576, dtype=torch.bfloat16)
    kv_c, k_pe, w, cos, sin = _append_inputs(3, 5, "cpu")
    slots = torch.arange(3)
    with pytest.raises(ValueError, match="kv_c must be"):
        mla_append(cache, kv_c[:, :500], k_pe, slots)
    with pytest.raises(ValueError, match="k_pe"):
        mla_append(cache, kv_c, k_pe[:2], slots)
    with pytest.raises(ValueError, match="slot_mapping has 2"):
        mla_append(cache, kv_c, k_pe, slots[:2])
    with pytest.raises(TypeError, match="slot_mapping"):
        mla_append(cache, kv_c, k_pe, slots.float())
    with pytest.raises(ValueError, match="cache"):
        mla_append(torch.zeros(2, 4, 512, dtype=torch.bfloat16), kv_c, k_pe, slots)
    with pytest.raises(ValueError, match="norm_weight"):
        mla_append(cache, kv_c, k_pe, slots, norm_weight=w[:10])
    with pytest.raises(ValueError, match="cos and sin"):
        mla_append(cache, kv_c, k_pe, slots, cos=cos)
    with pytest.raises(ValueError, match="cos must be"):
        mla_append(cache, kv_c, k_pe, slots, cos=cos[:, :16], sin=sin[:, :16])


@requires_cuda
def test_mixed_devices():
    q, cache, table, sl = _good()
    with pytest.raises(ValueError, match="cache is on"):
        mla_decode(q.cuda(), cache, table, sl, 0.1)


# ------------------------------------------------------------------------------- torch integration
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, cache, table, sl = _good(device)
    torch.library.opcheck(torch.ops.leankernels.mla_decode.default, (q, cache, table, sl, 0.1, True, 2))
    kv_c, k_pe, w, cos, sin = _append_inputs(3, 5, device)
    c = torch.zeros(2, 4, 576, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.leankernels.mla_append.default,
                          (c, kv_c, k_pe, torch.arange(3, device=device), w, 1e-6, cos, sin, None))
    torch.library.opcheck(torch.ops.leankernels.mla_schedule.default, (sl, 4))


def test_torch_compile_fullgraph():
    q, cache, table, sl = _good()
    kv_c, k_pe, w, cos, sin = _append_inputs(2, 5, "cpu")

    def step(cache, q, kv_c, k_pe):
        mla_append(cache, kv_c, k_pe, torch.tensor([5, 6]), norm_weight=w, cos=cos, sin=sin)
        return mla_decode(q, cache, table, sl, 0.1)

    c1, c2 = cache.clone(), cache.clone()
    o1, l1 = step(c1, q, kv_c, k_pe)
    o2, l2 = torch.compile(step, fullgraph=True)(c2, q, kv_c, k_pe)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert torch.equal(c1.view(torch.int16), c2.view(torch.int16))


@requires_cuda
def test_cuda_graph_capture():
    q, cache, table, sl = _good("cuda")
    kv_c, k_pe, w, cos, sin = _append_inputs(2, 5, "cuda")
    slots = torch.tensor([5, 6], device="cuda")
    eager_cache = cache.clone()
    mla_append(eager_cache, kv_c, k_pe, slots, norm_weight=w)
    eo, el = mla_decode(q, eager_cache, table, sl, 0.1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mla_append(cache.clone(), kv_c, k_pe, slots, norm_weight=w)  # warm-up
        mla_decode(q, cache, table, sl, 0.1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        mla_append(cache, kv_c, k_pe, slots, norm_weight=w)
        go, gl = mla_decode(q, cache, table, sl, 0.1)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(go, eo) and torch.equal(gl, el)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_padded_block_stride(device, fp8):
    """FlashMLA allocates FP8 caches as [nb, bs + 1, 656][:, :bs]: blocks need not be dense."""
    cache, table, sl, _ = make_paged([50, 17], 16, fp8, 21, device)
    nb, bs, width = cache.shape
    padded = torch.full((nb, bs + 1, width), 0xFF if fp8 else float("nan"), dtype=cache.dtype, device=device)
    padded[:, :bs] = cache
    view = padded[:, :bs]
    assert not view.is_contiguous()
    q = randn(2, 2, 16, 576, seed=22, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, view, table, sl, 0.1)
    r_out, r_lse = ref.mla_decode(q.float(), cache, table, sl, 0.1)
    check_decode(out, lse, r_out, r_lse)
    kv_c, k_pe, w, cos, sin = _append_inputs(3, 23, device)
    slots = torch.tensor([0, 17, 40], device=device)
    want = cache.clone()
    ref.mla_append(want, kv_c, k_pe, slots, norm_weight=w)
    mla_append(view, kv_c, k_pe, slots, norm_weight=w)
    _assert_cache_equal(view.contiguous(), want, fp8)
    pad_bytes = padded[:, bs].cpu().view(torch.uint8)
    assert (pad_bytes == 0xFF).all() if fp8 else torch.isnan(padded[:, bs]).all()


@requires_cuda
def test_cuda_debug_block_table(monkeypatch):
    q, cache, table, sl = _good("cuda")
    bad = table.clone()
    bad[1, 0] = cache.shape[0] + 5
    out, lse = mla_decode(q, cache, bad, sl, 0.1)  # skipped, no error without debug
    assert not torch.isnan(out).any()
    monkeypatch.setenv("LEANKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"block_table\[1, 0\]"):
        mla_decode(q, cache, bad, sl, 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_every_code_decodes_exactly(device):
    """One key holding all 254 finite e4m3 codes (subnormals included) with scales 1 and 2^-3:
    with q = 0 the output is that key's value, which must equal the dequantized bytes exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    row = torch.zeros(1, 1, 656, dtype=torch.uint8)
    row[0, 0, : codes.numel()] = codes
    row[0, 0, 512:528] = torch.tensor([1.0, 2.0 ** -3, 1.0, 1.0]).view(torch.uint8)
    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16, device=device)
    out, lse = mla_decode(q, row.to(device), torch.zeros(1, 1, dtype=torch.int32, device=device),
                          torch.ones(1, dtype=torch.int32, device=device), 1.0)
    want = ref.mla_cache_dequantize(row)[0, 0, :512]
    assert torch.equal(out[0, 0].cpu().float(), want.expand(16, 512))
    assert torch.allclose(lse.cpu(), torch.zeros(1, 16, 1))
