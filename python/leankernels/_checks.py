"""Argument validation shared by the public wrappers: every error names the argument.

These run on every eager call (a decode step makes thousands), so the passing path is kept to
a few attribute reads; the messages are only built when a check fails.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

_Tensor = torch.Tensor


def tensor(name: str, t, dtypes: Iterable[torch.dtype] | None = None, dim: int | Iterable[int] | None = None):
    if (isinstance(t, _Tensor) and (dtypes is None or (type(dtypes) is tuple and t.dtype in dtypes))
            and (dim is None or t.dim() == dim) and (t.is_cpu or t.is_cuda or t.is_meta)):
        return t  # the common case in one expression; anything else takes the checks below
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or a CuPy array), got {type(t).__name__}")
    if dtypes is not None:
        if type(dtypes) is not tuple:
            dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if t.dim() not in dims:
            raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions; got shape {tuple(t.shape)}")
    if not (t.is_cpu or t.is_cuda or t.is_meta):
        raise ValueError(f"{name} is on {t.device}; leankernels runs on cpu and cuda tensors")
    return t


def same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must share one device")
    return first.device


def same_device2(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """same_device for two tensors, without building keyword dicts (the hot path of the ops)."""
    if a.is_cpu and b.is_cpu:
        return
    if b.device != a.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; all tensors must share one device")


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if t.shape != expected and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}; got {tuple(t.shape)}")


def no_grad_needed(op: str, hint: str, *tensors) -> None:
    """Raise now (not at backward time) when a forward-only op gets an input that requires grad
    while grad mode is on. Called only off the eager fast path (``_ops.direct`` is False
    whenever autograd would need the op), so decode-size calls do not pay for it."""
    if not torch.is_grad_enabled():
        return
    for t in tensors:
        if isinstance(t, _Tensor) and t.requires_grad:
            raise RuntimeError(f"{op} has no gradient (an input requires grad); {hint}")


# os.environ's dict of encoded keys (CPython's os._Environ, which updates it on every
# assignment and deletion): a membership test there costs ~0.04 us, against ~0.6 us for
# `in os.environ` / os.environ.get (which raise and catch KeyError when the key is unset).
# Elsewhere, os.environ itself.
_DEBUG_KEY = "LEANKERNELS_DEBUG"
try:
    _environ_keys, _debug_key = os.environ._data, os.environ.encodekey(_DEBUG_KEY)
    if not isinstance(_environ_keys, dict):
        raise TypeError
except (AttributeError, TypeError):  # pragma: no cover
    _environ_keys, _debug_key = os.environ, _DEBUG_KEY


def debug() -> bool:
    """LEANKERNELS_DEBUG=1 (anything but unset, "" or "0"): the ops then also check values that
    live on the device (group sizes, cache indices) at the cost of a host copy. Read on every
    call, so it can be switched at run time."""
    if _debug_key not in _environ_keys:  # the common case: unset
        return False
    return os.environ.get(_DEBUG_KEY, "0") not in ("", "0")
