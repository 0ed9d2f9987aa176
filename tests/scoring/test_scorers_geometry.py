"""Mahalanobis++, fDBD, NCI and NECO (issue 32) against code no one here wrote, per sample.

* OpenOOD's fdbd / nci postprocessors, the Mahalanobis++ authors' ``evaluate_Mahalanobis_norm`` and
  ``evaluate_neco``, and the NECO authors' ``neco()``: their scores on fixed tiny data, stored by
  ``tests/fixtures/geometry/make_geometry.py`` (sources and commits in ``geometry.json``);
* pytorch-ood 0.4.0's fDBD and NCI detectors, run here (skipped where pytorch-ood is not installed);
* each formula written out in plain torch / numpy on random odd shapes;
* the model path and the cached-feature path giving the same scores, in both feature spaces of a z-score model;
* bad input, and an APS sweep on tiny data.
"""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.scorers import (FDBD, NCI, NECO, SCORERS, Features, LinearHead, MahalanobisPP, extract_features,
                                    get_scorer, sweep)
from scorerhelpers import ConvBody

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "geometry")
NEW = ("mdspp", "fdbd", "nci", "neco")


@pytest.fixture(scope="module")
def ref():
    d = np.load(os.path.join(FIX, "geometry.npz"), allow_pickle=False)
    t = {k: torch.from_numpy(d[k]) for k in ("train", "labels", "test", "weight", "bias")}
    t["head"] = LinearHead(t["weight"], t["bias"])
    t["z_train"] = t["train"] @ t["weight"].T + t["bias"]
    t["z_test"] = t["test"] @ t["weight"].T + t["bias"]
    t["expected"] = {k: d[k] for k in d.files}
    return t


def _fit_score(ref, name, **kw):
    sc = get_scorer(name, **kw).fit_features(ref["train"], ref["labels"], logits=ref["z_train"], head=ref["head"])
    return sc.score_features(ref["z_test"], ref["test"]).double().numpy()


def test_fixture_names_its_sources():
    with open(os.path.join(FIX, "geometry.json"), encoding="utf-8") as f:
        meta = json.load(f)
    npz = set(np.load(os.path.join(FIX, "geometry.npz"), allow_pickle=False).files)
    for src in meta["sources"].values():
        assert len(src["commit"]) == 40 and src["repo"] and src["files"]
        assert set(src["arrays"]) <= npz


# --- per sample against the references' own code (fixtures) ------------------------------------------------
@pytest.mark.parametrize("flag, key", [(True, "dist"), (False, "norm")])
def test_fdbd_equals_openood_postprocessor(ref, flag, key):
    got = _fit_score(ref, "fdbd", distance_as_normalizer=flag)
    C = ref["weight"].shape[0]
    # OpenOOD sums over the classes, the paper (and ascood) averages over the C - 1 others: the same ranking.
    np.testing.assert_allclose(got * (C - 1), ref["expected"][f"openood_fdbd_{key}"], rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0001, 0.01, 0.1])
def test_nci_equals_openood_postprocessor(ref, alpha):
    np.testing.assert_allclose(_fit_score(ref, "nci", alpha=alpha), ref["expected"][f"openood_nci_{alpha:g}"],
                               rtol=1e-5, atol=1e-5)


def test_mahalanobis_pp_equals_the_authors_code(ref):
    np.testing.assert_allclose(_fit_score(ref, "mdspp"), ref["expected"]["mahanorm_mdspp"], rtol=2e-6)


