"""OOD detection metrics on raw scores (higher score = more ID), via scikit-learn.

Conventions (name the one a number uses; users confuse them):

* ``"openood"`` (default; the paper's tables): OOD is the positive class.
  ``fpr, tpr = roc_curve(is_ood, -score)``; AUROC = auc(fpr, tpr);
  FPR@95 = fpr at the *first* ROC point with tpr >= 0.95, i.e. the fraction of
  ID samples flagged OOD when 95% of OOD samples are caught (no interpolation).
* ``"odin"`` (the ODIN paper): ID is the positive class.
  ``fpr, tpr = roc_curve(is_id, score)``; FPR@95 = fraction of OOD samples
  accepted when 95% of ID samples are kept (first tpr >= 0.95).

Both: AUPR-In = auc(recall, precision) of precision_recall_curve(is_id, score),
AUPR-Out the same for (is_ood, -score): trapezoidal areas, not average
precision. AUROC is the same under both conventions. Values are fractions in
[0, 1]; tables multiply by 100.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

__all__ = ["CONVENTIONS", "CONVENTION_TEXT", "ood_metrics", "fpr_at_tpr"]

CONVENTIONS = ("openood", "odin")
CONVENTION_TEXT = {
    "openood": "OpenOOD convention: OOD positive; FPR@95 = % of ID flagged OOD when 95% of OOD is caught",
    "odin": "ODIN convention: ID positive; FPR@95 = % of OOD accepted when 95% of ID is kept",
}


def _as_1d(name: str, a) -> np.ndarray:
    try:
        import torch
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(a)))} non-finite score(s)")
    return a


def fpr_at_tpr(fpr: np.ndarray, tpr: np.ndarray, level: float = 0.95) -> float:
    """fpr at the first ROC point whose tpr >= level (no interpolation)."""
    return float(fpr[int(np.argmax(tpr >= level))])


def ood_metrics(id_scores, ood_scores, convention: str = "openood") -> dict[str, float]:
    """FPR@95, AUROC, AUPR-In, AUPR-Out (fractions) of ID vs OOD scores (higher = more ID).

    Args:
        id_scores: (N_id,) scores of ID samples (array-like or tensor).
        ood_scores: (N_ood,) scores of OOD samples.
        convention: "openood" (default) or "odin" (affects FPR@95 only).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    s_id, s_ood = _as_1d("id_scores", id_scores), _as_1d("ood_scores", ood_scores)
    score = np.concatenate([s_id, s_ood])
    is_ood = np.concatenate([np.zeros(s_id.size, dtype=int), np.ones(s_ood.size, dtype=int)])
    if convention == "openood":
        fpr, tpr, _ = skm.roc_curve(is_ood, -score)
    else:
        fpr, tpr, _ = skm.roc_curve(1 - is_ood, score)
    precision_in, recall_in, _ = skm.precision_recall_curve(1 - is_ood, score)
    precision_out, recall_out, _ = skm.precision_recall_curve(is_ood, -score)
    return {
        "fpr95": fpr_at_tpr(fpr, tpr, 0.95),
        "auroc": float(skm.auc(fpr, tpr)),
        "aupr_in": float(skm.auc(recall_in, precision_in)),
        "aupr_out": float(skm.auc(recall_out, precision_out)),
    }
