"""The decision rule: a threshold at a target TPR, conformal p-values, and Benjamini-Hochberg for batches.

Scores follow the scorers' convention: **higher = more in-distribution**.
Given n held-out ID calibration scores c_1..c_n (never used to fit the scorer
or to choose its hyperparameters) and a test score s:

* conformal p-value: p(s) = (1 + #{i: c_i <= s}) / (n + 1), in [1/(n+1), 1].
  Small p = the test score is lower than almost every ID score.
* single-sample decision at level alpha = 1 - tpr: flag OOD when p(s) <= alpha.
  With k = floor(alpha * (n + 1)) and c_(1) <= ... <= c_(n) the sorted
  calibration scores this is exactly ``s < c_(k)``, so the stored
  ``threshold`` is c_(k) (the conformal, finite-sample corrected (1 - tpr)
  quantile; not np.percentile's interpolated one, which has no guarantee).

What is guaranteed (Vovk et al. 2005; Bates et al., "Testing for outliers with
conformal p-values", Ann. Statist. 2023):

* If a new ID sample and the n calibration samples are exchangeable (drawn
  i.i.d. from the same ID distribution, with the same model and scorer), then
  P(p <= alpha) <= alpha: the false-alarm rate (ID flagged as OOD) is at most
  1 - tpr, so the TPR is at least ``tpr``. The probability is over the
  calibration draw and the test sample together (a marginal guarantee);
  for one fixed calibration set the rate fluctuates around it with a spread
  of about sqrt(alpha (1 - alpha) / n).
* With continuous scores (no ties) it is also >= alpha - 1/(n+1), so the rule
  is not needlessly conservative.
* n must be at least ceil(1/alpha) - 1 for anything to be flaggable at all
  (k >= 1): 19 samples for tpr 0.95, 99 for tpr 0.99. :func:`min_calibration_size`
  says so; more samples (hundreds to thousands) make the realised rate of one
  calibration set close to alpha.
* Nothing is guaranteed about OOD samples (the detection rate depends on the
  scorer), nor under a distribution shift of the ID data itself.

Batches: :func:`benjamini_hochberg` at false discovery rate q flags the k
smallest p-values, k the largest with p_(k) <= k q / m. Conformal p-values
sharing one calibration set are positively dependent (PRDS, Bates et al.
2023), so BH keeps E[#ID flagged / max(#flagged, 1)] <= q * m0 / m <= q,
again over calibration and test draws, with the test ID samples exchangeable
with the calibration ones.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["conformal_p_values", "threshold_at_tpr", "min_calibration_size", "benjamini_hochberg", "check_tpr",
           "check_fdr", "bh_min_calibration"]


def check_tpr(tpr: float, name: str = "tpr") -> float:
    """``tpr`` as a float in the open interval (0, 1); ValueError naming ``name`` otherwise."""
    try:
        value = float(tpr)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {tpr!r}") from None
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1) (the fraction of ID samples kept, e.g. 0.95), got {tpr!r}")
    return value


def check_fdr(fdr: float, name: str = "fdr") -> float:
    """``fdr`` as a float in (0, 1); ValueError naming ``name`` otherwise."""
    try:
        value = float(fdr)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {fdr!r}") from None
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must be in (0, 1) (the false discovery rate, e.g. 0.1), got {fdr!r}")
    return value


def min_calibration_size(tpr: float) -> int:
    """Smallest n with floor((1 - tpr)(n + 1)) >= 1, i.e. the fewest calibration scores that can flag anything."""
    alpha = 1.0 - check_tpr(tpr)
    # The 1e-9 keeps 1/alpha that is an integer up to rounding (1/0.05 = 19.999...) from asking one more sample.
    return max(1, math.ceil(1.0 / alpha - 1e-9) - 1)


def bh_min_calibration(m: int, fdr: float) -> int:
    """Fewest calibration scores n with which Benjamini-Hochberg at ``fdr`` over ``m`` images can flag a lone
    OOD image: its p-value is at least 1/(n+1) and must be <= fdr/m, so n + 1 >= m / fdr."""
    q = check_fdr(fdr)
    # The 1e-9 keeps m / q that is an integer up to rounding (150 / 0.1 = 1500.0000000000002) exact.
    return max(1, math.ceil(m / q - 1e-9) - 1)


def _sorted_calibration(calibration) -> torch.Tensor:
    c = torch.as_tensor(np.asarray(calibration, dtype=np.float64) if not torch.is_tensor(calibration) else calibration)
    c = c.detach().double().cpu().reshape(-1)
    if c.numel() == 0:
        raise ValueError("the calibration set is empty: pass the ID validation scores")
    if not bool(torch.isfinite(c).all()):
        bad = int((~torch.isfinite(c)).sum())
        raise ValueError(f"{bad} calibration score(s) are not finite (NaN or inf): the scorer failed on some ID "
                         "validation samples")
    return torch.sort(c).values


def threshold_at_tpr(calibration, tpr: float) -> tuple[float, int]:
    """(threshold, k): flag OOD when ``score < threshold``; threshold = c_(k), k = floor((1 - tpr)(n + 1)).

    ``calibration``: the n ID calibration scores (any 1-d float array). This is
    exactly the rule p(s) <= 1 - tpr of :func:`conformal_p_values` (module
    docstring). Raises ValueError when n is below :func:`min_calibration_size`
    (nothing could ever be flagged) or ``tpr`` is outside (0, 1).
    """
    tpr = check_tpr(tpr)
    c = _sorted_calibration(calibration)
    n = c.numel()
    k = math.floor((1.0 - tpr) * (n + 1) + 1e-9)
    if k < 1:
        raise ValueError(f"{n} calibration scores are too few for tpr {tpr}: the conformal rule needs at least "
                         f"{min_calibration_size(tpr)} ID validation samples to flag anything (more is better)")
    return float(c[k - 1]), k


def conformal_p_values(scores, calibration) -> torch.Tensor:
    """p = (1 + #{i: c_i <= s}) / (n + 1) per test score: (B,) -> (B,) float64 in [1/(n+1), 1].

    ``scores``: test scores (B,) (higher = more ID); ``calibration``: the n ID
    calibration scores. A NaN score gets p = 1/(n+1) (the most OOD value): a
    scorer that fails on an input should not let it pass as ID.
    """
    c = _sorted_calibration(calibration)
    s = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    # searchsorted(right=True) counts the calibration scores <= s (ties count: the conformal rank with ties).
    below = torch.searchsorted(c, s.nan_to_num(nan=-math.inf), right=True)
    return (1.0 + below.double()) / (c.numel() + 1.0)


def benjamini_hochberg(p_values, fdr: float) -> torch.Tensor:
    """Benjamini-Hochberg at false discovery rate ``fdr``: (m,) p-values -> (m,) bool, True = flagged OOD.

    Flags the k smallest p-values, k = max{j: p_(j) <= j * fdr / m} (none if no
    such j). See the module docstring for the guarantee with conformal p-values.
    """
    q = check_fdr(fdr)
    p = torch.as_tensor(p_values).detach().double().cpu().reshape(-1)
    m = p.numel()
    if m == 0:
        return torch.zeros(0, dtype=torch.bool)
    order = torch.argsort(p, stable=True)
    ranked = p[order]
    ok = ranked <= q * torch.arange(1, m + 1, dtype=torch.float64) / m
    flagged = torch.zeros(m, dtype=torch.bool)
    if bool(ok.any()):
        k = int(torch.nonzero(ok)[-1]) + 1
        flagged[order[:k]] = True
    return flagged
