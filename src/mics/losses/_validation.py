"""Argument checks and the float32 upcast shared by the losses.

Value checks (signs, ranges) read tensor contents, which costs a device sync and breaks graphs under
``torch.compile``; they are skipped while compiling, shape checks never are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_HALF_TYPES = (torch.float16, torch.bfloat16)


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half type (autocast output), else unchanged (float64 stays float64)."""
    return x.float() if x.dtype in _HALF_TYPES else x


def check_values() -> bool:
    """Whether checks that read tensor values may run (not while ``torch.compile`` traces)."""
    return not torch.compiler.is_compiling()


def check_float_matrix(name: str, x: Tensor, rows: int | None = None, cols: int | None = None) -> None:
    """Raise ValueError unless ``x`` is a floating tensor of shape [rows, cols] (None = any size)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")


def check_temperature(temp: Tensor | float) -> None:
    """Raise ValueError unless ``temp`` is a positive finite scalar (float or one-element tensor)."""
    if isinstance(temp, Tensor):
        if temp.numel() != 1:
            raise ValueError(f"temp must be a scalar, got a tensor of shape {tuple(temp.shape)}")
        if not temp.is_floating_point():
            raise ValueError(f"temp must be a floating-point tensor, got {temp.dtype}")
        if not check_values():
            return
        value = float(temp.detach())
    elif isinstance(temp, int | float):
        value = float(temp)
    else:
        raise ValueError(f"temp must be a float or a tensor, got {type(temp).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temp must be positive and finite, got {value}")


def check_unit_interval(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1]."""
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
