"""MLA (multi-head latent attention) over a paged latent KV cache: the public wrappers.

The cache holds, per token and layer, DeepSeek-V3's compressed KV: the 512-value latent
(kv_lora_rank; it is also the value) and the 64 RoPE key values, either as 576 bf16 values or
in FlashMLA's 656-byte FP8 format (512 e4m3 latent values, 4 fp32 scales, 64 bf16 RoPE values).
Tokens live in blocks of ``block_size`` slots; a sequence's block_table row lists its blocks.
See reference.mla_append / reference.mla_decode for the exact semantics.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _checks, _ops
from ._lib import build_info

LATENT = 512
ROPE = 64
DIM = LATENT + ROPE       # 576
FP8_BYTES = 656

_FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_DTYPES = (torch.bfloat16, torch.uint8, torch.float8_e4m3fn)


def _int_arg(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}; got {v}")
    return int(v)


def _float_arg(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a float; got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite; got {v}")
    return f


class LatentCache:
    """A paged MLA latent cache for one layer, with a free-list block allocator.

    Args:
        num_blocks: number of blocks to allocate.
        block_size: token slots per block (any value >= 1).
        fp8: store FlashMLA's 656-byte FP8 rows (uint8) instead of 576 bf16 values.
        device: where the cache lives.

    Attributes:
        kv: the cache tensor, ``[num_blocks, block_size, 576]`` bf16 or
            ``[num_blocks, block_size, 656]`` uint8; pass it to mla_append / mla_decode.
        bytes_per_token: bytes of cache per token slot, measured from the allocated storage.
    """

    def __init__(self, num_blocks: int, block_size: int, fp8: bool = False, device="cpu"):
        num_blocks, block_size = _int_arg("num_blocks", num_blocks, 1), _int_arg("block_size", block_size, 1)
        self.num_blocks, self.block_size, self.fp8 = int(num_blocks), int(block_size), bool(fp8)
        if self.fp8:
            self.kv = torch.zeros(self.num_blocks, self.block_size, FP8_BYTES, dtype=torch.uint8, device=device)
        else:
            self.kv = torch.zeros(self.num_blocks, self.block_size, DIM, dtype=torch.bfloat16, device=device)
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def bytes_per_token(self) -> float:
        return self.kv.untyped_storage().nbytes() / (self.num_blocks * self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take num_blocks free blocks (ids in [0, num_blocks)); ValueError when too few are free."""
        _int_arg("num_blocks", num_blocks, 0)
        if num_blocks > len(self._free):
            raise ValueError(f"num_blocks={num_blocks} exceeds the {len(self._free)} free blocks of the cache")
        return [self._free.pop() for _ in range(num_blocks)]

    def free(self, blocks) -> None:
        """Return blocks to the free list."""
        for b in blocks:
            b = int(b)
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"blocks: block id {b} is out of range [0, {self.num_blocks})")
            if b in self._free:  # a double free would hand the block to two sequences
                raise ValueError(f"blocks: block id {b} is already free")
            self._free.append(b)

    def slot_mapping(self, blocks, start: int, count: int) -> torch.Tensor:
        """int64 slots of token positions start .. start+count-1 of a sequence owning blocks."""
        _int_arg("start", start, 0)
        _int_arg("count", count, 0)
        pos = torch.arange(start, start + count)
        ids = torch.as_tensor(list(blocks), dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise ValueError(f"blocks: block ids must lie in [0, {self.num_blocks}); got {ids.tolist()}")
        if count and (start + count - 1) // self.block_size >= len(ids):
            raise ValueError(f"blocks: {len(ids)} blocks hold {len(ids) * self.block_size} tokens; "
                             f"positions up to {start + count - 1} were asked for")
        return (ids[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.kv.device)

    @staticmethod
    def block_table(per_sequence, max_blocks: int | None = None, device="cpu", pad: int = 0) -> torch.Tensor:
        """int32 [B, max_blocks] block table from lists of block ids (rows padded with pad)."""
        width = max_blocks if max_blocks is not None else max((len(r) for r in per_sequence), default=0)
        if max_blocks is not None:
            _int_arg("max_blocks", max_blocks, 0)
            if any(len(r) > max_blocks for r in per_sequence):
                raise ValueError(f"max_blocks={max_blocks} is narrower than the longest row of per_sequence")
        t = torch.full((len(per_sequence), max(width, 1)), pad, dtype=torch.int32)
        for i, r in enumerate(per_sequence):
            t[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.int32)
        return t.to(device)


PagedLatentCache = LatentCache


def _cache_arg(cache, name: str = "cache") -> torch.Tensor:
    _checks.tensor(name, cache, _CACHE_DTYPES, dim=3)
    width = cache.shape[-1]
    if cache.dtype == torch.bfloat16 and width != DIM:
        raise ValueError(f"{name}: a bf16 latent cache must be [num_blocks, block_size, {DIM}]; got {tuple(cache.shape)}")
    if cache.dtype != torch.bfloat16 and width != FP8_BYTES:
        raise ValueError(f"{name}: an FP8 latent cache must be [num_blocks, block_size, {FP8_BYTES}] bytes; "
                         f"got {tuple(cache.shape)}")
    if cache.shape[1] < 1:
        raise ValueError(f"{name}: block_size (dim 1) must be >= 1; got shape {tuple(cache.shape)}")
    if cache.stride(2) != 1 or cache.stride(1) != width:
        raise ValueError(f"{name}: tokens inside a block must be dense (strides (*, {width}, 1)); got {cache.stride()}")
    if cache.dtype == torch.float8_e4m3fn:
        cache = cache.view(torch.uint8)
    return cache


def _rows(name: str, t, width: int) -> torch.Tensor:
    _checks.tensor(name, t, _FLOAT_IN, dim=2)
    if t.shape[1] != width:
        raise ValueError(f"{name} must be [T, {width}]; got {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def mla_append(cache, kv_c, k_pe, slot_mapping, norm_weight=None, eps: float = 1e-6, cos=None, sin=None,
               positions=None) -> None:
    """Write new tokens into a paged latent cache, in place, in one fused pass.

    For each token t with slot = slot_mapping[t] in [0, num_blocks * block_size), slot
    = block * block_size + offset, stores row = bf16(cat(RMSNorm(kv_c[t]) , RoPE(k_pe[t]))) at
    cache[block, offset] (FP8 caches: the row in FlashMLA's 656-byte format).

    Args:
        cache: ``[num_blocks, block_size, 576]`` bf16, or ``[num_blocks, block_size, 656]`` uint8 /
            float8_e4m3fn (FP8 format), e.g. ``LatentCache.kv``. Modified in place.
        kv_c: ``[T, 512]`` latent (fp32/bf16/fp16), before the kv_a_layernorm.
        k_pe: ``[T, 64]`` RoPE part of the key, before rotation.
        slot_mapping: ``[T]`` int32/int64. Slots < 0 are padding and skipped; slots past the cache
            are skipped too (LEANKERNELS_DEBUG=1: ValueError instead).
        norm_weight: ``[512]`` RMSNorm weight (DeepSeek's kv_a_layernorm). None: no normalization,
            kv_c is stored as given.
        eps: RMSNorm epsilon. y = x * rsqrt(mean(x^2) + eps) * weight (mean/rsqrt in float64).
        cos, sin: ``[T, 32]`` rotation per token, or tables ``[P, 32]`` indexed by positions.
            None (both): no rotation. Convention: interleaved pairs (x[2i], x[2i+1]) rotated by
            angle i, as in DeepSeek-V3's reference inference code (GPT-J style, not HF's
            rotate_half).
        positions: ``[T]`` int32/int64 rows of the cos/sin tables (optional). A token whose
            position is out of the table's rows is skipped, like an out-of-range slot
            (LEANKERNELS_DEBUG=1: ValueError).

    Duplicate slots in one call store one of the rows (unspecified which).
    """
    cache = _cache_arg(cache)
    kv_c = _rows("kv_c", kv_c, LATENT)
    k_pe = _rows("k_pe", k_pe, ROPE)
    _checks.tensor("slot_mapping", slot_mapping, (torch.int32, torch.int64), dim=1)
    T = kv_c.shape[0]
    if k_pe.shape[0] != T:
        raise ValueError(f"k_pe has {k_pe.shape[0]} tokens but kv_c has {T}")
    if slot_mapping.shape[0] != T:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but kv_c has {T} tokens")
    if norm_weight is not None:
        _checks.tensor("norm_weight", norm_weight, _FLOAT_IN, dim=1)
        _checks.shape("norm_weight", norm_weight, (LATENT,))
        norm_weight = norm_weight.float().contiguous()
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    if positions is not None and cos is None:
        raise ValueError("positions needs cos and sin tables")
    if cos is not None:
        _checks.tensor("cos", cos, _FLOAT_IN, dim=2)
        _checks.tensor("sin", sin, _FLOAT_IN, dim=2)
        if cos.shape[1] != ROPE // 2:
            raise ValueError(f"cos must be [T or P, {ROPE // 2}]; got {tuple(cos.shape)}")
        _checks.shape("sin", sin, tuple(cos.shape))
        if positions is None and cos.shape[0] != T:
            raise ValueError(f"cos has {cos.shape[0]} rows but there are {T} tokens (pass positions to index a table)")
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    if positions is not None:
        _checks.tensor("positions", positions, (torch.int32, torch.int64), dim=1)
        if positions.shape[0] != T:
            raise ValueError(f"positions has {positions.shape[0]} entries but kv_c has {T} tokens")
        positions = positions.to(torch.int64).contiguous()
    _checks.same_device(cache=cache, kv_c=kv_c, k_pe=k_pe, slot_mapping=slot_mapping, norm_weight=norm_weight,
                        cos=cos, sin=sin, positions=positions)
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    eps = _float_arg("eps", eps)
    fast = _ops.direct(cache, kv_c, k_pe, slot_mapping, norm_weight, cos, sin, positions)
    if not fast:
        _checks.no_grad_needed("mla_append", "the cache write is inference-only; train attention with MLAttention's "
                               "cache-free prefill (trainable=True, cache=None)", kv_c, k_pe, norm_weight)
    (_ops.mla_append_impl if fast else _ops.mla_append)(cache, kv_c, k_pe, slot_mapping, norm_weight, eps, cos, sin,
                                                        positions)


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo at import time
    (that import alone costs ~1 s, most of `import leankernels`). The decorator only marks the
    function (``fn._dynamo_marked_constant = True``, torch 2.1 to 2.13) for dynamo to read when
    it traces a call; when dynamo is already loaded the real decorator is used.
    tests/test_import.py checks the mark is what the real decorator sets."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        return dynamo.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@_assume_constant_result
def _cpu_threads() -> int:
    return max(1, int(build_info()["omp_max_threads"]))


def mla_num_splits(batch: int, rows: int, max_seqlen: int, device: torch.device) -> int:
    """KV splits per sequence, from shapes known on the host only (no sync, graph-safe).

    As many (sequence, row group, split) work units as fit in one wave of 2 per SM (CUDA) or
    2 per thread (CPU), each split at least 256 (CUDA) or 512 (CPU) keys; units hold 16 rows.
    """
    groups = math.ceil(rows / 16)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        slots, min_keys, cap = 2 * _num_sms(index), 256, 64
    else:
        slots, min_keys, cap = 2 * _cpu_threads(), 512, 16
    want = slots // max(batch * groups, 1)  # floor: all units in one wave, no half-empty tail
    return max(1, min(want, cap, math.ceil(max_seqlen / min_keys)))


def mla_decode(q, cache, block_table, seqlens, softmax_scale: float, causal: bool = True, num_splits: int | None = None):
    """Decode attention of absorbed MLA queries over the paged latent cache.

    Args:
        q: ``[B, s_q, H, 576]`` bfloat16: per head, the query absorbed into the latent space
            (512, W_UK folded in) followed by its 64 RoPE values.
        cache: latent cache ``[num_blocks, block_size, 576]`` bf16 or ``[.., 656]`` FP8 bytes.
            Keys are its 576-value rows; values are the first 512 (the latent).
        block_table: ``[B, max_blocks]`` int32; row b lists the blocks of sequence b in order.
            Entries past ceil(seqlens[b] / block_size) are never read (any padding value works).
            A used entry out of [0, num_blocks): ValueError on the CPU; on CUDA the block is
            skipped (LEANKERNELS_DEBUG=1: ValueError).
        seqlens: ``[B]`` int32 keys per sequence (0 allowed; at most max_blocks * block_size).
        softmax_scale: scale of q.k before the softmax (DeepSeek-V3: 192**-0.5 * mscale**2).
        causal: for s_q > 1, query i sees keys [0, seqlens[b] - s_q + i] (the last s_q keys
            are the queries' own tokens); without it every query sees all keys.
        num_splits: KV splits per sequence (None: chosen from the shapes, see mla_num_splits).

    Returns:
        ``(out, lse)``: out ``[B, s_q, H, 512]`` bfloat16 = softmax(scale * q.k) @ v;
        lse ``[B, H, s_q]`` fp32, natural-log sum of exp of the scaled scores. A query with no
        visible key gets out = 0 and lse = +inf (FlashMLA's convention).
    """
    _checks.tensor("q", q, (torch.bfloat16,), dim=4)
    cache = _cache_arg(cache)
    _checks.tensor("block_table", block_table, (torch.int32,), dim=2)
    _checks.tensor("seqlens", seqlens, (torch.int32,), dim=1)
    B, s_q, H, D = q.shape
    if D != DIM:
        raise ValueError(f"q must have head dim {DIM} (512 latent + 64 rope); got {D}")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table has {block_table.shape[0]} rows but q has batch {B}")
    if seqlens.shape[0] != B:
        raise ValueError(f"seqlens has {seqlens.shape[0]} entries but q has batch {B}")
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    seqlens = seqlens.contiguous()
    device = _checks.same_device(q=q, cache=cache, block_table=block_table, seqlens=seqlens)
    softmax_scale = _float_arg("softmax_scale", softmax_scale)
    if num_splits is None:
        num_splits = mla_num_splits(B, s_q * H, block_table.shape[1] * cache.shape[1], device)
    else:  # more splits than key slots would only add empty splits (and their buffers)
        num_splits = min(_int_arg("num_splits", num_splits, 1), max(1, block_table.shape[1] * cache.shape[1]))
    try:
        causal = bool(causal)
    except (RuntimeError, TypeError, ValueError):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}") from None
    if _ops.direct(q, cache, block_table, seqlens):
        op = _ops.mla_decode_impl
    else:
        _checks.no_grad_needed("mla_decode", "it is inference-only; train attention with MLAttention's cache-free "
                               "prefill (trainable=True, cache=None)", q, cache)
        op = _ops.mla_decode
    return op(q, cache, block_table, seqlens, softmax_scale, causal, int(num_splits))


__all__ = ["LatentCache", "PagedLatentCache", "mla_append", "mla_decode", "mla_num_splits"]
