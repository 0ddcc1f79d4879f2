"""FP8 (e4m3) block quantization: the public wrappers.

See reference.quantize_fp8 for the exact semantics; the kernels match it bit for bit.
"""
from __future__ import annotations

import numbers

import torch

from . import _checks, _interop, _ops
from ._lib import FP8, GROUP
from .gemm import _k_offs  # the k-grouped layout's offs checks (gemm imports nothing from quant)

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_FMTS = ("fp32", "ue8m0")


_BLOCK_ROWS = {(1, GROUP): 1, (GROUP, GROUP): GROUP}
_TOKEN_BLOCK = (1, GROUP)  # quantize_fp8's default block (the same object: an identity test)
_Tensor = torch.Tensor


def _block_rows(block) -> int:
    if type(block) is tuple and len(block) == 2 and type(block[0]) is int and type(block[1]) is int:
        rows = _BLOCK_ROWS.get(block)
        if rows is not None:  # the common case; anything else gets the checks below
            return rows
    try:
        b = tuple(block)
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in b):
            raise TypeError
        b = tuple(int(v) for v in b)
    except TypeError:
        raise TypeError(f"block must be a pair such as (1, 128) or (128, 128); got {block!r}") from None
    if b == (1, GROUP):
        return 1
    if b == (GROUP, GROUP):
        return GROUP
    raise ValueError(f"block must be (1, 128) (per-token groups) or (128, 128) (weight blocks); got {block!r}")


def quantize_fp8(x, block=_TOKEN_BLOCK, scale_fmt: str = "fp32"):
    """Quantize to float8_e4m3fn with one fp32 scale per block.

    Args:
        x: float32, bfloat16 or float16 tensor (or CuPy array). With block (1, 128): any shape
            ``[..., K]``, one scale per 128 consecutive elements of the last dim (activations,
            per token). With block (128, 128): ``[N, K]`` or ``[E, N, K]`` (weights, per expert).
            Any strides; K and N need not be multiples of 128 (the last group is partial).
        block: ``(1, 128)`` or ``(128, 128)``.
        scale_fmt: ``"fp32"``: scale = max(amax, 1e-4) / 448. ``"ue8m0"``: that scale rounded
            up to a power of two (DeepSeek-V3.1 / Blackwell UE8M0 scales), stored as fp32.

    Returns:
        ``(x_fp8, scale)``: x_fp8 has x's shape, dtype float8_e4m3fn, contiguous, and holds
        round-to-nearest-even of x / scale clamped to +-448 (bit-identical to PyTorch's
        ``(x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)``). scale is fp32 of
        shape ``[..., ceil(K/128)]`` or ``[(E,) ceil(N/128), ceil(K/128)]``.

    NaN and Inf: a group containing NaN gets a NaN scale and all-NaN codes; a group containing
    +-Inf gets an Inf scale, its finite values quantize to 0 and its infinities to NaN. Bad
    values are never hidden. With CuPy input, x_fp8 comes back as a uint8 CuPy array.
    """
    if (type(x) is _Tensor and (block is _TOKEN_BLOCK or (type(block) is tuple and block == _TOKEN_BLOCK))
            and x.is_cpu):
        # an eager [T, K] CPU call, every check below in one expression (a decode step makes many)
        dt, xs = x.dtype, x.shape
        if (dt in _INPUT_DTYPES and len(xs) == 2 and (scale_fmt == "fp32" or scale_fmt == "ue8m0")
                and _ops.direct_cpu(x)):
            return _ops.quantize_rows(x, _ops._DTYPE_CODES[dt], xs[0], xs[1], scale_fmt == "ue8m0")
    src = x
    x = _interop.to_torch(x)
    _checks.tensor("x", x, _INPUT_DTYPES)
    block_rows = _block_rows(block)
    if scale_fmt not in _SCALE_FMTS:
        raise ValueError(f"scale_fmt must be 'fp32' or 'ue8m0'; got {scale_fmt!r}")
    if block_rows == 1 and x.dim() < 1:
        raise ValueError("x must have at least 1 dimension for block (1, 128); got a scalar")
    if block_rows == GROUP and x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, K] or [E, N, K] for block (128, 128); got shape {tuple(x.shape)}")
    if _ops.direct(x):
        op = _ops.quantize_fp8_impl
    else:
        _checks.no_grad_needed("quantize_fp8", "to train through FP8 use leankernels.fp8_linear / fp8_grouped_linear, "
                               "which quantize inside (straight-through)", x)
        op = _ops.quantize_fp8
    q, scale = op(x, block_rows, scale_fmt == "ue8m0")
    if src is x:
        return q, scale
    return _interop.like_input(q, src), _interop.like_input(scale, src)


