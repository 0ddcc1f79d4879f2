"""Benchmark cases for training (see case.py for the contract): forward + backward of a MoE layer.

Ours: ``leankernels.nn.MoE`` built with ``trainable=True`` (DeepSeek-V3's FP8 recipe through
``fp8_grouped_linear``: 1x128 activations and 128x128 weights forward, transposed weight blocks
for dgrad, token-grouped 1x128 quantization and the k-grouped FP8 GEMM for wgrad; the SwiGLU
between the two GEMMs as one op each way, ``leankernels::silu_mul``). Baseline: the same layer,
same weights, same routing ops, with ``fp8_experts=False``: bf16 ``F.grouped_mm`` experts and
torch's ``F.silu(g) * u`` under PyTorch autograd (fp32 masters cast to bf16). One call = forward, backward of a
squared-output loss, gradients cleared; FLOPs = 3x the expert GEMMs' forward FLOPs (forward,
dgrad, wgrad), shared experts included; the % is against the measured bf16 matmul ceiling.

Two cases. "weights unchanged": the weights stay as they are between calls, as between the
microbatches of one optimizer step (gradient accumulation), so ours reuses its FP8 copies of
the weights (the modules re-quantize only when a master weight changes) while the baseline casts
them to bf16 in every forward. "weights changed": before every call each side's parameters are
marked modified (their version counters bumped, as an optimizer step does), so ours quantizes
its weights in every call too: one optimizer step per forward/backward. The optimizer's own
arithmetic is not timed in either.
"""
from __future__ import annotations

import torch

from ..nn import DeepSeekConfig, MoE, plain
from .case import Case

# A DeepSeek-V2-Lite-like MoE layer cut to CPU size (and a tiny one for --quick).
FULL = DeepSeekConfig(hidden_size=1024, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=704,
                      n_shared_experts=1, n_group=1, topk_group=1, scoring_func="sigmoid")
QUICK = DeepSeekConfig(hidden_size=256, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                       n_shared_experts=1, n_group=1, topk_group=1, scoring_func="sigmoid")


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())


def _mark_modified(m: torch.nn.Module) -> None:
    """Bump the version counter of every parameter of m, as an optimizer's in-place update does."""
    bump = getattr(torch.autograd.graph, "increment_version", None)
    for p in m.parameters():
        if bump is not None:
            bump(p)
        else:  # pragma: no cover (torch without increment_version)
            with torch.no_grad():
                p.mul_(1)


class MoeTrainStep:
    def __init__(self, cfg: DeepSeekConfig, tokens: int, device: str, weights_changed: bool = False):
        self.cfg, self.tokens, self.device = cfg, tokens, device
        self.weights_changed = weights_changed
        self.ours = self.ref = self.x = None

    def setup(self) -> None:
        src = plain.make_block(self.cfg.replace(max_position_embeddings=64), self.device, torch.float32, seed=0).mlp
        self.ours = MoE.from_float(src, torch.bfloat16, trainable=True)
        self.ref = MoE.from_float(src, torch.bfloat16, fp8_shared=False, trainable=True, fp8_experts=False)
        g = torch.Generator(self.device).manual_seed(1)
        self.x = torch.randn(self.tokens, self.cfg.hidden_size, generator=g, device=self.device).bfloat16()

    def teardown(self) -> None:
        self.ours = self.ref = self.x = None

    def _step(self, m: MoE):
        if self.weights_changed:
            _mark_modified(m)
        x = self.x.detach().requires_grad_()
        y = m(x)
        y.float().pow(2).mean().backward()
        grads = (x.grad, m.w13_master.grad, m.w2_master.grad)
        m.zero_grad(set_to_none=True)
        m.load_counts.zero_()
        return y, grads

    def run_ours(self):
        return self._step(self.ours)

    def run_ref(self):
        return self._step(self.ref)

    def check(self) -> bool:
        (y, g), (y2, g2) = self.run_ours(), self.run_ref()
        return _diff(y.float(), y2.float()) < 1e-2 and all(_diff(a.float(), b.float()) < 2e-2 for a, b in zip(g, g2))


def cases(device: str, quick: bool) -> list[Case]:
    cfg, T = (QUICK, 256) if quick else (FULL, 2048)
    H, I, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    fwd = 2 * T * 3 * I * H * (k + cfg.n_shared_experts)
    shape = f"T={T} H={H} E={cfg.n_routed_experts} top{k} I={I} +{cfg.n_shared_experts} shared"
    out = []
    for changed in (False, True):
        st = MoeTrainStep(cfg, T, device, weights_changed=changed)
        name = "MoE layer forward+backward (FP8 recipe), weights " + ("changed" if changed else "unchanged")
        out.append(Case("train", name, shape, st.run_ours,
                        {"same layer, bf16 F.grouped_mm experts (autograd)": st.run_ref}, flops=3 * fwd,
                        check=st.check, bound="compute", ceiling="bf16_matmul", setup=st.setup,
                        teardown=st.teardown, min_reps=3 if quick else 11,  # (a 2-core VM: +-15% per call)
                        extra={"check": "output and x/w13/w2 gradients vs the bf16 layer, diff < 1e-2 / 2e-2",
                               "weights": "re-quantized every call (parameters marked modified, as an optimizer "
                                          "step does)" if changed else "unchanged between calls (microbatches of "
                                          "one optimizer step): FP8 copies reused"}))
    return out
