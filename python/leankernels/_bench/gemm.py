"""Benchmark cases for the FP8 GEMM family (see case.py for the contract).

Baselines, measured in the same run on the same data:
  CPU: ``F.grouped_mm`` on bf16 weights, ``torch.bmm`` in fp32 on the dequantized FP8 operands
  (what a CPU user without FP8 kernels would run), and for dense ``torch.matmul`` in bf16.
  GPU: ``F.scaled_mm`` with BlockWise1x128 x BlockWise128x128 scales (dense, when this torch and
  GPU support it), ``F.scaled_grouped_mm`` with row-wise scales and ``F.grouped_mm`` in bf16
  (grouped). A baseline that this torch/GPU cannot run is left out (probed once here).
Shapes: DeepSeek-V3 (DESIGN "Benchmarks") on GPU; on CPU the MoE decode step (8 experts x 16
rows, N=4096, K=7168) plus scaled-down ones, and (decode_cases) the decode-shaped GEMMs of
DESIGN "CPU builds": DeepSeek-V2-Lite and DeepSeek-V3 experts and a dense N=4096 K=14336 at
T = 1, 4, 16 tokens against torch bf16 and torch int8 weight-only on the same experts, with
GB/s on the FP8 weight bytes touched and % of the "read" ceiling; the V2-Lite T=1 gate/up GEMM
on every CPU path (lk.cpu_paths()); one large-M (prefill) dense GEMM against torch bf16; the
MoE weight-gradient pieces of training (wgrad_cases: fp8_k_grouped_gemm and
quantize_fp8_transposed, see that section).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _lib
from .. import gemm as lkg
from .. import quant
from .. import reference as ref
from .. import routing
from ..memory import empty_hugepages, hugepages_available, to_hugepages
from .case import Case
from .timing import LLC_FLUSH

GROUP = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _probe(fn):
    """fn if it runs here (a baseline this torch/GPU may not support), else None."""
    try:
        fn()
        return fn
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError):
        return None


def _portable(fn):
    """fn run with the portable mma.sync kernel forced (on Hopper the default is the wgmma one),
    so one GPU run records both of our kernels beside the PyTorch baselines."""
    def run():
        old = os.environ.get("LEANKERNELS_GEMM_BACKEND")
        os.environ["LEANKERNELS_GEMM_BACKEND"] = "portable"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["LEANKERNELS_GEMM_BACKEND"]
            else:
                os.environ["LEANKERNELS_GEMM_BACKEND"] = old
    return run


def _rowwise_fp8(x: torch.Tensor):
    """Per-row (last dim) e4m3 quantization with fp32 scales, for the row-wise baselines."""
    s = x.float().abs().amax(dim=-1).clamp_min(1e-4) / 448.0
    return (x.float() / s.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _bytes(rows: int, N: int, K: int, E: int, out_bytes: int = 2) -> float:
    """Minimal traffic: fp8 a and b once, their scales, the output once."""
    return rows * K + E * N * K + 4 * (rows * _cdiv(K, GROUP) + E * _cdiv(N, GROUP) * _cdiv(K, GROUP)) + rows * N * out_bytes


def _grouped_case(device: str, E: int, m: int, N: int, K: int, masked: bool = False, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E * m, K, generator=g).to(device)
    w = (torch.randn(E, N, K, generator=g) * 0.02).to(device)
    a, sa = quant.quantize_fp8(x, (1, GROUP))
    b, sb = quant.quantize_fp8(w, (GROUP, GROUP))
    offs = (torch.arange(1, E + 1, dtype=torch.int32) * m).to(device)
    xb, wb = x.bfloat16(), w.bfloat16()
    del w
    baselines = {}
    if masked:
        a3, sa3 = a.view(E, m, K), sa.view(E, m, -1)
        masked_m = torch.full((E,), m, dtype=torch.int32, device=device)
        out = torch.empty(E, m, N, dtype=torch.bfloat16, device=device)

        def ours():
            return lkg.fp8_grouped_gemm_masked(a3, sa3, b, sb, masked_m, out=out)

        def check():
            want = ref.fp8_gemm(a3[0], sa3[0], b[0], sb[0], torch.float32)
            return _diff(ours()[0].float(), want) < 1e-4
    else:
        out = torch.empty(E * m, N, dtype=torch.bfloat16, device=device)

        def ours():
            return lkg.fp8_grouped_gemm(a, sa, b, sb, offs, out=out)

        def check():
            want = ref.fp8_gemm(a[:m], sa[:m], b[0], sb[0], torch.float32)
            return _diff(ours()[:m].float(), want) < 1e-4

    bt = wb.transpose(-2, -1)
    baselines["F.grouped_mm bf16"] = _probe(lambda: F.grouped_mm(xb, bt, offs=offs))
    if device == "cpu":
        ad = quant.dequantize_fp8(a, sa, (1, GROUP)).view(E, m, K)
        bd = quant.dequantize_fp8(b, sb, (GROUP, GROUP))
        bdt = bd.transpose(1, 2)
        baselines["torch.bmm fp32 (dequantized)"] = _probe(lambda: torch.bmm(ad, bdt))
    else:
        baselines["leankernels portable mma.sync"] = _probe(_portable(ours))
        ar, sar = _rowwise_fp8(xb)
        br, sbr = _rowwise_fp8(wb)
        brt = br.transpose(-2, -1)
        baselines["F.scaled_grouped_mm rowwise"] = _probe(lambda: F.scaled_grouped_mm(
            ar, brt, sar, F.ScalingType.RowWise, sbr, F.ScalingType.RowWise, offs=offs,
            output_dtype=torch.bfloat16))
    baselines = {k: v for k, v in baselines.items() if v is not None}
    kind = "masked" if masked else "contiguous"
    return Case(domain="gemm", name=f"fp8_grouped_gemm {kind}", shape=f"{E}x{m} N={N} K={K}", ours=ours,
                baselines=baselines, flops=2.0 * E * m * N * K, bytes=float(_bytes(E * m, N, K, E)),
                check=check, bound="compute" if device != "cpu" and m >= 256 else "memory",
                extra={"weight bytes fp8": E * N * K, "weight bytes bf16": 2 * E * N * K})


def _diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum().clamp_min(1e-300))


def _dense_case(device: str, M: int, N: int, K: int, seed: int = 0, name: str = "fp8_gemm dense",
                bound: Optional[str] = None, ceiling: Optional[str] = None, fp32: bool = False) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) * 0.02).to(device)
    a, sa = quant.quantize_fp8(x, (1, GROUP))
    b, sb = quant.quantize_fp8(w, (GROUP, GROUP))
    xb, wb = x.bfloat16(), w.bfloat16()

    def ours():
        return lkg.fp8_gemm(a, sa, b, sb)

    def check():
        want = ref.fp8_gemm(a[:64], sa[:64], b, sb, torch.float32)
        return _diff(ours()[:64].float(), want) < 1e-4

    baselines = {"torch.matmul bf16": _probe(lambda: xb @ wb.T)}
    if fp32:
        xf, wf = xb.float(), wb.float()
        baselines = {"torch.matmul fp32": _probe(lambda: xf @ wf.T), **baselines}
    if device != "cpu":
        baselines["leankernels portable mma.sync"] = _probe(_portable(ours))
        # cuBLAS blockwise FP8: scale_a [M, K/128] outer-dim-major, b as [K, N] column-major.
        sa_t = sa.t().contiguous().t()
        baselines["F.scaled_mm blockwise 1x128 x 128x128"] = _probe(lambda: F.scaled_mm(
            a, b.t(), sa_t, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16))
    baselines = {k: v for k, v in baselines.items() if v is not None}
    return Case(domain="gemm", name=name, shape=f"M={M} N={N} K={K}", ours=ours, baselines=baselines,
                flops=2.0 * M * N * K, bytes=float(_bytes(M, N, K, 1)), check=check,
                bound=bound or ("compute" if device != "cpu" and M >= 1024 else "memory"), ceiling=ceiling)


DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]
MOE_NK = [(4096, 7168), (7168, 2048)]


# ------------------------------------------------------------------ decode-shaped CPU cases
#
# One decode step's routed rows through one expert projection, as real decode lays them out:
# T tokens, each routed to top_k distinct experts drawn at random (seeded), rows sorted by
# expert with lk.plan / lk.permute(quantize=True). Timed: the GEMM alone (ours on the FP8 rows,
# the baselines on the same rows in bf16). Bytes: the FP8 weight bytes of the experts that got
# >= 1 row (what a decode GEMM must read), against the "read" ceiling. The LLC is flushed before
# every call (Case.rotate): in a real decode step every other layer's weights pass through the
# cache between two calls of this one.
#
# Weights: BANK distinct random experts per projection, quantized once per format; expert e of
# the pool holds a copy of bank[e % BANK] (its own memory: the values only feed the checks, and
# building 64-256 random experts per case would dominate the run). Experts of DeepSeek-V3 (256 x
# 29 MB FP8 for gate/up, 7.5 GB, twice that in bf16) do not fit beside their bf16 and int8
# copies: a V3 case allocates only the experts its tokens chose plus SPARE_EXPERTS unused ones
# and renumbers the ids (said in its shape); even so the V3 T=16 gate/up case holds ~12 GB
# (~100 chosen experts in FP8, bf16 and int8), and a case raises MemoryError (its row shows the
# error) when the machine has less than that available. Weights are allocated in Case.setup and
# freed in Case.teardown, so only one case holds them at a time.
#
# Baselines: torch bf16 F.grouped_mm on the same rows and offs (empty experts included, as a
# model would call it) and torch int8 weight-only, a Python loop of _weight_int8pack_mm over the
# experts with rows (row ranges read on the host once, at setup; ours reads offs on the device
# and its wrapper's offs check is part of our time). The masked cases (T=1: M_max = 1) use the
# same contiguous baselines on the same rows.

@dataclass(frozen=True)
class MoeShape:
    model: str
    E: int                     # routed experts
    top_k: int
    projs: tuple               # ((projection, N, K), ...)
    remap: bool                # allocate only the chosen experts (+ SPARE_EXPERTS), ids renumbered


V2_LITE = MoeShape("V2-Lite", 64, 6, (("gate/up", 2816, 2048), ("down", 2048, 1408)), remap=False)
V3_EXPERTS = MoeShape("V3", 256, 8, (("gate/up", 4096, 7168), ("down", 7168, 2048)), remap=True)
DENSE_DECODE_NK = (4096, 14336)
PREFILL_MNK = (512, 4096, 7168)
DECODE_T = (1, 4, 16)
DECODE_T_QUICK = (1, 16)    # --quick: stand-in shapes (an eighth of N and K) at these T
SPARE_EXPERTS = 4
BANK = 4

BF16_BASELINE = "torch bf16 F.grouped_mm"
READ_BASELINE = "plain read of the same bytes (torch int64 sum, cache flushed)"
INT8_BASELINE = "torch int8 weight-only (_weight_int8pack_mm per expert)"
BF16_DENSE = "torch bf16 F.linear"
INT8_DENSE = "torch int8 weight-only (_weight_int8pack_mm)"

_ELEM = {"fp8": 1, "bf16": 2, "int8": 1}   # bytes per weight element
_FLUSH = LLC_FLUSH


def _quick_dim(d: int) -> int:
    """The --quick stand-in of a dimension: an eighth, rounded up to a multiple of 128."""
    return max(GROUP, _cdiv(d // 8, GROUP) * GROUP)


def _available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ensure_memory(need: float, what: str) -> None:
    """MemoryError (reported as the case's error) rather than the OOM killer ending the run."""
    avail = _available_bytes()
    if avail is not None and need > 0.85 * avail:
        raise MemoryError(f"{what} needs ~{need / 1e9:.1f} GB of weights; {avail / 1e9:.1f} GB available")


class SameBytesRead:
    """A plain read pass over as many bytes as a decode case's weights (torch int64 sum; the LLC
    flushed before every call, like every row): the case's own read ceiling, timed in the same
    interleaved rounds as ours, so a memory bandwidth that drifts during the run (this VM's
    moved between 29 and 46 GB/s within minutes) moves both alike. ratio = its time / ours:
    the fraction of a plain read's rate at which ours streams the weights."""

    def __init__(self, nbytes: int, huge: bool = False):
        self.nbytes, self.huge = int(nbytes), huge   # huge: in 2 MiB pages, like weights kept there
        self.buf: Optional[torch.Tensor] = None

    def setup(self) -> None:
        if self.buf is None:
            _ensure_memory(self.nbytes, "the same-bytes read buffer")
            n = max(self.nbytes // 8, 1)   # written: no zero pages
            self.buf = (empty_hugepages(n, dtype=torch.int64).fill_(1) if self.huge
                        else torch.ones(n, dtype=torch.int64))

    def teardown(self) -> None:
        self.buf = None

    def __call__(self):
        return self.buf.sum()


def _with_read(st, nbytes: int, huge: bool = False):
    """(setup, teardown, reader) for a decode case whose state st has setup()/teardown()."""
    rd = SameBytesRead(nbytes, huge)

    def setup():
        st.setup()
        rd.setup()

    def teardown():
        rd.teardown()
        st.teardown()
    return setup, teardown, rd


def _int8_weight(w: torch.Tensor):
    """Per-output-channel symmetric int8 (what _weight_int8pack_mm takes): q [N, K] int8, s [N] bf16."""
    s = (w.abs().amax(dim=1).clamp_min(1e-8) / 127).bfloat16()
    q = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, s


def _bank(n: int, N: int, K: int, formats, seed: int) -> list:
    """n distinct random [N, K] weights (std 1/sqrt(K)) in each of ``formats``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randn(N, K, generator=g) / math.sqrt(K)
        d = {}
        if "fp8" in formats:
            d["fp8"] = quant.quantize_fp8(w, (GROUP, GROUP))
        if "bf16" in formats:
            d["bf16"] = w.bfloat16()
        if "int8" in formats:
            d["int8"] = _int8_weight(w)
        out.append(d)
        del w
    return out


def random_ids(T: int, E: int, top_k: int, seed: int) -> torch.Tensor:
    """[T, top_k] int32: top_k distinct experts per token, uniformly at random (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, E, generator=g).topk(top_k, dim=1).indices.to(torch.int32)


class GroupedDecode:
    """The prepared inputs of one decode-shaped grouped GEMM (see the section comment above).

    ``formats``: the weight formats to allocate in setup(): "fp8" (ours), "bf16" and "int8"
    (the torch baselines). ``masked``: ours is fp8_grouped_gemm_masked on an [E, M_max, K] copy
    of the same rows (M_max = the most rows any expert got; 1 at T=1). ``huge``: every format's
    weights in 2 MiB huge pages (leankernels.memory), else torch's default allocation."""

    def __init__(self, shape: MoeShape, proj: str, N: int, K: int, T: int, masked: bool = False,
                 formats=("fp8", "bf16", "int8"), seed: int = 0, huge: bool = False):
        self.shape, self.proj, self.N, self.K, self.T = shape, proj, N, K, T
        self.masked, self.formats, self.seed, self.huge = masked, tuple(formats), seed, huge
        E = shape.E
        ids = random_ids(T, E, shape.top_k, seed)
        used = torch.unique(ids)
        if shape.remap:
            g = torch.Generator().manual_seed(seed + 1)
            mask = torch.ones(E, dtype=torch.bool)
            mask[used.long()] = False
            rest = torch.nonzero(mask).flatten()
            spare = rest[torch.randperm(rest.numel(), generator=g)[:SPARE_EXPERTS]]
            pool = torch.sort(torch.cat([used.long(), spare])).values
            lut = torch.full((E,), -1, dtype=torch.int32)
            lut[pool] = torch.arange(pool.numel(), dtype=torch.int32)
            ids = lut[ids.long()]
        self.P = int(pool.numel()) if shape.remap else E
        self.used = int(used.numel())
        self.ids = ids
        self.plan = routing.plan(ids, self.P)
        self.offs = self.plan.offs
        counts, ends = self.plan.counts.tolist(), self.offs.tolist()
        self.segments = [(e, end - c, end) for e, (c, end) in enumerate(zip(counts, ends)) if c]
        self.rows = T * shape.top_k
        gx = torch.Generator().manual_seed(seed + 2)
        x = torch.randn(T, K, generator=gx).bfloat16()
        self.a, self.sa = routing.permute(x, self.plan, quantize=True)
        self.xr = routing.permute(x, self.plan)          # the same rows in bf16, for the baselines
        if masked:
            m_max = max(c for c in counts)
            kb = _cdiv(K, GROUP)
            self.a3 = torch.zeros(self.P, m_max, K, dtype=torch.uint8).view(torch.float8_e4m3fn)
            self.sa3 = torch.ones(self.P, m_max, kb)
            for e, lo, hi in self.segments:
                self.a3[e, : hi - lo] = self.a[lo:hi]
                self.sa3[e, : hi - lo] = self.sa[lo:hi]
            self.masked_m = self.plan.counts.clone()
        self.b = self.sb = self.wb = self.wbt = self.qi = self.si = self.out = self.out_i8 = None

    # -- sizes
    def touched_bytes(self, fmt: str = "fp8") -> int:
        """Weight bytes of the experts with >= 1 row (scales not counted)."""
        return self.used * self.N * self.K * _ELEM[fmt]

    def pool_bytes(self) -> int:
        return self.P * self.N * self.K * sum(_ELEM[f] for f in self.formats)

    # -- lifetime
    def setup(self) -> None:
        if self.b is not None:
            return
        P, N, K = self.P, self.N, self.K
        nb = min(BANK, P)
        _ensure_memory(self.pool_bytes() + nb * N * K * (4 + sum(_ELEM[f] for f in self.formats)),
                       f"{self.shape.model} {self.proj} ({P} experts allocated)")
        bank = _bank(nb, N, K, self.formats, seed=1000 + self.seed)
        empty = empty_hugepages if self.huge else torch.empty
        self.b = empty(P, N, K, dtype=torch.float8_e4m3fn)
        self.sb = torch.empty(P, _cdiv(N, GROUP), _cdiv(K, GROUP))
        for e in range(P):
            q, sc = bank[e % nb]["fp8"]
            self.b[e].copy_(q)
            self.sb[e].copy_(sc)
        if "bf16" in self.formats:
            self.wb = empty(P, N, K, dtype=torch.bfloat16)
            for e in range(P):
                self.wb[e].copy_(bank[e % nb]["bf16"])
            self.wbt = self.wb.transpose(-2, -1)   # F.grouped_mm takes [E, K, N]; the [E, N, K] view
        if "int8" in self.formats:
            self.qi = empty(P, N, K, dtype=torch.int8)
            self.si = torch.empty(P, N, dtype=torch.bfloat16)
            for e in range(P):
                q, sc = bank[e % nb]["int8"]
                self.qi[e].copy_(q)
                self.si[e].copy_(sc)
            self.i8_segments = [(lo, hi, self.qi[e], self.si[e]) for e, lo, hi in self.segments]
            self.out_i8 = torch.empty(self.rows, N, dtype=torch.bfloat16)
        del bank
        if self.masked:
            self.out = torch.empty(P, self.a3.shape[1], N, dtype=torch.bfloat16)
        else:
            self.out = torch.empty(self.rows, N, dtype=torch.bfloat16)

    def teardown(self) -> None:
        self.b = self.sb = self.wb = self.wbt = self.qi = self.si = self.out = self.out_i8 = None
        self.i8_segments = None

    # -- the timed calls
    def ours(self) -> torch.Tensor:
        if self.masked:
            return lkg.fp8_grouped_gemm_masked(self.a3, self.sa3, self.b, self.sb, self.masked_m, out=self.out)
        return lkg.fp8_grouped_gemm(self.a, self.sa, self.b, self.sb, self.offs, out=self.out)

    def bf16(self) -> torch.Tensor:
        return F.grouped_mm(self.xr, self.wbt, offs=self.offs)

    def int8(self) -> torch.Tensor:
        out = self.out_i8
        for lo, hi, q, sc in self.i8_segments:
            out[lo:hi] = torch.ops.aten._weight_int8pack_mm(self.xr[lo:hi], q, sc)
        return out

    # -- the check
    def _rows(self, out: torch.Tensor) -> torch.Tensor:
        """Ours in contiguous row order [R, N] (the masked output gathered back)."""
        if not self.masked:
            return out
        return torch.cat([out[e, : hi - lo] for e, lo, hi in self.segments])

    def check(self, fn=None) -> bool:
        """Ours (or ``fn``, a variant of ours) against leankernels.reference on the first 256
        output columns of the first and last expert with rows; the torch baselines against ours
        on every row (loosely: their weights are bf16 / int8, ours FP8)."""
        got = self._rows((fn or self.ours)().float())
        n = min(self.N, 2 * GROUP)
        for e, lo, hi in (self.segments[0], self.segments[-1]):
            want = ref.fp8_gemm(self.a[lo:hi], self.sa[lo:hi], self.b[e, :n], self.sb[e, : _cdiv(n, GROUP)],
                                torch.float32)
            if not _diff(got[lo:hi, :n], want) < 1e-4:
                return False
        if fn is None:
            if "bf16" in self.formats and not _diff(self.bf16().float(), got) < 1e-2:
                return False
            if "int8" in self.formats and not _diff(self.int8().float(), got) < 1e-2:
                return False
        return True


class DenseDecode:
    """T rows through one dense [N, K] weight: ours fp8_gemm, torch bf16 F.linear and int8
    weight-only on the same weight; prepared like GroupedDecode (weights in setup())."""

    def __init__(self, T: int, N: int, K: int, seed: int = 0, huge: bool = False):
        self.T, self.N, self.K, self.seed, self.huge = T, N, K, seed, huge
        g = torch.Generator().manual_seed(seed + 2)
        self.x = torch.randn(T, K, generator=g).bfloat16()
        self.a, self.sa = quant.quantize_fp8(self.x, (1, GROUP))
        self.b = self.sb = self.wb = self.qi = self.si = None

    def touched_bytes(self, fmt: str = "fp8") -> int:
        return self.N * self.K * _ELEM[fmt]

    def setup(self) -> None:
        if self.b is not None:
            return
        _ensure_memory(8 * self.N * self.K, f"dense N={self.N} K={self.K}")
        d = _bank(1, self.N, self.K, ("fp8", "bf16", "int8"), seed=2000 + self.seed)[0]
        (self.b, self.sb), self.wb, (self.qi, self.si) = d["fp8"], d["bf16"], d["int8"]
        if self.huge:
            self.b, self.wb, self.qi = to_hugepages(self.b), to_hugepages(self.wb), to_hugepages(self.qi)

    def teardown(self) -> None:
        self.b = self.sb = self.wb = self.qi = self.si = None

    def ours(self) -> torch.Tensor:
        return lkg.fp8_gemm(self.a, self.sa, self.b, self.sb)

    def bf16(self) -> torch.Tensor:
        return F.linear(self.x, self.wb)

    def int8(self) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(self.x, self.qi, self.si)

    def check(self) -> bool:
        got = self.ours().float()
        n = min(self.N, 2 * GROUP)
        want = ref.fp8_gemm(self.a, self.sa, self.b[:n], self.sb[: _cdiv(n, GROUP)], torch.float32)
        return (_diff(got[:, :n], want) < 1e-4 and _diff(self.bf16().float(), got) < 1e-2
                and _diff(self.int8().float(), got) < 1e-2)


def _model(shape: MoeShape, quick: bool) -> MoeShape:
    if not quick:
        return shape
    return MoeShape(shape.model + " stand-in", shape.E, shape.top_k,
                    tuple((p, _quick_dim(N), _quick_dim(K)) for p, N, K in shape.projs), shape.remap)


def _extra(st, key: str) -> dict:
    return {"id": key, "bytes are": "FP8 weight bytes of the experts with >= 1 row (scales not counted)",
            "weight bytes fp8 touched": st.touched_bytes("fp8"),
            "weight bytes bf16 touched": st.touched_bytes("bf16"),
            "weight bytes int8 touched": st.touched_bytes("int8")}


HUGE_NOTE = ", 2 MiB pages"   # case-name suffix: every format's weights and the same-bytes read in huge pages


def grouped_decode_case(shape: MoeShape, proj: str, T: int, masked: bool = False, quick: bool = False,
                        huge: bool = False) -> Case:
    shape = _model(shape, quick)
    N, K = next((n, k) for p, n, k in shape.projs if p == proj)
    st = GroupedDecode(shape, proj, N, K, T, masked=masked, huge=huge)
    layout = "masked" if masked else "contiguous"
    where = f" ({st.P} of {shape.E} allocated)" if shape.remap else ""
    extra = _extra(st, f"{shape.model.split()[0]}-{proj.replace('/', '')}-T{T}-{layout}{'-2m' if huge else ''}")
    extra.update({"experts used": st.used, "experts allocated": st.P, "rows": st.rows, "layout": layout})
    if masked:
        extra["M_max"] = int(st.a3.shape[1])
    setup, teardown, rd = _with_read(st, st.touched_bytes(), huge)
    return Case(domain="gemm", name=f"fp8_grouped_gemm{'_masked' if masked else ''} decode {shape.model} {proj}"
                                    f"{HUGE_NOTE if huge else ''}",
                shape=f"T={T} top{shape.top_k} E={shape.E} N={N} K={K}: {st.used} experts, {st.rows} rows{where}",
                ours=st.ours, baselines={BF16_BASELINE: st.bf16, INT8_BASELINE: st.int8, READ_BASELINE: rd},
                flops=2.0 * st.rows * N * K, bytes=float(st.touched_bytes()), check=st.check, bound="memory",
                ceiling="read_2m" if huge else "read", rotate=_FLUSH, setup=setup, teardown=teardown, extra=extra)


def dense_decode_case(T: int, quick: bool = False, huge: bool = False) -> Case:
    N, K = DENSE_DECODE_NK
    if quick:
        N, K = _quick_dim(N), _quick_dim(K)
    st = DenseDecode(T, N, K, huge=huge)
    setup, teardown, rd = _with_read(st, st.touched_bytes(), huge)
    return Case(domain="gemm", name="fp8_gemm decode dense" + (" stand-in" if quick else "") + (HUGE_NOTE if huge else ""),
                shape=f"T={T} N={N} K={K}", ours=st.ours,
                baselines={BF16_DENSE: st.bf16, INT8_DENSE: st.int8, READ_BASELINE: rd},
                flops=2.0 * T * N * K, bytes=float(st.touched_bytes()), check=st.check, bound="memory",
                ceiling="read_2m" if huge else "read", rotate=_FLUSH, setup=setup, teardown=teardown,
                extra=_extra(st, f"dense-T{T}{'-2m' if huge else ''}"))


def _on_cpu_path(path: str, fn):
    """fn run with the CPU path `path` forced, the path in use restored after."""
    def run():
        cur = _lib.cpu_path()
        _lib.set_cpu_path(path)
        try:
            return fn()
        finally:
            _lib.set_cpu_path(cur)
    return run


def cpu_paths_case(quick: bool = False) -> Optional[Case]:
    """The V2-Lite T=1 gate/up GEMM on the CPU path in use (ours) and on every other path this
    CPU runs (lk.set_cpu_path, forced per call, the path in use restored after): ratio = that
    path's time / the path in use's time, so "AVX2 within 1.5x of the best path" reads as the
    avx2 row's ratio <= 1.5x when the path in use is the fastest (a row below 1x: that forced
    path beat the one in use). None when the CPU runs only one path."""
    cur, paths = _lib.cpu_path(), _lib.cpu_paths()
    others = [p for p in paths if p != cur]
    if not others:
        return None
    shape = _model(V2_LITE, quick)
    proj, N, K = shape.projs[0]
    st = GroupedDecode(shape, proj, N, K, 1, formats=("fp8",))

    def on(path):
        return _on_cpu_path(path, st.ours)

    def check():
        return all(st.check(on(p)) for p in paths)

    extra = _extra(st, "cpu-paths")
    extra.update({"path in use": cur, "paths": paths})
    return Case(domain="gemm", name=f"fp8_grouped_gemm decode {shape.model} {proj}, CPU path {cur} (in use)",
                shape=f"T=1 top{shape.top_k} E={shape.E} N={N} K={K}: {st.used} experts, {st.rows} rows",
                ours=on(cur), baselines={f"leankernels {p} path (forced)": on(p) for p in others},
                flops=2.0 * st.rows * N * K, bytes=float(st.touched_bytes()), check=check, bound="memory",
                ceiling="read", rotate=_FLUSH, setup=st.setup, teardown=st.teardown, extra=extra)


def _prefill_mnk(quick: bool) -> tuple[int, int, int]:
    M, N, K = PREFILL_MNK
    return (M // 4, _quick_dim(N), _quick_dim(K)) if quick else (M, N, K)


def prefill_case(quick: bool = False) -> Case:
    """Large M stays near torch's bf16 matmul rate: ratio = torch bf16 time / ours = our rate as a
    fraction of torch bf16's on this shape; % of ceiling against the measured bf16 matmul rate."""
    c = _dense_case("cpu", *_prefill_mnk(quick), name="fp8_gemm prefill dense", bound="compute", ceiling="bf16_matmul")
    c.extra["ratio is"] = "our rate / torch bf16 matmul rate on this shape"
    if _lib.cpu_path() == "amx":  # what the AMX tiles buy: the same GEMM on the vdpbf16ps kernels
        c.baselines["leankernels avx512bf16 path (forced)"] = _on_cpu_path("avx512bf16", c.ours)
        c.extra["ratio is"] += "; avx512bf16 row: that path's time / the amx path's"
    return c


# The CPU paths that run the products in fp32 (no AVX512_BF16): what a CPU without it runs.
FP32_PATHS = ("avx512", "avx2")


def prefill_path_case(path: str, quick: bool = False) -> Optional[Case]:
    """The prefill GEMM with a CPU path that multiplies in fp32 forced (`path`, one of
    FP32_PATHS), against torch's fp32 matmul (the rate such a CPU gets from torch: its bf16
    matmul has no native products there) and torch's bf16 matmul on this CPU, in the same run.
    None when this CPU cannot run `path` or it is the path in use (prefill_case measures that)."""
    if path not in _lib.cpu_paths() or path == _lib.cpu_path():
        return None
    c = _dense_case("cpu", *_prefill_mnk(quick), name=f"fp8_gemm prefill dense, CPU path {path} (forced)",
                    bound="compute", ceiling="fp32_matmul", fp32=True)
    c.ours, c.check = _on_cpu_path(path, c.ours), _on_cpu_path(path, c.check)
    c.extra["ratio is"] = f"torch's time / the {path} path's; % of ceiling against the measured fp32 matmul rate"
    return c


def decode_specs(quick: bool = False) -> list[tuple]:
    """(kind, args) of every decode-shaped CPU case, in run order; kind in "grouped", "masked",
    "dense", and "grouped_2m" / "dense_2m" (T=1 with every weight in 2 MiB huge pages, where
    the OS has them: see leankernels.memory)."""
    Ts = DECODE_T_QUICK if quick else DECODE_T
    out = [("grouped", (V2_LITE, proj, T)) for T in Ts for proj, _, _ in V2_LITE.projs]
    out += [("grouped", (V3_EXPERTS, proj, T)) for T in Ts for proj, _, _ in V3_EXPERTS.projs]
    out += [("masked", (V3_EXPERTS, proj, 1)) for proj, _, _ in V3_EXPERTS.projs]
    out += [("dense", (T,)) for T in Ts]
    if hugepages_available():
        out += [("grouped_2m", (V2_LITE, proj, 1)) for proj, _, _ in V2_LITE.projs] + [("dense_2m", (1,))]
    return out


def spec_id(spec: tuple) -> str:
    kind, args = spec
    pages = "-2m" if kind.endswith("_2m") else ""
    if kind.startswith("dense"):
        return f"dense-T{args[0]}{pages}"
    shape, proj, T = args
    return f"{shape.model}-{proj.replace('/', '')}-T{T}-{'masked' if kind == 'masked' else 'contiguous'}{pages}"


def decode_case(spec: tuple, quick: bool = False) -> Case:
    kind, args = spec
    huge = kind.endswith("_2m")
    if kind.startswith("dense"):
        return dense_decode_case(*args, quick=quick, huge=huge)
    return grouped_decode_case(*args, masked=kind == "masked", quick=quick, huge=huge)


def decode_cases(device: str, quick: bool) -> list[Case]:
    """The decode-shaped CPU cases (none on GPUs): see the section comment above. Each case
    allocates its weights only while it runs."""
    if device != "cpu":
        return []
    out = [decode_case(spec, quick) for spec in decode_specs(quick)]
    paths = cpu_paths_case(quick)
    if paths is not None:
        out.append(paths)
    out.append(prefill_case(quick))
    out += [c for c in (prefill_path_case(p, quick) for p in FP32_PATHS) if c is not None]
    return out


def base_specs(device: str, quick: bool) -> list[tuple]:
    """(kind, args, kwargs) of the other GEMM cases ("grouped": _grouped_case, "dense":
    _dense_case), so a caller can build them one at a time (base_case)."""
    G, D = "grouped", "dense"
    if device == "cpu":
        if quick:
            return [(G, ("cpu", 4, 16, 512, 896), {}), (D, ("cpu", 32, 512, 896), {})]
        return [
            (G, ("cpu", 8, 16, 4096, 7168), {}),                  # MoE decode step (the judged shape)
            (G, ("cpu", 8, 16, 4096, 7168), {"masked": True}),
            (G, ("cpu", 4, 128, 1024, 1792), {}),                 # prefill, DeepSeek-V3 / 4
            (D, ("cpu", 64, 2112, 7168), {}),
            (D, ("cpu", 128, 896, 2048), {}),
        ]
    if quick:
        return [(G, (device, 4, 256, 4096, 7168), {}), (D, (device, 128, 4096, 7168), {})]
    out = [(D, (device, M, N, K), {}) for M in (64, 128, 4096) for N, K in DEEPSEEK_NK]
    out += [(G, (device, E, m, N, K), {}) for E, m in ((4, 8192), (8, 4096)) for N, K in MOE_NK]
    out += [(G, (device, E, m, N, K), {"masked": True}) for E, m in ((1, 1024), (2, 512), (4, 256)) for N, K in MOE_NK]
    return out


def base_label(spec: tuple) -> str:
    """The "name shape" the case of ``spec`` will have, without building it."""
    kind, args, kw = spec
    if kind == "dense":
        _, M, N, K = args
        return f"fp8_gemm dense M={M} N={N} K={K}"
    _, E, m, N, K = args
    return f"fp8_grouped_gemm {'masked' if kw.get('masked') else 'contiguous'} {E}x{m} N={N} K={K}"


def base_case(spec: tuple) -> Case:
    kind, args, kw = spec
    return (_dense_case if kind == "dense" else _grouped_case)(*args, **kw)


def base_cases(device: str, quick: bool) -> list[Case]:
    return [base_case(spec) for spec in base_specs(device, quick)]


# ------------------------------------------------------------------- training: MoE wgrad
# The weight gradient of a grouped linear layer (DeepSeek-V3 recipe): dW[e] = dy_e.T @ x_e with
# dy and x quantized in 1x128 groups along tokens (quantize_fp8_transposed), then the k-grouped
# GEMM. V2-Lite-like experts (N_out = 1408 or 2816 rows of dW, K = 2048 columns) with ~4096
# routed tokens split over E experts (multinomial: uneven, unaligned). Baselines of the same
# FLOPs in the same run: one torch bf16 matmul [N_out, T] @ [T, K] (the dense rate; its output is
# E times smaller), and torch bf16 per-expert matmuls into a fresh [E, N_out, K] bf16 output (what
# a user without FP8 kernels runs; ours writes fp32, twice the bytes: at E=64 first-touching that
# output is a large part of both times). ratio = baseline time / ours; "% of ceiling" against the
# measured bf16 matmul rate. Transposed quantization is memory bound: GB/s against a bf16
# transposed copy (x.T.contiguous()) and quantize_fp8 (no transpose) of the same x.
WGRAD_SHAPES = ((8, 1408, 2048), (64, 1408, 2048), (8, 2816, 2048), (64, 2816, 2048))  # (E, N_out, K)
WGRAD_TOKENS = 4096


def _wgrad_split(E: int, T: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(E), T, replacement=True, generator=g).bincount(minlength=E)
    return counts.cumsum(0).to(torch.int32).to(device)


def wgrad_case(device: str, E: int, N_out: int, K: int, T: int = WGRAD_TOKENS, seed: int = 0,
               reuse: bool = False) -> Case:
    """reuse: ours accumulates into one fp32 gradient buffer kept across calls (out=,
    accumulate=True) and torch's per-expert mm writes into one bf16 buffer kept across calls;
    else each allocates a fresh output per call."""
    st = {}

    def setup():
        g = torch.Generator().manual_seed(seed)
        dy = torch.randn(T, N_out, generator=g).bfloat16().to(device)
        x = torch.randn(T, K, generator=g).bfloat16().to(device)
        offs = _wgrad_split(E, T, seed, device)
        a, sa = quant.quantize_fp8_transposed(dy, offs)
        b, sb = quant.quantize_fp8_transposed(x, offs)
        ends = [0] + offs.tolist()
        st.update(dy=dy, x=x, dyt=dy.T.contiguous(), offs=offs, a=a, sa=sa, b=b, sb=sb, ends=ends)
        if reuse:
            st.update(grad=torch.zeros(E, N_out, K, device=device),
                      out_bf16=torch.zeros(E, N_out, K, dtype=torch.bfloat16, device=device))

    def teardown():
        st.clear()

    def ours():
        if reuse:
            return lkg.fp8_k_grouped_gemm(st["a"], st["sa"], st["b"], st["sb"], st["offs"], out=st["grad"],
                                          accumulate=True)
        return lkg.fp8_k_grouped_gemm(st["a"], st["sa"], st["b"], st["sb"], st["offs"])

    def bf16_dense():
        return st["dyt"] @ st["x"]

    def bf16_per_expert():  # a fresh output per call as ours allocates one (reuse: one kept buffer)
        e_ends, dy, x = st["ends"], st["dy"], st["x"]
        out = st["out_bf16"] if reuse else torch.empty(E, N_out, K, dtype=torch.bfloat16, device=device)
        for e in range(E):
            torch.mm(dy[e_ends[e]:e_ends[e + 1]].T, x[e_ends[e]:e_ends[e + 1]], out=out[e])
        return out

    def check():
        e = max(range(E), key=lambda i: st["ends"][i + 1] - st["ends"][i])  # the largest expert
        s, t = st["ends"][e], st["ends"][e + 1]
        want = st["dy"][s:t].double().T @ st["x"][s:t].double()
        if not reuse:
            return _diff(ours()[e], want) < 1e-3
        before = st["grad"][e].clone()
        return _diff(ours()[e] - before, want) < 1e-3

    G = _cdiv(T, GROUP) + E - 1
    nbytes = (N_out + K) * T + 4 * (N_out + K) * G + 4 * E * N_out * K
    name = "fp8_k_grouped_gemm wgrad" + (", accumulated into a kept fp32 buffer" if reuse else "")
    return Case(domain="gemm", name=name, shape=f"E={E} T={T} N_out={N_out} K={K}",
                ours=ours, baselines={"torch.matmul bf16 (same FLOPs, one [N_out, K] output)": bf16_dense,
                                      "torch.mm bf16 per expert": bf16_per_expert},
                flops=2.0 * T * N_out * K, bytes=float(nbytes), check=check, bound="compute",
                ceiling="bf16_matmul", setup=setup, teardown=teardown,
                extra={"output bytes fp32": 4 * E * N_out * K, "output": "kept across calls" if reuse else "fresh per call",
                       "ratio is": "baseline time / ours (our rate as a fraction of the baseline's)"})


def quantize_transposed_case(device: str, E: int, T: int, K: int, seed: int = 0) -> Case:
    st = {}

    def setup():
        g = torch.Generator().manual_seed(seed)
        st.update(x=torch.randn(T, K, generator=g).bfloat16().to(device), offs=_wgrad_split(E, T, seed, device))

    def teardown():
        st.clear()

    def ours():
        return quant.quantize_fp8_transposed(st["x"], st["offs"])

    def check():
        q, s = ours()
        qr, sr = ref.quantize_fp8_transposed(st["x"][:, :256], st["offs"])
        return torch.equal(q[:256].view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s[:256], sr)

    G = _cdiv(T, GROUP) + E - 1
    return Case(domain="gemm", name="quantize_fp8_transposed", shape=f"E={E} T={T} K={K} bf16",
                ours=ours, baselines={"x.T.contiguous() bf16 copy": lambda: st["x"].T.contiguous(),
                                      "quantize_fp8 1x128 (no transpose)": lambda: quant.quantize_fp8(st["x"])},
                bytes=float(3 * T * K + 4 * K * G), check=check, bound="memory", setup=setup, teardown=teardown)


def wgrad_specs(device: str, quick: bool) -> list[tuple]:
    """(kind, args) of the wgrad cases: ("gemm", (E, N_out, K, T)) and ("quant", (E, T, K))."""
    if quick:
        return [("gemm", (4, 176, 256, 512)), ("quant", (4, 512, 256))]
    out = [("gemm", (E, N, K, WGRAD_TOKENS)) for E, N, K in WGRAD_SHAPES]
    # E=64: most of a fresh output's time is first-touching it (0.74-1.48 GB fp32)
    out += [("gemm_reuse", (E, N, K, WGRAD_TOKENS)) for E, N, K in WGRAD_SHAPES if E == 64]
    return out + [("quant", (8, WGRAD_TOKENS, 2048)), ("quant", (64, WGRAD_TOKENS, 2816))]


def wgrad_spec_id(spec: tuple) -> str:
    kind, args = spec
    if kind.startswith("gemm"):
        return "wgrad-E{}-N{}-K{}-T{}".format(*args) + ("-accumulate" if kind == "gemm_reuse" else "")
    return "quantT-E{}-T{}-K{}".format(*args)


def wgrad_spec_case(device: str, spec: tuple) -> Case:
    kind, args = spec
    if kind.startswith("gemm"):
        return wgrad_case(device, *args, reuse=kind == "gemm_reuse")
    return quantize_transposed_case(device, *args)


def wgrad_cases(device: str, quick: bool) -> list[Case]:
    return [wgrad_spec_case(device, spec) for spec in wgrad_specs(device, quick)]


def cases(device: str, quick: bool) -> list[Case]:
    return base_cases(device, quick) + decode_cases(device, quick) + wgrad_cases(device, quick)
