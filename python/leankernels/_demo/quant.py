"""Demo section: quantize a DeepSeek-V3 weight and a batch of activations to FP8."""
from __future__ import annotations

import torch

import leankernels as lk
from leankernels import reference as ref

from .._bench.timing import wall_time


def _case(what: str, x: torch.Tensor, block, device: str, reps: int) -> dict:
    q, s = lk.quantize_fp8(x, block)
    qr, sr = ref.quantize_fp8(x, block)
    exact = torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    deq = lk.dequantize_fp8(q, s, block)
    rel = float((deq - x.float()).norm() / x.float().norm())
    t_ours = wall_time(lambda: lk.quantize_fp8(x, block), device, reps)
    t_ref = wall_time(lambda: ref.quantize_fp8(x, block), device, max(2, reps // 2))
    before = x.numel() * x.element_size()
    after = q.numel() + s.numel() * 4
    moved = before + after
    return {
        "what": f"{what} {tuple(x.shape)} {str(x.dtype)[6:]} {block[0]}x{block[1]}",
        "ours": f"{t_ours * 1e3:.2f} ms ({moved / t_ours / 1e9:.1f} GB/s)",
        "baseline": f"eager reference {t_ref * 1e3:.2f} ms",
        "ratio": f"{t_ref / t_ours:.1f}x",
        "detail": f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({100 * (1 - after / before):.0f}% saved), "
                  f"round-trip rel err {rel:.3%}",
        "check": exact and rel < 0.05,
    }


def run(device: str, quick: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    # DeepSeek-V3: hidden 7168; a routed expert's gate+up projection is [2 x 2048, 7168].
    tokens = 256 if quick else 4096
    w = torch.randn(4096, 7168, generator=g).mul_(0.02).to(torch.bfloat16).to(device)
    a = torch.randn(tokens, 7168, generator=g).to(torch.bfloat16).to(device)
    reps = 3 if quick else 5
    return [
        _case("expert gate/up weight", w, (128, 128), device, reps),
        _case("activations", a, (1, 128), device, reps),
    ]
