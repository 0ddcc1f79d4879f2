"""The main job: a DeepSeek-V3-shaped decoder block on leankernels ops against the same block
in plain PyTorch (same weights), prefill then decode, timed in the same run.

Block: RMSNorm -> MLAttention -> residual -> RMSNorm -> MoE -> residual. Ours: Fp8Linear
projections (128x128 weight blocks, 1x128 activations), the latent cache (mla_append +
mla_decode, absorbed queries), routed experts through route/plan/permute/fp8_grouped_gemm/
unpermute. Plain: bf16 nn.Linear, naive MLA with an MHA-style cache of decompressed K/V
(preallocated), DeepSeek-V3 gate in torch ops and a Python loop over the experts (the layer as
transformers writes it). Decode inputs are the same random hidden states for both blocks
(teacher forced), so the outputs are compared step by step.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from ..mla import LatentCache
from ..nn import V3, DecoderBlock, DeepSeekConfig
from ..nn import plain

# Device-scaled defaults. MLA's latent (512) and RoPE (64) widths are the cache format: fixed.
CPU = DeepSeekConfig(hidden_size=1024, num_attention_heads=16, q_lora_rank=512, n_routed_experts=64,
                     moe_intermediate_size=256, num_experts_per_tok=6, n_group=8, topk_group=4)
CPU_QUICK = CPU.replace(n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=4)
GPU = DeepSeekConfig(hidden_size=4096, num_attention_heads=32, q_lora_rank=1024, n_routed_experts=64,
                     moe_intermediate_size=1024, num_experts_per_tok=6, n_group=8, topk_group=4)
# batch (sequences), prompt tokens, decode steps
RUN = {"cpu": (4, 512, 32), "cpu_quick": (4, 128, 8), "gpu": (32, 1024, 32), "v3": (32, 1024, 32)}
# Check (DeepGEMM's diff metric per token, on the block's update out - x, against the plain bf16
# block). FP8 noise can flip a near-tie of the gate, so a few tokens pick a different (equally
# valid) expert set; the check records each block's expert choice (from its own MoE input) and
# requires, over the tokens whose choice agrees, every token within TOKEN_BAR (chained FP8 GEMMs
# give ~2-4e-3), and the choice to agree for at least MIN_ROUTE_AGREE of the tokens.
TOKEN_BAR = 1e-2
MIN_ROUTE_AGREE = 0.8


def token_diffs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token DeepGEMM diff of [..., H] tensors (float64)."""
    x, y = x.double().flatten(0, -2), y.double().flatten(0, -2)
    return 1 - 2 * (x * y).sum(-1) / (x * x + y * y).sum(-1).clamp_min(1e-300)


class _MoEInputs:
    """Keeps the inputs a MoE module receives (a reference, no copy: negligible in the timing)."""

    def __init__(self, module):
        self.inputs = []
        self.handle = module.register_forward_pre_hook(lambda mod, args: self.inputs.append(args[0]))


def _same_routing(ours, ref, h_ours, h_ref) -> torch.Tensor:
    """[T] bool: both blocks' gates chose the same expert set for the token."""
    H = h_ours.shape[-1]
    ids_o = ours.mlp.route(h_ours.reshape(-1, H))[1].long().sort(-1).values
    ids_r = ref.mlp.gate(h_ref.reshape(-1, H))[1].sort(-1).values
    return (ids_o == ids_r).all(-1).cpu()


def _summary(d: torch.Tensor, same: torch.Tensor) -> dict:
    d = d.cpu()
    agree = d[same] if bool(same.any()) else d.new_zeros(1)
    return {"median": float(d.median()), "max_same_routing": float(agree.max()),
            "route_agree": float(same.double().mean()), "tokens": int(d.numel()),
            "passed": bool(float(agree.max()) < TOKEN_BAR and float(same.double().mean()) >= MIN_ROUTE_AGREE)}


