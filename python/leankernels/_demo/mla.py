"""MLA demo: the latent cache's memory per token beside MHA's, and a decode check + timing.

Memory is measured from allocated tensors (untyped_storage().nbytes()), per token per layer:
bf16 latent cache (576 values), FlashMLA's FP8 rows (656 B), and, as the baseline, an MHA
KV cache of the same model (DeepSeek-V3: 128 heads x (192 K + 128 V) bf16 = 81,920 B).
"""
from __future__ import annotations


import torch

from .. import reference
from .._bench.mla import cos_diff, make_inputs
from ..mla import LatentCache, mla_decode
from .._bench.timing import wall_time

DSV3_HEADS, MHA_K, MHA_V = 128, 192, 128


def memory_rows(device: str) -> list[dict]:
    tokens = 64
    mha_k = torch.empty(tokens, DSV3_HEADS, MHA_K, dtype=torch.bfloat16, device=device)
    mha_v = torch.empty(tokens, DSV3_HEADS, MHA_V, dtype=torch.bfloat16, device=device)
    mha = (mha_k.untyped_storage().nbytes() + mha_v.untyped_storage().nbytes()) / tokens
    rows = []
    for fp8 in (False, True):
        lc = LatentCache(num_blocks=1, block_size=tokens, fp8=fp8, device=device)
        b = lc.bytes_per_token
        rows.append({
            "what": f"KV cache bytes/token/layer, MLA latent {'FP8 (656-B rows)' if fp8 else 'bf16 (576 values)'}",
            "ours": f"{b:,.0f} B",
            "baseline": f"{mha:,.0f} B (MHA bf16, 128 heads x (192 K + 128 V), DeepSeek-V3)",
            "ratio": f"{b / mha:.2%} of MHA ({mha / b:.0f}x smaller)",
            "detail": "measured from the allocated cache tensors",
        })
    return rows


def decode_rows(device: str, quick: bool) -> list[dict]:
    B, s_q, H, s_k = (2, 1, 16, 1024) if quick else (4, 1, 16, 4096)
    if device == "cuda":
        B, s_k = 128, 8192
    rows = []
    for fp8 in (False, True):
        q, cache, table, seqlens = make_inputs(B, s_q, H, s_k, fp8, device)
        scale = 192 ** -0.5

        ours = wall_time(lambda: mla_decode(q, cache, table, seqlens, scale), device, reps=5)
        ref = wall_time(lambda: reference.mla_decode(q, cache, table, seqlens, scale, True), device,
                          reps=2 if device == "cpu" else 1)
        out, lse = mla_decode(q, cache, table, seqlens, scale)
        r_out, r_lse = reference.mla_decode(q.float(), cache, table, seqlens, scale, True)
        d = max(cos_diff(out.float(), r_out), cos_diff(lse, r_lse))
        rows.append({
            "what": f"mla_decode {'FP8' if fp8 else 'bf16'} cache, b={B} s_q={s_q} h={H} s_k={s_k} ({device})",
            "ours": f"{ours * 1e3:.2f} ms",
            "baseline": f"{ref * 1e3:.2f} ms (eager PyTorch reference)",
            "ratio": f"{ref / ours:.1f}x faster",
            "detail": f"diff {d:.1e} vs fp32 reference (bar 1e-5)",
            "check": bool(d < 1e-5),
        })
    return rows


def run(device: str, quick: bool) -> list[dict]:
    return memory_rows(device) + decode_rows(device, quick)


if __name__ == "__main__":
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else "cpu", "--full" not in sys.argv):
        print(" | ".join(f"{k}: {v}" for k, v in r.items()))
