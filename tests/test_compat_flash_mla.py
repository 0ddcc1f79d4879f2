"""leankernels.compat.flash_mla against FlashMLA's first-release and 2025 APIs and their test recipes:
NaN past every sequence's length, varlen, causal, h_q in {16, 32, 64, 128}, s_q in {1, 2},
default softmax scale 1/sqrt(576), out and lse compared with an fp32 attention written here
(independent of leankernels.reference) by FlashMLA's cosine-style diff < 1e-5."""
from __future__ import annotations

import math

import pytest
import torch

from leankernels.compat.flash_mla import flash_mla_with_kvcache, get_mla_metadata

from conftest import DEVICES, gemm_diff, seeded


def sdpa(query, key, value, causal):
    """[h, s_q, d] x [h, s_k, d] fp32 attention with FlashMLA's bottom-right causal mask."""
    query, key, value = query.float(), key.float(), value.float()
    w = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))
    if causal:
        s_q, s_k = query.shape[-2], key.shape[-2]
        keep = torch.ones(s_q, s_k, dtype=torch.bool, device=query.device).tril(diagonal=s_k - s_q)
        w = w.masked_fill(~keep, float("-inf"))
    lse = w.logsumexp(dim=-1)
    return torch.softmax(w, dim=-1) @ value, lse


def flashmla_schedule(seqlens, num_parts, block_n=64, overhead=5):
    """FlashMLA's greedy tile schedule, written out independently for the test."""
    nblk = [math.ceil(L / block_n) for L in seqlens]
    payload = math.ceil(sum(n + overhead for n in nblk) / num_parts) + overhead
    md, splits = [], [0]
    idx = blk = split = 0
    for _ in range(num_parts):
        row = [idx, blk * block_n, 0, 0, split, 0, 0, 0]
        budget = payload
        while idx < len(seqlens):
            left = nblk[idx] - blk
            if budget >= left + overhead:
                splits.append(splits[-1] + split + 1)
                budget -= left + overhead
                idx, blk, split = idx + 1, 0, 0
            else:
                if budget - overhead > 0:
                    blk += budget - overhead
                    split += 1
                break
        row[2] = idx if blk > 0 else idx - 1
        row[3] = blk * block_n if blk > 0 else seqlens[idx - 1]
        md.append(row)
    return md, splits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlens", [[4096] * 8, [100, 3000, 7, 900, 64, 65], [1] * 40])
