"""Shared test fixtures and helpers.

Conventions (DESIGN.md "Tests"): fresh seeded random inputs (never zeros), outputs poisoned
before a kernel writes them, CUDA tests skip without a GPU, every kernel compared against
leankernels.reference.
"""
from __future__ import annotations

import os

import pytest
import torch

import leankernels

HAS_CUDA = leankernels.cuda_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of leankernels")

# Devices every kernel test runs on: the CPU always, CUDA when present (else reported skipped).
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(*shape, seed: int = 0, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Fresh standard-normal data from a per-test seed, made on the CPU then moved."""
    x = torch.randn(*shape, generator=seeded(seed)) * scale
    return x.to(dtype=dtype, device=device)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with a value no kernel writes (NaN for floats, -7 / 0x7f for others)."""
    if t.dtype.is_floating_point:
        if t.dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(0x7F)
        else:
            t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


def gemm_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's accuracy metric: 1 - 2*sum(x*y) / sum(x^2 + y^2), in float64."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)




def pytest_report_header(config):
    info = leankernels.build_info()
    return (f"leankernels {leankernels.__version__}: cuda build={info['cuda']} archs={info['cuda_archs']} "
            f"cuda available={HAS_CUDA} torch={torch.__version__} threads={torch.get_num_threads()} "
            f"LEANKERNELS_DEBUG={os.environ.get('LEANKERNELS_DEBUG', '0')}")


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck, working around its schema test on float8 inputs.

    The schema test compares inputs before/after with torch.allclose, which PyTorch does not
    implement for float8 on the CPU; for such ops we run the other opcheck tests and check
    the no-mutation part of the schema ourselves, bit for bit.
    """
    kwargs = kwargs or {}
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if not any(t.dtype == torch.float8_e4m3fn for t in tensors):
        torch.library.opcheck(op, args, kwargs)
        return
    # Arguments the schema declares as written (Tensor(a!), e.g. out=) may change; nothing else.
    written = {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    names = [a.name for a in op._schema.arguments]
    inputs = [a for n, a in list(zip(names, args)) + list(kwargs.items())
              if isinstance(a, torch.Tensor) and n not in written]
    before = [t.clone() for t in inputs]
    torch.library.opcheck(op, args, kwargs,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    op(*args, **kwargs)
    for b, t in zip(before, inputs):
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:
            assert torch.equal(b.view(torch.uint8), t.view(torch.uint8)), "op mutated an input"
        else:
            assert torch.equal(b.nan_to_num(), t.nan_to_num()), "op mutated an input"


@pytest.fixture(params=leankernels.cpu_paths())
def cpu_path(request):
    """Each CPU path this machine can run (csrc/cpu/isa.h), forced for the test, then restored."""
    old = leankernels.cpu_path()
    leankernels.set_cpu_path(request.param)
    yield request.param
    leankernels.set_cpu_path(old)
