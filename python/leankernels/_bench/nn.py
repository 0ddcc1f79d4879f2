"""Benchmark cases for the leankernels.nn layers (see case.py for the contract): one decode
step of the DeepSeek-V3-shaped block, and of its MoE and MLA layers alone, against the same
layers in plain PyTorch (leankernels.nn.plain: bf16 nn.Linear, a Python loop over the experts,
naive MLA over an MHA-style cache of decompressed K/V), same weights, same inputs.

Shapes: the demo's (leankernels._demo.block): the CPU block on the CPU, the GPU block on CUDA.

On the CPU also a batch-1 decode step of leankernels.nn.MoE with DeepSeek-V2-Lite shapes (64
routed experts, top-6, hidden 2048, moe_intermediate 1408, 2 shared experts, softmax gate),
against the plain PyTorch MoE on the same weights, with its bytes = its active FP8 weights (the
6 routed experts' gate/up/down plus the shared experts; the router's fp32 [64, 2048] and the
block scales not counted): "% of ceiling" is against the "read" ceiling and the table's notes
give its time as a multiple of the time to read those bytes at that ceiling.
"""
from __future__ import annotations

import math

import torch

from .. import routing
from ..memory import hugepages_available
from ..mla import LatentCache
from ..nn import DecoderBlock, DeepSeekConfig, MoE, plain
from .case import Case
from .gemm import READ_BASELINE, _with_read
from .timing import LLC_FLUSH


def _setup(device: str, quick: bool):
    from .._demo.block import CPU, CPU_QUICK, GPU

    cfg = (CPU_QUICK if quick else CPU) if device == "cpu" else GPU
    B, P = (4, 128 if quick else 512) if device == "cpu" else (32, 2048)
    ref = plain.make_block(cfg, device, torch.bfloat16, seed=0)
    ours = DecoderBlock.from_float(ref)
    bs = 64
    per_seq = math.ceil((P + 1) / bs)
    cache = LatentCache(B * per_seq, bs, device=device)
    table = torch.arange(B * per_seq, dtype=torch.int32, device=device).view(B, per_seq)
    ref.reset_cache(B, P + 1)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(B, P + 1, cfg.hidden_size, generator=g, device=device).to(torch.bfloat16)
    with torch.inference_mode():
        ref(x[:, :P], 0)
        ours(x[:, :P], cache, table, 0)
    return cfg, B, P, ref, ours, cache, table, x[:, P:].contiguous()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())


# DeepSeek-V2-Lite's MoE layer (transformers' DeepseekV2 config: softmax gate, no groups, no
# renormalisation, routed_scaling_factor 1.0).
V2_LITE_MOE = DeepSeekConfig(hidden_size=2048, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
                             n_shared_experts=2, n_group=1, topk_group=1, scoring_func="softmax",
                             norm_topk_prob=False, routed_scaling_factor=1.0)
BANK = 4   # distinct random experts; the others copy them (own memory; values only feed the check)