def test_get_mla_metadata(device, seqlens):
    sl = torch.tensor(seqlens, dtype=torch.int32, device=device)
    md, ns = get_mla_metadata(sl, 1 * 16 // 1, 1)
    assert md.dtype == torch.int32 and ns.dtype == torch.int32
    assert md.shape[1] == 8 and ns.shape == (len(seqlens) + 1,)
    want_md, want_ns = flashmla_schedule(seqlens, md.shape[0])
    assert ns.tolist() == want_ns
    assert md[:, :5].tolist() == [r[:5] for r in want_md]
    if device == "cpu":
        assert md.shape[0] == 132 // 1 // 1  # an H100's SM count
    md2, _ = get_mla_metadata(sl, 2 * 128, 1)
    assert md2.shape[0] == md.shape[0] // 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_q", [16, 32, 64, 128])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_mla_with_kvcache(device, h_q, s_q, varlen, causal):
    b, mean_sk, h_kv, d, dv, block_size = 3, 100, 1, 576, 512, 64
    g = seeded(h_q * 10 + s_q + 100 * varlen)
    cache_seqlens = torch.full((b,), mean_sk, dtype=torch.int32)
    if varlen:
        for i in range(b):
            cache_seqlens[i] = max(int(torch.normal(float(mean_sk), mean_sk / 2, (1,), generator=g)), s_q)
    max_seqlen_pad = math.ceil(int(cache_seqlens.max()) / 256) * 256
    q = torch.randn(b, s_q, h_q, d, generator=g).to(torch.bfloat16)
    block_table = torch.arange(b * max_seqlen_pad // block_size, dtype=torch.int32).view(b, max_seqlen_pad // block_size)
    blocked_k = torch.randn(block_table.numel(), block_size, h_kv, d, generator=g).to(torch.bfloat16)
    for i in range(b):
        blocked_k.view(b, max_seqlen_pad, h_kv, d)[i, int(cache_seqlens[i]):] = float("nan")
    blocked_v = blocked_k[..., :dv]
    md, ns = get_mla_metadata(cache_seqlens.to(device), s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q.to(device), blocked_k.to(device), block_table.to(device),
                                      cache_seqlens.to(device), dv, md, ns, causal=causal)
    assert out.shape == (b, s_q, h_q, dv) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    r_out = torch.empty(b, s_q, h_q, dv)
    r_lse = torch.empty(b, h_q, s_q)
    for i in range(b):
        begin, end = i * max_seqlen_pad, i * max_seqlen_pad + int(cache_seqlens[i])
        o, l = sdpa(q[i].transpose(0, 1), blocked_k.view(-1, h_kv, d)[begin:end].transpose(0, 1),
                    blocked_v.reshape(-1, h_kv, dv)[begin:end].transpose(0, 1), causal=causal)
        r_out[i], r_lse[i] = o.transpose(0, 1), l
    assert gemm_diff(out.cpu().float(), r_out) < 1e-5
    assert gemm_diff(lse.cpu(), r_lse) < 1e-5


def test_flash_mla_bad_inputs():
    q = torch.randn(2, 1, 16, 576).to(torch.bfloat16)
    k = torch.randn(4, 64, 1, 576).to(torch.bfloat16)
    bt = torch.arange(4, dtype=torch.int32).view(2, 2)
    sl = torch.tensor([10, 70], dtype=torch.int32)
    md, ns = get_mla_metadata(sl, 16, 1)
    with pytest.raises(ValueError, match="head_dim_v"):
        flash_mla_with_kvcache(q, k, bt, sl, 128, md, ns)
    with pytest.raises(ValueError, match="num_heads_k"):
        flash_mla_with_kvcache(q, k.expand(4, 64, 3, 576), bt, sl, 512, md, ns)   # 3 does not divide 16
    with pytest.raises(TypeError, match="k_cache must have q's dtype"):
        flash_mla_with_kvcache(q, k.half(), bt, sl, 512, md, ns)
    with pytest.raises(TypeError, match="is_fp8_kvcache"):
        flash_mla_with_kvcache(q, k, bt, sl, 512, md, ns, is_fp8_kvcache=True)
    with pytest.raises(NotImplementedError, match="indices"):
        flash_mla_with_kvcache(q, k, bt, sl, 512, md, ns, indices=torch.zeros(2, 1, 64, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="topk"):
        get_mla_metadata(sl, 16, 1, 16, True, 64)
    with pytest.raises(ValueError, match="num_heads_q"):
        get_mla_metadata(sl, 16, 2, num_heads_q=15)
    with pytest.raises(ValueError, match="k_cache"):
        flash_mla_with_kvcache(q, k[..., :512], bt, sl, 512, md, ns)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla_with_kvcache(q, k, bt, sl, 512, md, ns[:2])
    with pytest.raises(ValueError, match="tile_scheduler_metadata"):
        flash_mla_with_kvcache(q, k, bt, sl, 512, md[:, :4], ns)
    with pytest.raises(TypeError, match="cache_seqlens"):
        get_mla_metadata(sl.long(), 16, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_mla_with_fp8_rows(device):
    """An extension over the first release: FlashMLA's 656-byte FP8 rows as k_cache."""
    from leankernels import reference as ref

    g = seeded(77)
    b, s_q, h_q, bs = 2, 2, 16, 64
    sl = torch.tensor([90, 33], dtype=torch.int32)
    rows = torch.randn(4, bs, 576, generator=g).to(torch.bfloat16)
    k = ref.mla_cache_quantize(rows).view(torch.float8_e4m3fn).unsqueeze(2)   # [4, 64, 1, 656]
    bt = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    q = torch.randn(b, s_q, h_q, 576, generator=g).to(torch.bfloat16)
    md, ns = get_mla_metadata(sl.to(device), s_q * h_q, 1)
    out, lse = flash_mla_with_kvcache(q.to(device), k.to(device), bt.to(device), sl.to(device), 512, md, ns,
                                      causal=True)
    r_out, r_lse = ref.mla_decode(q.float(), k[:, :, 0].view(torch.uint8), bt, sl, 576 ** -0.5, causal=True)
    assert gemm_diff(out.cpu().float(), r_out) < 1e-5
    assert gemm_diff(lse.cpu(), r_lse) < 1e-5


# ---- FlashMLA's 2025 dense decoding test (tests/test_flash_mla_decoding.py upstream): q clamped to
# [-1, 1], cache randn/10 clamped, a randomly permuted block table whose unused tail entries are
# 2147480000 and whose unused blocks (and the tail of each last block) hold NaN, optional
# zero-length sequences, the 2025 metadata call (…, h_q, is_fp8, topk=None), the reference in fp32
# with KV heads repeated over their query heads, and the upstream tolerances: out per element
# within abs 8e-4 or rel 2.01/128 with cosine diff < 5e-6, lse within abs 1e-6 or rel 8.01/65536,
# and the same inf/NaN positions.
def _close(ans, ref, abs_tol, rel_tol, cos_tol=None):
    ans, ref = ans.float().clone(), ref.float().clone()
    for val in (float("inf"), float("-inf")):
        assert torch.equal(ans == val, ref == val), f"{val} positions differ"
        ans[ans == val], ref[ref == val] = 0, 0
    assert torch.equal(ans.isnan(), ref.isnan()), "NaN positions differ"
    ans, ref = ans.nan_to_num(0), ref.nan_to_num(0)
    err = (ans - ref).abs()
    ok = (err < abs_tol) | (err / (ref.abs() + 1e-6) < rel_tol)
    assert ok.all(), f"{int((~ok).sum())} of {ok.numel()} elements out of tolerance; max abs err {float(err.max())}"
    if cos_tol is not None:
        assert gemm_diff(ans, ref) < cos_tol


def _reference(q, blocked_k, block_table, seqlens, causal, dv=512):
    b, s_q, h_q, d = q.shape
    bs, h_kv = blocked_k.shape[1], blocked_k.shape[2]
    out = torch.empty(b, s_q, h_q, dv)
    lse = torch.empty(b, h_q, s_q)
    for i in range(b):
        n = int(seqlens[i])
        kv = blocked_k[block_table[i, :math.ceil(n / bs)].long()].reshape(-1, h_kv, d)[:n].float()
        kv = kv.transpose(0, 1).repeat_interleave(h_q // h_kv, dim=0)            # [h_q, n, d]
        w = q[i].transpose(0, 1).float() @ kv.transpose(-2, -1) / math.sqrt(d)  # [h_q, s_q, n]
        if causal and s_q > 1:
            keep = torch.ones(s_q, n, dtype=torch.bool).tril(diagonal=n - s_q)
            w = w.masked_fill(~keep, float("-inf"))
        l = w.logsumexp(dim=-1)
        o = torch.softmax(w, dim=-1) @ kv[..., :dv]
        lonely = l == float("-inf")
        o[lonely] = 0.0
        l[lonely] = float("inf")
        out[i], lse[i] = o.transpose(0, 1), l
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_q,h_kv,dtype,fp8", [
    (128, 1, torch.bfloat16, False), (16, 2, torch.bfloat16, False), (32, 4, torch.bfloat16, False),
    (64, 1, torch.float16, False), (16, 2, torch.float16, False), (128, 1, torch.bfloat16, True)])
@pytest.mark.parametrize("s_q,causal,varlen,zero_len", [(1, False, False, False), (2, True, True, True),
                                                       (4, True, True, False)])
def test_flash_mla_2025_dense_decoding(device, h_q, h_kv, dtype, fp8, s_q, causal, varlen, zero_len):
    from leankernels import reference as ref

    b, s_k, d, dv, bs = 3, 150, 576, 512, 64
    g = seeded(h_q * 3 + h_kv + s_q * 101 + fp8)
    seqlens = torch.full((b,), s_k, dtype=torch.int32)
    if varlen:
        for i in range(b):
            seqlens[i] = max(int(torch.normal(float(s_k), s_k / 2, (1,), generator=g)), s_q)
    if zero_len:
        seqlens[1] = 0
    pad = math.ceil(int(seqlens.max()) / 256) * 256
    q = torch.randn(b, s_q, h_q, d, generator=g).clamp(-1, 1).to(dtype)
    block_table = torch.arange(b * pad // bs, dtype=torch.int32)
    block_table = block_table[torch.randperm(block_table.numel(), generator=g)].view(b, -1)
    blocked_k = (torch.randn(block_table.numel(), bs, h_kv, d, generator=g) / 10).clamp(-1, 1).to(dtype)
    for i in range(b):
        n = int(seqlens[i])
        used = math.ceil(n / bs)
        blocked_k[block_table[i, used:].long()] = float("nan")
        if n % bs:
            blocked_k[block_table[i, used - 1], n % bs:] = float("nan")
        block_table[i, used:] = 2147480000
    k_in = blocked_k
    if fp8:
        k_in = ref.mla_cache_quantize(blocked_k[:, :, 0]).unsqueeze(2)         # [blocks, bs, 1, 656] uint8
        blocked_k = ref.mla_cache_dequantize(k_in[:, :, 0]).unsqueeze(2)
    md, ns = get_mla_metadata(seqlens.to(device), s_q * h_q // h_kv, h_kv, h_q, fp8, None)
    out, lse = flash_mla_with_kvcache(q.to(device), k_in.to(device), block_table.to(device), seqlens.to(device),
                                      dv, md, ns, causal=causal, is_fp8_kvcache=fp8)
    assert out.dtype == dtype and out.shape == (b, s_q, h_q, dv) and lse.shape == (b, h_q, s_q)
    r_out, r_lse = _reference(q, blocked_k, block_table, seqlens, causal)
    _close(out.cpu(), r_out.to(torch.bfloat16), 8e-4, 2.01 / 128, 5e-6)
    _close(lse.cpu(), r_lse, 1e-6, 8.01 / 65536)