def silu_mul_quantize_fp8(h, scale_fmt: str = "fp32"):
    """The SwiGLU activation and its FP8 quantization in one pass: ``quantize_fp8(silu(g) * u)``
    with ``[g, u] = h.chunk(2, -1)``, the way a SwiGLU MLP (or MoE expert) feeds its down
    projection, without the two intermediate tensors.

    Args:
        h: ``[..., 2I]`` float32, bfloat16 or float16 (gate/up projection output, gate first).
        scale_fmt: ``"fp32"`` or ``"ue8m0"``, as quantize_fp8.

    Returns:
        ``(a_fp8 [..., I], scale [..., ceil(I/128)])`` in quantize_fp8's 1x128 format. silu and
        the product are computed in fp32 (silu(g) = g / (1 + exp(-g))); on the CPU the exp of
        whole finite groups is a vector one within a few ulp of libm's, so a code can differ
        from ``quantize_fp8(F.silu(g) * u)``'s by one step where the product sits on a rounding
        boundary. NaN and Inf follow quantize_fp8. CUDA tensors take exactly those two steps.
    """
    if (type(h) is _Tensor and h.is_cpu and h.dtype in _INPUT_DTYPES and h.dim() == 2 and h.shape[1] % 2 == 0
            and (scale_fmt == "fp32" or scale_fmt == "ue8m0") and h.is_contiguous() and _ops.direct(h)):
        # an eager [T, 2I] CPU call, the checks below in one expression (a decode step makes many)
        return _ops.silu_mul_quantize_fp8_impl(h, scale_fmt == "ue8m0")
    src = h
    h = _interop.to_torch(h)
    _checks.tensor("h", h, _INPUT_DTYPES)
    if scale_fmt not in _SCALE_FMTS:
        raise ValueError(f"scale_fmt must be 'fp32' or 'ue8m0'; got {scale_fmt!r}")
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"h must be [..., 2I] (gate and up halves); got shape {tuple(h.shape)}")
    lead, two_i = h.shape[:-1], h.shape[-1]
    h2 = h.reshape(-1, two_i) if h.dim() != 2 else h
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    if _ops.direct(h2):
        q, scale = _ops.silu_mul_quantize_fp8_impl(h2, scale_fmt == "ue8m0")
    else:
        _checks.no_grad_needed("silu_mul_quantize_fp8", "compute F.silu(g) * u and train through fp8_linear", h)
        q, scale = _ops.silu_mul_quantize_fp8(h2, scale_fmt == "ue8m0")
    if h.dim() != 2:
        q, scale = q.view(*lead, q.shape[-1]), scale.view(*lead, scale.shape[-1])
    if src is h:
        return q, scale
    return _interop.like_input(q, src), _interop.like_input(scale, src)


