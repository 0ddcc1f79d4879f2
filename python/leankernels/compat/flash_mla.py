"""Drop-in for FlashMLA's dense decoding Python API (deepseek-ai/FlashMLA, 2025 releases).

    from leankernels.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, kvcache, block_table, cache_seqlens, dv,
                                      tile_scheduler_metadata, num_splits, causal=True)

Same signatures, shapes, dtypes and results (out ``[b, s_q, h_q, dv]``, lse fp32
``[b, h_q, s_q]``), backed by leankernels.mla_decode, so it also runs on the CPU, on any
sm_80+ GPU, with any page block size and with FlashMLA's 656-byte FP8 cache rows. Both the
February 2025 call (three metadata arguments, k_cache dtype decides FP8) and the September 2025
keywords (``get_mla_metadata(..., num_heads_q=None, is_fp8_kvcache=False, topk=None)``,
``flash_mla_with_kvcache(..., is_fp8_kvcache=False, indices=None)``) work.

Differences to know:

* the metadata is FlashMLA's (same shapes, same greedy schedule), but the leankernels kernel
  picks its own KV split from the shapes, so the metadata is checked and otherwise not needed;
  on the CPU the SM count is taken as an H100's (132), so the metadata matches FlashMLA's there;
* dense attention only: sparse attention (``topk`` / ``indices``, DeepSeek-V3.2) raises
  NotImplementedError;
* ``num_heads_k > 1`` (grouped query heads: q heads ``[j*h_q/h_k, (j+1)*h_q/h_k)`` attend to
  KV head j) is run as ``h_k`` independent single-head problems in one call: the cache is
  re-laid out head-major first (one copy of the cache per call; free for ``h_k = 1``);
* fp16 q and cache are computed in bf16 (leankernels' attention kernels are bf16): each call
  converts q and the cache (one copy of the cache), and out comes back as fp16. Inputs lose
  fp16's 3 extra mantissa bits before the product; the result still meets FlashMLA's test
  tolerances (tests/test_compat_flash_mla.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _checks, _ops
from ..mla import DIM, FP8_BYTES, LATENT, mla_decode

TILE_SCHEDULER_METADATA_SIZE = 8
_CPU_SM_COUNT = 132


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_heads_q: Optional[int] = None,
    is_fp8_kvcache: bool = False,
    topk: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Arguments:
        cache_seqlens: (batch_size), dtype torch.int32.
        num_q_tokens_per_head_k: Equals to seq_len_q * num_heads_q // num_heads_k.
        num_heads_k: The number of k heads.
        num_heads_q: The number of q heads (optional; checked to be a multiple of num_heads_k).
        is_fp8_kvcache: Whether the cache holds FlashMLA's 656-byte FP8 rows (same schedule).
        topk: Sparse attention; not supported here (NotImplementedError unless None).

    Return:
        tile_scheduler_metadata: (num_sm_parts, TileSchedulerMetaDataSize), dtype torch.int32.
        num_splits: (batch_size + 1), dtype torch.int32.
    """
    if topk is not None:
        raise NotImplementedError("topk (FlashMLA's sparse attention) is not supported by "
                                  "leankernels.compat.flash_mla: dense attention only")
    _checks.tensor("cache_seqlens", cache_seqlens, (torch.int32,), dim=1)
    for name, v in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k), ("num_heads_k", num_heads_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if num_heads_k < 1 or num_q_tokens_per_head_k < 1:
        raise ValueError(f"num_q_tokens_per_head_k and num_heads_k must be >= 1; "
                         f"got {num_q_tokens_per_head_k}, {num_heads_k}")
    if num_heads_q is not None and (not isinstance(num_heads_q, int) or num_heads_q < 1 or num_heads_q % num_heads_k):
        raise ValueError(f"num_heads_q must be a positive multiple of num_heads_k = {num_heads_k}; got {num_heads_q!r}")
    if cache_seqlens.device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(cache_seqlens.device).multi_processor_count
    else:
        sm_count = _CPU_SM_COUNT
    num_sm_parts = max(1, sm_count // num_heads_k // math.ceil(num_q_tokens_per_head_k / 64))
    return _ops.mla_schedule(cache_seqlens, num_sm_parts)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Arguments:
        q: (batch_size, seq_len_q, num_heads_q, head_dim), bfloat16 or float16, head_dim 576.
        k_cache: (num_blocks, page_block_size, num_heads_k, head_dim): q's dtype with head_dim
            576, or FP8 rows (uint8 / int8 / float8_e4m3fn, 656 bytes per token, num_heads_k = 1).
            num_heads_q must be a multiple of num_heads_k.
        block_table: (batch_size, max_num_blocks_per_seq), torch.int32.
        cache_seqlens: (batch_size), torch.int32.
        head_dim_v: Head_dim of v (512: the latent).
        tile_scheduler_metadata: (num_sm_parts, TileSchedulerMetaDataSize), torch.int32, return by get_mla_metadata.
        num_splits: (batch_size + 1), torch.int32, return by get_mla_metadata.
        softmax_scale: float. The scaling of QK^T before applying softmax. Default to 1 / sqrt(head_dim).
        causal: bool. Whether to apply causal attention mask.
        is_fp8_kvcache: bool. k_cache holds FP8 rows (also inferred from its dtype, as the
            February 2025 release did).
        indices: sparse attention; not supported here (NotImplementedError unless None).

    Return:
        out: (batch_size, seq_len_q, num_heads_q, head_dim_v), q's dtype.
        softmax_lse: (batch_size, num_heads_q, seq_len_q), torch.float32.
    """
    if indices is not None:
        raise NotImplementedError("indices (FlashMLA's sparse attention) is not supported by "
                                  "leankernels.compat.flash_mla: dense attention only")
    _checks.tensor("q", q, (torch.bfloat16, torch.float16), dim=4)
    _checks.tensor("k_cache", k_cache, (torch.bfloat16, torch.float16, torch.uint8, torch.int8, torch.float8_e4m3fn), dim=4)
    fp8 = k_cache.dtype not in (torch.bfloat16, torch.float16)
    if is_fp8_kvcache and not fp8:
        raise TypeError(f"is_fp8_kvcache=True needs k_cache of 656-byte FP8 rows (uint8/int8/float8_e4m3fn); got {k_cache.dtype}")
    if not fp8 and k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache must have q's dtype ({q.dtype}) unless it holds FP8 rows; got {k_cache.dtype}")
    width = FP8_BYTES if fp8 else DIM
    if k_cache.shape[3] != width:
        raise ValueError(f"k_cache must have head_dim {width} for dtype {k_cache.dtype}; got shape {tuple(k_cache.shape)}")
    h_q, h_k = q.shape[2], k_cache.shape[2]
    if h_k < 1 or h_q % h_k:
        raise ValueError(f"num_heads_k = {h_k} (k_cache.shape[2]) must divide num_heads_q = {h_q}")
    if fp8 and h_k != 1:
        raise ValueError(f"k_cache with FP8 rows must have num_heads_k = 1; got shape {tuple(k_cache.shape)}")
    if int(head_dim_v) != LATENT:
        raise ValueError(f"head_dim_v must be {LATENT} (the MLA latent); got {head_dim_v}")
    _checks.tensor("tile_scheduler_metadata", tile_scheduler_metadata, (torch.int32,), dim=2)
    if tile_scheduler_metadata.shape[1] != TILE_SCHEDULER_METADATA_SIZE:
        raise ValueError(f"tile_scheduler_metadata must be (num_sm_parts, {TILE_SCHEDULER_METADATA_SIZE}); "
                         f"got {tuple(tile_scheduler_metadata.shape)}")
    _checks.tensor("num_splits", num_splits, (torch.int32,), dim=1)
    if num_splits.shape[0] != q.shape[0] + 1:
        raise ValueError(f"num_splits must have batch_size + 1 = {q.shape[0] + 1} entries; got {num_splits.shape[0]}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    out_dtype = q.dtype
    # fp16 is computed in bf16 (the kernels' dtype; see the module notes); FP8 rows as bytes.
    cache = k_cache.view(torch.uint8) if fp8 else k_cache.to(torch.bfloat16)
    q = q.to(torch.bfloat16)
    if h_k == 1:
        out, lse = mla_decode(q, cache[:, :, 0], block_table, cache_seqlens, softmax_scale, causal=bool(causal))
    else:
        out, lse = _grouped_heads(q, cache, block_table, cache_seqlens, softmax_scale, bool(causal))
    return out.to(out_dtype), lse


def _grouped_heads(q, cache, block_table, cache_seqlens, softmax_scale, causal):
    """num_heads_k > 1 as h_k single-KV-head problems folded into the batch: KV head j's pages
    are stored at j * num_blocks + page, and batch row j * B + b reads them with its block table
    shifted by j * num_blocks (out-of-range entries stay out of range: -1)."""
    B, s_q, h_q, D = q.shape
    num_blocks, page, h_k, _ = cache.shape
    hp = h_q // h_k
    _checks.tensor("block_table", block_table, (torch.int32,), dim=2)
    qf = q.view(B, s_q, h_k, hp, D).permute(2, 0, 1, 3, 4).reshape(h_k * B, s_q, hp, D)
    cf = cache.permute(2, 0, 1, 3).reshape(h_k * num_blocks, page, D)
    bt = block_table.long()
    shift = torch.arange(h_k, device=bt.device).view(h_k, 1, 1) * num_blocks
    btf = torch.where((bt >= 0) & (bt < num_blocks), bt + shift, -1).to(torch.int32).reshape(h_k * B, -1)
    out, lse = mla_decode(qf, cf, btf, cache_seqlens.repeat(h_k), softmax_scale, causal=causal)
    out = out.view(h_k, B, s_q, hp, LATENT).permute(1, 2, 0, 3, 4).reshape(B, s_q, h_q, LATENT)
    lse = lse.view(h_k, B, hp, s_q).permute(1, 0, 2, 3).reshape(B, h_q, s_q)
    return out, lse


__all__ = ["get_mla_metadata", "flash_mla_with_kvcache"]
