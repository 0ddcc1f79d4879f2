"""``python -m leankernels train``: a small DeepSeek-style language model trained in FP8 and in bf16.

What it does: builds one byte-level LM (embedding, MLA + MoE decoder blocks with DeepSeek-V3's
sigmoid gate and selection bias, a final norm, an LM head), copies its initial weights into
three runs and trains each on the same batches from the same seed:

* ``fp8``: every attention projection and expert (routed and shared) through leankernels' FP8
  training ops (DeepSeek-V3's recipe: 1x128 activation and 128x128 weight blocks in forward
  and backward, fp32 master weights), with aux-loss-free load balancing (``MoE.balance``
  between steps); as in DeepSeek-V3, the embedding, the output head, the gate, the norms and
  the attention core stay in higher precision (bf16 / fp32);
* ``bf16``: the same model with fp32 master weights and bf16 compute (torch.autocast for the
  projections, bf16 ``F.grouped_mm`` experts), the same routing ops and the same balancing:
  the baseline (both keep the residual stream and the norms in fp32, so the runs differ only
  in the precision of their matrix products);
* ``fp8_no_balance``: the FP8 run without bias updates, to show what balancing does to the
  expert load.

The data is text that ships with Python itself: the standard library's ``.py`` files, read as
bytes (vocabulary 256), the last 5% held out. It prints the loss curves (train and held-out),
tokens/s and the expert load (max / mean tokens per expert, over all MoE layers) with and
without bias updates; ``--json`` writes ``{"fp8": {"loss": [...], "tokens_per_s": x, ...},
"bf16": {...}, "fp8_no_balance": {...}}``; ``--plot`` draws the curves (needs matplotlib).
"""
from __future__ import annotations

import json
import math
import os
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

from .nn import layers, plain
from .nn.config import DeepSeekConfig

# A model that trains in minutes on 2 CPU cores. The MLA latent (512) and RoPE (64) widths are
# fixed by the cache format; everything else is scaled down from DeepSeek-V3.
CONFIG = DeepSeekConfig(hidden_size=256, num_attention_heads=4, q_lora_rank=None, qk_nope_head_dim=32,
                        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, moe_intermediate_size=128,
                        num_experts_per_tok=2, n_group=4, topk_group=2, scoring_func="sigmoid",
                        norm_topk_prob=True, routed_scaling_factor=1.0, max_position_embeddings=512)
VOCAB = 256


