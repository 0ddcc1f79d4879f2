"""Hugging Face transformers integration: MoE experts, DeepSeek-V2/V3 routers and MLA decode.

Needs transformers >= 5.13 (CI tests 5.13 and the newest release; see TESTED_RANGE).

Three pieces, usable separately:

1. An experts implementation named ``"leankernels"``, registered with transformers'
   ``ExpertsInterface`` when this module is imported::

       import leankernels.integrations.transformers  # registers "leankernels"
       model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="leankernels")
       # or: model.set_experts_implementation("leankernels")
       # or: DeepseekV3Config(..., experts_implementation="leankernels")

   Any ``@use_experts_implementation`` experts module with ``gate_up_proj`` ``[E, 2I, H]`` and
   ``down_proj`` ``[E, H, I]`` (or transposed, ``[E, H, 2I]`` / ``[E, I, H]``), optional
   per-expert biases, and its own gate activation (concatenated or interleaved gate/up columns):
   tested on tiny Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2, DeepSeek-V3 and GPT-OSS models, then runs
   plan -> permute -> grouped GEMM (gate/up) -> gate activation -> grouped GEMM (down) ->
   unpermute. Two modes (``set_experts_mode``, or ``config.leankernels_experts_mode``):

   * ``"fp8"`` (default): weights quantized once to FP8 e4m3 with 128x128 block scales (cached
     on the module, re-quantized when a weight changes: new tensor, in-place update, dtype or
     device), activations quantized per call with 1x128 scales inside ``permute``;
     ``fp8_grouped_gemm`` with fp32 outputs.
   * ``"bf16"``: the same routing ops, but each expert's two matmuls run in the weights' own
     dtype (bf16 or fp32) with ``torch.nn.functional.linear``, as transformers' eager experts
     do, so results match the unpatched model to rounding.

   Modules the path does not cover (no gate, a norm after each expert, expert parallelism,
   quantized/replaced weight tensors) fall back to transformers' ``grouped_mm`` implementation
   with one RuntimeWarning per class naming the reason; calls that need gradients fall back
   silently (the leankernels ops have no autograd: that is the documented training path).

2. ``LeanKernelsDeepseekV3TopkRouter`` / ``LeanKernelsDeepseekV2TopkRouter``: DeepSeek-V3's
   group-limited sigmoid router and DeepSeek-V2's softmax greedy / group-limited greedy router
   on ``route`` (same logits, same chosen experts, weights equal to fp32 rounding; ids come back
   sorted by descending score rather than in torch.topk's unsorted order).

3. ``LeanKernelsDeepseekV3Attention`` / ``LeanKernelsDeepseekV2Attention`` + ``MLALatentCache``:
   the cache keeps, per layer, only DeepSeek's 576-value latent rows (512 normalised latent + 64 rotated RoPE key) in a paged
   ``LatentCache`` (bf16, or FlashMLA's FP8 format with ``fp8_cache=True``), written with
   ``mla_append``. Prefill (an empty cache) runs decompressed attention on the fresh latents
   through transformers' attention interface (sdpa / eager / ...); every later step appends its rows and attends with ``mla_decode`` on absorbed
   queries (W_UK folded into q, W_UV applied to the latent output). ``patch_deepseek`` makes
   ``generate()`` create this cache automatically.

Limitations: inference only (no autograd through the kernels; calls needing gradients take
transformers' own paths). The latent-cache decode needs kv_lora_rank = 512 and
qk_rope_head_dim = 64 (DeepSeek-V3's values). Batches must be unpadded (all prompts the same
length): a padded attention_mask raises NotImplementedError at the first decode step (that check
reads the mask, a device sync on GPU). No beam search (cache reordering), no assisted generation
(cache cropping), no cache offloading, no static cache / torch.compile of generate. The latent
cache is bf16 (or FP8): decode rounds the cached latents and the absorbed queries to bf16, so in
an fp32 model decode logits differ from the unpatched model by that rounding (in a bf16 model
the cached values are the ones transformers caches).
"""
from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
    from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as _dsv2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as _dsv3
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("leankernels.integrations.transformers needs transformers >= 5.13 "
                      "(pip install 'transformers>=5.13')") from e

# Older releases differ: before 5.7 a registered experts implementation cannot be selected, and
# 5.8's DeepseekV3TopkRouter returns logits only (DeepseekV3MoE routes). CI tests both ends of
# TESTED_RANGE; newer releases are allowed with a warning (5.24 renamed past_key_values -> cache,
# which broke the attention patch inside forward: the next rename should be named, not a TypeError).
TESTED_RANGE = ((5, 13), (5, 25))


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


def _range_text() -> str:
    lo, hi = TESTED_RANGE
    return f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"


if _version_tuple(transformers.__version__) < TESTED_RANGE[0]:
    raise ImportError(f"leankernels.integrations.transformers needs transformers >= {TESTED_RANGE[0][0]}."
                      f"{TESTED_RANGE[0][1]} (tested {_range_text()}); found {transformers.__version__}")
if _version_tuple(transformers.__version__) > TESTED_RANGE[1]:
    import warnings
    warnings.warn(f"leankernels.integrations.transformers is tested with transformers {_range_text()}; "
                  f"found {transformers.__version__}: the experts, router and MLA patches may not match this "
                  "release", RuntimeWarning, stacklevel=2)

