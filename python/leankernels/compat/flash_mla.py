"""Drop-in for FlashMLA's first-release Python API (deepseek-ai/FlashMLA, February 2025).

    from leankernels.compat.flash_mla import get_mla_metadata, flash_mla_with_kvcache

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, kvcache, block_table, cache_seqlens, dv,
                                      tile_scheduler_metadata, num_splits, causal=True)

Same signatures, shapes, dtypes and results (out ``[b, s_q, h_q, dv]``, lse fp32
``[b, h_q, s_q]``), backed by leankernels.mla_decode, so it also runs on the CPU, on any
sm_80+ GPU, with any page block size and with FlashMLA's 656-byte FP8 cache rows.

Differences to know: the metadata is FlashMLA's (same shapes, same greedy schedule), but the
leankernels kernel picks its own KV split from the shapes, so the metadata is checked and
otherwise not needed; on the CPU the SM count is taken as an H100's (132), so the metadata
matches what FlashMLA returns there.
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
    num_heads_per_head_k: int,
    num_heads_k: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Arguments:
        cache_seqlens: (batch_size), dtype torch.int32.
        num_heads_per_head_k: Equals to seq_len_q * num_heads_q // num_heads_k.
        num_heads_k: num_heads_k.

    Return:
        tile_scheduler_metadata: (num_sm_parts, TileSchedulerMetaDataSize), dtype torch.int32.
        num_splits: (batch_size + 1), dtype torch.int32.
    """
    _checks.tensor("cache_seqlens", cache_seqlens, (torch.int32,), dim=1)
    for name, v in (("num_heads_per_head_k", num_heads_per_head_k), ("num_heads_k", num_heads_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if int(num_heads_k) < 1 or int(num_heads_per_head_k) < 1:
        raise ValueError(f"num_heads_per_head_k and num_heads_k must be >= 1; got {num_heads_per_head_k}, {num_heads_k}")
    if cache_seqlens.device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(cache_seqlens.device).multi_processor_count
    else:
        sm_count = _CPU_SM_COUNT
    num_sm_parts = max(1, sm_count // int(num_heads_k) // math.ceil(int(num_heads_per_head_k) / 64))
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Arguments:
        q: (batch_size, seq_len_q, num_heads_q, head_dim), bfloat16, head_dim 576.
        k_cache: (num_blocks, page_block_size, num_heads_k, head_dim), num_heads_k = 1; bf16
            with head_dim 576, or uint8 / float8_e4m3fn with 656 bytes per token (FP8 rows).
        block_table: (batch_size, max_num_blocks_per_seq), torch.int32.
        cache_seqlens: (batch_size), torch.int32.
        head_dim_v: Head_dim of v (512: the latent).
        tile_scheduler_metadata: (num_sm_parts, TileSchedulerMetaDataSize), torch.int32, return by get_mla_metadata.
        num_splits: (batch_size + 1), torch.int32, return by get_mla_metadata.
        softmax_scale: float. The scaling of QK^T before applying softmax. Default to 1 / sqrt(head_dim).
        causal: bool. Whether to apply causal attention mask.

    Return:
        out: (batch_size, seq_len_q, num_heads_q, head_dim_v).
        softmax_lse: (batch_size, num_heads_q, seq_len_q), torch.float32.
    """
    _checks.tensor("k_cache", k_cache, (torch.bfloat16, torch.uint8, torch.float8_e4m3fn), dim=4)
    if k_cache.shape[2] != 1:
        raise ValueError(f"k_cache must have num_heads_k = 1 (MLA); got shape {tuple(k_cache.shape)}")
    width = DIM if k_cache.dtype == torch.bfloat16 else FP8_BYTES
    if k_cache.shape[3] != width:
        raise ValueError(f"k_cache must have head_dim {width} for dtype {k_cache.dtype}; got shape {tuple(k_cache.shape)}")
    if int(head_dim_v) != LATENT:
        raise ValueError(f"head_dim_v must be {LATENT} (the MLA latent); got {head_dim_v}")
    _checks.tensor("tile_scheduler_metadata", tile_scheduler_metadata, (torch.int32,), dim=2)
    if tile_scheduler_metadata.shape[1] != TILE_SCHEDULER_METADATA_SIZE:
        raise ValueError(f"tile_scheduler_metadata must be (num_sm_parts, {TILE_SCHEDULER_METADATA_SIZE}); "
                         f"got {tuple(tile_scheduler_metadata.shape)}")
    _checks.tensor("num_splits", num_splits, (torch.int32,), dim=1)
    _checks.tensor("q", q, (torch.bfloat16,), dim=4)
    if num_splits.shape[0] != q.shape[0] + 1:
        raise ValueError(f"num_splits must have batch_size + 1 = {q.shape[0] + 1} entries; got {num_splits.shape[0]}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    return mla_decode(q, k_cache[:, :, 0], block_table, cache_seqlens, softmax_scale, causal=bool(causal))


__all__ = ["get_mla_metadata", "flash_mla_with_kvcache"]
