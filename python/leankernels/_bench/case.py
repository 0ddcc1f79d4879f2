"""The benchmark case contract shared by every domain's case module.

Each domain module in this package (quant.py, gemm.py, routing.py, mla.py, nn.py) exposes
``cases(device: str, quick: bool) -> list[Case]``. The runner times ``ours`` and every
baseline in the same process, with the same inputs, and reports ratios against them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence


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
    # Optional fields (the runner works without them):
    rotate: Optional[Callable[[], None]] = None   # switch ours/baselines to the next prepared
    #   input set (see InputSets); the runner calls it outside the timed region before every
    #   timed run, so inputs do not sit in cache between runs
    ceiling: Optional[str] = None    # name of the measured ceiling the "% of ceiling" is taken
    #   against ("copy", "bf16_matmul", "fp8_matmul", ...); default: "copy" when bound is
    #   "memory", else the best matmul rate measured on the device
    setup: Optional[Callable[[], None]] = None     # allocate the case's big inputs; the runner
    #   calls it right before the case's check and timing (cases() then only describes the
    #   case, so a domain's cases do not all hold their weights at once)
    teardown: Optional[Callable[[], None]] = None  # free what setup allocated; called after the
    #   case, also when it failed
    calls: int = 1                   # for microsecond calls: each timed sample runs ours (and
    #   each baseline) this many times back to back and the runner reports the time per call,
    #   so ours and the baselines are measured alike (steady state, timer overhead amortised)
    min_reps: int = 0                # at least this many timed calls (on top of the run's own
    #   minimum): for slow, noisy cases (a whole generate() takes ~1 s, so the time budget alone
    #   gives 3 samples and their median moves with the machine's memory phase)


class InputSets:
    """Several prepared input sets for one case, for Case.rotate.

    The case's callables read ``sets.current``; pass ``sets.advance`` as ``Case.rotate``::

        sets = InputSets([make_inputs(seed) for seed in range(3)])
        Case(..., ours=lambda: op(*sets.current), rotate=sets.advance)
    """

    def __init__(self, sets: Sequence):
        if not sets:
            raise ValueError("sets must hold at least one input set")
        self.sets = list(sets)
        self.index = 0

    @property
    def current(self):
        return self.sets[self.index]

    def advance(self) -> None:
        self.index = (self.index + 1) % len(self.sets)
