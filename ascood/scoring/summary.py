"""Summaries over seeds shared by the apps (demo and reproduce tables)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["mean_std", "STD_TEXT"]

#: How the ± of every table is computed (the tables' headers say so).
STD_TEXT = "population std over seeds (ddof 0, numpy's np.std, as the authors' eval script)"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, population std with ddof 0) of ``values`` as floats.

    ddof 0 is what the authors' evaluation script computes (``np.std``), so a
    spread printed here compares with the paper's: the sample std (ddof 1)
    would read sqrt(n / (n - 1)) wider, 1.22x for 3 seeds. The std of one value is 0.0.
    """
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(a.mean()), float(a.std(ddof=0))
