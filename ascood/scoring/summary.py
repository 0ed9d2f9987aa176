"""Summaries over seeds shared by the apps (demo and reproduce tables)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["mean_std"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof 1) of ``values`` as floats; the std of one value is 0.0."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
