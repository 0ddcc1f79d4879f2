"""Readable pure-PyTorch reference of every leankernels op: the specification.

Tests compare the C++ and CUDA kernels against these functions. They favour clarity over
speed, run on any device, and follow ../DESIGN.md's semantics to the bit where it says so.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-4
GROUP = 128


# ------------------------------------------------------------------------------------ quant
def fp8_scale(amax: torch.Tensor, scale_fmt: str = "fp32") -> torch.Tensor:
    """max(amax, 1e-4) / 448 in fp32; "ue8m0" rounds up to a power of two. NaN/Inf pass through."""
    s = amax.float().clamp_min(SCALE_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
        up = torch.where(mant == 0.5, s, torch.ldexp(torch.ones_like(s), exp))
        s = torch.where(torch.isfinite(s), up, s)
    return s


def quantize_fp8(x: torch.Tensor, block=(1, 128), scale_fmt: str = "fp32"):
    """Block-scaled e4m3 quantization.

    block (1, 128): x [..., K] -> (q [..., K] e4m3, scale [..., ceil(K/128)] fp32).
    block (128, 128): x [(E,) N, K] -> (q, scale [(E,) ceil(N/128), ceil(K/128)]).
    q = e4m3(clamp(x / scale, -448, 448)), round to nearest even. A group holding NaN gets a
    NaN scale and NaN codes; a group holding +-Inf gets scale Inf, so its finite values
    become 0 and its infinities NaN (Inf/Inf).
    """
    block = tuple(block)
    K = x.shape[-1]
    G = math.ceil(K / GROUP)
    xf = x.float()
    if block == (1, GROUP):
        xp = F.pad(xf, (0, G * GROUP - K))
        g = xp.reshape(*x.shape[:-1], G, GROUP)
        scale = fp8_scale(g.abs().amax(dim=-1) if K else g.new_zeros(g.shape[:-1]), scale_fmt)
        q = (g / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q.reshape(*x.shape[:-1], G * GROUP)[..., :K], scale
    if block == (GROUP, GROUP):
        N = x.shape[-2]
        Nb = math.ceil(N / GROUP)
        lead = x.shape[:-2]
        xp = F.pad(xf, (0, G * GROUP - K, 0, Nb * GROUP - N))
        g = xp.reshape(*lead, Nb, GROUP, G, GROUP)
        amax = g.abs().amax(dim=(-3, -1)) if g.numel() else g.new_zeros((*lead, Nb, G))
        scale = fp8_scale(amax, scale_fmt)
        q = (g / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q.reshape(*lead, Nb * GROUP, G * GROUP)[..., :N, :K], scale
    raise ValueError(f"block must be (1, 128) or (128, 128); got {block}")


def expand_scale(scale: torch.Tensor, shape, block=(1, 128)) -> torch.Tensor:
    """Broadcast a block scale tensor to the full element shape it describes."""
    block = tuple(block)
    K = shape[-1]
    s = scale.repeat_interleave(GROUP, dim=-1)[..., :K]
    if block == (GROUP, GROUP):
        s = s.repeat_interleave(GROUP, dim=-2)[..., : shape[-2], :]
    return s


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor, block=(1, 128)) -> torch.Tensor:
    """x_fp8.float() * scale broadcast over its block, in fp32."""
    return x_fp8.float() * expand_scale(scale.float(), x_fp8.shape, block)


# -------------------------------------------------------------------------------------- mla
# DeepSeek-V3 MLA dims: kv_lora_rank 512 (the latent, also the value), rope dim 64.
MLA_LATENT = 512
MLA_ROPE = 64
MLA_DIM = MLA_LATENT + MLA_ROPE            # 576 values per token in the bf16 cache
MLA_FP8_BYTES = MLA_LATENT + 4 * 4 + 2 * MLA_ROPE   # 656 bytes per token in the FP8 cache
MLA_FP8_SCALE_FLOOR = 1e-4


def mla_fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """FlashMLA's FP8 KV-cache scale: 2**ceil(log2(max(amax / 448, 1e-4))), fp32.

    Note the convention differs from quantize_fp8's: the floor 1e-4 applies to amax / 448 (not
    to amax), and the scale is always a power of two (UE8M0-representable). The stored scale
    is the dequantization multiplier: value = e4m3 * scale. Computed exactly with frexp
    instead of FlashMLA's float log2 (the two agree except where log2 rounds).
    """
    s = (amax.float() / FP8_MAX).clamp_min(MLA_FP8_SCALE_FLOOR)
    mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    up = torch.where(mant == 0.5, s, torch.ldexp(torch.ones_like(s), exp))
    return torch.where(torch.isfinite(s), up, s)


def mla_cache_quantize(kv: torch.Tensor) -> torch.Tensor:
    """bf16 latent-cache rows [..., 576] -> FlashMLA's 656-byte FP8 rows [..., 656] (uint8).

    Byte layout of one token (FlashMLA "V32_FP8Sparse"):
      [0, 512)    512 float8_e4m3fn latent values, in 4 tiles of 128
      [512, 528)  4 fp32 scales, one per tile (value = e4m3 * scale)
      [528, 656)  64 bf16 RoPE values, unquantized
    """
    if kv.shape[-1] != MLA_DIM:
        raise ValueError(f"kv must have last dim {MLA_DIM}; got {tuple(kv.shape)}")
    lead = kv.shape[:-1]
    x = kv.to(torch.bfloat16).float()
    tiles = x[..., :MLA_LATENT].reshape(*lead, 4, GROUP)
    scale = mla_fp8_scale(tiles.abs().amax(dim=-1))                        # [..., 4]
    codes = (tiles / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # [..., 4, 128]
    out = torch.empty(*lead, MLA_FP8_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :MLA_LATENT] = codes.reshape(*lead, MLA_LATENT).view(torch.uint8)
    out[..., MLA_LATENT:MLA_LATENT + 16] = scale.contiguous().view(torch.uint8).reshape(*lead, 16)
    out[..., MLA_LATENT + 16:] = x[..., MLA_LATENT:].to(torch.bfloat16).contiguous().view(torch.uint8).reshape(*lead, 128)
    return out


def mla_cache_dequantize(cache: torch.Tensor) -> torch.Tensor:
    """Latent-cache rows [..., 576] bf16 or [..., 656] FP8 bytes -> fp32 [..., 576]."""
    if cache.dtype == torch.bfloat16:
        return cache.float()
    raw = cache.view(torch.uint8)
    lead = raw.shape[:-1]
    codes = raw[..., :MLA_LATENT].contiguous().view(FP8).float().reshape(*lead, 4, GROUP)
    scale = raw[..., MLA_LATENT:MLA_LATENT + 16].contiguous().view(torch.float32)   # [..., 4]
    rope = raw[..., MLA_LATENT + 16:].contiguous().view(torch.bfloat16).float()     # [..., 64]
    latent = (codes * scale.unsqueeze(-1)).reshape(*lead, MLA_LATENT)
    return torch.cat([latent, rope], dim=-1)


def mla_rope(k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J style) rotary embedding, DeepSeek-V3's reference convention.

    Pairs are (x[2i], x[2i+1]) with angle i: out[2i] = x[2i] cos_i - x[2i+1] sin_i,
    out[2i+1] = x[2i] sin_i + x[2i+1] cos_i. k_pe [T, 64], cos/sin [T, 32]. fp32 out.
    (HF's modeling_deepseek uses rotate_half on de-interleaved weights: the same rotation once
    the weight columns are permuted; this library stores the interleaved form.)
    """
    x = k_pe.float()
    c, s = cos.float(), sin.float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def mla_rms_norm(kv_c: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the latent: x * rsqrt(mean(x^2) + eps) * weight. The mean and rsqrt in
    float64, the two multiplies in fp32 (x * inv first, then * weight). fp32 out."""
    x = kv_c.float()
    inv = torch.rsqrt(x.double().pow(2).mean(dim=-1, keepdim=True) + eps).float()
    return x * inv * weight.float()


def mla_append(cache: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
               norm_weight=None, eps: float = 1e-6, cos=None, sin=None, positions=None) -> None:
    """Write T new tokens into the paged latent cache, in place.

    cache [num_blocks, block_size, 576] bf16, or [num_blocks, block_size, 656] uint8 (FP8).
    kv_c [T, 512], k_pe [T, 64], slot_mapping [T] (slot = block * block_size + offset).
    Row = bf16(cat(RMSNorm(kv_c) if norm_weight is given else kv_c, RoPE(k_pe) if cos/sin
    are given else k_pe)); FP8 caches store mla_cache_quantize(row). cos/sin are [T, 32], or
    tables [P, 32] indexed by positions [T]. Slots < 0 or >= num_blocks * block_size are
    skipped (padding).
    """
    nb, bs = cache.shape[0], cache.shape[1]
    x = kv_c.float() if norm_weight is None else mla_rms_norm(kv_c, norm_weight, eps)
    pe = k_pe.float()
    if cos is not None:
        if positions is not None:
            cos, sin = cos[positions.long()], sin[positions.long()]
        pe = mla_rope(pe, cos, sin)
    row = torch.cat([x, pe], dim=-1).to(torch.bfloat16)
    if cache.dtype != torch.bfloat16:
        row = mla_cache_quantize(row).view(cache.dtype)
    slots = slot_mapping.long()
    ok = (slots >= 0) & (slots < nb * bs)
    idx = slots[ok]
    cache[idx // bs, idx % bs] = row[ok]


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
               softmax_scale: float, causal: bool = True):
    """Attention of absorbed MLA queries over the paged latent cache.

    q [B, s_q, H, 576]; cache as in mla_append; block_table [B, max_blocks] int32;
    seqlens [B] int32. Keys are the 576-wide cache rows, values their first 512 values.
    Query i of s_q sees keys [0, seqlen - s_q + i] when causal, all seqlen keys otherwise.
    Returns out [B, s_q, H, 512] in q's dtype (computed in fp32) and lse fp32 [B, H, s_q]
    (natural log of the softmax denominator of the scaled scores). A query with no visible key
    gets out = 0 and lse = +inf.
    """
    B, s_q, H, _ = q.shape
    bs = cache.shape[1]
    out = torch.zeros(B, s_q, H, MLA_LATENT, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, s_q), float("inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        L = int(seqlens[b])
        if L <= 0:
            continue
        blocks = block_table[b, : math.ceil(L / bs)].long()
        kv = mla_cache_dequantize(cache[blocks]).reshape(-1, MLA_DIM)[:L]          # [L, 576]
        scores = torch.einsum("qhd,kd->hqk", q[b].float(), kv) * softmax_scale      # [H, s_q, L]
        if causal:
            last = L - s_q + torch.arange(s_q, device=q.device)                       # last visible key
            hidden = torch.arange(L, device=q.device)[None, :] > last[:, None]       # [s_q, L]
            scores = scores.masked_fill(hidden, float("-inf"))
        lse_b = torch.logsumexp(scores, dim=-1)                                       # [H, s_q]
        seen = torch.isfinite(lse_b)
        p = torch.where(seen[..., None], torch.exp(scores - lse_b[..., None]), torch.zeros_like(scores))
        out[b] = torch.einsum("hqk,kd->qhd", p, kv[:, :MLA_LATENT])
        lse[b] = torch.where(seen, lse_b, torch.full_like(lse_b, float("inf")))
    return out.to(q.dtype), lse
