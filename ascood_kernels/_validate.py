"""Argument checks shared by the public ops.

Every check raises before any kernel runs, with a message that names the
argument and says what was expected, so a bad call never reaches C++/CUDA.
"""
from __future__ import annotations

import math
import numbers

import torch

#: dtypes every op accepts (float64 is accepted too: it is what gradcheck and
#: the float64 reference comparisons use).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, *, min_rank: int = 2, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank >= ``min_rank`` with an accepted dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if t.dim() < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank} (batch first), got shape {tuple(t.shape)}")
    return t


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on {name_a}'s device {a.device}, got {b.device}")


def same_dtype(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have {name_a}'s dtype {a.dtype}, got {b.dtype}")


def like(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, shape: bool = True) -> None:
    """``b`` must match ``a`` in device and dtype (and shape unless ``shape=False``)."""
    same_device(name_a, a, name_b, b)
    same_dtype(name_a, a, name_b, b)
    if shape:
        same_shape(name_a, a, name_b, b)


def real_number(name: str, v) -> float:
    """A finite Python/NumPy real number (bool and tensors are rejected)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def fraction(name: str, v) -> float:
    """A fraction in (0, 1]."""
    v = real_number(name, v)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {v}")
    return v


def positive(name: str, v) -> float:
    v = real_number(name, v)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def non_negative(name: str, v) -> float:
    v = real_number(name, v)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)