@pytest.mark.parametrize("maxlogit, key", [(True, "maxlogit"), (False, "ratio")])
def test_neco_equals_the_mahalanobis_pp_authors_neco(ref, maxlogit, key):
    """dim=None: the fewest components explaining >= 90 % of the variance, as evaluate_neco."""
    np.testing.assert_allclose(_fit_score(ref, "neco", maxlogit=maxlogit), ref["expected"][f"mahanorm_neco_{key}"],
                               rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("dim", [2, 5])
def test_neco_equals_the_neco_authors_code(ref, arch, dim):
    """The authors multiply by the max logit for every architecture but ResNets."""
    got = _fit_score(ref, "neco", dim=dim, maxlogit=arch != "resnet")
    np.testing.assert_allclose(got, ref["expected"][f"authors_neco_{arch}_{dim}"], rtol=2e-6, atol=1e-6)


# --- per sample against pytorch-ood 0.4.0 -------------------------------------------------------------------
def _pood():
    return pytest.importorskip("pytorch_ood", reason="pytorch-ood (test extra) is not installed")


def _random(C=7, m=13, n=101, b=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    centres = torch.rand(C, m, generator=g) * 3
    h = (centres[y] + torch.randn(n, m, generator=g) * 0.8).relu()
    q = (torch.rand(b, m, generator=g) * 3 * torch.rand(b, 1, generator=g) * 2).relu()
    head = LinearHead(torch.randn(C, m, generator=g) * 0.4, torch.randn(C, generator=g) * 0.1)
    return h, y, q, head


def _linear(head):
    fc = nn.Linear(head.weight.shape[1], head.weight.shape[0])
    with torch.no_grad():
        fc.weight.copy_(head.weight)
        fc.bias.copy_(head.bias)
    return fc


def test_fdbd_equals_pytorch_ood():
    pood = _pood()
    h, y, q, head = _random()
    det = pood.detector.fDBD(encoder=nn.Identity(), head=_linear(head)).fit_features(h)
    ours = get_scorer("fdbd").fit_features(h, y, head=head).score_features(head.fc(q), q)
    torch.testing.assert_close(ours, -det.predict_features(q), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.5])
def test_nci_equals_pytorch_ood(alpha):
    pood = _pood()
    h, y, q, head = _random(seed=1)
    det = pood.detector.NCI(encoder=nn.Identity(), head=_linear(head), alpha=alpha).fit_features(h)
    ours = get_scorer("nci", alpha=alpha).fit_features(h, y, head=head).score_features(head.fc(q), q)
    torch.testing.assert_close(ours, -det.predict_features(q), rtol=1e-5, atol=1e-5)


# --- the formulas in plain torch / numpy on random odd shapes ------------------------------------------------
def test_fdbd_formula():
    h, y, q, head = _random(C=6, m=11, seed=2)
    W, b = head.weight.double(), head.bias.double()
    mu = h.double().mean(0)
    z = q.double() @ W.T + b
    want = []
    for i in range(len(q)):
        p = int(z[i].argmax())
        d = [abs(z[i, p] - z[i, c]) / torch.linalg.norm(W[p] - W[c]) for c in range(6) if c != p]
        want.append(sum(d) / 5 / torch.linalg.norm(q[i].double() - mu))
    got = get_scorer("fdbd").fit_features(h, y, head=head).score_features(head.fc(q), q)
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-5, atol=0)  # float32 scoring


def test_nci_formula():
    h, y, q, head = _random(C=5, m=9, seed=3)
    mu = h.double().mean(0)
    W = head.weight.double()
    pred = (q.double() @ W.T + head.bias.double()).argmax(1)
    c = q.double() - mu
    want = torch.stack([W[pred[i]] @ c[i] / c[i].norm() + 0.3 * q[i].double().abs().sum() for i in range(len(q))])
    got = get_scorer("nci", alpha=0.3).fit_features(h, y, head=head).score_features(head.fc(q), q)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # float32 scoring


def test_mahalanobis_pp_formula_and_that_it_is_mds_on_unit_features():
    h, y, q, head = _random(C=4, m=10, n=77, seed=4)
    u = (h / h.norm(dim=1, keepdim=True)).double().numpy()
    uq = (q / q.norm(dim=1, keepdim=True)).double().numpy()
    means = np.stack([u[y.numpy() == c].mean(0) for c in range(4)])
    centred = u - means[y.numpy()]
    prec = np.linalg.pinv(centred.T @ centred / len(u), hermitian=True)
    d = np.stack([np.einsum("bi,ij,bj->b", uq - mu, prec, uq - mu) for mu in means], 1)
    got = get_scorer("maha++").fit_features(h, y, head=head).score_features(head.fc(q), q)
    np.testing.assert_allclose(got.double().numpy(), -d.min(1), rtol=1e-5)
    mds = get_scorer("mds").fit_features(h / h.norm(dim=1, keepdim=True), y)
    np.testing.assert_allclose(got.numpy(), mds.score_features(head.fc(q), q / q.norm(dim=1, keepdim=True)).numpy(),
                               rtol=1e-5)


