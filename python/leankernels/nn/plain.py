"""The same DeepSeek-V3 layers written in plain PyTorch, the way model code writes them.

These are the specification the leankernels layers are tested against, and the demo's
baseline: dense bf16/fp32 ``nn.Linear`` projections, a DeepSeek-V3 gate in torch ops, routed
experts run one by one in a Python loop over the experts that received tokens, and MLA
computed naively (no weight absorption) with an MHA-style cache of decompressed keys and
values, ``[B, heads, max_len, 192]`` + ``[B, heads, max_len, 128]``, preallocated (a static
cache: no torch.cat per step). Parameter names follow transformers' DeepseekV3 modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepSeekConfig, rope_interleaved, rope_tables


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class PlainMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainGate(nn.Module):
    """DeepSeek-V3 router in torch ops: fp32 logits, sigmoid (or softmax) scores, optional
    selection bias, group-limited top-k, renormalisation and routed scaling."""

    def __init__(self, cfg: DeepSeekConfig, device=None):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, device=device, dtype=torch.float32))
        if cfg.scoring_func == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(E, device=device, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        T, E = choice.shape
        if cfg.n_group > 1:
            grouped = choice.view(T, cfg.n_group, E // cfg.n_group)
            if self.e_score_correction_bias is not None:
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(cfg.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~mask.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * cfg.routed_scaling_factor, ids


class PlainMoE(nn.Module):
    """DeepSeek MoE as model code writes it: gate, then a Python loop over the experts that
    received tokens (index, expert MLP, weighted index_add), plus the shared experts."""

    def __init__(self, cfg: DeepSeekConfig, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.gate = PlainGate(cfg, device)
        self.experts = nn.ModuleList(PlainMLP(cfg.hidden_size, cfg.moe_intermediate_size, device, dtype)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (PlainMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, device, dtype)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(ids.flatten(), minlength=self.cfg.n_routed_experts).tolist()
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok, slot = torch.where(ids == e)
            y = self.experts[e](x[tok])
            out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class PlainMLA(nn.Module):
    """DeepSeek-V3 multi-head latent attention, naive: the latent is decompressed through
    kv_b_proj into per-head keys and values, which are cached (MHA-style) and attended with
    scaled_dot_product_attention. RoPE is the interleaved (GPT-J style) rotation of
    DeepSeek-V3's reference code, on the last 64 values of each query head and the shared key."""

    def __init__(self, cfg: DeepSeekConfig, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        lin = dict(bias=False, device=device, dtype=dtype)
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, **lin)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, device)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, **lin)
        else:
            self.q_proj = nn.Linear(H, nh * cfg.qk_head_dim, **lin)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, **lin)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, device)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), **lin)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, H, **lin)
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.k_cache = self.v_cache = None

    def reset_cache(self, batch: int, max_len: int) -> None:
        """Preallocate the decompressed K/V cache: [B, heads, max_len, 192] and [.., 128]."""
        cfg, w = self.cfg, self.o_proj.weight
        self.k_cache = torch.zeros(batch, cfg.num_attention_heads, max_len, cfg.qk_head_dim, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros(batch, cfg.num_attention_heads, max_len, cfg.v_head_dim, dtype=w.dtype, device=w.device)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes per token slot, measured from the allocated K and V tensors."""
        slots = self.k_cache.shape[0] * self.k_cache.shape[2]
        return (self.k_cache.untyped_storage().nbytes() + self.v_cache.untyped_storage().nbytes()) / slots

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x [B, S, hidden]: S new tokens per sequence at positions start .. start+S-1."""
        cfg = self.cfg
        B, S, _ = x.shape
        nh, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, S, nh, dn + dr)
        cos, sin = self.cos[start:start + S, None, :], self.sin[start:start + S, None, :]
        q = torch.cat([q[..., :dn], rope_interleaved(q[..., dn:], cos, sin)], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        kv_c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        k_pe = rope_interleaved(k_pe, cos[:, 0], sin[:, 0])                        # [B, S, 64]
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_c)).view(B, S, nh, dn + dv)
        k = torch.cat([kv[..., :dn], k_pe[:, :, None, :].expand(B, S, nh, dr)], dim=-1)
        v = kv[..., dn:]
        if self.k_cache is None or self.k_cache.shape[0] != B or self.k_cache.shape[2] < start + S:
            raise ValueError("call reset_cache(batch, max_len) first (max_len >= start + S)")
        self.k_cache[:, :, start:start + S] = k.transpose(1, 2)
        self.v_cache[:, :, start:start + S] = v.transpose(1, 2)
        L = start + S
        mask = None
        if S > 1:
            mask = torch.arange(L, device=x.device)[None, :] <= (start + torch.arange(S, device=x.device))[:, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_cache[:, :, :L], self.v_cache[:, :, :L],
                                           attn_mask=mask, scale=cfg.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, nh * dv))


class PlainBlock(nn.Module):
    """RMSNorm -> MLA -> residual -> RMSNorm -> MoE -> residual."""

    def __init__(self, cfg: DeepSeekConfig, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.self_attn = PlainMLA(cfg, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.mlp = PlainMoE(cfg, device, dtype)

    def reset_cache(self, batch: int, max_len: int) -> None:
        self.self_attn.reset_cache(batch, max_len)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), start)
        return h + self.mlp(self.post_attention_layernorm(h))


def init_block_(block: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights with a sensible scale (std 1/sqrt(fan_in) for projections,
    norm weights near 1, a small random selection bias), in place, generated on each
    parameter's device; returns the block."""
    gens: dict = {}
    with torch.no_grad():
        for name, p in sorted(block.named_parameters()) + sorted(block.named_buffers()):
            if name.endswith(("cos", "sin")) or "cache" in name:
                continue
            g = gens.get(p.device)
            if g is None:
                g = gens[p.device] = torch.Generator(p.device).manual_seed(seed)
            v = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * v
            elif name.endswith("e_score_correction_bias"):
                v = 0.01 * v
            elif p.dim() == 2:
                v = v / p.shape[1] ** 0.5
            p.copy_(v.to(p.dtype))
            del v
    return block


def make_block(cfg: DeepSeekConfig, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> PlainBlock:
    """A PlainBlock with init_block_ random weights, allocated once on device (no default
    nn.Linear initialisation pass: built on the meta device, then materialised)."""
    with torch.device("meta"):
        block = PlainBlock(cfg, dtype=dtype)
    block = block.to_empty(device=device)
    for m in block.modules():
        if isinstance(m, (RMSNorm, PlainGate)):
            m.float()
    cos, sin = rope_tables(cfg, cfg.max_position_embeddings, device)
    block.self_attn.cos, block.self_attn.sin = cos, sin
    return init_block_(block, seed)
