"""MDS / RMDS / Mahalanobis++ in the head space of a z-score model: the all-ones direction is dropped.

A z-score head's rows sum to 0 over the features, up to float32 rounding. Before the fix the tied covariance
kept an eigenvalue of that rounding along the all-ones vector (~1e-14 of the largest: above pinvh's
cutoff), its inverse (~1e13) amplified every test row's rounding noise in that direction, and the scores
depended on the fit's chunking (~10 %) and on nothing real. The reference here is computed from float64
features of the same model (no rounding to speak of), with the pseudo-inverse restricted to the hyperplane.
"""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.scorers import LinearHead, extract_features, get_scorer
from ascood.scoring.scorers.features import Features
from scorerhelpers import ConvBody

C = 4


def _Body():
    return ConvBody(10)


def _model():
    torch.manual_seed(0)
    return ascood.ASCOODNet(_Body(), C, head="zscore", input_mean=[0.0] * 3, input_std=[1.0] * 3).eval()


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.arange(n) % C


def _zscore64(h):
    """The z-score head's h~ in float64 (unbiased std, eps 1e-6 on the std, sigma 1: ascood's zscore op)."""
    mu = h.mean(1, keepdim=True)
    return (h - mu) / (h.std(1, keepdim=True) + 1e-6)


def _mds64(train_h, y, test_h):
    """-min_c (h - mu_c)^T P (h - mu_c), P the covariance's pseudo-inverse on the sum-zero hyperplane."""
    ht, q = _zscore64(train_h), _zscore64(test_h)
    means = torch.stack([ht[y == c].mean(0) for c in range(C)])
    centred = ht - means[y]
    cov = centred.T @ centred / len(ht)
    m = cov.shape[0]
    basis = torch.linalg.qr(torch.eye(m, dtype=torch.float64) - 1.0 / m)[0][:, : m - 1]  # the hyperplane
    prec = basis @ torch.linalg.inv(basis.T @ cov @ basis) @ basis.T
    d = q[:, None, :] - means[None]
    return -torch.einsum("bcm,mn,bcn->bc", d, prec, d).min(1).values


def test_zscore_head_space_mds_equals_the_float64_hyperplane_reference_for_any_chunking():
    model = _model()
    x, y = _images(64, 0)
    q, _ = _images(11, 2)
    with torch.no_grad():
        h, hq = model.features(x).double(), model.features(q).double()  # float64 body: the reference features
    want = _mds64(h, y, hq)
    feats = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=64))
    test = extract_features(model, DataLoader(TensorDataset(q, torch.zeros(11, dtype=torch.long)), batch_size=11))
    got = []
    for rows in (64, 16, 7):
        mds = get_scorer("mds", feature_space="head")
        mds.chunk_rows = rows
        mds.fit_features(feats)
        got.append(mds.score_features(torch.as_tensor(test.logits), torch.as_tensor(test.features),
                                      head=test.head).double())
    for s in got:
        torch.testing.assert_close(s, want, rtol=1e-4, atol=1e-4)
    # The model path (streamed fit in loader batches of 16) gives the same.
    on_model = get_scorer("mds", feature_space="head").fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    torch.testing.assert_close(on_model.score(model, q)[1].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["rmds", "mdspp"])
def test_other_covariance_scorers_are_chunking_invariant_in_the_zscore_head_space(name):
    model = _model()
    x, y = _images(64, 0)
    q, _ = _images(11, 2)
    feats = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=64))
    test = extract_features(model, DataLoader(TensorDataset(q, torch.zeros(11, dtype=torch.long)), batch_size=11))
    scores = []
    for rows in (64, 16, 5):
        s = get_scorer(name, feature_space="head")
        s.chunk_rows = rows
        s.fit_features(feats)
        scores.append(s.score_features(torch.as_tensor(test.logits), torch.as_tensor(test.features), head=test.head))
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], rtol=1e-5, atol=1e-5)


def test_a_plain_head_or_the_raw_space_is_fitted_unprojected():
    """Only the z-score head's head space is projected: a linear head (no constraint) keeps every direction."""
    model = _model()
    x, y = _images(64, 0)
    feats = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=64))
    assert feats.head.zero_mean_rows
    plain = Features(feats.logits, feats.features, feats.labels,
                     LinearHead(feats.head.weight, feats.head.bias, feats.head.standardize), feats.batch_size)
    a = get_scorer("mds", feature_space="head").fit_features(plain)
    b = get_scorer("mds", feature_space="head").fit_features(feats)
    ones = torch.ones(10, dtype=torch.float64) / 10 ** 0.5
    assert float(ones @ b.precision @ ones) < 1e-6 * float(b.precision.diagonal().max())
    assert float(ones @ a.precision @ ones) > 1e6  # the unprojected fit inverts the rounding (the old bug)