class MoeDecode:
    """leankernels.nn.MoE and plain.PlainMoE on the same weights, one token; the weights are
    built in setup() and freed in teardown(). The token and the router are made in __init__, so
    the experts it picks (and the active bytes) are known before any expert weight exists."""

    def __init__(self, cfg: DeepSeekConfig, seed: int = 0):
        self.cfg = cfg
        H = cfg.hidden_size
        g = torch.Generator().manual_seed(seed)
        self.gate = torch.randn(cfg.n_routed_experts, H, generator=g) / H ** 0.5
        self.x = torch.randn(1, H, generator=g).bfloat16()
        self.seed = seed
        _, ids = routing.route(torch.nn.functional.linear(self.x.float(), self.gate), cfg.num_experts_per_tok,
                               cfg.scoring_func, None, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                               float(cfg.routed_scaling_factor))
        self.ids = sorted(set(ids.flatten().tolist()))
        I, Is = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        self.routed_bytes = len(self.ids) * 3 * I * H       # gate, up, down of each chosen expert, FP8
        self.shared_bytes = 3 * Is * H
        self.ours = self.ref = None
        self._mode = None

    @property
    def active_bytes(self) -> int:
        return self.routed_bytes + self.shared_bytes

    def setup(self) -> None:
        if self.ours is not None:
            return
        cfg, H, I = self.cfg, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        with torch.device("meta"):
            ref = plain.PlainMoE(cfg, dtype=torch.bfloat16)
        ref = ref.to_empty(device="cpu")
        g = torch.Generator().manual_seed(self.seed + 1)

        def rnd(n, k):
            return (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()

        bank = [(rnd(I, H), rnd(I, H), rnd(H, I)) for _ in range(BANK)]
        with torch.no_grad():
            ref.gate.weight.copy_(self.gate)
            for e, mlp in enumerate(ref.experts):
                wg, wu, wd = bank[e % BANK]
                mlp.gate_proj.weight.copy_(wg)
                mlp.up_proj.weight.copy_(wu)
                mlp.down_proj.weight.copy_(wd)
            sh = ref.shared_experts
            Is = sh.gate_proj.weight.shape[0]
            sh.gate_proj.weight.copy_(rnd(Is, H))
            sh.up_proj.weight.copy_(rnd(Is, H))
            sh.down_proj.weight.copy_(rnd(H, Is))
        del bank
        self.ref, self.ours = ref, MoE.from_float(ref)
        with torch.inference_mode():
            _, ids = self.ours.route(self.x)
        if sorted(set(ids.flatten().tolist())) != self.ids:
            raise RuntimeError("MoE.route chose other experts than the case's bytes were counted for")
        # NOTES: the timed calls run inside one inference mode entered here, as a model's layers
        # run inside the one its generate loop entered: entering it per call (a context manager
        # after a cache flush) cost ~80-170 us of a ~3 ms step, which no layer pays in a model.
        self._mode = torch.inference_mode()
        self._mode.__enter__()

    def teardown(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self.ours = self.ref = None

    def run_ours(self):
        return self.ours(self.x)

    def run_ref(self):
        return self.ref(self.x)

    def check(self) -> bool:
        return _diff(self.run_ours().float(), self.run_ref().float()) < 2e-2


def moe_decode_case(quick: bool) -> Case:
    cfg = V2_LITE_MOE
    if quick:  # stand-in: an eighth of the widths (rounded up to 128), the same routing
        cfg = cfg.replace(hidden_size=256, moe_intermediate_size=256)
    st = MoeDecode(cfg)
    label = "V2-Lite" + (" stand-in" if quick else "")
    shape = (f"T=1 hidden={cfg.hidden_size} E={cfg.n_routed_experts} top{cfg.num_experts_per_tok} "
             f"I={cfg.moe_intermediate_size} shared={cfg.n_shared_experts}")
    # leankernels.nn keeps its FP8 weights in 2 MiB huge pages where the OS has them: then the
    # same-bytes read and the ceiling are taken over huge pages too (the plain PyTorch MoE keeps
    # torch's default allocation, as its users get it)
    huge = hugepages_available()
    setup, teardown, rd = _with_read(st, st.active_bytes, huge)
    return Case("nn", f"MoE decode step {label} batch 1", shape, st.run_ours,
                {"plain PyTorch MoE (expert loop, bf16)": st.run_ref, READ_BASELINE: rd},
                bytes=float(st.active_bytes), check=st.check, bound="memory", ceiling="read_2m" if huge else "read",
                rotate=LLC_FLUSH,
                setup=setup, teardown=teardown,
                extra={"bytes are": "active FP8 weights: the chosen routed experts' gate/up/down + the shared "
                                    "experts (router and block scales not counted)",
                       "active weight bytes": st.active_bytes, "routed expert bytes": st.routed_bytes,
                       "shared expert bytes": st.shared_bytes, "experts chosen": st.ids,
                       "x_ceiling_note": "its active weights"})


class GenerateV2Lite:
    """transformers ``generate()`` on a DeepSeek-V2-Lite-shaped DeepseekV3ForCausalLM (hidden 2048,
    16 heads, kv_lora 512, no q_lora, 64 experts top-6 + 2 shared, moe_intermediate 1408, dense
    intermediate 10944, 4 layers, an 8k vocabulary, random bf16 weights): the same model patched
    with ``patch_deepseek_v3`` (FP8 experts, route, MLA latent cache) against transformers'
    default experts path. Greedy, a 4-token prompt and ``NEW`` new tokens per call."""

    NEW = 16
    # what "ours" patches: the experts alone (experts_implementation="leankernels"), or
    # everything (experts, router, MLA latent cache, every nn.Linear in FP8)
    VARIANTS = {"experts": dict(router=False, attention=False),
                "full FP8": dict(linears=True)}

    def __init__(self, batch: int, variant: str):
        self.batch, self.variant = batch, variant
        self.model = None

    def setup(self):
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        import leankernels.integrations.transformers as lkt
        self.lkt = lkt
        cfg = DeepseekV3Config(
            vocab_size=8192, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
            n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
            qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1,
            num_experts_per_tok=6, first_k_dense_replace=1, max_position_embeddings=4096, norm_topk_prob=False)
        torch.manual_seed(0)
        with torch.device("cpu"):
            self.model = DeepseekV3ForCausalLM(cfg).eval().to(torch.bfloat16)
        self.default_impl = self.model.config._experts_implementation
        self.ids = torch.randint(0, cfg.vocab_size, (self.batch, 4), generator=torch.Generator().manual_seed(1))

    def teardown(self):
        self.model = None

    def _generate(self, patched: bool):
        m = self.model
        if patched:
            self.lkt.unpatch_deepseek_v3(m, self.default_impl)
            self.lkt.patch_deepseek_v3(m, **self.VARIANTS[self.variant])
        else:
            self.lkt.unpatch_deepseek_v3(m, self.default_impl)
        with torch.inference_mode():
            return m.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=self.NEW,
                              min_new_tokens=self.NEW, do_sample=False)

    def run_ours(self):
        return self._generate(True)

    def run_ref(self):
        return self._generate(False)

    def check(self) -> bool:
        if self.variant != "experts":  # FP8 in every projection: no exact mode to compare here;
            # tests/test_transformers.py::test_fp8_linears_option checks its logits
            out = self.run_ours()
            return tuple(out.shape) == (self.batch, self.ids.shape[1] + self.NEW)
        # The first new token comes from the prefill, which the patch computes like transformers
        # (bf16 experts mode: exact matmuls); later steps read the bf16 latent cache and may
        # flip a near-tie on random weights, after which the sequences part.
        with self.lkt.experts_mode("bf16"):
            ours, ref = self.run_ours(), self.run_ref()
        first = self.ids.shape[1]
        return torch.equal(ours[:, first], ref[:, first])


def generate_cases(quick: bool) -> list[Case]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    if quick:
        return []
    out = []
    for variant, batch in (("experts", 1), ("full FP8", 1), ("experts", 8), ("full FP8", 8)):
        st = GenerateV2Lite(batch, variant)
        out.append(Case(
            "nn", f"transformers generate() V2-Lite-shaped batch {batch}, patched: {variant}",
            f"4 layers, 64 experts top-6, bf16 weights, 4-token prompt + {st.NEW} new tokens",
            st.run_ours, {f"transformers default experts ({'grouped_mm'})": st.run_ref},
            check=st.check, bound="memory", setup=st.setup, teardown=st.teardown, min_reps=7,
            extra={"tokens per call": batch * st.NEW,
                   "ours": f"patch_deepseek_v3({st.VARIANTS[variant]})",
                   "check": ("bf16 experts mode: the first new token equals the unpatched model's"
                             if variant == "experts" else "output shape only (logits: tests/test_transformers.py)")}))
    return out


def cases(device: str, quick: bool) -> list[Case]:
    out = _block_cases(device, quick)
    if device == "cpu":
        out.append(moe_decode_case(quick))
        out.extend(generate_cases(quick))
    return out


def _block_cases(device: str, quick: bool) -> list[Case]:
    cfg, B, P, ref, ours, cache, table, xd = _setup(device, quick)
    start = torch.full((B,), P, dtype=torch.int64, device=device)
    shape = (f"B={B} ctx={P} hidden={cfg.hidden_size} heads={cfg.num_attention_heads} "
             f"E={cfg.n_routed_experts} top{cfg.num_experts_per_tok}")
    mla_bytes = B * (P + 1) * cache.bytes_per_token
    mha_bytes = B * (P + 1) * ref.self_attn.kv_bytes_per_token()

    def inf(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    block_ours = inf(lambda: ours(xd, cache, table, start))
    block_ref = inf(lambda: ref(xd, P))
    h = xd.flatten(0, 1)
    moe_ours = inf(lambda: ours.mlp(h))
    moe_ref = inf(lambda: ref.mlp(h))
    attn_ours = inf(lambda: ours.self_attn(xd, cache, table, start))
    attn_ref = inf(lambda: ref.self_attn(xd, P))

    def check(o, r):
        return lambda: _diff(o().float(), r().float()) < 2e-2

    return [
        Case("nn", "DecoderBlock decode step", shape, block_ours, {"plain PyTorch block (bf16)": block_ref},
             bytes=mla_bytes, check=check(block_ours, block_ref),
             extra={"kv_bytes_mla": mla_bytes, "kv_bytes_mha": mha_bytes}),
        Case("nn", "MoE decode step", shape, moe_ours, {"plain PyTorch MoE (expert loop, bf16)": moe_ref},
             check=check(moe_ours, moe_ref)),
        Case("nn", "MLAttention decode step", shape, attn_ours, {"naive MLA, MHA cache (bf16, SDPA)": attn_ref},
             bytes=mla_bytes, check=check(attn_ours, attn_ref), extra={"kv_bytes_mha": mha_bytes}),
    ]
