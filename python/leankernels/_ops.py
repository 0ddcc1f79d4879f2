"""torch.library definitions of every leankernels op and their fake (meta) kernels.

Each op takes tensors already validated by the public wrapper (quant.py, gemm.py, ...),
allocates its outputs and calls the framework-free C++ core with raw pointers on the
current CUDA stream, so ops work in eager mode, under torch.compile(fullgraph=True) and
inside CUDA graphs. The fake kernels give shapes and dtypes for tracing.
"""
from __future__ import annotations

import torch

from ._lib import C, FP8, GROUP, device_args, dtype_code


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------ quant
def _quant_layout(x: torch.Tensor, block_rows: int):
    """View x as [batch, rows, K] with unit column stride: (x', batch, rows, K, bstride, rstride).

    Any row and batch strides are fine (the kernels only read x); only the last dim must be
    dense, and 1x128 leading dims must collapse into one (reshape copies when they do not).
    """
    K = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if block_rows == 1:
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return x2, 1, x2.shape[0], K, 0, x2.stride(0)
    if x.dim() == 2:
        return x, 1, x.shape[0], K, 0, x.stride(0)
    return x, x.shape[0], x.shape[1], K, x.stride(0), x.stride(1)


def _quant_scale_shape(shape, block_rows: int):
    K = shape[-1]
    if block_rows == 1:
        return (*shape[:-1], _cdiv(K, GROUP))
    return (*shape[:-2], _cdiv(shape[-2], GROUP), _cdiv(K, GROUP))


@torch.library.custom_op("leankernels::quantize_fp8", mutates_args=())
def quantize_fp8(x: torch.Tensor, block_rows: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(_quant_scale_shape(x.shape, block_rows), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, scale
    xv, batch, rows, K, bstride, rstride = _quant_layout(x, block_rows)
    device, stream = device_args(x)
    C().quantize_fp8(xv.data_ptr(), dtype_code(x.dtype), batch, rows, K, bstride, rstride, block_rows,
                     q.data_ptr(), scale.data_ptr(), ue8m0, device, stream)
    return q, scale


@quantize_fp8.register_fake
def _(x, block_rows, ue8m0):
    return (x.new_empty(x.shape, dtype=FP8),
            x.new_empty(_quant_scale_shape(x.shape, block_rows), dtype=torch.float32))


@torch.library.custom_op("leankernels::dequantize_fp8", mutates_args=())
def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out
    q = q.contiguous()
    scale = scale.contiguous()
    K = q.shape[-1]
    if block_rows == 1:
        batch, rows = 1, q.numel() // K
    else:
        batch = q.shape[0] if q.dim() == 3 else 1
        rows = q.shape[-2]
    device, stream = device_args(q)
    C().dequantize_fp8(q.data_ptr(), scale.data_ptr(), batch, rows, K, block_rows, out.data_ptr(), device, stream)
    return out


@dequantize_fp8.register_fake
def _(q, scale, block_rows):
    return q.new_empty(q.shape, dtype=torch.float32)
