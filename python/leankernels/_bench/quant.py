"""Benchmark cases for FP8 block quantization (leankernels.quantize_fp8).

Baselines: the eager PyTorch reference (leankernels.reference.quantize_fp8, the specification)
and, outside --quick, the same reference under torch.compile (what a user gets for free).
Shapes: DeepSeek-V3 activations (tokens x hidden 7168, 1x128 groups) and weights (128x128
blocks): dense projections and a stack of expert matrices. Inputs are bf16, as in the model.
"""
from __future__ import annotations

import math

import torch

from .case import Case, InputSets

BLOCK_NAMES = {(1, 128): "1x128", (128, 128): "128x128"}


def _shapes(device: str, quick: bool):
    """(block, shape) pairs for this device and mode."""
    act, wt = (1, 128), (128, 128)
    if quick:   # scaled-down DeepSeek-V3 shapes: a few seconds on 2 CPU cores
        return [(act, (256, 7168)), (wt, (1536, 2048))]
    if device.startswith("cuda"):
        return [(act, (4096, 7168)), (act, (16384, 7168)),
                (wt, (7168, 16384)), (wt, (24576, 1536)), (wt, (7168, 2048)), (wt, (8, 2048, 7168))]
    return [(act, (4096, 7168)), (wt, (2112, 7168)), (wt, (7168, 2048)), (wt, (24576, 1536))]


def _compiled_reference():
    from .. import reference
    try:  # one specialised graph per shape: allow more recompiles than the default 8
        import torch._dynamo.config as dcfg
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 64))
    except Exception:  # noqa: BLE001
        pass
    return torch.compile(reference.quantize_fp8, dynamic=False)


def quant_bytes(shape, block, in_bytes: int = 2) -> float:
    """Minimal DRAM traffic of one quantize call: read x, write the e4m3 codes and the scales."""
    numel = math.prod(shape)
    k_groups = math.ceil(shape[-1] / 128)
    if block == (1, 128):
        n_scales = math.prod(shape[:-1]) * k_groups
    else:
        n_scales = math.prod(shape[:-2]) * math.ceil(shape[-2] / 128) * k_groups
    return float(numel * in_bytes + numel * 1 + n_scales * 4)


def _call_cases(device: str, quick: bool) -> list[Case]:
    """One decode token (T=1): the cost of one quantize_fp8 call, mostly fixed cost, against
    torch.topk on a [1, 256] row in the same run (issue target: ours <= 3x, ratio >= 0.33x)."""
    import leankernels
    from .. import reference
    from .routing import CALLS_PER_SAMPLE, TOPK_BASELINE, topk_baseline

    out = []
    for H in ([7168] if quick else [2048, 7168]):
        g = torch.Generator().manual_seed(H)
        x = torch.randn(1, H, generator=g).to(device=device, dtype=torch.bfloat16)

        def check(x=x):
            q, s = leankernels.quantize_fp8(x)
            rq, rs = reference.quantize_fp8(x)
            return bool(torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs))

        out.append(Case("quant", "quantize_fp8 1x128 T=1 call", f"1x{H} bf16",
                        lambda x=x: leankernels.quantize_fp8(x), {TOPK_BASELINE: topk_baseline(device)},
                        bytes=quant_bytes((1, H), (1, 128)), check=check, bound="memory",
                        extra={"T": 1, "target": "ours <= 3x torch.topk (ratio >= 0.33x)"},
                        calls=CALLS_PER_SAMPLE))
    return out


def _swiglu_cases(device: str, quick: bool) -> list[Case]:
    """silu_mul_quantize_fp8 (SwiGLU activation + 1x128 quantization in one pass) against the
    unfused ops it replaces in an MoE or MLP (chunk, F.silu, mul, quantize_fp8), on fp32
    gate/up outputs: V2-Lite's 6 expert rows of a batch-1 token (I=1408) and an MoE prefill's
    rows (512 tokens x top-6)."""
    import torch.nn.functional as F

    import leankernels

    def unfused(h):
        g, u = h.chunk(2, dim=-1)
        return leankernels.quantize_fp8(F.silu(g).mul_(u))

    out = []
    for rows in ([6] if quick else [6, 3072]):
        I = 1408
        gen = torch.Generator(device=device)
        gen.manual_seed(rows)
        sets = InputSets([torch.randn(rows, 2 * I, generator=gen, device=device) * 2 for _ in range(2)])

        def check(sets=sets):
            (q, s), (q2, s2) = leankernels.silu_mul_quantize_fp8(sets.current), unfused(sets.current)
            near = (q.float() - q2.float()).abs() <= q2.float().abs() * 0.125 + 2.0 ** -9
            return bool(torch.allclose(s, s2, rtol=3e-7, atol=0) and near.all())

        numel = rows * I
        out.append(Case("quant", "silu_mul_quantize_fp8 (SwiGLU + 1x128)", f"{rows}x{2 * I} fp32",
                        lambda sets=sets: leankernels.silu_mul_quantize_fp8(sets.current),
                        {"chunk + F.silu + mul_ + quantize_fp8": lambda sets=sets: unfused(sets.current)},
                        bytes=float(numel * 2 * 4 + numel + numel // 128 * 4), check=check, bound="memory",
                        extra={"rows": rows, "I": I}, rotate=sets.advance))
    return out


def cases(device: str, quick: bool) -> list[Case]:
    import leankernels
    from .. import reference

    cuda = device.startswith("cuda")
    n_sets = 3 if cuda else 2
    compiled = None if quick else _compiled_reference()
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    out = _call_cases(device, quick) + _swiglu_cases(device, quick)
    for block, shape in _shapes(device, quick):
        sets = InputSets([torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
                          for _ in range(n_sets)])

        def ours(sets=sets, block=block):
            return leankernels.quantize_fp8(sets.current, block)

        def ref(sets=sets, block=block):
            return reference.quantize_fp8(sets.current, block)

        baselines = {"reference eager": ref}
        if compiled is not None:
            baselines["reference torch.compile"] = lambda sets=sets, block=block: compiled(sets.current, block)

        def check(sets=sets, block=block):
            q, s = leankernels.quantize_fp8(sets.current, block)
            rq, rs = reference.quantize_fp8(sets.current, block)
            return bool(torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs))

        kind = "activations" if block == (1, 128) else "weights"
        out.append(Case(
            domain="quant",
            name=f"quantize_fp8 {BLOCK_NAMES[block]} {kind}",
            shape="x".join(map(str, shape)) + " bf16",
            ours=ours,
            baselines=baselines,
            flops=0.0,
            bytes=quant_bytes(shape, block),
            check=check,
            bound="memory",
            extra={"block": list(block), "input_sets": n_sets, "check": "codes and scales bitwise equal to the reference"},
            rotate=sets.advance,
        ))
    return out
