"""Differentiable FP8 linear layers (DeepSeek-V3's FP8 training recipe): the public wrappers.

``fp8_linear`` and ``fp8_grouped_linear`` take high-precision activations and weights and
quantize inside, in forward and backward::

    Fprop  y  = x(1x128) . W(128x128)                 fp8_gemm / fp8_grouped_gemm
    Dgrad  dx = dy(1x128) . W^T                       W^T's 128x128 blocks are W's blocks
                                                      transposed: no requantization
    Wgrad  dW = dy^T . x, both in 1x128 groups        quantize_fp8_transposed +
           along the tokens (never across experts)    fp8_k_grouped_gemm

with fp32 accumulation everywhere; quantization is straight-through (its rounding has no
gradient). ``reference.fp8_linear`` / ``reference.fp8_linear_grads`` hold the specification.
"""
from __future__ import annotations

import torch

from . import _checks, _ops
from ._lib import FP8, GROUP

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _quantized(weight: torch.Tensor, quantized):
    """Validate an optional pre-quantized copy of ``weight``: ``(fp8 [.., N, K], scale)``."""
    if quantized is None:
        return None, None
    if not isinstance(quantized, (tuple, list)) or len(quantized) != 2:
        raise TypeError("quantized must be None or a pair (weight_fp8, weight_scale) from "
                        "quantize_fp8(weight, (128, 128))")
    wq, ws = quantized
    _checks.tensor("quantized[0]", wq, (FP8,))
    _checks.tensor("quantized[1]", ws, (torch.float32,))
    _checks.shape("quantized[0]", wq, tuple(weight.shape))
    N, K = weight.shape[-2], weight.shape[-1]
    _checks.shape("quantized[1]", ws, (*weight.shape[:-2], _cdiv(N, GROUP), _cdiv(K, GROUP)))
    _checks.same_device2("weight", weight, "quantized[0]", wq)
    _checks.same_device2("weight", weight, "quantized[1]", ws)
    return wq, ws


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, quantized=None):
    """``y = x @ weight.T (+ bias)`` through FP8, differentiable in x, weight and bias.

    Args:
        x: ``[..., K]`` float32, bfloat16 or float16.
        weight: ``[N, K]`` float (the master weight; its gradient comes back in its dtype).
        bias: optional ``[N]`` float, added in fp32 after the GEMM.
        quantized: optional ``(weight_fp8, weight_scale)``, ``quantize_fp8(weight, (128, 128))``
            computed by the caller (a module that re-quantizes only when its weight changes).
            It must be the quantization of ``weight``: nothing checks the values.

    Returns:
        ``[..., N]`` in x's dtype. Forward: x quantized in 1x128 groups, weight in 128x128
        blocks, fp8_gemm with fp32 accumulation. Backward: see the module docstring.
    """
    _checks.tensor("x", x, _FLOAT)
    _checks.tensor("weight", weight, _FLOAT, 2)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., K]")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has last dim {x.shape[-1]} but weight is [N, K] with K = {weight.shape[1]}")
    _checks.same_device2("x", x, "weight", weight)
    if bias is not None:
        _checks.tensor("bias", bias, _FLOAT, 1)
        _checks.shape("bias", bias, (weight.shape[0],))
        _checks.same_device2("x", x, "bias", bias)
    wq, ws = _quantized(weight, quantized)
    if _ops.direct(x, weight, bias):
        return _ops.fp8_linear_impl(x, weight, bias, wq, ws)
    return _ops.fp8_linear(x, weight, bias, wq, ws)


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, *, quantized=None):
    """Grouped (MoE) ``y[r] = x[r] @ weight[e].T`` through FP8, differentiable in x and weight.

    Args:
        x: ``[M, K]`` float rows sorted by expert (e.g. ``permute(x, plan)``).
        weight: ``[E, N, K]`` float master weights.
        offs: int32 ``[E]`` cumulative END row of each expert (``fp8_grouped_gemm``'s offs, the
            ``F.grouped_mm`` convention), on x's device. Any counts (0, 1, odd); rows past
            ``offs[-1]`` give zero output and zero gradient.
        quantized: optional ``(weight_fp8, weight_scale)`` as in ``fp8_linear``.

    Returns:
        ``[M, N]`` in x's dtype. The weight gradient quantizes dy and x in 1x128 groups along
        the rows of each expert separately (no group spans two experts); experts with no rows
        get a zero gradient.
    """
    _checks.tensor("x", x, _FLOAT, 2)
    _checks.tensor("weight", weight, _FLOAT, 3)
    _checks.tensor("offs", offs, (torch.int32,), 1)
    if x.shape[1] != weight.shape[2]:
        raise ValueError(f"x has K = {x.shape[1]} but weight is [E, N, K] with K = {weight.shape[2]}")
    if weight.shape[0] == 0:
        raise ValueError("weight must hold at least one expert (E >= 1)")
    _checks.shape("offs", offs, (weight.shape[0],))
    _checks.same_device2("x", x, "weight", weight)
    _checks.same_device2("x", x, "offs", offs)
    wq, ws = _quantized(weight, quantized)
    if _ops.direct(x, weight, offs):
        return _ops.fp8_grouped_linear_impl(x, weight, offs.contiguous(), wq, ws)
    return _ops.fp8_grouped_linear(x, weight, offs, wq, ws)
