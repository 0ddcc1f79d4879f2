"""Benchmark cases for MLA decode (see case.py for the contract).

ours: leankernels.mla_decode over the paged latent cache (bf16 and FlashMLA FP8 rows).
Baselines, same inputs, same run: the eager PyTorch reference (reference.mla_decode), and
torch's scaled_dot_product_attention over a contiguous MHA cache of the same model (per head
K 192 = 128 nope + 64 rope, V 128; bf16), the memory/speed point MLA is measured against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference
from ..mla import mla_decode
from .case import Case

_MHA_K, _MHA_V = 192, 128
_MHA_LIMIT_BYTES = 20e9  # skip the MHA baseline where its cache would not fit comfortably


def make_inputs(B, s_q, H, s_k, fp8, device, block_size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    nbps = math.ceil(s_k / block_size)
    nb = B * nbps
    rows = torch.randn(nb, block_size, 576, generator=g).to(torch.bfloat16)
    cache = reference.mla_cache_quantize(rows) if fp8 else rows
    table = torch.randperm(nb, generator=g).to(torch.int32).view(B, nbps)
    q = torch.randn(B, s_q, H, 576, generator=g).to(torch.bfloat16)
    seqlens = torch.full((B,), s_k, dtype=torch.int32)
    return q.to(device), cache.to(device), table.to(device), seqlens.to(device)


def mha_sdpa(B, s_q, H, s_k, device, seed=1):
    """Callable: SDPA of q [B, H, s_q, 192] over a bf16 MHA cache K [B, H, s_k, 192], V [.., 128]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, s_q, _MHA_K, generator=g).to(torch.bfloat16).to(device)
    k = torch.randn(B, H, s_k, _MHA_K, generator=g).to(torch.bfloat16).to(device)
    v = torch.randn(B, H, s_k, _MHA_V, generator=g).to(torch.bfloat16).to(device)
    mask = None
    if s_q > 1:
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(diagonal=s_k - s_q)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=_MHA_K ** -0.5)


def cos_diff(x, y) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def decode_case(B, s_q, H, s_k, fp8, device, with_reference=True) -> Case:
    q, cache, table, seqlens = make_inputs(B, s_q, H, s_k, fp8, device)
    scale = 192 ** -0.5
    token_bytes = 656 if fp8 else 1152
    nbytes = B * s_k * token_bytes + q.numel() * 2 + B * s_q * H * 512 * 2
    flops = 2.0 * B * s_q * H * s_k * (576 + 512)
    baselines = {}
    if with_reference:
        baselines["eager reference"] = lambda: reference.mla_decode(q, cache, table, seqlens, scale, True)
    mha_bytes = B * H * s_k * (_MHA_K + _MHA_V) * 2
    if mha_bytes <= _MHA_LIMIT_BYTES:
        baselines["SDPA over MHA cache"] = mha_sdpa(B, s_q, H, s_k, device)

    def check():
        out, lse = mla_decode(q, cache, table, seqlens, scale)
        r_out, r_lse = reference.mla_decode(q.float(), cache, table, seqlens, scale, True)
        return cos_diff(out.float(), r_out) < 1e-5 and cos_diff(lse, r_lse) < 1e-5

    return Case(
        domain="mla", name=f"mla_decode {'fp8' if fp8 else 'bf16'} cache",
        shape=f"b={B} s_q={s_q} h={H} s_k={s_k}",
        ours=lambda: mla_decode(q, cache, table, seqlens, scale),
        baselines=baselines, flops=flops, bytes=nbytes, check=check,
        bound="memory" if s_q * H <= 32 else "compute",
        extra={"cache_bytes_per_token": token_bytes, "mha_bytes_per_token_same_heads": H * (_MHA_K + _MHA_V) * 2,
               "mha_cache_bytes": mha_bytes},
    )


def shapes(device: str, quick: bool) -> list[tuple[int, int, int, int]]:
    """(B, s_q, H, s_k) decode shapes: small on the CPU (B=4, s_k=4096, H=16 is the judged
    one), DESIGN.md's on a GPU."""
    if device == "cpu":
        return [(2, 1, 16, 512)] if quick else [(4, 1, 16, 4096), (4, 2, 16, 2048), (2, 1, 128, 1024)]
    if quick:
        return [(128, 1, 16, 8192), (128, 1, 128, 8192)]
    return [(128, s_q, h, s_k) for s_k in (4096, 8192) for h in (16, 32, 64, 128) for s_q in (1, 2)]


def cases(device: str, quick: bool) -> list[Case]:
    # On a GPU the eager reference is far too slow to time at b=128; it still checks.
    return [decode_case(*s, fp8, device, with_reference=device == "cpu")
            for s in shapes(device, quick) for fp8 in (False, True)]
