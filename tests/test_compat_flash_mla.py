"""leankernels.compat.flash_mla against FlashMLA's first-release API and its own test recipe:
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
        flash_mla_with_kvcache(q, k.expand(4, 64, 2, 576), bt, sl, 512, md, ns)
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
