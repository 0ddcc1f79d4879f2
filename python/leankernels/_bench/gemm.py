"""Benchmark cases for the FP8 GEMM family (see case.py for the contract).

Baselines, measured in the same run on the same data:
  CPU: ``F.grouped_mm`` on bf16 weights, ``torch.bmm`` in fp32 on the dequantized FP8 operands
  (what a CPU user without FP8 kernels would run), and for dense ``torch.matmul`` in bf16.
  GPU: ``F.scaled_mm`` with BlockWise1x128 x BlockWise128x128 scales (dense, when this torch and
  GPU support it), ``F.scaled_grouped_mm`` with row-wise scales and ``F.grouped_mm`` in bf16
  (grouped). A baseline that this torch/GPU cannot run is left out (probed once here).
Shapes: DeepSeek-V3 (DESIGN "Benchmarks") on GPU; on CPU the MoE decode step (8 experts x 16
rows, N=4096, K=7168) plus scaled-down ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import gemm as lkg
from .. import quant
from .. import reference as ref
from .case import Case

GROUP = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _probe(fn):
    """fn if it runs here (a baseline this torch/GPU may not support), else None."""
    try:
        fn()
        return fn
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError):
        return None


def _rowwise_fp8(x: torch.Tensor):
    """Per-row (last dim) e4m3 quantization with fp32 scales, for the row-wise baselines."""
    s = x.float().abs().amax(dim=-1).clamp_min(1e-4) / 448.0
    return (x.float() / s.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _bytes(rows: int, N: int, K: int, E: int, out_bytes: int = 2) -> float:
    """Minimal traffic: fp8 a and b once, their scales, the output once."""
    return rows * K + E * N * K + 4 * (rows * _cdiv(K, GROUP) + E * _cdiv(N, GROUP) * _cdiv(K, GROUP)) + rows * N * out_bytes


def _grouped_case(device: str, E: int, m: int, N: int, K: int, masked: bool = False, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E * m, K, generator=g).to(device)
    w = (torch.randn(E, N, K, generator=g) * 0.02).to(device)
    a, sa = quant.quantize_fp8(x, (1, GROUP))
    b, sb = quant.quantize_fp8(w, (GROUP, GROUP))
    offs = (torch.arange(1, E + 1, dtype=torch.int32) * m).to(device)
    xb, wb = x.bfloat16(), w.bfloat16()
    del w
    baselines = {}
    if masked:
        a3, sa3 = a.view(E, m, K), sa.view(E, m, -1)
        masked_m = torch.full((E,), m, dtype=torch.int32, device=device)
        out = torch.empty(E, m, N, dtype=torch.bfloat16, device=device)

        def ours():
            return lkg.fp8_grouped_gemm_masked(a3, sa3, b, sb, masked_m, out=out)

        def check():
            want = ref.fp8_gemm(a3[0], sa3[0], b[0], sb[0], torch.float32)
            return _diff(ours()[0].float(), want) < 1e-4
    else:
        out = torch.empty(E * m, N, dtype=torch.bfloat16, device=device)

        def ours():
            return lkg.fp8_grouped_gemm(a, sa, b, sb, offs, out=out)

        def check():
            want = ref.fp8_gemm(a[:m], sa[:m], b[0], sb[0], torch.float32)
            return _diff(ours()[:m].float(), want) < 1e-4

    bt = wb.transpose(-2, -1)
    baselines["F.grouped_mm bf16"] = _probe(lambda: F.grouped_mm(xb, bt, offs=offs))
    if device == "cpu":
        ad = quant.dequantize_fp8(a, sa, (1, GROUP)).view(E, m, K)
        bd = quant.dequantize_fp8(b, sb, (GROUP, GROUP))
        bdt = bd.transpose(1, 2)
        baselines["torch.bmm fp32 (dequantized)"] = _probe(lambda: torch.bmm(ad, bdt))
    else:
        ar, sar = _rowwise_fp8(xb)
        br, sbr = _rowwise_fp8(wb)
        brt = br.transpose(-2, -1)
        baselines["F.scaled_grouped_mm rowwise"] = _probe(lambda: F.scaled_grouped_mm(
            ar, brt, sar, F.ScalingType.RowWise, sbr, F.ScalingType.RowWise, offs=offs,
            output_dtype=torch.bfloat16))
    baselines = {k: v for k, v in baselines.items() if v is not None}
    kind = "masked" if masked else "contiguous"
    return Case(domain="gemm", name=f"fp8_grouped_gemm {kind}", shape=f"{E}x{m} N={N} K={K}", ours=ours,
                baselines=baselines, flops=2.0 * E * m * N * K, bytes=float(_bytes(E * m, N, K, E)),
                check=check, bound="compute" if device != "cpu" and m >= 256 else "memory",
                extra={"weight bytes fp8": E * N * K, "weight bytes bf16": 2 * E * N * K})


def _diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum().clamp_min(1e-300))


def _dense_case(device: str, M: int, N: int, K: int, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) * 0.02).to(device)
    a, sa = quant.quantize_fp8(x, (1, GROUP))
    b, sb = quant.quantize_fp8(w, (GROUP, GROUP))
    xb, wb = x.bfloat16(), w.bfloat16()

    def ours():
        return lkg.fp8_gemm(a, sa, b, sb)

    def check():
        want = ref.fp8_gemm(a[:64], sa[:64], b, sb, torch.float32)
        return _diff(ours()[:64].float(), want) < 1e-4

    baselines = {"torch.matmul bf16": _probe(lambda: xb @ wb.T)}
    if device != "cpu":
        # cuBLAS blockwise FP8: scale_a [M, K/128] outer-dim-major, b as [K, N] column-major.
        sa_t = sa.t().contiguous().t()
        baselines["F.scaled_mm blockwise 1x128 x 128x128"] = _probe(lambda: F.scaled_mm(
            a, b.t(), sa_t, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16))
    baselines = {k: v for k, v in baselines.items() if v is not None}
    return Case(domain="gemm", name="fp8_gemm dense", shape=f"M={M} N={N} K={K}", ours=ours, baselines=baselines,
                flops=2.0 * M * N * K, bytes=float(_bytes(M, N, K, 1)), check=check,
                bound="compute" if device != "cpu" and M >= 1024 else "memory")


DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]
MOE_NK = [(4096, 7168), (7168, 2048)]


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        if quick:
            return [_grouped_case("cpu", 4, 16, 512, 896), _dense_case("cpu", 32, 512, 896)]
        return [
            _grouped_case("cpu", 8, 16, 4096, 7168),              # MoE decode step (the judged shape)
            _grouped_case("cpu", 8, 16, 4096, 7168, masked=True),
            _grouped_case("cpu", 4, 128, 1024, 1792),             # prefill, DeepSeek-V3 / 4
            _dense_case("cpu", 64, 2112, 7168),
            _dense_case("cpu", 128, 896, 2048),
        ]
    if quick:
        return [_grouped_case(device, 4, 256, 4096, 7168), _dense_case(device, 128, 4096, 7168)]
    out = [_dense_case(device, M, N, K) for M in (64, 128, 4096) for N, K in DEEPSEEK_NK]
    out += [_grouped_case(device, E, m, N, K) for E, m in ((4, 8192), (8, 4096)) for N, K in MOE_NK]
    out += [_grouped_case(device, E, m, N, K, masked=True) for E, m in ((1, 1024), (2, 512), (4, 256)) for N, K in MOE_NK]
    return out