def corpus(max_bytes: int) -> bytes:
    """The standard library's .py files in sorted path order, concatenated, up to max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test", "tests"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            parts.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(parts)[:max_bytes]
    return b"".join(parts)


class TinyLM(nn.Module):
    """Byte-level DeepSeek-style LM: embedding -> blocks (RMSNorm, MLA, RMSNorm, MoE) -> norm -> head."""

    def __init__(self, cfg: DeepSeekConfig, blocks, fp8: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.fp8 = cfg, fp8
        self.embed = nn.Parameter(torch.randn(VOCAB, cfg.hidden_size, generator=g) * 0.02)
        dtype = torch.float32   # the residual stream and module outputs; the GEMMs run in FP8 or bf16
        self.blocks = nn.ModuleList(layers.DecoderBlock.from_float(b, dtype, fp8=fp8, trainable=True) for b in blocks)
        self.norm = plain.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        head = nn.Linear(cfg.hidden_size, VOCAB, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.randn(VOCAB, cfg.hidden_size, generator=g) / cfg.hidden_size ** 0.5)
        # DeepSeek-V3 keeps the embedding, the output head, the gate, the norms and the attention
        # core in higher precision: the head is a bf16-compute linear in both runs.
        self.head = head

    def moes(self):
        return [b.mlp for b in self.blocks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed[tokens]
        for b in self.blocks:
            x = b(x)
        with torch.autocast(x.device.type, torch.bfloat16):
            return self.head(self.norm(x)).float()


def _batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        win = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
        yield win[:, :-1], win[:, 1:]


def _loss(model: TinyLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ctx = torch.autocast("cpu", torch.bfloat16) if not model.fp8 and x.device.type == "cpu" else \
        torch.autocast("cuda", torch.bfloat16, enabled=not model.fp8)
    with ctx:
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))


def run(name: str, model: TinyLM, train, held_out, steps: int, lr: float, balance_rate: float, log) -> dict:
    """Train ``model`` on the batches in ``train``; returns its figures."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, loads, tokens, t_train = [], [], 0, 0.0
    model.train()
    for step, (x, y) in enumerate(train):
        t0 = time.perf_counter()
        loss = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        counts = torch.stack([m.balance(balance_rate) for m in model.moes()])
        t_train += time.perf_counter() - t0
        tokens += x.numel()
        losses.append(loss.item())
        c = counts.double()
        loads.append(float((c.amax(1) / c.mean(1)).mean()))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  {name:15s} step {step:4d}  loss {losses[-1]:.4f}  load max/mean {loads[-1]:.2f}")
    model.eval()
    with torch.no_grad():
        held = [float(_loss(model, x, y)) for x, y in held_out]
    tail = max(1, len(loads) // 4)
    return {"loss": losses, "held_out_loss": sum(held) / len(held), "tokens_per_s": tokens / t_train,
            "load_max_over_mean": loads, "load_max_over_mean_last_quarter": sum(loads[-tail:]) / tail,
            "steps": len(losses), "train_seconds": t_train}


def main(quick: bool = False, steps: int | None = None, json_path: str | None = None, plot_path: str | None = None,
         layers_n: int | None = None, batch: int | None = None, seq: int | None = None, lr: float = 3e-3,
         balance_rate: float = 1e-2, seed: int = 0, log=print) -> dict:
    steps = steps or (200 if quick else 600)
    layers_n = layers_n or 2
    batch = batch or 8
    seq = seq or (128 if quick else 256)
    cfg = CONFIG
    torch.manual_seed(seed)
    text = corpus(2_000_000 if quick else 16_000_000)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(data.numel() * 0.95)
    train_data, held_data = data[:split], data[split:]
    held_out = list(_batches(held_data, 32, batch, seq, seed + 1))
    blocks = [plain.make_block(cfg, "cpu", torch.float32, seed=seed + 1 + i) for i in range(layers_n)]
    for b in blocks:  # the attention output and expert down projections start small (GPT-2 style)
        with torch.no_grad():
            b.self_attn.o_proj.weight.mul_((2 * layers_n) ** -0.5)
            for e in list(b.mlp.experts) + [b.mlp.shared_experts]:
                e.down_proj.weight.mul_((2 * layers_n) ** -0.5)
    n_params = None
    log(f"leankernels train: byte-level DeepSeek-style LM, {layers_n} blocks (MLA + MoE {cfg.n_routed_experts} "
        f"experts top-{cfg.num_experts_per_tok}, sigmoid gate with selection bias), hidden {cfg.hidden_size}, "
        f"batch {batch} x {seq} tokens, {steps} steps, AdamW lr {lr}")
    log(f"data: {len(text) / 1e6:.1f} MB of the Python standard library's .py files, 5% held out; "
        f"torch threads {torch.get_num_threads()}")
    results = {"config": {**cfg.to_dict(), "layers": layers_n, "batch": batch, "seq": seq, "steps": steps, "lr": lr,
                          "balance_rate": balance_rate, "seed": seed}}
    for name, fp8, rate in (("fp8", True, balance_rate), ("bf16", False, balance_rate),
                            ("fp8_no_balance", True, 0.0)):
        model = TinyLM(cfg, blocks, fp8, seed)
        if n_params is None:
            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            results["config"]["trainable_parameters"] = n_params
            log(f"model: {n_params / 1e6:.2f} M trainable parameters (fp32 masters)")
        results[name] = run(name, model, _batches(train_data, steps, batch, seq, seed), held_out, steps, lr, rate, log)
    fp8, bf16, nob = results["fp8"], results["bf16"], results["fp8_no_balance"]
    gap = fp8["held_out_loss"] / bf16["held_out_loss"] - 1
    results["fp8_vs_bf16_loss_gap"] = gap
    log("")
    log(f"{'run':16s} {'held-out loss':>14s} {'last train loss':>16s} {'tokens/s':>10s} {'load max/mean':>14s}")
    for name in ("fp8", "bf16", "fp8_no_balance"):
        r = results[name]
        log(f"{name:16s} {r['held_out_loss']:14.4f} {r['loss'][-1]:16.4f} {r['tokens_per_s']:10.0f} "
            f"{r['load_max_over_mean_last_quarter']:14.2f}")
    log(f"FP8 held-out loss is {100 * gap:+.2f}% vs bf16 (target: within 3%); FP8 trains at "
        f"{fp8['tokens_per_s'] / bf16['tokens_per_s']:.2f}x bf16's tokens/s on this device.")
    log(f"Expert load (max/mean tokens per expert, last quarter of training): {fp8['load_max_over_mean_last_quarter']:.2f} "
        f"with bias updates vs {nob['load_max_over_mean_last_quarter']:.2f} without (1.00 = perfectly even).")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {json_path}")
    if plot_path:
        _plot(results, plot_path)
        log(f"wrote {plot_path}")
    return results


def acceptance(results: dict) -> list[str]:
    """What the train job must show, as a list of failures (empty: all met): FP8's held-out
    loss within 3% of bf16's, and the bias updates narrowing the expert load (max/mean over the
    last quarter of training) against the FP8 run without them."""
    out = []
    gap = results["fp8_vs_bf16_loss_gap"]
    if not abs(gap) <= 0.03:
        out.append(f"FP8 held-out loss is {100 * gap:+.2f}% vs bf16's (must be within 3%)")
    bal = results["fp8"]["load_max_over_mean_last_quarter"]
    nob = results["fp8_no_balance"]["load_max_over_mean_last_quarter"]
    if not bal < nob:
        out.append(f"expert load max/mean {bal:.2f} with bias updates is not below {nob:.2f} without")
    return out


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib)") from e
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("fp8", "bf16", "fp8_no_balance"):
        a.plot(results[name]["loss"], label=name)
        b.plot(results[name]["load_max_over_mean"], label=name)
    a.set_xlabel("step")
    a.set_ylabel("train loss (nats/byte)")
    a.legend()
    b.set_xlabel("step")
    b.set_ylabel("expert load max/mean")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
