"""Readable pure-PyTorch reference of every leankernels op: the specification.

Tests compare the C++ and CUDA kernels against these functions. They favour clarity over
speed, run on any device, and follow ../DESIGN.md's semantics to the bit where it says so.
"""
from __future__ import annotations

import math

import torch

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


def _nan_code_sign(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """NaN codes (S.1111.111) take the sign bit of the unscaled value x, on every device: the
    sign of a NaN quotient is the platform's (x86: Inf / Inf = -NaN; CUDA: one +NaN)."""
    bits = q.view(torch.uint8)
    nan = (bits & 0x7F) == 0x7F
    fixed = torch.where(torch.signbit(x), 0xFF, 0x7F).to(torch.uint8)
    return torch.where(nan, fixed, bits).view(FP8)


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
        xp = xf.new_zeros(*x.shape[:-1], G * GROUP)   # zero padding (F.pad rejects empty dims on torch 2.4)
        xp[..., :K] = xf
        g = xp.reshape(*x.shape[:-1], G, GROUP)
        scale = fp8_scale(g.abs().amax(dim=-1) if K else g.new_zeros(g.shape[:-1]), scale_fmt)
        q = _nan_code_sign((g / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), g)
        return q.reshape(*x.shape[:-1], G * GROUP)[..., :K], scale
    if block == (GROUP, GROUP):
        N = x.shape[-2]
        Nb = math.ceil(N / GROUP)
        lead = x.shape[:-2]
        xp = xf.new_zeros(*lead, Nb * GROUP, G * GROUP)
        xp[..., :N, :K] = xf
        g = xp.reshape(*lead, Nb, GROUP, G, GROUP)
        amax = g.abs().amax(dim=(-3, -1)) if g.numel() else g.new_zeros((*lead, Nb, G))
        scale = fp8_scale(amax, scale_fmt)
        q = _nan_code_sign((g / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), g)
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


# The k-grouped (wgrad) layout: tokens are the contraction dimension. Rows of x (tokens) are
# sorted by expert and split by offs (int32 [E], cumulative END offsets); each expert's rows are
# cut into groups of 128 starting at the expert's first row, so no group straddles two experts.
# The j-th group of expert e uses scale column floor(start_e / 128) + e + j: no prefix sum is
# needed, and columns never overlap (floor(s/128) + ceil(m/128) <= ceil((s+m)/128)), so
# ceil(M/128) + E - 1 columns hold every expert. offs=None is one expert holding every row.
def k_group_segments(offs, M: int):
    """[(start, end)] rows of each expert: ends clamped to [0, M], each start the running
    maximum of the earlier ends (unchecked decreasing offs give empty experts, never overlap)."""
    if offs is None:
        return [(0, M)]
    segs, start = [], 0
    for v in offs.tolist():
        end = min(max(int(v), 0), M)
        segs.append((start, max(start, end)))
        start = max(start, end)
    return segs


def k_group_columns(M: int, num_experts: int) -> int:
    """Scale columns of the k-grouped layout: ceil(M/128) + E - 1."""
    return math.ceil(M / GROUP) + num_experts - 1


def k_groups(offs, M: int):
    """Every token group: (expert, first row, end row, scale column)."""
    groups = []
    for e, (s, t) in enumerate(k_group_segments(offs, M)):
        for j, r0 in enumerate(range(s, t, GROUP)):
            groups.append((e, r0, min(r0 + GROUP, t), s // GROUP + e + j))
    return groups


def quantize_fp8_transposed(x: torch.Tensor, offs=None, scale_fmt: str = "fp32"):
    """x [M, K] -> (xt [K, M] e4m3, scale [K, ceil(M/128) + E - 1] fp32): x.T quantized in 1x128
    groups along M (tokens), the groups of the k-grouped layout (see k_groups). Each group is
    quantize_fp8 of its <= 128 values; rows past the last expert's end give 0 codes, unused
    scale columns hold 0."""
    M, K = x.shape
    E = 1 if offs is None else offs.shape[0]
    xt = x.float().T
    q = torch.zeros(K, M, dtype=torch.uint8, device=x.device)
    scale = torch.zeros(K, k_group_columns(M, E), dtype=torch.float32, device=x.device)
    for _, r0, r1, g in k_groups(offs, M):
        qg, sg = quantize_fp8(xt[:, r0:r1], (1, GROUP), scale_fmt)
        q[:, r0:r1] = qg.view(torch.uint8)
        scale[:, g] = sg[:, 0]
    return q.view(FP8), scale


# ---------------------------------------------------------------------------------- routing
# Expert gating and token routing (DESIGN.md "Routing"). Conventions shared by every device:
#  * scores are the fp32 values of sigmoid/softmax evaluated in float64 and rounded once, so
#    they are the correctly rounded fp32 scores and every device produces the same bits
#    (a plain fp32 torch.sigmoid may differ by 1 ulp, and differs between CPU and GPU);
#  * a NaN logit gives a NaN score; in selection a NaN ranks as -inf (below every number), and
#    softmax leaves NaN logits out of its normalising sum. A chosen NaN score (a token with
#    fewer than top_k non-NaN candidates) makes that token's renormalised weights NaN;
#  * ties go to the lower expert (or group) index; experts of discarded groups rank below all.
def _ordered_desc(key: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row by descending key, ties to the lower index (stable sort)."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def _no_nan(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)


def route_scores(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """fp32 gate scores [T, E]: sigmoid or softmax of the logits, computed in float64."""
    x = logits.double()
    nan = torch.isnan(x)
    if score == "sigmoid":
        s = torch.sigmoid(x)
    elif score == "softmax":
        s = torch.softmax(x.masked_fill(nan, -math.inf), dim=-1)
    else:
        raise ValueError(f"score must be 'softmax' or 'sigmoid'; got {score!r}")
    return s.float().masked_fill(nan, math.nan)


def route(logits: torch.Tensor, top_k: int, score: str = "softmax", bias=None, n_group: int = 1,
          topk_group: int = 1, renormalize: bool = True, scale: float = 1.0):
    """DeepSeek-V3 / Mixtral gate: logits [T, E] -> (weights fp32 [T, top_k], ids int32 [T, top_k]).

    The DeepSeek-V3 Gate (inference/model.py) step by step: selection key = scores + bias
    (bias only chooses); with n_group > 1 each group scores the sum of its top-2 keys (bias
    given) or its max key (no bias), the best topk_group groups survive, and top_k experts are
    picked among them; weights are the unbiased scores of the chosen experts, renormalised to
    sum 1 (fp32, summed k = 0, 1, ... in order) and multiplied by scale. ids are ordered by
    descending key.
    """
    T, E = logits.shape
    scores = route_scores(logits, score)
    key = scores if bias is None else scores + bias.float()
    key = _no_nan(key)
    keep = torch.ones(T, E, dtype=torch.bool, device=logits.device)
    if n_group > 1:
        g = key.view(T, n_group, E // n_group)
        if bias is None:
            group_key = g.amax(dim=-1)
        else:
            top2 = g.topk(2, dim=-1).values
            group_key = _no_nan(top2[..., 0] + top2[..., 1])
        kept = _ordered_desc(group_key)[:, :topk_group]
        group_keep = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        group_keep.scatter_(1, kept, True)
        keep = group_keep.repeat_interleave(E // n_group, dim=1)
    order = _ordered_desc(key)
    # experts of discarded groups go last; the stable sort keeps the key order otherwise
    excluded = (~keep).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(excluded, dim=-1, stable=True).indices)
    ids = order[:, :top_k]
    w = scores.gather(1, ids)
    if renormalize and top_k > 0:
        denom = w[:, 0]
        for k in range(1, top_k):
            denom = denom + w[:, k]
        w = w / denom[:, None]
    w = w * torch.tensor(scale, dtype=torch.float32, device=w.device)
    return w, ids.to(torch.int32)


def deepseek_v3_gate(logits: torch.Tensor, top_k: int, bias=None, n_group: int = 1, topk_group: int = 1,
                     scale: float = 1.0, score: str = "sigmoid"):
    """The published DeepSeek-V3 Gate.forward (inference/model.py) after the linear layer, in
    plain fp32 PyTorch, as a baseline: fast eager code whose fp32 sigmoid can differ from
    route_scores by 1 ulp and whose torch.topk breaks ties arbitrarily."""
    scores = logits.float().sigmoid() if score == "sigmoid" else logits.float().softmax(dim=-1)
    original = scores
    if bias is not None:
        scores = scores + bias
    if n_group > 1:
        s = scores.view(logits.size(0), n_group, -1)
        group_scores = s.amax(dim=-1) if bias is None else s.topk(2, dim=-1)[0].sum(dim=-1)
        indices = group_scores.topk(topk_group, dim=-1)[1]
        mask = s.new_ones(logits.size(0), n_group, dtype=torch.bool).scatter_(1, indices, False)
        scores = s.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, top_k, dim=-1)[1]
    weights = original.gather(1, indices)
    if score == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scale, indices


def plan_rows(num_tokens: int, top_k: int, num_experts: int, align: int = 1) -> int:
    """Static row count R of a plan: T*top_k + min(E, T*top_k) * (align - 1).

    Each non-empty expert pads at most align - 1 rows and at most min(E, T*top_k) experts are
    non-empty, so R bounds offs[-1] for every routing without looking at the ids."""
    n = num_tokens * top_k
    return n + min(num_experts, n) * (align - 1)


def plan(ids: torch.Tensor, num_experts: int, align: int = 1):
    """ids [T, top_k] -> (counts [E], offs [E], row_token [R], token_row [T, top_k]), all int32.

    ids outside [0, E) are dropped (token_row = -1). Expert e owns rows
    [offs[e] - padded_e, offs[e] - padded_e + counts[e]) in flat (token, k) order, where
    padded_e = counts[e] rounded up to align; padding rows and rows >= offs[-1] hold -1.
    """
    T, K = ids.shape
    dev = ids.device
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)[:num_experts]
    padded = (counts + align - 1) // align * align
    offs = torch.cumsum(padded, 0)
    starts = offs - padded
    R = plan_rows(T, K, num_experts, align)
    row_token = torch.full((R,), -1, dtype=torch.int64, device=dev)
    token_row = torch.full((T * K,), -1, dtype=torch.int64, device=dev)
    # stable: sort (expert, flat position) pairs; position within an expert = rank in that order
    pos = torch.arange(T * K, device=dev)
    sel = pos[valid]
    order = torch.sort(flat[sel], stable=True).indices
    sel = sel[order]
    e = flat[sel]
    first = torch.cumsum(counts, 0) - counts  # unpadded start of each expert in the sorted list
    rank = torch.arange(sel.numel(), device=dev) - first[e]
    rows = starts[e] + rank
    token_row[sel] = rows
    row_token[rows] = sel // K
    i32 = torch.int32
    return counts.to(i32), offs.to(i32), row_token.to(i32), token_row.view(T, K).to(i32)


def permute(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """Rows of x [T, H] gathered into expert order [R, H]; padding rows (-1) are zeros."""
    valid = row_token >= 0
    out = x.index_select(0, row_token.clamp_min(0).long())
    return torch.where(valid[:, None], out, torch.zeros((), dtype=x.dtype, device=x.device))


def unpermute(y: torch.Tensor, token_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * y[token_row[t, k]] over k = 0, 1, ... (dropped k skipped),
    accumulated in fp32 and cast to y's dtype."""
    T, K = token_row.shape
    acc = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    for k in range(K):
        r = token_row[:, k]
        valid = (r >= 0)[:, None]
        rows = y.index_select(0, r.clamp_min(0).long()).float()
        acc = torch.where(valid, acc + weights[:, k, None].float() * rows, acc)
    return acc.to(y.dtype)


def update_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float = 1e-3) -> torch.Tensor:
    """DeepSeek aux-loss-free balancing: bias_e + rate * sign(mean(counts) - counts_e), in fp32.

    The sign is taken exactly in integers: sign(sum(counts) - E * counts_e), in Python's
    unbounded ints (int64 arithmetic would wrap for counts near 2**62 and flip the sign)."""
    E = counts.numel()
    c = counts.long().cpu().tolist()
    total = sum(c)
    s = torch.tensor([(total > E * x) - (total < E * x) for x in c], dtype=torch.float32, device=bias.device)
    return bias.float() + torch.tensor(rate, dtype=torch.float32, device=bias.device) * s
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
    codes = _nan_code_sign((tiles / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), tiles)  # [..., 4, 128]
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
    slots = slot_mapping.long()
    ok = (slots >= 0) & (slots < nb * bs)
    if cos is not None:
        if positions is not None:
            pos = positions.long()
            ok &= (pos >= 0) & (pos < cos.shape[0])  # tokens at out-of-range positions are skipped
            pos = pos.clamp(0, max(cos.shape[0] - 1, 0))
            cos, sin = cos[pos], sin[pos]
        pe = mla_rope(pe, cos, sin)
    row = torch.cat([x, pe], dim=-1).to(torch.bfloat16)
    if cache.dtype != torch.bfloat16:
        row = mla_cache_quantize(row).view(cache.dtype)
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
    gets out = 0 and lse = +inf. A query with a non-finite visible score (NaN or Inf in q or in
    a visible cache row) gets out = NaN and lse = NaN: bad inputs are never hidden.
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
        last = L - s_q + torch.arange(s_q, device=q.device) if causal else torch.full((s_q,), L - 1, device=q.device)
        hidden = torch.arange(L, device=q.device)[None, :] > last[:, None]           # [s_q, L]
        bad = (~torch.isfinite(scores)).masked_fill(hidden, False).any(-1)            # [H, s_q]
        seen = (last >= 0).expand_as(bad) & ~bad                                       # a visible key, all finite
        scores = scores.masked_fill(hidden | ~seen[..., None], float("-inf"))
        lse_b = torch.logsumexp(scores, dim=-1)                                       # [H, s_q]
        p = torch.where(seen[..., None], torch.exp(scores - lse_b[..., None]), torch.zeros_like(scores))
        o = torch.einsum("hqk,kd->qhd", p, kv[:, :MLA_LATENT].nan_to_num(0.0))        # hidden rows may hold NaN
        out[b] = o.masked_fill(bad.transpose(0, 1)[..., None], float("nan"))
        lse[b] = torch.where(seen, lse_b, torch.full_like(lse_b, float("nan")).masked_fill(~bad, float("inf")))
    return out.to(q.dtype), lse
# ------------------------------------------------------------------------------------- gemm
def _fp8_gemm_rows(a, a_scale, b, b_scale) -> torch.Tensor:
    """fp32 [M, N] = a @ b.T with block scales applied per 128-wide K step (the numerics contract).

    a [M, K] e4m3 with a_scale [M, ceil(K/128)]; b [N, K] e4m3 with b_scale [ceil(N/128), ceil(K/128)].
    For each K block kb: acc += (a_blk.float() @ b_blk.float().T) * (a_scale[:, kb] * b_scale[nb, kb]),
    where the block product is an fp32 sum of exact e4m3 x e4m3 products.
    """
    M, K = a.shape
    N = b.shape[0]
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    bs_rows = b_scale.float().repeat_interleave(GROUP, dim=0)[:N]  # [N, ceil(K/128)]
    for kb in range(math.ceil(K / GROUP)):
        k0, k1 = kb * GROUP, min(K, (kb + 1) * GROUP)
        blk = a[:, k0:k1].float() @ b[:, k0:k1].float().T
        acc += blk * (a_scale[:, kb].float()[:, None] * bs_rows[:, kb][None, :])
    return acc


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """out [M, N] = a @ b.T, FP8 block-scaled (1x128 for a, 128x128 for b), fp32 accumulate."""
    return _fp8_gemm_rows(a, a_scale, b, b_scale).to(out_dtype)


def fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype=torch.bfloat16, out=None) -> torch.Tensor:
    """Contiguous grouped GEMM: rows r in [offs[e-1], offs[e]) of a use expert e's b[e].

    a [M_total, K], a_scale [M_total, ceil(K/128)], b [E, N, K], b_scale [E, ceil(N/128), ceil(K/128)],
    offs int32 [E] cumulative END offsets (offs[-1] <= M_total). Rows past offs[-1] are not
    written: they keep the contents of `out` (uninitialised memory when out is None).
    """
    M, E, N = a.shape[0], b.shape[0], b.shape[1]
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    ends = [int(v) for v in offs.tolist()]
    start = 0
    for e in range(E):
        end = ends[e]
        if end > start:
            out[start:end] = _fp8_gemm_rows(a[start:end], a_scale[start:end], b[e], b_scale[e]).to(out.dtype)
        start = max(start, end)
    return out


def fp8_grouped_gemm_masked(a, a_scale, b, b_scale, masked_m, out_dtype=torch.bfloat16, out=None) -> torch.Tensor:
    """Masked grouped GEMM: out[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e].T (block-scaled).

    a [E, M_max, K], a_scale [E, M_max, ceil(K/128)], masked_m int32 [E]. Rows at or past
    masked_m[e] (clamped to [0, M_max]) are not written.
    """
    E, M_max = a.shape[0], a.shape[1]
    N = b.shape[1]
    if out is None:
        out = torch.empty(E, M_max, N, dtype=out_dtype, device=a.device)
    for e in range(E):
        m = min(max(int(masked_m[e]), 0), M_max)
        if m:
            out[e, :m] = _fp8_gemm_rows(a[e, :m], a_scale[e, :m], b[e], b_scale[e]).to(out.dtype)
    return out
# --------------------------------------------------------------------------------- training
def _qdq(x: torch.Tensor, block=(1, 128)) -> torch.Tensor:
    """x quantized to e4m3 with block scales and dequantized again (fp32): what FP8 keeps of x."""
    q, s = quantize_fp8(x, block)
    return dequantize_fp8(q, s, block)


def _qdq_tokens(x: torch.Tensor, ends) -> torch.Tensor:
    """fp32 [M, K]: x quantized in 1x128 groups along the rows (tokens) of each segment
    [ends[e-1], ends[e]) separately (a group never spans two segments), dequantized. Rows past
    the last end are zero."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for end in ends:
        for g0 in range(start, end, GROUP):
            g1 = min(end, g0 + GROUP)
            out[g0:g1] = _qdq(x[g0:g1].t().contiguous()).t()   # one group per column
        start = max(start, end)
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """Forward of DeepSeek-V3's FP8 linear: x(1x128) . W(128x128) with both dequantized, fp32,
    plus bias, in x's dtype."""
    K = x.shape[-1]
    y = _qdq(x.reshape(-1, K)) @ _qdq(weight, (GROUP, GROUP)).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs) -> torch.Tensor:
    """Forward of the grouped FP8 linear: rows [offs[e-1], offs[e]) of x times expert e's
    weight (each quantized as in fp8_linear); rows past offs[-1] are zero."""
    y = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float32, device=x.device)
    xq = _qdq(x)
    start = 0
    for e, end in enumerate(int(v) for v in offs.tolist()):
        if end > start:
            y[start:end] = xq[start:end] @ _qdq(weight[e], (GROUP, GROUP)).T
        start = max(start, end)
    return y.to(x.dtype)


def fp8_linear_grads(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, offs=None):
    """The backward of DeepSeek-V3's FP8 recipe, written out: ``(dx, dW)`` in fp32.

    Dgrad: dy quantized in 1x128 groups along N, times the 128x128-block-quantized weight (its
    blocks read transposed; the values are the forward's). Wgrad: dy^T . x with dy and x both
    quantized in 1x128 groups along the tokens of each expert's segment. x ``[M, K]``, dy ``[M, N]``;
    weight ``[N, K]`` (offs None) or ``[E, N, K]`` with offs int32 ``[E]`` cumulative ends.
    """
    M = x.shape[0]
    if offs is None:
        wq = _qdq(weight, (GROUP, GROUP))
        dx = _qdq(dy) @ wq
        ends = [M]
    else:
        ends = [int(v) for v in offs.tolist()]
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        dyq = _qdq(dy)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                dx[start:end] = dyq[start:end] @ _qdq(weight[e], (GROUP, GROUP))
            start = max(start, end)
    dyt, xt = _qdq_tokens(dy, ends), _qdq_tokens(x, ends)
    if offs is None:
        return dx, dyt.T @ xt
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            dw[e] = dyt[start:end].T @ xt[start:end]
        start = max(start, end)
    return dx, dw



def fp8_k_grouped_gemm(a, a_scale, b, b_scale, offs=None, out_dtype=torch.float32) -> torch.Tensor:
    """k-grouped GEMM (MoE wgrad): out[e] = a[:, seg_e] @ b[:, seg_e].T, the contraction over tokens.

    a [M, L] e4m3 with a_scale [M, G], b [N, L] e4m3 with b_scale [N, G], both per-row 1x128 scales
    along L in the layout quantize_fp8_transposed gives (G = ceil(L/128) + E - 1; E = 1 for
    offs=None). For each token group (k_groups): acc[e] += (a_grp.float() @ b_grp.float().T) *
    (a_scale[:, g] x b_scale[:, g]), the group product an fp32 sum of exact e4m3 products.
    Returns [M, N] for offs=None, else [E, M, N] (experts without rows are 0).
    """
    M, L = a.shape
    N = b.shape[0]
    E = 1 if offs is None else offs.shape[0]
    acc = torch.zeros(E, M, N, dtype=torch.float32, device=a.device)
    for e, r0, r1, g in k_groups(offs, L):
        blk = a[:, r0:r1].float() @ b[:, r0:r1].float().T
        acc[e] += blk * (a_scale[:, g].float()[:, None] * b_scale[:, g].float()[None, :])
    return (acc[0] if offs is None else acc).to(out_dtype)