@pytest.mark.parametrize("dim", [1, 4, None])
def test_neco_formula_with_an_svd_pca(dim):
    h, y, q, head = _random(C=5, m=14, n=97, seed=5)
    x = h.double().numpy()
    mean, std = x.mean(0), x.std(0)
    s = (x - mean) / std
    _, sv, vt = np.linalg.svd(s - s.mean(0), full_matrices=False)
    ratio = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    d = dim or int(np.argmax(ratio >= 0.9)) + 1
    sq = (q.double().numpy() - mean) / std
    z = head.fc(q)
    want = np.linalg.norm(sq @ vt[:d].T, axis=1) / np.linalg.norm(sq, axis=1) * z.double().numpy().max(1)
    sc = get_scorer("neco", dim=dim, maxlogit=True).fit_features(h, y, head=head)
    assert sc.resolved_dim() == d
    np.testing.assert_allclose(sc.score_features(z, q).double().numpy(), want, rtol=1e-5)


# --- both entry paths, both feature spaces of a z-score model ---------------------------------------------------
def _Body():
    return ConvBody(10)


def _model(head="zscore"):
    torch.manual_seed(0)
    return ascood.ASCOODNet(_Body(), 4, head=head, input_mean=[0.0] * 3, input_std=[1.0] * 3).eval()


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.arange(n) % 4


# (mdspp, head) included: MDS's fit drops the z-score head's all-ones direction (tests/scoring/test_mds_zscore_head.py).
PATHS = [(n, s) for n in NEW for s in ("raw", "head")]


@pytest.mark.parametrize("name, space", PATHS)
def test_model_path_equals_cached_feature_path(name, space):
    model = _model()
    train = DataLoader(TensorDataset(*_images(64, 0)), batch_size=16)
    x, yx = _images(9, 1)
    on_model = get_scorer(name, feature_space=space).fit(model, train)
    pred, s_model = on_model.score(model, x)
    cached = get_scorer(name, feature_space=space).fit_features(extract_features(model, train))
    rec = extract_features(model, DataLoader(TensorDataset(x, yx), batch_size=4))
    s_cached = cached.score_features(torch.as_tensor(rec.logits), torch.as_tensor(rec.features), head=rec.head)
    torch.testing.assert_close(s_model, s_cached, rtol=1e-5, atol=1e-6)
    assert pred.tolist() == model(x).argmax(1).tolist()


def _zscore_case():
    model = _model()
    x, y = _images(64, 0)
    with torch.no_grad():
        h = model.features(x)
        ht = model.standardize(h)
        z = model(x)
    head = LinearHead.from_model(model)
    q, _ = _images(11, 2)
    with torch.no_grad():
        hq = model.features(q)
        return model, h, ht, z, y, head, hq, model.standardize(hq), model(q)


@pytest.mark.parametrize("name", NEW)
def test_the_feature_space_matters_on_a_zscore_model_and_head_is_the_model_space(name):
    """On a z-score model "raw" and "head" give different scores; "head" equals the scorer run by hand on
    h~ = standardize(h) with a plain head (whose fc(h~) are the model's logits)."""
    _, h, ht, z, y, head, hq, hqt, zq = _zscore_case()
    raw = get_scorer(name).fit_features(h, y, logits=z, head=head).score_features(zq, hq)
    in_head = get_scorer(name, feature_space="head").fit_features(h, y, logits=z, head=head).score_features(zq, hq)
    assert not torch.allclose(raw, in_head, rtol=1e-3)
    # A head without standardisation that says its rows are zero-mean (as the z-score head's h~ are): the
    # covariance scorers then drop the all-ones direction as on the model (test_mds_zscore_head.py).
    plain = LinearHead(head.weight, head.bias, zero_mean_rows=True)
    by_hand = get_scorer(name, feature_space="head").fit_features(ht, y, logits=z, head=plain).score_features(
        zq, hqt, head=plain)
    torch.testing.assert_close(in_head, by_hand, rtol=1e-4, atol=1e-5)


