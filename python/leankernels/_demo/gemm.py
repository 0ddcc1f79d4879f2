"""Demo: one DeepSeek-V3 MoE expert FFN in FP8 (hidden 7168, expert intermediate 2048).

gate/up weights fused as [4096, 7168], down [7168, 2048], quantized once to e4m3 with 128x128
scales. Forward: x -> quantize 1x128 -> fp8_gemm (gate/up) -> SwiGLU -> quantize -> fp8_gemm
(down), compared with the same FFN in bf16 PyTorch (speed) and in fp32 (accuracy).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import gemm, quant
from .._bench.timing import wall_time

HIDDEN, INTER = 7168, 2048


def _diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def run(device: str = "cpu", quick: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tokens = 16 if device == "cpu" else (128 if quick else 4096)
    x = torch.randn(tokens, HIDDEN, generator=g).to(device)
    w_gu = (torch.randn(2 * INTER, HIDDEN, generator=g) * HIDDEN ** -0.5).to(device)
    w_down = (torch.randn(HIDDEN, INTER, generator=g) * INTER ** -0.5).to(device)

    q_gu, s_gu = quant.quantize_fp8(w_gu, (128, 128))
    q_down, s_down = quant.quantize_fp8(w_down, (128, 128))

    def ffn_fp8():
        a, sa = quant.quantize_fp8(x, (1, 128))
        gate, up = gemm.fp8_gemm(a, sa, q_gu, s_gu).float().chunk(2, dim=-1)
        h, sh = quant.quantize_fp8(F.silu(gate) * up, (1, 128))
        return gemm.fp8_gemm(h, sh, q_down, s_down)

    def ffn(xx, wgu, wd):
        gate, up = F.linear(xx, wgu).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, wd)

    xb, wgu_b, wd_b = x.bfloat16(), w_gu.bfloat16(), w_down.bfloat16()
    want = ffn(x, w_gu, w_down)
    got = ffn_fp8()
    bf16_out = ffn(xb, wgu_b, wd_b)
    d_ours, d_bf16 = _diff(got.float(), want), _diff(bf16_out.float(), want)

    reps = 5 if device == "cpu" else 20
    t_ours = wall_time(ffn_fp8, device, reps)
    t_bf16 = wall_time(lambda: ffn(xb, wgu_b, wd_b), device, reps)

    fp8_bytes = q_gu.numel() + q_down.numel() + 4 * (s_gu.numel() + s_down.numel())
    bf16_bytes = 2 * (w_gu.numel() + w_down.numel())
    return [
        {"what": "DeepSeek-V3 expert FFN weight bytes (FP8+scales vs bf16)", "ours": f"{fp8_bytes / 2**20:.1f} MiB",
         "baseline": f"{bf16_bytes / 2**20:.1f} MiB", "ratio": f"{bf16_bytes / fp8_bytes:.2f}x smaller", "check": True},
        {"what": f"expert FFN forward, {tokens} tokens, {device} (FP8 ours vs bf16 torch)", "ours": f"{1e3 * t_ours:.2f} ms",
         "baseline": f"{1e3 * t_bf16:.2f} ms", "ratio": f"{t_bf16 / t_ours:.2f}x", "check": True},
        {"what": "expert FFN accuracy vs fp32 FFN (DeepGEMM diff)", "ours": f"{d_ours:.2e}",
         "baseline": f"{d_bf16:.2e} (bf16)", "ratio": "", "check": d_ours < 3e-3},  # two chained FP8 GEMMs + SwiGLU: ~2x one GEMM's ~7e-4
    ]


if __name__ == "__main__":
    for row in run("cpu", True):
        print(row)