# The name under which this release passes the KV cache to attention layers and generate() keeps
# it in model_kwargs ("past_key_values" up to 5.23, "cache" from 5.24).
CACHE_ARG = "cache" if "cache" in __import__("inspect").signature(
    _dsv3.DeepseekV3Attention.forward).parameters else "past_key_values"

from .. import _ops
from ..gemm import fp8_grouped_gemm
from ..mla import DIM, LATENT, ROPE, LatentCache, mla_append, mla_decode
from ..nn.layers import fp8_linear_forward
from ..memory import to_hugepages
from ..quant import quantize_fp8
from ..reference import mla_cache_dequantize
from ..routing import permute, plan, route, unpermute

IMPLEMENTATION = "leankernels"
_MODES = ("fp8", "bf16")
_mode = "fp8"

# ----------------------------------------------------------------------------------- experts


def set_experts_mode(mode: str) -> None:
    """Select how ``experts_implementation="leankernels"`` multiplies: ``"fp8"`` (default; FP8
    block-scaled grouped GEMM) or ``"bf16"`` (the weights' own dtype, exact). A model's
    ``config.leankernels_experts_mode`` overrides this process-wide default."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
    _mode = mode


def get_experts_mode(module=None) -> str:
    """The mode used for ``module`` (its config's override, else the process-wide default)."""
    mode = getattr(getattr(module, "config", None), "leankernels_experts_mode", None)
    if mode is None:
        return _mode
    if mode not in _MODES:
        raise ValueError(f"config.leankernels_experts_mode must be one of {_MODES}; got {mode!r}")
    return mode


@contextlib.contextmanager
def experts_mode(mode: str):
    """Context manager: ``with experts_mode("bf16"): model.generate(...)``."""
    old = _mode
    set_experts_mode(mode)
    try:
        yield
    finally:
        set_experts_mode(old)


def _unsupported(experts) -> str | None:
    """Why the leankernels path cannot run this experts module (None: it can)."""
    if not getattr(experts, "has_gate", True):
        return "no gate (up_proj + activation experts)"
    if getattr(experts, "has_post_expert_norm", False):
        return "a norm after each expert"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    names = ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias")
                                             if getattr(experts, "has_bias", False) else ())
    for name in names:
        if not isinstance(getattr(experts, name, None), torch.Tensor) or getattr(experts, name).dim() not in (2, 3):
            return f"no {name} weight tensor (quantized or replaced experts)"
    return None


_warned: set = set()


def _fall_back(experts, reason: str):
    """transformers' grouped_mm path, with one warning per experts class and reason."""
    key = (type(experts).__name__, reason)
    if key not in _warned:
        _warned.add(key)
        import warnings
        warnings.warn(f"experts_implementation='leankernels': {type(experts).__name__} has {reason}; these experts "
                      "run on transformers' grouped_mm path instead", RuntimeWarning, stacklevel=3)
    return grouped_mm_experts_forward


def _weight_key(t: torch.Tensor):
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))


def _cached_on(module, name: str, weights, build):
    """``build()`` (run without grad), cached on ``module`` as a plain attribute (not in
    state_dict) and rebuilt when any of ``weights`` changes: a new tensor, an in-place update,
    load_state_dict, ``.to()``. Built outside inference mode: the results are ordinary tensors
    with version counters even when the first call runs under ``torch.inference_mode()``, so
    _ops.fp8_nan_free can vouch for FP8 weights among them (the GEMMs then skip their NaN check)."""
    key = tuple(_weight_key(w) for w in weights)
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, build())
        module.__dict__[name] = cached
    return cached[1]


def _nk(experts, name: str) -> torch.Tensor:
    """An expert weight as ``[E, N, K]`` (out x in): transposed modules (GPT-OSS) store ``[E, K, N]``."""
    w = getattr(experts, name)
    return w.transpose(-1, -2) if getattr(experts, "is_transposed", False) else w


def fp8_expert_weights(experts):
    """``(gate_up, gate_up_scale, down, down_scale)``: the module's expert weights as ``[E, N, K]``
    in FP8 with 128x128 block scales, quantized on first use and cached on the module; a new or
    modified weight tensor (in-place update, load_state_dict, .to()) is re-quantized on the next
    call."""
    gu, dn = experts.gate_up_proj, experts.down_proj
    return _cached_on(experts, "_leankernels_fp8", (gu, dn),
                      lambda: (*_fp8_weight(_nk(experts, "gate_up_proj").detach().contiguous()),
                               *_fp8_weight(_nk(experts, "down_proj").detach().contiguous())))


def _fp8_weight(w: torch.Tensor):
    """quantize_fp8(w, (128, 128)), the FP8 bytes in 2 MiB huge pages on the CPU (leankernels.memory)."""
    q, s = quantize_fp8(w, (128, 128))
    return (to_hugepages(q) if q.is_cpu else q), s