def test_mahalanobis_pp_in_the_zscore_head_space_ranks_as_mds():
    """Every h~ of a z-score head has nearly the same norm: Mahalanobis++ there is MDS up to a constant."""
    _, h, _, z, y, head, hq, _, zq = _zscore_case()
    pp = get_scorer("mdspp", feature_space="head").fit_features(h, y, logits=z, head=head).score_features(zq, hq)
    md = get_scorer("mds", feature_space="head").fit_features(h, y, logits=z, head=head).score_features(zq, hq)
    assert torch.argsort(pp).tolist() == torch.argsort(md).tolist()
    ratio = pp / md
    assert float(ratio.max() / ratio.min()) < 1.01


# --- registry, bad input -------------------------------------------------------------------------------------------
def test_names_and_aliases():
    assert {SCORERS[n] for n in NEW} == {MahalanobisPP, FDBD, NCI, NECO}
    for alias in ("Mahalanobis++", "maha++", "MDS++", "mdspp"):
        assert type(get_scorer(alias)) is MahalanobisPP
    assert all(SCORERS[n].needs_fit and SCORERS[n].streams_fit and SCORERS[n].fit_split == "train" for n in NEW)
    assert SCORERS["mdspp"].uses_labels and not any(SCORERS[n].uses_labels for n in ("fdbd", "nci", "neco"))
    from ascood.scoring.scorers import scorer_for_model

    assert scorer_for_model("maha++", input_std=[0.5, 0.25, 0.5], eps=0.001).std == [0.5, 0.25, 0.5]


def test_bad_hyperparameters_are_refused_by_name():
    with pytest.raises(ValueError, match="fdbd distance_as_normalizer must be True or False, got 1"):
        get_scorer("fdbd", distance_as_normalizer=1)
    with pytest.raises(ValueError, match="nci alpha must be a number >= 0, got -0.1"):
        get_scorer("nci", alpha=-0.1)
    with pytest.raises(ValueError, match="nci alpha must be a number >= 0"):
        get_scorer("nci", alpha="0.1")
    with pytest.raises(ValueError, match="neco maxlogit must be True or False"):
        get_scorer("neco", maxlogit="yes")
    with pytest.raises(ValueError, match="neco dim must be an integer >= 1 or None, got True"):
        get_scorer("neco", dim=True)
    with pytest.raises(ValueError, match="feature_space must be 'raw' or 'head'"):
        get_scorer("fdbd", feature_space="logits")


def test_bad_fit_data_is_refused():
    h, y, q, head = _random(C=4, m=6, n=40, seed=6)
    with pytest.raises(ValueError, match="fdbd needs head"):
        get_scorer("fdbd").fit_features(h, y)
    with pytest.raises(ValueError, match="nci needs head"):
        get_scorer("nci").fit_features(h, y)
    twin = LinearHead(torch.cat([head.weight[:3], head.weight[1:2]]), head.bias)
    with pytest.raises(ValueError, match="fdbd: the head's rows 1 and 3 are identical"):
        get_scorer("fdbd").fit_features(h, y, head=twin)
    with pytest.raises(ValueError, match=r"neco dim must be in \[1, 5\] for 6-d features, got 6"):
        get_scorer("neco", dim=6).fit_features(h, y)
    with pytest.raises(ValueError, match="neco: the features do not vary"):
        get_scorer("neco").fit_features(torch.ones(20, 6), torch.arange(20) % 4)
    bad = h.clone()
    bad[7, 2] = float("nan")
    for name in NEW:
        with pytest.raises(ValueError, match=rf"{name}: the fit set's features hold NaN or inf \(first at row 7\)"):
            get_scorer(name).fit_features(bad, y, head=head)
    with pytest.raises(ValueError, match="mdspp: label 4 at row 0 is outside the model's 4 classes"):
        get_scorer("mdspp").fit_features(h, torch.where(torch.arange(40) == 0, 4, y), head=head)
    sc = get_scorer("neco", dim=3).fit_features(h, y)
    with pytest.raises(ValueError, match=r"neco dim must be in \[1, 5\]"):
        sc.set_params(dim=6)


