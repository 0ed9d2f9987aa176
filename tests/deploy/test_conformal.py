"""The decision rule: threshold at a TPR, conformal p-values, Benjamini-Hochberg, and their guarantees.

Expectations are computed independently here (brute-force counting, the BH
definition, exact finite-sample rates), and the guarantees are checked by
simulation over many calibration draws.
"""
import math

import numpy as np
import pytest
import torch

from ascood.deploy.conformal import (benjamini_hochberg, check_tpr, conformal_p_values, min_calibration_size,
                                     threshold_at_tpr)


def brute_p(s, cal):
    return (1 + sum(c <= s for c in cal)) / (len(cal) + 1)


def test_p_values_count_ties_and_order_free():
    cal = [3.0, 1.0, 2.0, 2.0, 5.0]
    tests = [0.5, 1.0, 2.0, 2.5, 5.0, 9.0]
    got = conformal_p_values(torch.tensor(tests), torch.tensor(cal))
    assert got.tolist() == pytest.approx([brute_p(s, cal) for s in tests])
    assert got.dtype == torch.float64
    # NaN (a scorer failure) counts as the most OOD value, never as ID.
    assert conformal_p_values(torch.tensor([float("nan")]), torch.tensor(cal)).item() == pytest.approx(1 / 6)


@pytest.mark.parametrize("n,tpr", [(19, 0.95), (50, 0.95), (99, 0.95), (200, 0.9), (1000, 0.99), (37, 0.8)])
def test_threshold_is_the_p_value_rule(n, tpr):
    rng = np.random.default_rng(n)
    cal = rng.normal(size=n)
    t, k = threshold_at_tpr(cal, tpr)
    assert k == math.floor((1 - tpr) * (n + 1) + 1e-9)
    assert t == np.sort(cal)[k - 1]
    probe = np.concatenate([rng.normal(size=500) * 2, cal])  # include the calibration values (ties)
    p = conformal_p_values(probe, cal).numpy()
    assert np.array_equal(probe < t, p <= k / (n + 1))
    assert np.array_equal(p <= 1 - tpr + 1e-12, p <= k / (n + 1))  # alpha itself is the level


def test_too_small_calibration_and_bad_tpr_are_named():
    assert min_calibration_size(0.95) == 19
    assert min_calibration_size(0.99) == 99
    with pytest.raises(ValueError, match="too few for tpr 0.95.*at least 19"):
        threshold_at_tpr(np.arange(18.0), 0.95)
    threshold_at_tpr(np.arange(19.0), 0.95)
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan"), "x"):
        with pytest.raises(ValueError, match="tpr must be"):
            check_tpr(bad)
    with pytest.raises(ValueError, match="not finite"):
        threshold_at_tpr([0.0, float("inf")] * 20, 0.9)
    with pytest.raises(ValueError, match="empty"):
        conformal_p_values([1.0], [])


def brute_bh(p, q):
    m = len(p)
    ranked = sorted(p)
    ks = [j for j in range(1, m + 1) if ranked[j - 1] <= j * q / m]
    if not ks:
        return [False] * m
    cut = ranked[max(ks) - 1]
    return [v <= cut for v in p]


def test_benjamini_hochberg_matches_its_definition():
    rng = np.random.default_rng(0)
    for trial in range(200):
        m = int(rng.integers(1, 40))
        # p-values on a coarse grid so ties happen (as conformal p-values tie)
        p = rng.integers(1, 30, size=m) / 30.0
        if trial % 3 == 0:
            p[: m // 3] = rng.uniform(0, 0.01, size=m // 3)
        q = float(rng.choice([0.05, 0.1, 0.2, 0.5]))
        assert benjamini_hochberg(torch.tensor(p), q).tolist() == brute_bh(list(p), q)
    assert benjamini_hochberg(torch.tensor([]), 0.1).numel() == 0
    with pytest.raises(ValueError, match="fdr must be in"):
        benjamini_hochberg(torch.tensor([0.1]), 1.0)


@pytest.mark.parametrize("n,tpr", [(50, 0.95), (99, 0.95), (200, 0.9)])
def test_false_alarm_rate_within_the_bound_over_fresh_draws(n, tpr):
    # Marginal guarantee: over calibration draws and fresh ID samples, P(flag) in [k/(n+1)] exactly for
    # continuous scores, and k/(n+1) lies in [alpha - 1/(n+1), alpha].
    rng = np.random.default_rng(n)
    alpha, reps, m = 1 - tpr, 3000, 40
    k = math.floor(alpha * (n + 1) + 1e-9)
    rates = np.empty(reps)
    for r in range(reps):
        cal, test = rng.standard_t(3, size=n), rng.standard_t(3, size=m)  # heavy tails: nothing Gaussian assumed
        t, _ = threshold_at_tpr(cal, tpr)
        rates[r] = (test < t).mean()
    mean, se = rates.mean(), rates.std(ddof=1) / math.sqrt(reps)
    assert alpha - 1 / (n + 1) <= k / (n + 1) <= alpha
    assert mean <= alpha + 4 * se, (mean, alpha)
    assert mean >= alpha - 1 / (n + 1) - 4 * se, (mean, alpha)
    assert abs(mean - k / (n + 1)) <= 4 * se  # and it is the exact finite-sample rate


def test_bh_controls_fdr_over_fresh_draws():
    rng = np.random.default_rng(1)
    n, m0, m1, q, reps = 300, 150, 50, 0.1, 1500
    fdp = np.empty(reps)
    power = np.empty(reps)
    for r in range(reps):
        cal = rng.normal(size=n)
        id_test, ood_test = rng.normal(size=m0), rng.normal(-2.5, 1, size=m1)
        p = conformal_p_values(np.concatenate([id_test, ood_test]), cal)
        flag = benjamini_hochberg(p, q).numpy()
        false = flag[:m0].sum()
        fdp[r] = false / max(flag.sum(), 1)
        power[r] = flag[m0:].mean()
    se = fdp.std(ddof=1) / math.sqrt(reps)
    assert fdp.mean() <= q * m0 / (m0 + m1) + 4 * se, fdp.mean()
    assert power.mean() > 0.3  # the test is not vacuous: BH does flag OOD samples


def test_detector_scores_keep_the_bound(tmp_path):
    # The same guarantee with a real detector's scores: a pool of i.i.d. ID images, scored once; each repetition
    # calibrates the detector on a random n of them and counts false alarms on the rest.
    import deployhelpers as H

    det = H.fitted("ebo")
    x, _ = H.id_pixels(700, seed=11)
    with torch.no_grad():
        _, scores = det.score_normalized(H.normalise(x))
    rng = np.random.default_rng(2)
    n, tpr, reps = 100, 0.9, 800
    rates = np.empty(reps)
    for r in range(reps):
        perm = torch.from_numpy(rng.permutation(len(scores)))
        det.calibrate(scores[perm[:n]], tpr)
        _, is_ood, _ = det.decide(scores[perm[n:]])
        rates[r] = is_ood.double().mean().item()
    se = rates.std(ddof=1) / math.sqrt(reps)
    alpha = 1 - tpr
    assert alpha - 1 / (n + 1) - 4 * se <= rates.mean() <= alpha + 4 * se, rates.mean()
