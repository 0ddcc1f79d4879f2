"""Loading of the compiled core (leankernels._C) and the small helpers every op wrapper uses."""
from __future__ import annotations

import functools
import os

import torch

from . import _C  # noqa: F401  (the extension; import errors should surface here, loudly)

# Mirrors lk::DType in csrc/common/common.h.
_DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float8_e4m3fn: 3,
    torch.int32: 4,
    torch.int64: 5,
}

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128


def C():
    return _C


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]


def device_args(t: torch.Tensor) -> tuple[int, int]:
    """(device index, stream handle) for a launch: (-1, 0) on the CPU, else the current stream."""
    if t.is_cpu:
        return -1, 0
    if t.is_cuda:
        if not build_info()["cuda"]:
            raise RuntimeError(
                "leankernels was built without CUDA kernels, so it cannot run on CUDA tensors; "
                "rebuild with nvcc on PATH (see README)"
            )
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(index).cuda_stream
    raise ValueError(f"leankernels: unsupported device {t.device}")


# The CPU kernels exist once per instruction-set level; the best one this CPU runs is used
# unless LEANKERNELS_CPU names another (csrc/cpu/isa.h).
CPU_PATHS = ("amx", "avx512bf16", "avx512", "avx2", "neon", "generic")


def cpu_paths() -> list[str]:
    """CPU kernel paths this machine can run, best first (e.g. ``["avx512bf16", "avx512", "avx2",
    "generic"]`` on a Zen 4; ``["neon", "generic"]`` on arm64)."""
    return list(_C.cpu_paths())


def cpu_path() -> str:
    """The CPU kernel path in use."""
    return str(_C.cpu_path())


def set_cpu_path(name: str) -> None:
    """Use the CPU kernels built for ``name`` (one of ``cpu_paths()``) from now on, process-wide."""
    if not isinstance(name, str) or name not in CPU_PATHS:
        raise ValueError(f"leankernels: CPU path must be one of {', '.join(CPU_PATHS)}; got {name!r}")
    if not _C.set_cpu_path(name):
        raise ValueError(f"leankernels: this CPU cannot run the {name!r} kernels; it runs {', '.join(cpu_paths())}")


def _cpu_path_from_env() -> None:
    name = os.environ.get("LEANKERNELS_CPU", "").strip()
    if not name:
        return
    try:
        set_cpu_path(name)
    except ValueError as e:
        raise ImportError(f"LEANKERNELS_CPU={name!r}: {e}") from None


_cpu_path_from_env()


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    return dict(_C.build_info())


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled in and a CUDA device is usable."""
    return bool(build_info()["cuda"]) and torch.cuda.is_available() and _C.cuda_device_count() > 0