def _dense_grouped(experts, x: torch.Tensor, p) -> torch.Tensor:
    """Expert-sorted rows through each expert's gate/up and down matmuls in the weights' dtype,
    as transformers' eager experts compute them (``x @ w + b`` for transposed weights)."""
    w1, w2 = _nk(experts, "gate_up_proj"), _nk(experts, "down_proj")
    b1, b2 = _biases(experts)
    x = x.to(w1.dtype)
    y = x.new_zeros(x.shape[0], w2.shape[1])
    ends = p.offs.tolist()  # one host sync; F.linear per expert is the exact eager computation
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            h = experts._apply_gate(F.linear(x[start:end], w1[e], None if b1 is None else b1[e]))
            y[start:end] = F.linear(h, w2[e], None if b2 is None else b2[e])
        start = end
    return y


def _biases(experts):
    if not getattr(experts, "has_bias", False):
        return None, None
    return experts.gate_up_proj_bias, experts.down_proj_bias


def _row_experts(p, num_experts: int) -> torch.Tensor:
    """The expert of each permuted row (from offs, on the device; rows past offs[-1] get the last)."""
    rows = torch.arange(p.row_token.shape[0], device=p.offs.device, dtype=p.offs.dtype)
    return torch.searchsorted(p.offs, rows, right=True).clamp_(max=num_experts - 1)


