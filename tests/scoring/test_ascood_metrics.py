"""Metrics against cases computed by hand (OpenOOD and ODIN conventions)."""
import numpy as np
import pytest

from ascood.scoring.metrics import ood_metrics

# ID scores and OOD scores (higher = more ID); one OOD sample (0.85) sits among the ID ones.
ID = [0.9, 0.8, 0.7, 0.6]
OOD = [0.85, 0.5, 0.4, 0.3]


def test_auroc_is_pairwise_probability():
    # AUROC = P(score_id > score_ood): 0.9 beats 4, 0.8/0.7/0.6 beat 3 each -> 13/16.
    assert ood_metrics(ID, OOD)["auroc"] == pytest.approx(13 / 16)
    assert ood_metrics(ID, OOD, "odin")["auroc"] == pytest.approx(13 / 16)


def test_fpr95_openood_vs_odin_convention():
    # OpenOOD: catch all 4 OOD (tpr >= .95 needs 4/4) -> threshold 0.85 flags ID 0.8, 0.7, 0.6 -> 3/4.
    assert ood_metrics(ID, OOD)["fpr95"] == pytest.approx(0.75)
    # ODIN: keep all 4 ID (threshold 0.6) -> OOD 0.85 accepted -> 1/4.
    assert ood_metrics(ID, OOD, "odin")["fpr95"] == pytest.approx(0.25)


def test_aupr_in_and_out_trapezoidal():
    # AUPR-In: PR points (recall, precision) by descending score, trapezoids between them:
    # (1, 4/5) (3/4, 3/4) (1/2, 2/3) (1/4, 1/2) (1/4, 1) (0, 1).
    aupr_in = 0.25 * (4 / 5 + 3 / 4) / 2 + 0.25 * (3 / 4 + 2 / 3) / 2 + 0.25 * (2 / 3 + 1 / 2) / 2 + 0.25 * 1
    # AUPR-Out (OOD positive, ascending score): precision 1 up to recall 3/4, then
    # (3/4, 1/2) -> (1, 4/7).
    aupr_out = 0.75 * 1 + 0.25 * (1 / 2 + 4 / 7) / 2
    m = ood_metrics(ID, OOD)
    assert m["aupr_in"] == pytest.approx(aupr_in)
    assert m["aupr_out"] == pytest.approx(aupr_out)
    # Trapezoidal area differs from average precision here (a common mix-up).
    from sklearn.metrics import average_precision_score
    assert abs(average_precision_score([1] * 4 + [0] * 4, ID + OOD) - aupr_in) > 1e-3


def test_fpr95_uses_first_point_without_interpolation():
    # 20 OOD scores 0..19 (low), one ID score between each consecutive pair from the top:
    # catching 19/20 = 95% of OOD needs threshold at OOD score 18 -> the ID scores below 18.5 count.
    ood = np.arange(20, dtype=float)
    id_ = np.array([18.5, 17.5, 100.0, 101.0])
    # OOD positive: threshold -score >= -18 catches OOD 0..18 (19/20 = 0.95 exactly, no interpolation),
    # ID flagged: those with score <= 18: 17.5 -> 1/4.
    assert ood_metrics(id_, ood)["fpr95"] == pytest.approx(0.25)


def test_perfect_reversed_and_tied():
    good = ood_metrics([5, 6, 7], [1, 2])
    assert good["auroc"] == 1 and good["fpr95"] == 0 and good["aupr_in"] == pytest.approx(1)
    bad = ood_metrics([1, 2], [5, 6, 7])
    assert bad["auroc"] == 0 and bad["fpr95"] == 1
    tie = ood_metrics([1.0, 1.0], [1.0, 1.0, 1.0])
    assert tie["auroc"] == pytest.approx(0.5) and tie["fpr95"] == 1


def test_rejects_non_finite_and_bad_convention():
    with pytest.raises(ValueError, match="non-finite"):
        ood_metrics([1, float("nan")], [0.0])
    with pytest.raises(ValueError, match="convention"):
        ood_metrics([1], [0], "other")
    with pytest.raises(ValueError, match="empty"):
        ood_metrics([], [0])
