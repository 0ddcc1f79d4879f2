"""DeepSeek-V3-shaped layer dimensions shared by the leankernels layers and their plain twins."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class DeepSeekConfig:
    """Dimensions of one DeepSeek-V3 decoder block (field names follow transformers' config).

    The MLA latent and RoPE widths are fixed by the latent-cache format (512 + 64); every other
    size may be scaled down. The defaults are a test-sized block (hidden 1024, 8 heads, 32 experts
    top-4); the demo's presets are other sizes, named in ``leankernels._demo.block`` (``CPU``:
    hidden 1024, 16 heads, 64 experts top-6; ``GPU``); ``V3`` holds the real model's values.
    """
    hidden_size: int = 1024
    num_attention_heads: int = 8
    q_lora_rank: int | None = 384            # None: a plain q_proj (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_routed_experts: int = 32
    n_shared_experts: int = 1
    moe_intermediate_size: int = 256
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    scoring_func: str = "sigmoid"            # "sigmoid" (V3, with a selection bias) or "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5

    def replace(self, **kw) -> "DeepSeekConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)


# DeepSeek-V3 (671B) per-layer dimensions (a MoE layer; YaRN context extension not modelled).
V3 = DeepSeekConfig(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
                    n_shared_experts=1, moe_intermediate_size=2048, num_experts_per_tok=8, n_group=8,
                    topk_group=4, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    max_position_embeddings=163840)


def rope_tables(cfg: DeepSeekConfig, length: int, device="cpu"):
    """cos/sin tables [length, rope/2] fp32 for the interleaved (GPT-J style) rotation."""
    import torch

    half = cfg.qk_rope_head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / cfg.qk_rope_head_dim))
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rope_interleaved(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) by angle i. x [..., S, (heads,) 64]; cos/sin broadcastable
    to x[..., 0::2]. Computed in fp32, returned in x's dtype."""
    import torch

    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
