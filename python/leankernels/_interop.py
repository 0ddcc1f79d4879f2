"""CuPy (and any DLPack producer) interop: arrays in, arrays of the same kind out, zero-copy.

CuPy has no float8 dtype, so FP8 data crosses as uint8 arrays of the same shape (the bits
are the e4m3fn bytes); an op given a uint8 CuPy array where it expects FP8 reads it as such.
"""
from __future__ import annotations

import torch


_DL_CUDA, _DL_CUDA_MANAGED = 2, 13  # DLPack device types


def is_foreign(x) -> bool:
    """A non-torch GPU array speaking DLPack (CuPy, or any CUDA producer). CPU arrays such as
    NumPy's are not taken: pass torch.from_numpy(a) explicitly."""
    if isinstance(x, torch.Tensor) or not hasattr(x, "__dlpack_device__"):
        return False
    try:
        return x.__dlpack_device__()[0] in (_DL_CUDA, _DL_CUDA_MANAGED)
    except Exception:
        return False


def to_torch(x, fp8: bool = False):
    """A torch view of a DLPack array (no copy); uint8 reinterpreted as e4m3fn when fp8."""
    if isinstance(x, torch.Tensor) or not is_foreign(x):
        return x
    t = torch.from_dlpack(x)
    if fp8 and t.dtype == torch.uint8:
        t = t.view(torch.float8_e4m3fn)
    return t


def like_input(t: torch.Tensor, template):
    """Return t as the same kind of array as template (CuPy in, CuPy out)."""
    if isinstance(template, torch.Tensor) or not is_foreign(template):
        return t
    import cupy  # only reached when a CuPy array came in

    if t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return cupy.from_dlpack(t)
