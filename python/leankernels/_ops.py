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


# ---------------------------------------------------------------------------------- routing
from typing import Optional  # noqa: E402  (op schemas read the annotation)


def plan_rows(num_tokens: int, top_k: int, num_experts: int, align: int) -> int:
    """Static permuted-row count: T*top_k + min(E, T*top_k) * (align - 1) (see reference.plan_rows)."""
    n = num_tokens * top_k
    return n + torch.sym_min(num_experts, n) * (align - 1)  # sym_min: T may be symbolic when traced


@torch.library.custom_op("leankernels::route", mutates_args=())
def route(logits: torch.Tensor, top_k: int, sigmoid: bool, bias: Optional[torch.Tensor], n_group: int,
          topk_group: int, renormalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device, stream = device_args(logits)
    C().route(logits.data_ptr(), dtype_code(logits.dtype), T, E, logits.stride(0),
              0 if bias is None else bias.data_ptr(), sigmoid, top_k, n_group, topk_group, renormalize,
              float(scale), weights.data_ptr(), ids.data_ptr(), device, stream)
    return weights, ids


@route.register_fake
def _(logits, top_k, sigmoid, bias, n_group, topk_group, renormalize, scale):
    T = logits.shape[0]
    return (logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int32))


@torch.library.custom_op("leankernels::plan", mutates_args=())
def plan(ids: torch.Tensor, num_experts: int, align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = ids.shape
    dev = ids.device
    R = plan_rows(T, K, num_experts, align)
    i32 = torch.int32
    counts = torch.empty((num_experts,), dtype=i32, device=dev)
    offs = torch.empty((num_experts,), dtype=i32, device=dev)
    row_token = torch.empty((R,), dtype=i32, device=dev)
    token_row = torch.empty((T, K), dtype=i32, device=dev)
    ids = ids.contiguous()
    device, stream = device_args(ids)
    ws_size = C().plan_workspace_size(T, K, num_experts) if device >= 0 else 0
    ws = torch.empty((max(ws_size, 1),), dtype=i32, device=dev)
    C().plan(ids.data_ptr(), T, K, num_experts, align, R, counts.data_ptr(), offs.data_ptr(),
             row_token.data_ptr(), token_row.data_ptr(), ws.data_ptr(), ws_size, device, stream)
    return counts, offs, row_token, token_row


@plan.register_fake
def _(ids, num_experts, align):
    T, K = ids.shape
    R = plan_rows(T, K, num_experts, align)
    i32 = torch.int32
    return (ids.new_empty((num_experts,), dtype=i32), ids.new_empty((num_experts,), dtype=i32),
            ids.new_empty((R,), dtype=i32), ids.new_empty((T, K), dtype=i32))


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("leankernels::permute", mutates_args=())
def permute(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    T, H = x.shape
    R = row_token.shape[0]
    out = torch.empty((R, H), dtype=x.dtype, device=x.device)
    if R == 0 or H == 0:
        return out
    x = _rows_view(x)
    device, stream = device_args(x)
    C().permute(x.data_ptr(), x.element_size(), T, H, x.stride(0), row_token.data_ptr(), R, out.data_ptr(),
                device, stream)
    return out


@permute.register_fake
def _(x, row_token):
    return x.new_empty((row_token.shape[0], x.shape[1]))


@torch.library.custom_op("leankernels::permute_fp8", mutates_args=())
def permute_fp8(x: torch.Tensor, row_token: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T, H = x.shape
    R = row_token.shape[0]
    q = torch.empty((R, H), dtype=FP8, device=x.device)
    scale = torch.empty((R, _cdiv(H, GROUP)), dtype=torch.float32, device=x.device)
    if R == 0 or H == 0:
        return q, scale
    x = _rows_view(x)
    device, stream = device_args(x)
    C().permute_fp8(x.data_ptr(), dtype_code(x.dtype), T, H, x.stride(0), row_token.data_ptr(), R,
                    q.data_ptr(), scale.data_ptr(), ue8m0, device, stream)
    return q, scale


@permute_fp8.register_fake
def _(x, row_token, ue8m0):
    R, H = row_token.shape[0], x.shape[1]
    return x.new_empty((R, H), dtype=FP8), x.new_empty((R, _cdiv(H, GROUP)), dtype=torch.float32)


@torch.library.custom_op("leankernels::unpermute", mutates_args=())
def unpermute(y: torch.Tensor, token_row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    R, H = y.shape
    T, K = token_row.shape
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    if T == 0 or H == 0:
        return out
    y = y.contiguous()
    token_row = token_row.contiguous()
    weights = weights.contiguous()
    device, stream = device_args(y)
    C().unpermute(y.data_ptr(), dtype_code(y.dtype), R, H, token_row.data_ptr(), weights.data_ptr(), T, K,
                  out.data_ptr(), device, stream)
    return out


@unpermute.register_fake
def _(y, token_row, weights):
    return y.new_empty((token_row.shape[0], y.shape[1]))


@torch.library.custom_op("leankernels::update_bias", mutates_args=())
def update_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    out = torch.empty_like(bias, memory_format=torch.contiguous_format)
    E = bias.shape[0]
    if E == 0:
        return out
    bias = bias.contiguous()
    counts = counts.contiguous()
    device, stream = device_args(bias)
    C().update_bias(bias.data_ptr(), counts.data_ptr(), dtype_code(counts.dtype), E, float(rate),
                    out.data_ptr(), device, stream)
    return out


@update_bias.register_fake
def _(bias, counts, rate):
    return torch.empty_like(bias, memory_format=torch.contiguous_format)
# -------------------------------------------------------------------------------------- mla
from typing import Optional  # noqa: E402  (Python 3.9: torch evaluates op annotations)

MLA_LATENT, MLA_DIM, MLA_FP8_BYTES = 512, 576, 656


def _mla_debug() -> bool:
    import os

    return os.environ.get("LEANKERNELS_DEBUG", "0") not in ("", "0")


def _mla_error_flag(t: torch.Tensor, debug: bool):
    """A device int32 the CUDA kernels set on a bad index; only allocated under debug."""
    if debug and t.device.type == "cuda":
        return torch.zeros(4, dtype=torch.int32, device=t.device)
    return None


def _mla_raise_flag(flag) -> None:
    """Raise for the first bad index a CUDA kernel reported: flag = {kind, i, j, value}."""
    if flag is None:
        return
    kind, i, j, value = flag.tolist()  # syncs: debug mode only
    if kind != 0:
        where = {1: f"slot_mapping[{i}]", 2: f"block_table[{i}, {j}]", 3: f"positions[{i}]"}[kind]
        raise ValueError(f"leankernels: {where} = {value} is out of range (LEANKERNELS_DEBUG=1)")


def _mla_cache_geometry(cache: torch.Tensor):
    """(fp8, num_blocks, block_size, block stride in bytes) of a [nb, bs, 576|656] cache."""
    fp8 = cache.dtype != torch.bfloat16
    return fp8, cache.shape[0], cache.shape[1], cache.stride(0) * cache.element_size()


@torch.library.custom_op("leankernels::mla_append", mutates_args=("cache",))
def mla_append(cache: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
               norm_weight: Optional[torch.Tensor], eps: float, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
               positions: Optional[torch.Tensor]) -> None:
    T = kv_c.shape[0]
    if T == 0 or cache.numel() == 0:
        return
    debug = _mla_debug()
    flag = _mla_error_flag(cache, debug)
    fp8, nb, bs, bstride = _mla_cache_geometry(cache)
    device, stream = device_args(cache)
    C().mla_append(
        kv_c.data_ptr(), dtype_code(kv_c.dtype), kv_c.stride(0), k_pe.data_ptr(), dtype_code(k_pe.dtype),
        k_pe.stride(0), slot_mapping.data_ptr(), T, norm_weight.data_ptr() if norm_weight is not None else 0,
        eps, cos.data_ptr() if cos is not None else 0, sin.data_ptr() if sin is not None else 0,
        positions.data_ptr() if positions is not None else 0, cos.shape[0] if cos is not None else 0,
        cache.data_ptr(), fp8, nb, bs, bstride, debug, flag.data_ptr() if flag is not None else 0, device, stream)
    _mla_raise_flag(flag)


@mla_append.register_fake
def _(cache, kv_c, k_pe, slot_mapping, norm_weight, eps, cos, sin, positions):
    return None


@torch.library.custom_op("leankernels::mla_decode", mutates_args=())
def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
               softmax_scale: float, causal: bool, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, s_q, H, _ = q.shape
    out = torch.empty(B, s_q, H, MLA_LATENT, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, s_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q = q.contiguous()
    rows = s_q * H
    if num_splits > 1:
        o_part = torch.empty(B, num_splits, rows, MLA_LATENT, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, num_splits, rows, dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = None
    debug = _mla_debug()
    flag = _mla_error_flag(q, debug)
    fp8, nb, bs, bstride = _mla_cache_geometry(cache)
    device, stream = device_args(q)
    C().mla_decode(
        q.data_ptr(), B, s_q, H, cache.data_ptr(), fp8, nb, bs, bstride, block_table.data_ptr(),
        block_table.shape[1], block_table.stride(0), seqlens.data_ptr(), softmax_scale, causal, num_splits,
        o_part.data_ptr() if o_part is not None else 0, lse_part.data_ptr() if lse_part is not None else 0,
        out.data_ptr(), lse.data_ptr(), flag.data_ptr() if flag is not None else 0, device, stream)
    _mla_raise_flag(flag)
    return out, lse


@mla_decode.register_fake
def _(q, cache, block_table, seqlens, softmax_scale, causal, num_splits):
    B, s_q, H, _ = q.shape
    return q.new_empty(B, s_q, H, MLA_LATENT), q.new_empty(B, H, s_q, dtype=torch.float32)


@torch.library.custom_op("leankernels::mla_schedule", mutates_args=())
def mla_schedule(seqlens: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    B = seqlens.shape[0]
    metadata = torch.empty(num_parts, 8, dtype=torch.int32, device=seqlens.device)
    num_splits = torch.empty(B + 1, dtype=torch.int32, device=seqlens.device)
    seqlens = seqlens.contiguous()
    device, stream = device_args(seqlens)
    C().mla_schedule(seqlens.data_ptr(), B, num_parts, metadata.data_ptr(), num_splits.data_ptr(), device, stream)
    return metadata, num_splits


@mla_schedule.register_fake
def _(seqlens, num_parts):
    B = seqlens.shape[0]
    return (seqlens.new_empty(num_parts, 8, dtype=torch.int32), seqlens.new_empty(B + 1, dtype=torch.int32))
# ------------------------------------------------------------------------------------- gemm
# Layout codes mirror lk::GemmLayout in csrc/cpu/gemm.h.
_GEMM_DENSE, _GEMM_CONTIGUOUS, _GEMM_MASKED = 0, 1, 2


def _gemm_launch(layout: int, a, a_scale, b, b_scale, groups, M: int, out: torch.Tensor) -> None:
    """Call the C++ core. a is [R, K] (or [G, M, K] for masked), b [G, N, K]; out preallocated."""
    if out.numel() == 0:
        return
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (the kernel writes rows in place)")
    a, a_scale, b, b_scale = a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale.contiguous()
    G, N, K = (1, b.shape[0], b.shape[1]) if b.dim() == 2 else (b.shape[0], b.shape[1], b.shape[2])
    gptr = 0
    if groups is not None:
        groups = groups.contiguous()
        gptr = groups.data_ptr()
    device, stream = device_args(a)
    C().fp8_gemm(layout, a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(), gptr, G, M, N, K,
                 out.data_ptr(), dtype_code(out.dtype), device, stream)


@torch.library.custom_op("leankernels::fp8_gemm", mutates_args=())
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_DENSE, a, a_scale, b, b_scale, None, a.shape[0], out)
    return out


@fp8_gemm.register_fake
def _(a, a_scale, b, b_scale, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@torch.library.custom_op("leankernels::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # Zeros, so rows past offs[-1] (unknown on the host without a sync) are defined.
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, a.shape[0], out)
    return out


@fp8_grouped_gemm.register_fake
def _(a, a_scale, b, b_scale, offs, out_dtype):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("leankernels::fp8_grouped_gemm_out", mutates_args=("out",))
def fp8_grouped_gemm_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                         offs: torch.Tensor, out: torch.Tensor) -> None:
    _gemm_launch(_GEMM_CONTIGUOUS, a, a_scale, b, b_scale, offs, a.shape[0], out)


@fp8_grouped_gemm_out.register_fake
def _(a, a_scale, b, b_scale, offs, out):
    return None


@torch.library.custom_op("leankernels::fp8_grouped_gemm_masked", mutates_args=())
def fp8_grouped_gemm_masked(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            masked_m: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=out_dtype, device=a.device)
    _gemm_launch(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, a.shape[1], out)
    return out


@fp8_grouped_gemm_masked.register_fake
def _(a, a_scale, b, b_scale, masked_m, out_dtype):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("leankernels::fp8_grouped_gemm_masked_out", mutates_args=("out",))
def fp8_grouped_gemm_masked_out(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                                masked_m: torch.Tensor, out: torch.Tensor) -> None:
    _gemm_launch(_GEMM_MASKED, a, a_scale, b, b_scale, masked_m, a.shape[1], out)


@fp8_grouped_gemm_masked_out.register_fake
def _(a, a_scale, b, b_scale, masked_m, out):
    return None