def with_experts(cfg: DeepSeekConfig, experts: int) -> DeepSeekConfig:
    """cfg with a different number of routed experts, keeping valid group routing: at most the
    original number of groups, at least 2 experts per group, enough kept groups for top-k."""
    if experts < 1:
        raise SystemExit("--experts must be >= 1")
    top_k = min(cfg.num_experts_per_tok, experts)
    g = max([d for d in range(1, cfg.n_group + 1) if experts % d == 0 and (experts // d >= 2 or d == 1)])
    kg = min(g, max(cfg.topk_group, -(-top_k // (experts // g))))
    return cfg.replace(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=g, topk_group=kg)


def pick(device: str, quick: bool, preset: str | None, experts: int | None):
    if preset == "v3":
        cfg, key = V3, "v3"
    elif preset in ("cpu", "small") or (preset is None and device == "cpu"):  # "small": the old name of "cpu"
        cfg, key = (CPU_QUICK, "cpu_quick") if quick else (CPU, "cpu")
    else:
        cfg, key = GPU, "gpu"
    if experts:
        cfg = with_experts(cfg, experts)
    if key == "v3" and device == "cpu" and cfg.n_routed_experts > 16:
        print(f"note: --preset v3 on the CPU holds {cfg.n_routed_experts} experts of 44 M parameters each (bf16 plain block "
              "+ FP8 block); consider --experts 8", file=sys.stderr)
    return cfg, RUN[key]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _bar(i: int, n: int, t0: float, stream=sys.stderr) -> None:
    w = 30
    done = int(w * i / n)
    stream.write(f"\r  decode [{'#' * done}{'.' * (w - done)}] {i}/{n} steps  {time.perf_counter() - t0:5.1f} s")
    if i == n:
        stream.write("\n")
    stream.flush()


def active_fraction(cfg: DeepSeekConfig, block: plain.PlainBlock) -> tuple[int, int]:
    """(parameters used per token, all parameters) of the block."""
    total = sum(p.numel() for p in block.parameters())
    per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
    idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total - idle, total


def run(device: str, quick: bool = False, preset: str | None = None, steps: int | None = None,
        batch: int | None = None, prompt: int | None = None, experts: int | None = None,
        progress: bool = True, fp8_cache: bool = False) -> dict:
    """Build both blocks, prefill, decode; returns the figures (a dict, JSON-serialisable)."""
    cfg, (B, P, N) = pick(device, quick, preset, experts)
    B, P, N = batch or B, prompt or P, steps or N
    torch.manual_seed(0)
    t_build = time.perf_counter()
    ref = plain.make_block(cfg, device, torch.bfloat16, seed=0)
    ours = DecoderBlock.from_float(ref)
    t_build = time.perf_counter() - t_build

    bs = 64
    per_seq = math.ceil((P + N) / bs)
    cache = LatentCache(B * per_seq, bs, fp8=fp8_cache, device=device)
    table = torch.arange(B * per_seq, dtype=torch.int32, device=device).view(B, per_seq)
    ref.reset_cache(B, P + N)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(B, P + N, cfg.hidden_size, generator=g, device=device).to(torch.bfloat16)

    hook_o, hook_r = _MoEInputs(ours.mlp), _MoEInputs(ref.mlp)
    with torch.inference_mode():
        _sync(device)
        t = time.perf_counter()
        y_ref = ref(x[:, :P], 0)
        _sync(device)
        t_pre_ref = time.perf_counter() - t
        t = time.perf_counter()
        y_ours = ours(x[:, :P], cache, table, 0)
        _sync(device)
        t_pre_ours = time.perf_counter() - t
        pre = _summary(token_diffs(y_ours - x[:, :P], y_ref - x[:, :P]),
                       _same_routing(ours, ref, hook_o.inputs[0], hook_r.inputs[0]))

        t_ref, t_ours, dec_ref, dec_ours, dec_in = [], [], [], [], []
        t0 = time.perf_counter()
        for i in range(N):
            xi = x[:, P + i:P + i + 1]
            order = (0, 1) if i % 2 == 0 else (1, 0)     # alternate who goes first
            for who in order:
                _sync(device)
                t = time.perf_counter()
                if who == 0:
                    yr = ref(xi, P + i)
                else:
                    yo = ours(xi, cache, table, P + i)
                _sync(device)
                (t_ref if who == 0 else t_ours).append(time.perf_counter() - t)
            dec_ref.append(yr.float())
            dec_ours.append(yo.float())
            dec_in.append(xi.float())
            if progress:
                _bar(i + 1, N, t0)
        same = _same_routing(ours, ref, torch.cat(hook_o.inputs[1:], 1), torch.cat(hook_r.inputs[1:], 1))
    hook_o.handle.remove()
    hook_r.handle.remove()
    xin = torch.cat(dec_in, 1)
    dec = _summary(token_diffs(torch.cat(dec_ours, 1) - xin, torch.cat(dec_ref, 1) - xin), same)
    passed = pre["passed"] and dec["passed"]

    # per-token figures: the median decode step over the batch (skip the first step: warm-up)
    steady = slice(1, None) if N > 2 else slice(None)
    med = lambda v: sorted(v[steady])[len(v[steady]) // 2]
    step_ours, step_ref = med(t_ours), med(t_ref)
    mha = ref.self_attn.kv_bytes_per_token()
    bf16_rows = LatentCache(1, bs, fp8=False, device=device)
    fp8_rows = LatentCache(1, bs, fp8=True, device=device)
    w_ours = sum(t.numel() * t.element_size() for n, t in list(ours.named_parameters()) + list(ours.named_buffers())
                 if not n.endswith(("cos", "sin", "w_uk", "w_uv_t")))
    w_ref = sum(p.numel() * p.element_size() for p in ref.parameters())
    active, total = active_fraction(cfg, ref)
    v3_mha = V3.num_attention_heads * (V3.qk_head_dim + V3.v_head_dim) * 2
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {
        "device": device, "device_name": dev_name, "preset": {"small": "cpu"}.get(preset, preset) or ("cpu" if device == "cpu" else "gpu"),
        "config": cfg.to_dict(), "latent_cache": "fp8" if fp8_cache else "bf16", "batch": B, "prompt": P, "decode_steps": N, "build_s": t_build,
        "prefill_s": {"leankernels": t_pre_ours, "plain": t_pre_ref},
        "decode_ms_per_token": {"leankernels": 1e3 * step_ours / B, "plain": 1e3 * step_ref / B},
        "decode_step_ms": {"leankernels": 1e3 * step_ours, "plain": 1e3 * step_ref},
        "tokens_per_s": {"leankernels": B / step_ours, "plain": B / step_ref},
        "speedup": step_ref / step_ours,
        "kv_bytes_per_token": {"mla_bf16": bf16_rows.bytes_per_token, "mla_fp8": fp8_rows.bytes_per_token, "mha": mha,
                               "mha_v3": v3_mha},
        "weight_bytes": {"leankernels_fp8": w_ours, "plain_bf16": w_ref},
        "params": {"active_per_token": active, "total": total, "active_fraction": active / total},
        "check": {"prefill": pre, "decode": dec, "token_bar": TOKEN_BAR, "min_route_agree": MIN_ROUTE_AGREE,
                  "passed": passed},
    }


def legend(r: dict) -> str:
    """What the table's columns mean, in words."""
    return (
        "ours:     this block on leankernels ops: FP8 projections (128x128 weight blocks, 1x128 activation groups),\n"
        "          experts through route/plan/permute and FP8 grouped GEMMs, attention over the MLA latent cache\n"
        f"          (mla_append + mla_decode on absorbed queries, {r['latent_cache']} rows).\n"
        "baseline: the same block with the same weights in plain PyTorch bf16, written as transformers writes it:\n"
        "          nn.Linear projections, MLA with a decompressed per-head K/V cache, the gate in torch ops and a\n"
        "          Python loop over the experts. Both get the same inputs (decode teacher-forced), timed in this run.\n"
        "ratio:    baseline time / ours (or baseline size / ours).\n"
        "check:    per token, DeepGEMM's diff 1 - 2*sum(x*y)/sum(x^2+y^2) between ours' and the baseline's block\n"
        f"          update (output - input); ok when every token whose experts agree stays below {r['check']['token_bar']:.0e}\n"
        f"          and at least {r['check']['min_route_agree']:.0%} of tokens pick the same experts (FP8 noise can flip a\n"
        "          near-tie of the gate to an equally valid expert set).")


def rows(r: dict) -> list[dict]:
    """Table rows of the figures."""
    ms, tps, kv, wb, pa = r["decode_ms_per_token"], r["tokens_per_s"], r["kv_bytes_per_token"], r["weight_bytes"], r["params"]
    c = r["check"]
    ok = lambda d: d["passed"]
    txt = lambda d: (f"diff/token median {d['median']:.1e}; same experts for {d['route_agree']:.0%} of tokens, "
                     f"max diff there {d['max_same_routing']:.1e} (bar {c['token_bar']:.0e})")
    return [
        {"what": f"decode time per token (batch {r['batch']}, context {r['prompt']}+{r['decode_steps']}, "
                 f"{r['latent_cache']} latent cache)",
         "ours": f"{ms['leankernels']:.3f} ms", "baseline": f"{ms['plain']:.3f} ms (plain PyTorch bf16)",
         "ratio": f"{r['speedup']:.2f}x faster" if r["speedup"] >= 1 else f"{1 / r['speedup']:.2f}x SLOWER",
         "detail": f"median step {r['decode_step_ms']['leankernels']:.2f} vs {r['decode_step_ms']['plain']:.2f} ms",
         "check": ok(c["decode"])},
        {"what": "decode tokens/s", "ours": f"{tps['leankernels']:.1f}", "baseline": f"{tps['plain']:.1f}",
         "ratio": f"{tps['leankernels'] / tps['plain']:.2f}x", "detail": "decode " + txt(c["decode"])},
        {"what": f"prefill {r['batch']}x{r['prompt']} tokens", "ours": f"{r['prefill_s']['leankernels'] * 1e3:.1f} ms",
         "baseline": f"{r['prefill_s']['plain'] * 1e3:.1f} ms", "ratio": f"{r['prefill_s']['plain'] / r['prefill_s']['leankernels']:.2f}x",
         "detail": "prefill " + txt(c["prefill"]), "check": ok(c["prefill"])},
        {"what": "KV cache bytes/token/layer, MLA latent bf16", "ours": f"{kv['mla_bf16']:,.0f} B",
         "baseline": f"{kv['mha']:,.0f} B (MHA bf16, {r['config']['num_attention_heads']} heads)",
         "ratio": f"{kv['mha'] / kv['mla_bf16']:.1f}x smaller", "detail": f"DeepSeek-V3 MHA: {kv['mha_v3']:,} B ({kv['mha_v3'] / kv['mla_bf16']:.0f}x)"},
        {"what": "KV cache bytes/token/layer, MLA latent FP8", "ours": f"{kv['mla_fp8']:,.0f} B",
         "baseline": f"{kv['mha']:,.0f} B (MHA bf16)", "ratio": f"{kv['mha'] / kv['mla_fp8']:.1f}x smaller",
         "detail": f"DeepSeek-V3 MHA: {kv['mha_v3'] / kv['mla_fp8']:.0f}x"},
        {"what": "block weight bytes", "ours": f"{wb['leankernels_fp8'] / 2**20:,.1f} MiB (FP8 + scales)",
         "baseline": f"{wb['plain_bf16'] / 2**20:,.1f} MiB (bf16)", "ratio": f"{wb['plain_bf16'] / wb['leankernels_fp8']:.2f}x smaller",
         "detail": "kv_b_proj, norms and gate stay bf16/fp32"},
        {"what": "parameters active per token", "ours": f"{pa['active_per_token'] / 1e6:,.1f} M of {pa['total'] / 1e6:,.1f} M",
         "baseline": "", "ratio": f"{pa['active_fraction']:.1%}",
         "detail": f"top-{r['config']['num_experts_per_tok']} of {r['config']['n_routed_experts']} routed experts + shared + attention"},
    ]


def plot(r: dict, path: str) -> None:
    """Bar charts of the figures (needs matplotlib: pip install 'leankernels[bench]')."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib, or the 'bench' extra)") from None
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ms = r["decode_ms_per_token"]
    ax[0].bar(["leankernels", "plain PyTorch"], [ms["leankernels"], ms["plain"]], color=["tab:green", "tab:gray"])
    ax[0].set_ylabel("ms per decode token")
    ax[0].set_title(f"decode ({r['speedup']:.2f}x)")
    kv = r["kv_bytes_per_token"]
    ax[1].bar(["MLA FP8", "MLA bf16", "MHA bf16"], [kv["mla_fp8"], kv["mla_bf16"], kv["mha"]],
              color=["tab:green", "tab:olive", "tab:gray"])
    ax[1].set_ylabel("KV-cache bytes / token / layer")
    ax[1].set_title("KV cache")
    wb = r["weight_bytes"]
    ax[2].bar(["FP8", "bf16"], [wb["leankernels_fp8"] / 2**20, wb["plain_bf16"] / 2**20], color=["tab:green", "tab:gray"])
    ax[2].set_ylabel("block weights (MiB)")
    ax[2].set_title(f"weights ({r['params']['active_fraction']:.1%} active per token)")
    fig.suptitle(f"leankernels DeepSeek-V3-shaped block on {r['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
