"""The benchmark case contract shared by every domain's case module.

Each domain module in this package (quant.py, gemm.py, routing.py, mla.py) exposes
``cases(device: str, quick: bool) -> list[Case]``. The runner times ``ours`` and every
baseline in the same process, with the same inputs, and reports ratios against them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Case:
    domain: str                      # "quant" | "gemm" | "routing" | "mla"
    name: str                        # e.g. "fp8_grouped_gemm contiguous"
    shape: str                       # human-readable shape, e.g. "8x4096 N=4096 K=7168"
    ours: Callable[[], object]       # runs our op once on prepared inputs
    baselines: dict[str, Callable[[], object]]  # name -> callable, e.g. {"F.grouped_mm bf16": fn}
    flops: float = 0.0               # useful FLOPs of one call (0 for pure data movement)
    bytes: float = 0.0               # minimal DRAM bytes one call must move
    check: Optional[Callable[[], bool]] = None   # correctness check of ours vs reference
    bound: str = "memory"            # "memory" or "compute": which ceiling the % is against
    extra: dict = field(default_factory=dict)     # anything else worth printing / saving