def test_bad_scoring_input_is_refused():
    h, y, q, head = _random(C=4, m=6, n=40, seed=7)
    for name in NEW:
        sc = get_scorer(name)
        with pytest.raises(RuntimeError, match=f"{name}: call fit"):
            sc.score_features(head.fc(q), q, head=head)
        sc.fit_features(h, y, head=head)
        with pytest.raises(ValueError, match=f"{name}: features have 5 columns, the scorer was fitted on 6"):
            sc.score_features(head.fc(q), q[:, :5])
        with pytest.raises(ValueError, match=f"{name} needs features"):
            sc.score_features(head.fc(q))
    with pytest.raises(ValueError, match="neco with feature_space='head' needs the model's head"):
        get_scorer("neco", feature_space="head").fit_features(h, y)


def test_a_zero_feature_scores_finite():
    """A feature at the mean / at the origin (every unit inactive): clamped norms, no NaN."""
    h, y, q, head = _random(C=4, m=6, n=40, seed=8)
    for name in NEW:
        sc = get_scorer(name).fit_features(h, y, head=head)
        x = torch.zeros(2, 6)
        if name in ("fdbd", "nci"):
            x[1] = sc.mean.float()
        assert torch.isfinite(sc.score_features(head.fc(x), x)).all(), name


# --- APS ------------------------------------------------------------------------------------------------------------
def _records():
    h, y, q, head = _random(C=4, m=8, n=80, seed=9)
    g = torch.Generator().manual_seed(10)
    val_id = (h[:40] + 0.2 * torch.randn(40, 8, generator=g)).relu()
    val_ood = torch.rand(40, 8, generator=g) * 0.5
    rec = lambda a, lab=None: Features(head.fc(a), a, lab, head)  # noqa: E731
    return rec(h, y), rec(val_id, y[:40]), rec(val_ood, torch.full((40,), -1))


@pytest.mark.parametrize("name, grid_key", [("fdbd", "distance_as_normalizer"), ("nci", "alpha")])
def test_aps_sweeps_the_openood_grid(name, grid_key):
    train, val_id, val_ood = _records()
    sc = get_scorer(name)
    res = sweep(sc, None, val_id, val_ood, id_train_loader=train)
    assert [p[grid_key] for p, _ in res.trials] == SCORERS[name].default_grid[grid_key]
    assert res.best_auroc == max(a for _, a in res.trials) and res.best_auroc > 0.9
    assert sc.get_params()[grid_key] == res.best_params[grid_key] and sc.fitted


def test_neco_dim_sweep_needs_no_refit():
    train, val_id, val_ood = _records()
    sc = get_scorer("neco")
    res = sweep(sc, None, val_id, val_ood, grid={"dim": [1, 2, 3, 20]}, id_train_loader=train)
    assert [p["dim"] for p, _ in res.trials] == [1, 2, 3]  # 20 >= m is refused by name, not scored
    assert sc.fitted and sc.dim == res.best_params["dim"]
    with pytest.raises(ValueError, match="no hyperparameters"):
        sweep(get_scorer("neco"), None, val_id, val_ood, id_train_loader=train)


# --- detector artifacts: the fitted state round-trips, a mismatched one is refused by name ---------------------
@pytest.mark.parametrize("name", NEW)
def test_state_round_trip_and_refusal(name):
    from ascood.deploy.state import ArtifactError, restore_scorer, scorer_state

    h, y, q, head = _random(C=4, m=6, n=40, seed=11)
    sc = get_scorer(name).fit_features(h, y, head=head)
    params, tensors = scorer_state(sc)
    back = restore_scorer(name, params, tensors, num_classes=4, feature_dim=6)
    torch.testing.assert_close(back.score_features(head.fc(q), q, head=head), sc.score_features(head.fc(q), q))
    assert back.get_params() == sc.get_params()
    with pytest.raises(ArtifactError, match=f"scorer {name}: "):
        restore_scorer(name, params, tensors, num_classes=4, feature_dim=7)
    key = next(k for k, v in tensors.items() if v.dtype == torch.float64)
    bad = {**tensors, key: tensors[key].float()}
    with pytest.raises(ArtifactError, match=f"scorer tensor '{key}' must be torch.float64"):
        restore_scorer(name, params, bad, num_classes=4, feature_dim=6)
    if name == "neco":
        with pytest.raises(ArtifactError, match="explained >= 0 and sum to 1"):
            restore_scorer(name, params, {**tensors, "explained": torch.zeros(6, dtype=torch.float64)},
                           num_classes=4, feature_dim=6)
