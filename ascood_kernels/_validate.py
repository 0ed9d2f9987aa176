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


INT64_MAX = 2 ** 63 - 1


def positive_int(name: str, v, hint: str = "") -> int:
    """An int in [1, 2**63 - 1] (the ops take int64); ``hint`` is appended to the range error."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    if v > INT64_MAX:
        raise ValueError(f"{name} must be in [1, 2**63 - 1] (the ops take int64){hint}, got {v}")
    return int(v)


def permutation_rows(name: str, perm, rows: int, n: int) -> None:
    """``perm`` must be a (rows, n) int64 tensor whose every row is a permutation of 0..n-1.

    A row with a repeated value would copy one pixel into several places (and
    drop others), so it is refused instead of silently duplicating pixels.
    """
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(perm).__name__}")
    if perm.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {str(perm.dtype).replace('torch.', '')}")
    if tuple(perm.shape) != (rows, n):
        raise ValueError(f"{name} must have shape (B, npix) = ({rows}, {n}), got {tuple(perm.shape)}")
    if rows == 0 or n == 0 or torch.compiler.is_compiling():
        return
    good = (perm.sort(dim=1).values == torch.arange(n, device=perm.device)).all(dim=1)
    if not bool(good.all()):
        row = int((~good).nonzero()[0, 0])
        raise ValueError(f"{name} must hold a permutation of 0..{n - 1} in every row (each value exactly once); "
                         f"row {row} is not")


def random_permutation_args(name: str, seeds, n) -> None:
    """``seeds``: a 1-D int64 tensor of values in [0, 2^32); ``n``: an int >= 0 (random_permutations)."""
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {str(seeds.dtype).replace('torch.', '')} "
                         f"of shape {tuple(seeds.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if seeds.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(seeds)
        if int(lo) < 0 or int(hi) > 0xFFFFFFFF:
            raise ValueError(f"{name} must hold values in [0, 2^32), got [{int(lo)}, {int(hi)}]")