def _silu_gate(experts) -> bool:
    """Whether the module gates with transformers' default ``act_fn(gate) * up`` (concatenated
    halves) and a SiLU activation: then silu_mul_quantize_fp8 does gate and quantization at once."""
    gate = getattr(type(experts), "_apply_gate", None)
    act = experts.__dict__.get("_modules", {}).get("act_fn")
    return (getattr(gate, "__name__", "") == "_default_apply_gate" and "_apply_gate" not in experts.__dict__
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


# NOTES: up to this many tokens (decode) the fp8 experts run as one C++ call (cpu/moe.h
# moe_experts): the same kernels in the same order, the same result bitwise, without the
# Python steps and allocations between them (V2-Lite-shaped generate() batch 1 on a 2-core Xeon
# VM: see BENCHMARKS.md).
_FUSED_ROWS = 16


def _fp8_eager_cpu(experts, x, ids, weights, w1, s1, w2, s2):
    """The fp8 mode through the ops' implementations, its inputs checked once here (see the
    NOTES in leankernels.nn.layers: at decode the public functions' own checks cost ~40 us per
    op with cold caches); None where it does not apply (the public functions then run)."""
    E, N1, H = w1.shape
    if not (_ops.direct(x, ids, weights, w1, s1, w2, s2) and x.is_cpu and ids.is_cpu and weights.is_cpu
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.dim() == 2 and x.shape[1] == H
            and ids.dim() == 2 and ids.dtype in (torch.int32, torch.int64) and ids.shape[0] == x.shape[0]
            and weights.shape == ids.shape and weights.dtype.is_floating_point
            and ids.shape[0] * ids.shape[1] < 2**31 and w2.shape == (E, H, N1 // 2)):
        return None
    if x.shape[0] <= _FUSED_ROWS and x.dtype is not torch.float16 and _silu_gate(experts):
        return _ops.moe_experts_impl(x, ids, weights, w1, s1, w2, s2, _ops.fp8_nan_free(w1, w2))
    ids = ids.contiguous() if ids.dtype is torch.int32 else ids.clamp(-1, E).to(torch.int32)
    _, offs, row_token, token_row = _ops.plan_impl(ids, E, 1)
    a, s = _ops.permute_fp8_impl(x, row_token, False)
    h = _ops.fp8_grouped_gemm_impl(a, s, w1, s1, offs, torch.float32, _ops.fp8_nan_free(w1))
    if _silu_gate(experts):
        a, s = _ops.silu_mul_quantize_fp8_impl(h, False)
    else:
        a, s = quantize_fp8(experts._apply_gate(h), (1, 128))
    y = _ops.fp8_grouped_gemm_impl(a, s, w2, s2, offs, torch.float32, _ops.fp8_nan_free(w2))
    return _ops.unpermute_impl(y, token_row, weights.float().contiguous()).to(x.dtype)


def leankernels_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"leankernels"`` experts implementation (transformers' experts forward signature).

    Args:
        self: the experts module: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, or
            transposed ``[E, H, 2I]`` / ``[E, I, H]`` (``is_transposed``, GPT-OSS), optional
            ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]`` (``has_bias``); the
            module's own ``_apply_gate`` (any gate/up column order: concatenated or interleaved).
        hidden_states: ``[T, H]`` tokens.
        top_k_index: ``[T, k]`` expert ids (ids outside ``[0, E)`` are dropped).
        top_k_weights: ``[T, k]`` gate weights.

    Returns:
        ``[T, H]`` in hidden_states' dtype: sum over k of weight * expert(token).
    """
    needs_grad = torch.is_grad_enabled() and (
        hidden_states.requires_grad or top_k_weights.requires_grad
        or any(t.requires_grad for t in self.parameters(recurse=False)))
    if needs_grad:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    reason = _unsupported(self)
    if reason is not None:
        return _fall_back(self, reason)(self, hidden_states, top_k_index, top_k_weights)
    E = self.gate_up_proj.shape[0]
    fp8 = get_experts_mode(self) == "fp8"
    if fp8 and not getattr(self, "has_bias", False):
        out = _fp8_eager_cpu(self, hidden_states, top_k_index, top_k_weights, *fp8_expert_weights(self))
        if out is not None:
            return out
    p = plan(top_k_index, E)
    if fp8:
        w1, s1, w2, s2 = fp8_expert_weights(self)
        b1, b2 = _biases(self)
        row_e = _row_experts(p, E) if b1 is not None else None
        a, a_scale = permute(hidden_states, p, quantize=True)
        h = fp8_grouped_gemm(a, a_scale, w1, s1, p.offs, out_dtype=torch.float32)
        if b1 is not None:
            h += b1.float()[row_e]
        hq, h_scale = quantize_fp8(self._apply_gate(h), (1, 128))
        y = fp8_grouped_gemm(hq, h_scale, w2, s2, p.offs, out_dtype=torch.float32)
        if b2 is not None:
            y += b2.float()[row_e]
    else:
        y = _dense_grouped(self, permute(hidden_states, p), p)
    return unpermute(y, p, top_k_weights).to(hidden_states.dtype)


def register() -> None:
    """Register ``"leankernels"`` with transformers' ExpertsInterface (done on import)."""
    ExpertsInterface.register(IMPLEMENTATION, leankernels_experts_forward)


register()

# ---------------------------------------------------------------------------------- linears


def _fp8_linear_weight(linear):
    """``(w, scale)``: the module's weight in FP8 with 128x128 block scales, cached on the module
    and re-quantized when the weight changes."""
    w = linear.weight
    return _cached_on(linear, "_leankernels_fp8", (w,), lambda: _fp8_weight(w.detach()))


class LeanKernelsFp8Linear(torch.nn.Linear):
    """``nn.Linear`` whose forward runs ``fp8_gemm``: the weight quantized once to FP8 with 128x128
    block scales (cached, re-quantized when it changes), activations per call with 1x128 scales,
    fp32 accumulation, bias added in fp32. Same parameters and state_dict as the ``nn.Linear``;
    calls that need gradients use ``nn.Linear``'s own forward. At decode shapes (a few rows) it
    reads half the bytes of a bf16 ``F.linear`` (BENCHMARKS.md: 2.9-3.5x at T=1 on a 2-core Zen 4)."""

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        w, w_scale = _fp8_linear_weight(self)
        return fp8_linear_forward(x, w, w_scale, self.bias, x.dtype)


# ------------------------------------------------------------------------------------ router


class LeanKernelsDeepseekV3TopkRouter(_dsv3.DeepseekV3TopkRouter):
    """DeepSeek-V3's TopkRouter on ``leankernels.route`` (one fused gate kernel).

    Returns ``(router_logits fp32 [T, E], weights fp32 [T, k], ids int64 [T, k])`` like the
    original: sigmoid scores, e_score_correction_bias for selection only, n_group/topk_group
    group-limited choice (groups scored by their top-2 biased scores), norm_topk_prob,
    routed_scaling_factor. Calls that need gradients use the original forward.
    """

    def forward(self, hidden_states):
        if torch.is_grad_enabled() and (self.weight.requires_grad or hidden_states.requires_grad):
            return super().forward(hidden_states)
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        weights, ids = route(router_logits, self.top_k, score="sigmoid", bias=self.e_score_correction_bias,
                             n_group=int(self.num_group), topk_group=int(self.topk_group),
                             renormalize=bool(self.norm_topk_prob), scale=float(self.routed_scaling_factor))
        return router_logits, weights, ids.long()


class LeanKernelsDeepseekV2TopkRouter(_dsv2.DeepseekV2TopkRouter):
    """DeepSeek-V2's TopkRouter on ``leankernels.route``: softmax scores over all experts, then
    ``topk_method="greedy"`` (top_k of all) or ``"group_limited_greedy"`` (groups scored by their
    best expert, the best topk_group groups kept, top_k among them); weights are the softmax
    scores themselves (no renormalisation) times routed_scaling_factor.

    Returns ``(router_logits fp32 [T, E], weights fp32 [T, k], ids int64 [T, k])`` like the
    original (ids sorted by descending score). Calls that need gradients use the original forward.
    """

    METHODS = ("greedy", "group_limited_greedy")

    def forward(self, hidden_states):
        if torch.is_grad_enabled() and (self.weight.requires_grad or hidden_states.requires_grad):
            return super().forward(hidden_states)
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        grouped = self.topk_method == "group_limited_greedy"
        weights, ids = route(router_logits, self.top_k, score="softmax",
                             n_group=int(self.num_group) if grouped else 1,
                             topk_group=int(self.topk_group) if grouped else 1,
                             renormalize=False, scale=float(self.routed_scaling_factor))
        return router_logits, weights, ids.long()

# ------------------------------------------------------------------------------- latent cache


class LatentCacheLayer(CacheLayerMixin):
    """One decoder layer's MLA cache: 576-value latent rows in a paged ``LatentCache``.

    Speaks transformers' cache-layer protocol (``update(kv_nope, k_rot)`` with DeepSeek-V3's
    ``[B, 1, S, 512]`` / ``[B, 1, S, 64]`` latents, as ``DeepseekV3Attention`` calls it), so the
    unpatched attention can also run on it; the patched attention appends with
    ``append_rows`` and reads through ``kv`` / ``block_table`` / ``seqlens``.
    Every sequence of the batch has the same length (no padding support).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, block_size: int = 64, fp8: bool = False, max_cache_len: int | None = None):
        super().__init__()
        self.block_size, self.fp8, self.max_cache_len = int(block_size), bool(fp8), max_cache_len
        self.cache: LatentCache | None = None
        self.blocks: list[list[int]] = []
        self.seq_len = 0
        self.block_table = self.seqlens = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        want = max(self.max_cache_len or 0, key_states.shape[-2] + 1)
        per_seq = math.ceil(want / self.block_size)
        self.cache = LatentCache(self.batch_size * per_seq, self.block_size, fp8=self.fp8, device=self.device)
        self.blocks = [[] for _ in range(self.batch_size)]
        self.seq_len = 0
        self.is_initialized = True

    @property
    def kv(self) -> torch.Tensor:
        """The paged cache tensor (``[num_blocks, block_size, 576]`` bf16 or ``[.., 656]`` uint8)."""
        return self.cache.kv

    def _grow(self, extra: int) -> None:
        c = self.cache
        extra = max(extra, c.num_blocks)  # double: amortised O(1) appends
        c.kv = torch.cat([c.kv, c.kv.new_zeros((extra,) + tuple(c.kv.shape[1:]))])
        old = c.num_blocks
        c.num_blocks += extra
        c.free(range(old + extra - 1, old - 1, -1))

    def _reserve(self, total: int) -> None:
        need = math.ceil(total / self.block_size)
        missing = sum(max(0, need - len(b)) for b in self.blocks)
        if missing == 0:
            return
        if missing > self.cache.num_free_blocks:
            self._grow(missing - self.cache.num_free_blocks)
        for b in self.blocks:
            b.extend(self.cache.allocate(need - len(b)))
        self.block_table = LatentCache.block_table(self.blocks, device=self.device)

    def _slots(self, start: int, count: int) -> torch.Tensor:
        return torch.cat([self.cache.slot_mapping(b, start, count) for b in self.blocks])

    def append_rows(self, kv_nope: torch.Tensor, k_rot: torch.Tensor) -> None:
        """Store S new tokens per sequence: kv_nope ``[B, S, 512]`` (normalised latent) and k_rot
        ``[B, S, 64]`` (rotated RoPE key), with ``mla_append`` (rounding to bf16 / FP8)."""
        if not self.is_initialized:
            self.lazy_initialization(kv_nope.unsqueeze(1), k_rot.unsqueeze(1))
        B, S = kv_nope.shape[:2]
        if B != self.batch_size:
            raise ValueError(f"kv_nope has batch {B} but this cache holds {self.batch_size} sequences")
        self._reserve(self.seq_len + S)
        mla_append(self.cache.kv, kv_nope.reshape(B * S, LATENT), k_rot.reshape(B * S, ROPE),
                   self._slots(self.seq_len, S))
        self.seq_len += S
        self.seqlens = torch.full((B,), self.seq_len, dtype=torch.int32, device=self.device)

    def read(self, count: int | None = None) -> torch.Tensor:
        """The first ``count`` cached rows of every sequence, fp32 ``[B, count, 576]``."""
        count = self.seq_len if count is None else count
        rows = self.cache.kv.view(-1, self.cache.kv.shape[-1])[self._slots(0, count)]
        return mla_cache_dequantize(rows).view(self.batch_size, count, DIM)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' protocol: store the new latents, return all of them
        (``[B, 1, L, 512]``, ``[B, 1, L, 64]``): cached rows for the past, the fresh values for
        the new tokens."""
        if key_states.dim() != 4 or key_states.shape[1] != 1 or key_states.shape[-1] != LATENT \
                or value_states.shape[-1] != ROPE:
            raise ValueError("MLALatentCache.update expects DeepSeek-V3 latents ([B, 1, S, 512] and [B, 1, S, 64]); "
                             f"got {tuple(key_states.shape)} and {tuple(value_states.shape)} (this transformers "
                             "version caches decompressed keys: use patch_deepseek's attention)")
        past = self.seq_len
        self.append_rows(key_states[:, 0], value_states[:, 0])
        if past == 0:
            return key_states, value_states
        old = self.read(past).to(key_states.dtype).unsqueeze(1)
        return (torch.cat([old[..., :LATENT], key_states], dim=-2),
                torch.cat([old[..., LATENT:], value_states], dim=-2))

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache, self.blocks, self.seq_len = None, [], 0
        self.block_table = self.seqlens = None
        self.is_initialized = False

    def _unsupported(self, what: str):
        raise NotImplementedError(f"MLALatentCache does not support {what}")

    def reorder_cache(self, beam_idx):
        self._unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int):
        self._unsupported("cropping (assisted generation)")

    def batch_repeat_interleave(self, repeats: int):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    def offload(self):
        self._unsupported("offloading")

    def prefetch(self):
        self._unsupported("offloading")


class MLALatentCache(Cache):
    """A transformers ``Cache`` holding DeepSeek-V3 MLA latents in paged leankernels caches.

    Args:
        config: the model config (its ``num_hidden_layers`` sets the layer count), or None
            with ``num_layers``.
        num_layers: number of decoder layers (default: from config).
        block_size: token slots per cache block.
        fp8: store FlashMLA's 656-byte FP8 rows instead of 576 bf16 values.
        max_cache_len: tokens per sequence to allocate up front (the cache grows past it).
        num_splits: KV splits of ``mla_decode`` (None: chosen from the shapes and the device;
            1: results independent of the CPU thread count / GPU size).

    Pass it as ``cache`` (``past_key_values`` before transformers 5.24) to ``model(...)`` / ``model.generate(...)``, or let a model
    patched with ``patch_deepseek`` create it inside ``generate()``.
    """

    def __init__(self, config=None, num_layers: int | None = None, block_size: int = 64, fp8: bool = False,
                 max_cache_len: int | None = None, num_splits: int | None = None):
        self.num_splits = num_splits
        if num_layers is None:
            if config is None:
                raise ValueError("MLALatentCache needs config or num_layers")
            config = config.get_text_config(decoder=True)
            num_layers = config.num_hidden_layers
            if getattr(config, "kv_lora_rank", LATENT) != LATENT or getattr(config, "qk_rope_head_dim", ROPE) != ROPE:
                raise ValueError(f"config: the latent cache needs kv_lora_rank={LATENT} and qk_rope_head_dim={ROPE}; "
                                 f"got {config.kv_lora_rank} and {config.qk_rope_head_dim}")
        super().__init__(layers=[LatentCacheLayer(block_size, fp8, max_cache_len) for _ in range(int(num_layers))])

    @property
    def bytes_per_token(self) -> float:
        """Cache bytes per token and sequence, summed over layers (allocated storage)."""
        return sum(layer.cache.bytes_per_token for layer in self.layers if layer.cache is not None)

# --------------------------------------------------------------------------------- attention


def _assert_unpadded(mask) -> None:
    """Decode steps attend to every cached row: refuse masks that hide any (padding)."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return
    last = mask[..., -1, :]
    ok = bool(last.all()) if last.dtype == torch.bool else bool((last == 0).all())
    if not ok:
        raise NotImplementedError("LeanKernelsDeepseekV3Attention: padded batches (attention_mask with zeros) are "
                                  "not supported during decode; run unpadded sequences of equal length")


class _LatentMLA:
    """The latent-cache MLA shared by the DeepSeek-V2 and V3 attention classes below (they differ
    in RoPE and in the forward's argument order).

    Prefill (this layer's cache is empty): the step's latent rows are appended with
    ``mla_append`` and attention runs decompressed, on the fresh (unrounded) latents, through
    transformers' attention interface (``config._attn_implementation``): the same values and
    kernels as the unpatched layer. Later steps (one or more new tokens per sequence): the rows
    are appended, the queries absorbed into the latent space (q_nope @ W_UK per head, fp32, then
    the 64 RoPE values; rounded to bf16) attend over the paged cache with ``mla_decode`` (causal
    within the step), and the 512-wide latent output goes through W_UV per head (fp32) and
    o_proj. With any other cache (or none) it is the original layer.
    """

    def _project(self, hidden_states, position_embeddings):
        B, S = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(B, S, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_nope, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states),
                                     [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope)
        k_rot = k_rot.view(B, 1, S, self.qk_rope_head_dim)
        q_rot, k_rot = self._rope(q_rot, k_rot, position_embeddings)
        return q_pass, q_rot, kv_nope, k_rot  # [B,H,S,nope], [B,H,S,64], [B,S,512], [B,1,S,64]

    def _prefill(self, q_pass, q_rot, kv_nope, k_rot, attention_mask, **kwargs):
        B, _, S, _ = q_pass.shape
        kv = self.kv_b_proj(kv_nope).view(B, S, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = torch.split(kv.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_rot.expand(-1, self.num_heads, -1, -1)], dim=-1)
        query = torch.cat([q_pass, q_rot], dim=-1)
        impl = self.config._attn_implementation
        modeling = self._modeling
        fn = modeling.eager_attention_forward if impl in (None, "eager") else modeling.ALL_ATTENTION_FUNCTIONS[impl]
        pad = self.qk_head_dim - self.v_head_dim if "flash" in str(impl) else 0  # flash kernels: equal head dims
        if pad > 0:
            value = F.pad(value, [0, pad])
        out, _ = fn(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        if pad > 0:
            out = out[..., : self.v_head_dim]
        return out.reshape(B, S, -1).contiguous()

    def absorbed_weights(self):
        """``(w_uk [H, nope, 512], w_uv_t [H, 512, v])`` fp32, from kv_b_proj: q_nope @ w_uk is the
        query in latent space, latent_out @ w_uv_t the per-head value output. Cached on the
        module and rebuilt when kv_b_proj.weight changes."""
        w = self.kv_b_proj.weight

        def build():
            w3 = w.detach().float().view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
            return w3[:, : self.qk_nope_head_dim].contiguous(), w3[:, self.qk_nope_head_dim:].transpose(1, 2).contiguous()
        return _cached_on(self, "_leankernels_absorbed", (w,), build)

    def _decode(self, layer, q_pass, q_rot, num_splits):
        B, H, S, _ = q_pass.shape
        w_uk, w_uv_t = self.absorbed_weights()
        # NOTES: one bmm per head over all B*S queries. A broadcasting matmul of [B, H, S, nope]
        # with [H, nope, 512] expands (copies) the weights B times: 12 ms per call at B=8.
        qh = q_pass.float().permute(1, 0, 2, 3).reshape(H, B * S, -1)                      # [H, B*S, nope]
        q_lat = torch.bmm(qh, w_uk).view(H, B, S, LATENT).permute(1, 2, 0, 3)              # [B, S, H, 512]
        q_abs = torch.cat([q_lat, q_rot.float().transpose(1, 2)], dim=-1).to(torch.bfloat16)  # [B, S, H, 576]
        out, _ = mla_decode(q_abs, layer.kv, layer.block_table, layer.seqlens, self.scaling, causal=True,
                            num_splits=num_splits)                                         # [B, S, H, 512]
        o = torch.bmm(out.float().permute(2, 0, 1, 3).reshape(H, B * S, LATENT), w_uv_t)  # [H, B*S, v]
        return o.view(H, B, S, self.v_head_dim).permute(1, 2, 0, 3).reshape(B, S, H * self.v_head_dim)

    def _latent_forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs):
        layer = cache.layers[self.layer_idx]
        q_pass, q_rot, kv_nope, k_rot = self._project(hidden_states, position_embeddings)
        past = layer.get_seq_length()
        if past:
            _assert_unpadded(attention_mask)
        layer.append_rows(kv_nope, k_rot[:, 0])
        if past == 0:
            out = self._prefill(q_pass, q_rot, kv_nope, k_rot, attention_mask, **kwargs)
        else:
            out = self._decode(layer, q_pass, q_rot, cache.num_splits)
        return self.o_proj(out.to(hidden_states.dtype)), None


class LeanKernelsDeepseekV3Attention(_LatentMLA, _dsv3.DeepseekV3Attention):
    """DeepSeek-V3 attention that keeps only latent rows in an ``MLALatentCache`` and decodes from
    them with ``mla_decode`` (see ``_LatentMLA``); RoPE on (cos, sin), interleaved or not as the
    config says."""

    _modeling = _dsv3

    def _rope(self, q_rot, k_rot, position_embeddings):
        cos, sin = position_embeddings
        rope = _dsv3.apply_rotary_pos_emb_interleave if self.config.rope_interleave else _dsv3.apply_rotary_pos_emb
        return rope(q_rot, k_rot, cos, sin)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, past_key_values=None,
                **kwargs):
        # Either name is accepted (transformers 5.24 renamed past_key_values to cache); the
        # original layer gets the one its release expects.
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, MLALatentCache):
            return super().forward(hidden_states, position_embeddings, attention_mask, **{CACHE_ARG: cache}, **kwargs)
        return self._latent_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)


class LeanKernelsDeepseekV2Attention(_LatentMLA, _dsv2.DeepseekV2Attention):
    """DeepSeek-V2 / V2-Lite attention on the latent cache (see ``_LatentMLA``): q from q_proj
    when q_lora_rank is None (V2-Lite) or the q LoRA pair (V2); RoPE on V2's complex
    ``freqs_cis`` (pairs of adjacent values rotated)."""

    _modeling = _dsv2

    def _rope(self, q_rot, k_rot, position_embeddings):
        return _dsv2.apply_rotary_emb(q_rot, k_rot, position_embeddings.to(q_rot.device))

    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, MLALatentCache):
            return super().forward(hidden_states, attention_mask, position_embeddings=position_embeddings,
                                   **{CACHE_ARG: cache}, **kwargs)
        return self._latent_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)


# ------------------------------------------------------------------------------------- patch


# model_type -> kind -> (transformers class, leankernels class)
_SWAPS = {
    "deepseek_v3": {"router": (_dsv3.DeepseekV3TopkRouter, LeanKernelsDeepseekV3TopkRouter),
                    "attention": (_dsv3.DeepseekV3Attention, LeanKernelsDeepseekV3Attention)},
    "deepseek_v2": {"router": (_dsv2.DeepseekV2TopkRouter, LeanKernelsDeepseekV2TopkRouter),
                    "attention": (_dsv2.DeepseekV2Attention, LeanKernelsDeepseekV2Attention)},
}
_LINEARS = (torch.nn.Linear, LeanKernelsFp8Linear)


def _generate_cache_hook(model, original):
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        original(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_ARG)
        opts = self.__dict__.get("_leankernels_cache_opts")
        if opts is not None and type(cache) is DynamicCache and generation_config.cache_implementation is None:
            max_len = kwargs.get("max_cache_length", args[-1] if args else None)
            model_kwargs[CACHE_ARG] = MLALatentCache(self.config, max_cache_len=max_len, **opts)
    return types.MethodType(_prepare_cache_for_generation, model)


def patch_deepseek(model, experts: bool = True, router: bool = True, attention: bool = True,
                      experts_mode: str | None = None, cache_block_size: int = 64, fp8_cache: bool = False,
                      decode_num_splits: int | None = None, linears: bool = False):
    """Run a transformers DeepSeek-V2 / V2-Lite / V3 model (``DeepseekV2ForCausalLM``,
    ``DeepseekV3ForCausalLM``, their ``*Model``) on leankernels, in place; returns the model.

    Args:
        experts: ``model.set_experts_implementation("leankernels")`` (FP8 grouped GEMM experts).
        router: swap every ``DeepseekV3TopkRouter`` / ``DeepseekV2TopkRouter`` for
            ``LeanKernelsDeepseekV3TopkRouter`` / ``LeanKernelsDeepseekV2TopkRouter``.
        attention: swap every ``DeepseekV3Attention`` / ``DeepseekV2Attention`` for the
            ``LeanKernelsDeepseekV3Attention`` / ``LeanKernelsDeepseekV2Attention`` latent-cache layer and
            make ``generate()`` use an ``MLALatentCache`` (unless a cache or
            ``cache_implementation`` is given).
        experts_mode: ``"fp8"`` or ``"bf16"``: stored as ``config.leankernels_experts_mode``
            (None: the process-wide ``set_experts_mode`` default).
        cache_block_size, fp8_cache, decode_num_splits: the ``MLALatentCache`` that
            ``generate()`` creates (its block_size, fp8 and num_splits).
        linears: also run every ``nn.Linear`` of the decoder layers (attention projections,
            dense and shared-expert MLPs) and ``lm_head`` in FP8 (``LeanKernelsFp8Linear``). Off by
            default: it changes every projection's numerics (FP8 round-off), not only the
            experts'; on a CPU it is what makes a whole decode step memory-light.

    Swaps change the modules' classes only: parameters, buffers, state_dict keys and hooks are
    untouched; ``unpatch_deepseek`` reverts them. Any other model type raises ValueError; a
    DeepSeek-V2 router with a ``topk_method`` other than greedy / group_limited_greedy keeps
    transformers' router (with a warning).
    """
    config = model.config
    swaps = _SWAPS.get(getattr(config, "model_type", None))
    if swaps is None:
        raise ValueError(f"patch_deepseek patches DeepSeek-V2 / V3 models (model_type in {sorted(_SWAPS)}); got "
                         f"{getattr(config, 'model_type', None)!r}. Other MoE models: experts_implementation='leankernels'")
    if router and getattr(config, "topk_method", "greedy") not in LeanKernelsDeepseekV2TopkRouter.METHODS \
            and config.model_type == "deepseek_v2":
        import warnings
        warnings.warn(f"patch_deepseek: topk_method={config.topk_method!r} is not one of "
                      f"{LeanKernelsDeepseekV2TopkRouter.METHODS}; the router stays transformers'", RuntimeWarning,
                      stacklevel=2)
        router = False
    if experts_mode is not None:
        if experts_mode not in _MODES:
            raise ValueError(f"experts_mode must be one of {_MODES}; got {experts_mode!r}")
        config.leankernels_experts_mode = experts_mode
    if attention and (config.kv_lora_rank != LATENT or config.qk_rope_head_dim != ROPE):
        raise ValueError(f"attention=True needs kv_lora_rank={LATENT} and qk_rope_head_dim={ROPE} "
                         f"(the MLA kernels' 576-value rows); got {config.kv_lora_rank} and {config.qk_rope_head_dim}")
    if experts:
        model.set_experts_implementation(IMPLEMENTATION)
    table = dict(swaps, linears=_LINEARS)
    wanted = {"router": router, "attention": attention, "linears": linears}
    for m in model.modules():
        for kind, (old, new) in table.items():
            if wanted[kind] and type(m) is old:
                m.__class__ = new
    if attention:
        model.__dict__["_leankernels_cache_opts"] = {"block_size": cache_block_size, "fp8": fp8_cache,
                                                   "num_splits": decode_num_splits}
        if "_prepare_cache_for_generation" not in model.__dict__ and hasattr(model, "_prepare_cache_for_generation"):
            model._prepare_cache_for_generation = _generate_cache_hook(model, model._prepare_cache_for_generation)
    return model


def unpatch_deepseek(model, experts_implementation: str | None = None):
    """Undo ``patch_deepseek``: original router/attention/linear classes, transformers' default
    generate cache, and ``experts_implementation`` (default: transformers' default choice)."""
    pairs = [pair for swaps in _SWAPS.values() for pair in swaps.values()] + [_LINEARS]
    for m in model.modules():
        for old, new in pairs:
            if type(m) is new:
                m.__class__ = old
    model.__dict__.pop("_leankernels_cache_opts", None)
    model.__dict__.pop("_prepare_cache_for_generation", None)
    if getattr(model.config, "_experts_implementation", None) == IMPLEMENTATION:
        model.set_experts_implementation(experts_implementation or model.get_correct_experts_implementation(None))
    return model


# The first names (DeepSeek-V3 only); the same functions.
patch_deepseek_v3 = patch_deepseek
unpatch_deepseek_v3 = unpatch_deepseek


__all__ = [
    "IMPLEMENTATION", "set_experts_mode", "get_experts_mode", "experts_mode", "fp8_expert_weights",
    "leankernels_experts_forward", "register", "LeanKernelsDeepseekV3TopkRouter", "LeanKernelsDeepseekV3Attention",
    "LeanKernelsDeepseekV2TopkRouter", "LeanKernelsDeepseekV2Attention", "LeanKernelsFp8Linear",
    "LatentCacheLayer", "MLALatentCache", "patch_deepseek", "unpatch_deepseek", "patch_deepseek_v3",
    "unpatch_deepseek_v3",
]