def dequantize_fp8(x_fp8, scale, block=(1, 128)):
    """Inverse of quantize_fp8: ``x_fp8.float() * scale`` broadcast over each block, as fp32.

    Args:
        x_fp8: float8_e4m3fn tensor (or uint8 CuPy array) ``[..., K]`` for block (1, 128), or
            ``[(E,) N, K]`` for block (128, 128).
        scale: fp32, shape ``[..., ceil(K/128)]`` or ``[(E,) ceil(N/128), ceil(K/128)]``.
        block: ``(1, 128)`` or ``(128, 128)``.
    """
    src = x_fp8
    x_fp8 = _interop.to_torch(x_fp8, fp8=True)
    scale = _interop.to_torch(scale)
    _checks.tensor("x_fp8", x_fp8, (FP8,))
    _checks.tensor("scale", scale, (torch.float32,))
    _checks.same_device(x_fp8=x_fp8, scale=scale)
    block_rows = _block_rows(block)
    if block_rows == 1 and x_fp8.dim() < 1:
        raise ValueError("x_fp8 must have at least 1 dimension for block (1, 128)")
    if block_rows == GROUP and x_fp8.dim() not in (2, 3):
        raise ValueError(f"x_fp8 must be [N, K] or [E, N, K] for block (128, 128); got shape {tuple(x_fp8.shape)}")
    _checks.shape("scale", scale, _ops._quant_scale_shape(x_fp8.shape, block_rows))
    op = _ops.dequantize_fp8_impl if _ops.direct(x_fp8, scale) else _ops.dequantize_fp8
    return _interop.like_input(op(x_fp8, scale, block_rows), src)


def quantize_fp8_transposed(x, offs=None, scale_fmt: str = "fp32"):
    """Quantize x.T in 1x128 groups along tokens: the operands of the weight-gradient GEMM.

    For ``y = x @ W.T`` with x ``[M tokens, K]``, DeepSeek-V3's Wgrad dW = dy.T @ x quantizes
    dy and x in groups of 128 along the token dimension (the contraction dimension). This gives
    ``xt = x.T`` ``[K, M]`` with one scale per 128 tokens per row of xt; feed two such results to
    ``fp8_k_grouped_gemm``.

    Args:
        x: float32, bfloat16 or float16 ``[M, K]``, any row stride (a non-unit column stride is
            copied first).
        offs: None, or int32 ``[E]`` cumulative END offsets of the experts' tokens (rows of x
            sorted by expert, ``F.grouped_mm`` convention), on x's device, non-decreasing,
            ``offs[-1] <= M``; not read on the host (checked only with ``LEANKERNELS_DEBUG=1``;
            bad values are clamped as in ``fp8_k_grouped_gemm``, never out of bounds).
            Expert e's tokens ``[start_e, end_e)`` are cut into groups of 128 starting at
            start_e (a group never straddles two experts; any count works: 0, 1, odd).
        scale_fmt: ``"fp32"`` or ``"ue8m0"``, as in ``quantize_fp8``.

    Returns:
        ``(xt_fp8, scale)``: xt_fp8 float8_e4m3fn ``[K, M]`` contiguous; scale float32
        ``[K, ceil(M/128) + E - 1]`` (``E = 1`` without offs), the j-th group of expert e in
        column ``floor(start_e / 128) + e + j`` (no prefix sum needed; columns never overlap).
        Unused scale columns are 0; tokens past ``offs[-1]`` give 0 codes. Each group is
        quantized exactly as ``quantize_fp8`` quantizes a 1x128 group (same scale, rounding,
        saturation, NaN/Inf rules): bit-identical to ``reference.quantize_fp8_transposed``.
    """
    src = x
    x = _interop.to_torch(x)
    _checks.tensor("x", x, _INPUT_DTYPES, 2)
    if scale_fmt not in _SCALE_FMTS:
        raise ValueError(f"scale_fmt must be 'fp32' or 'ue8m0'; got {scale_fmt!r}")
    offs, _ = _k_offs(offs, x.device, x.shape[0], "the number of rows of x")
    if _ops.direct(x, offs):
        xv = x if x.stride(1) == 1 and x.stride(0) >= 0 else x.contiguous()
        q, scale = _ops.quantize_fp8_transposed_impl(xv, None if offs is None else offs.contiguous(),
                                                     scale_fmt == "ue8m0")
    else:
        q, scale = _ops.quantize_fp8_transposed(x, offs, scale_fmt == "ue8m0")
    if src is x:
        return q, scale
    return _interop.like_input(q, src), _interop.like_input(scale, src)
