"""Benchmark cases for the leankernels.nn layers (see case.py for the contract): one decode
step of the DeepSeek-V3-shaped block, and of its MoE and MLA layers alone, against the same
layers in plain PyTorch (leankernels.nn.plain: bf16 nn.Linear, a Python loop over the experts,
naive MLA over an MHA-style cache of decompressed K/V), same weights, same inputs.

Shapes: the demo's (leankernels._demo.block): the CPU block on the CPU, the GPU block on CUDA.
To run them add "nn" to runner.DOMAINS.
"""
from __future__ import annotations

import math

import torch

from ..mla import LatentCache
from ..nn import DecoderBlock, plain
from .case import Case


def _setup(device: str, quick: bool):
    from .._demo.block import CPU, CPU_QUICK, GPU

    cfg = (CPU_QUICK if quick else CPU) if device == "cpu" else GPU
    B, P = (4, 128 if quick else 512) if device == "cpu" else (32, 2048)
    ref = plain.make_block(cfg, device, torch.bfloat16, seed=0)
    ours = DecoderBlock.from_float(ref)
    bs = 64
    per_seq = math.ceil((P + 1) / bs)
    cache = LatentCache(B * per_seq, bs, device=device)
    table = torch.arange(B * per_seq, dtype=torch.int32, device=device).view(B, per_seq)
    ref.reset_cache(B, P + 1)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(B, P + 1, cfg.hidden_size, generator=g, device=device).to(torch.bfloat16)
    with torch.inference_mode():
        ref(x[:, :P], 0)
        ours(x[:, :P], cache, table, 0)
    return cfg, B, P, ref, ours, cache, table, x[:, P:].contiguous()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())


def cases(device: str, quick: bool) -> list[Case]:
    cfg, B, P, ref, ours, cache, table, xd = _setup(device, quick)
    start = torch.full((B,), P, dtype=torch.int64, device=device)
    shape = (f"B={B} ctx={P} hidden={cfg.hidden_size} heads={cfg.num_attention_heads} "
             f"E={cfg.n_routed_experts} top{cfg.num_experts_per_tok}")
    mla_bytes = B * (P + 1) * cache.bytes_per_token
    mha_bytes = B * (P + 1) * ref.self_attn.kv_bytes_per_token()

    def inf(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    block_ours = inf(lambda: ours(xd, cache, table, start))
    block_ref = inf(lambda: ref(xd, P))
    h = xd.flatten(0, 1)
    moe_ours = inf(lambda: ours.mlp(h))
    moe_ref = inf(lambda: ref.mlp(h))
    attn_ours = inf(lambda: ours.self_attn(xd, cache, table, start))
    attn_ref = inf(lambda: ref.self_attn(xd, P))

    def check(o, r):
        return lambda: _diff(o().float(), r().float()) < 2e-2

    return [
        Case("nn", "DecoderBlock decode step", shape, block_ours, {"plain PyTorch block (bf16)": block_ref},
             bytes=mla_bytes, check=check(block_ours, block_ref),
             extra={"kv_bytes_mla": mla_bytes, "kv_bytes_mha": mha_bytes}),
        Case("nn", "MoE decode step", shape, moe_ours, {"plain PyTorch MoE (expert loop, bf16)": moe_ref},
             check=check(moe_ours, moe_ref)),
        Case("nn", "MLAttention decode step", shape, attn_ours, {"naive MLA, MHA cache (bf16, SDPA)": attn_ref},
             bytes=mla_bytes, check=check(attn_ours, attn_ref), extra={"kv_bytes_mha": mha_bytes}),
    ]
