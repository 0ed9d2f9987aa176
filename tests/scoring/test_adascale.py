"""AdaSCALE-A / AdaSCALE-L (issue 32): per sample against OpenOOD's postprocessor (fixture), against the formula
written out in plain loops, bad input, and the APS sweep on cached features (each split and extra extracted once).
"""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.scorers import (FeatureCache, Features, LinearHead, extract_features, features_scores,
                                    get_scorer, sweep)
from ascood.scoring.scorers.adascale import PERCENTILE_GRID, PerturbedFeatures, adascale_perturb
from scorerhelpers import ConvBody

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "adascale")
# Float32 tolerance of the per-sample check: the same float32 ops in the same order as the reference give equal
# scores here (0.0 difference on torch 2.14 CPU); the tolerance leaves room for another BLAS / conv kernel.
RTOL, ATOL = 1e-5, 1e-5


def _tinynet():
    spec = importlib.util.spec_from_file_location("adascale_tinynet", os.path.join(FIXTURE, "tinynet.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = _tinynet()
META = json.load(open(os.path.join(FIXTURE, "expected.json"), encoding="utf-8"))
SETTINGS = {s["name"]: s for s in META["settings"]}


def _loader(x, bs):
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=bs)


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(FIXTURE, "expected.npz"), allow_pickle=False) as f:
        expected = {k: f[k] for k in f.files}
    model = TINY.build_model(load_file(os.path.join(FIXTURE, "model.safetensors")))
    fit, test = TINY.make_data()
    # The images are regenerated from their seeds: a changed generator would show here first.
    assert float(fit.double().sum()) == pytest.approx(META["data_check"]["fit_sum"], abs=1e-6)
    assert float(test.double().sum()) == pytest.approx(META["data_check"]["test_sum"], abs=1e-6)
    return model, fit, test, expected


def _scorer(variant, setting):
    s = SETTINGS[setting]
    return get_scorer(f"adascale_{variant}", percentile=s["percentile"], k1=s["k1"], k2=s["k2"], lmbda=s["lmbda"],
                      o=s["o"])


def test_fixture_names_its_source():
    assert META["source"] == "https://github.com/Jingkang50/OpenOOD"
    assert META["commit"] == "3c35632ee91b54b09d1f085d04f94744cece7d0b"
    assert "openood/postprocessors/adascale_postprocessor.py" in META["files"]


# -- (a) per sample against OpenOOD's postprocessor -------------------------------------------------------------
@pytest.mark.parametrize("path", ["model", "features", "memmap"])
@pytest.mark.parametrize("variant", ["a", "l"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_scores_equal_openood_per_sample(reference, setting, variant, path, tmp_path):
    model, fit, test, expected = reference
    bs = META["batch_size"]
    s = _scorer(variant, setting)
    if path == "model":
        s.fit(model, _loader(fit, bs))
        got = torch.cat([s.score(model, test[i:i + bs])[1] for i in range(0, len(test), bs)])
        pred = torch.cat([s.score(model, test[i:i + bs])[0] for i in range(0, len(test), bs)])
        with torch.no_grad():
            assert pred.tolist() == model(test).argmax(1).tolist()
    else:
        kw = {"directory": tmp_path, "name": "fit"} if path == "memmap" else {}
        fit_rec = extract_features(model, _loader(fit, bs), extras=s.record_extras(), **kw)
        if path == "memmap":
            assert isinstance(fit_rec.extras[s.record_extras()[0].key], np.memmap)
        s.fit_features(fit_rec)
        kw = {"directory": tmp_path, "name": "test"} if path == "memmap" else {}
        test_rec = extract_features(model, _loader(test, bs), extras=s.record_extras(), **kw)
        _, got, _ = features_scores(s, test_rec)
        key = s.record_extras()[0].key
        pct = s.sample_percentile(torch.tensor(np.array(test_rec.features)),
                                  torch.tensor(np.array(test_rec.extras[key])))
        np.testing.assert_allclose(pct.numpy(), expected[f"{setting}_{variant}_percentile"], rtol=0, atol=1e-9)
    ref = expected[f"{setting}_{variant}_score"]
    assert np.unique(ref.round(4)).size > 20  # the scores differ between samples (the check can fail)
    np.testing.assert_allclose(got.numpy(), ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(s._fit_values().numpy(), expected[f"{setting}_{variant}_fit_q"], rtol=RTOL, atol=ATOL)


def test_fixture_percentiles_spread(reference):
    *_, expected = reference
    p = expected["default_a_percentile"]
    assert p.min() < 77 and p.max() > 83  # the ECDF moves samples across the (75, 85) range


# -- (b) the formula written out ---------------------------------------------------------------------------------
def _plain_scores(h, ht, fit_h, fit_ht, W, b, pct, k1, k2, lmbda, logit_scaling):
    """AdaSCALE in float64 loops: sorting for top-k, counting for the ECDF, Python's round (half to even)."""
    m = h.shape[1]
    n1, n2 = int(m * k1 / 100), int(m * k2 / 100)

    def q_prime(a, at):
        out = []
        for i in range(len(a)):
            order = np.argsort(-a[i], kind="stable")
            out.append(sum(max(at[i, j], 0.0) for j in order[:n1])
                       + lmbda * sum(abs(a[i, j] - at[i, j]) for j in order[:n2]))
        return np.array(out)

    fit_q = q_prime(fit_h, fit_ht)
    scores = []
    for i, q in enumerate(q_prime(h, ht)):
        frac = 1 - np.sum(fit_q <= q) / len(fit_q)
        p = pct[0] + frac * (pct[1] - pct[0])
        k = max(1, m - round(m * p / 100))
        a = np.maximum(h[i], 0)
        r = a.sum() / np.sort(a)[::-1][:k].sum()
        z = W @ (h[i] * math.exp(r)) + b if not logit_scaling else (W @ h[i] + b) * r ** 2
        scores.append(np.log(np.exp(z - z.max()).sum()) + z.max())
    return np.array(scores)


@pytest.mark.parametrize("variant", ["a", "l"])
@pytest.mark.parametrize("m, k1, k2, lmbda, pct", [(37, 20, 6, 3.0, (62, 93)), (101, 5, 1, 10, (75, 85)),
                                                   (8, 50, 30, 0.5, (60, 99))])
def test_matches_the_formula_on_random_features(variant, m, k1, k2, lmbda, pct):
    g = torch.Generator().manual_seed(m)
    C, n_fit, n = 5, 23, 11
    fit_h = torch.rand(n_fit, m, generator=g) * 2 - 0.3  # some negative entries: relu matters
    fit_ht = fit_h + 0.4 * torch.randn(n_fit, m, generator=g)
    h = torch.rand(n, m, generator=g) * 2 - 0.3
    ht = h + 0.4 * torch.randn(n, m, generator=g)
    W, b = torch.randn(C, m, generator=g) * 0.3, torch.randn(C, generator=g)
    head = LinearHead(W, b)
    s = get_scorer(f"adascale_{variant}", percentile=pct, k1=k1, k2=k2, lmbda=lmbda)
    key = s.record_extras()[0].key
    s.fit_features(Features(head.fc(fit_h), fit_h, head=head, extras={key: fit_ht}))
    got = s.score_features(head.fc(h), h, extras={key: ht})
    want = _plain_scores(*(t.double().numpy() for t in (h, ht, fit_h, fit_ht, W, b)), pct, k1, k2, lmbda,
                         variant == "l")
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-5)
    assert got.dtype == torch.float32 and got.shape == (n,)


def test_standardize_uses_the_models_full_head():
    g = torch.Generator().manual_seed(5)
    h, ht = torch.rand(9, 40, generator=g), torch.rand(9, 40, generator=g)
    head = LinearHead(torch.randn(4, 40, generator=g), torch.randn(4, generator=g),
                      standardize=lambda v: (v - v.mean(1, keepdim=True)) * 0.5)
    key = PerturbedFeatures(0.05, 0.5).key
    for variant in "al":
        plain = get_scorer(f"adascale_{variant}").fit_features(Features(head.logits(h), h, head=head,
                                                                        extras={key: ht}))
        std = get_scorer(f"adascale_{variant}", standardize=True).fit_features(
            Features(head.logits(h), h, head=head, extras={key: ht}))
        r = std.score_features(head.logits(h), h, extras={key: ht})
        p = std.sample_percentile(h, ht)
        from ascood.scoring.scorers.adascale import adascale_ratio
        ratio = adascale_ratio(h, p)
        want = torch.logsumexp(head.logits(h) * ratio ** 2 if variant == "l" else head.logits(h * torch.exp(ratio)), 1)
        torch.testing.assert_close(r, want)
        assert not torch.allclose(plain.score_features(head.logits(h), h, extras={key: ht}), r)


@pytest.mark.parametrize("shape, o", [((3, 2, 5, 7), 0.3), ((4, 11), 0.5), ((2, 1, 3, 3), 1.0)])
def test_perturbation_moves_the_least_sensitive_elements(shape, o):
    g = torch.Generator().manual_seed(len(shape))
    x, grad = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    got = adascale_perturb(x, grad, o, 0.5)
    want = x.clone().reshape(shape[0], -1)
    for i in range(shape[0]):
        gi = grad[i].reshape(-1)
        for j in np.argsort(gi.abs().numpy(), kind="stable")[:int(gi.numel() * o)]:
            want[i, j] += 0.5 * float(torch.sign(gi[j]))
    torch.testing.assert_close(got, want.reshape(shape), rtol=0, atol=0)


def test_perturbed_features_follow_the_max_logit_gradient():
    torch.manual_seed(1)
    model = TINY.build_model()
    x = torch.randn(5, *TINY.SHAPE)
    z, h, ht = PerturbedFeatures(0.1, 0.5).run(model, x)
    assert all(p.grad is None for p in model.parameters())  # the input gradient only
    for i in range(len(x)):  # one image at a time, through model.forward and .backward
        xi = x[i:i + 1].clone().requires_grad_(True)
        model(xi).max().backward()
        flat = xi.grad.reshape(-1)
        xt = x[i].clone().reshape(-1)
        idx = flat.abs().argsort()[:int(flat.numel() * 0.1)]
        xt[idx] += 0.5 * flat[idx].sign()
        with torch.no_grad():
            torch.testing.assert_close(ht[i], model.features(xt.reshape(1, *TINY.SHAPE))[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(h[i], model.features(x[i:i + 1])[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(z[i], model(x[i:i + 1])[0], rtol=1e-5, atol=1e-6)


# -- (c) bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, says", [
    ({"percentile": 80}, "percentile must be a pair"), ({"percentile": "ab"}, "percentile must be a pair"),
    ({"percentile": (85, 75)}, "percentile must satisfy 0 < p_min <= p_max < 100, got \\(85, 75\\)"),
    ({"percentile": (0, 50)}, "percentile must satisfy"), ({"percentile": (50, 100)}, "percentile must satisfy"),
    ({"percentile": (1, 2, 3)}, "percentile must be a pair"),
    ({"k1": 0}, "k1 must be an integer >= 1"), ({"k1": True}, "k1 must be an integer"),
    ({"k2": 2.5}, "k2 must be an integer"), ({"k1": 101}, "k1 is a percentage"),
    ({"lmbda": -1}, "lmbda must be a finite number >= 0"), ({"lmbda": float("nan")}, "lmbda"),
    ({"lmbda": "10"}, "lmbda"), ({"o": 0}, r"o \(the fraction"), ({"o": 1.5}, r"o \(the fraction"),
    ({"eps": -0.1}, "eps must be"), ({"eps": float("inf")}, "eps must be"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1"),
])
@pytest.mark.parametrize("variant", ["a", "l"])
def test_bad_hyperparameters_are_refused_by_name(variant, kw, says):
    with pytest.raises(ValueError, match=f"^adascale_{variant} {says}"):
        get_scorer(f"adascale_{variant}", **kw)
    with pytest.raises(ValueError, match=says):
        get_scorer(f"adascale_{variant}").set_params(**kw)


def test_names_and_aliases():
    for name in ("adascale_a", "AdaSCALE-A", "adascalea", "adascale-a"):
        assert type(get_scorer(name)).__name__ == "AdaScaleA"
    for name in ("adascale_l", "AdaSCALE_L", "adascalel"):
        assert type(get_scorer(name)).__name__ == "AdaScaleL"


def test_missing_or_bad_extras_and_unfitted_use_are_refused():
    h = torch.rand(6, 20)
    head = LinearHead(torch.randn(3, 20), torch.zeros(3))
    s = get_scorer("adascale_a")
    key = s.record_extras()[0].key
    with pytest.raises(RuntimeError, match="call fit"):
        s.score_features(head.fc(h), h, head=head, extras={key: h})
    with pytest.raises(ValueError, match=r"adascale_a needs the extra per-row arrays \['adascale_perturbed_o0.05"):
        s.fit_features(Features(head.fc(h), h, head=head))
    s.fit_features(Features(head.fc(h), h, head=head, extras={key: h + 0.1}))
    with pytest.raises(ValueError, match="adascale_a needs extras="):
        s.score_features(head.fc(h), h, head=head)
    with pytest.raises(ValueError, match="with the logits' B = 6 rows"):
        s.score_features(head.fc(h), h, head=head, extras={key: h[:4]})
    with pytest.raises(ValueError, match="the perturbed features are"):
        s.score_features(head.fc(h), h, head=head, extras={key: h[:, :5]})
    s.set_params(o=0.1)  # another perturbation: another extra, and a refit
    assert not s.fitted and s.record_extras()[0].key != key
    with pytest.raises(TypeError, match="features\\(x\\), head\\(h\\) and fc"):
        get_scorer("adascale_l").fit(nn.Linear(4, 3), _loader(torch.randn(4, 4), 2))


def test_nonfinite_perturbed_features_are_refused_with_the_row():
    h = torch.rand(30, 20)
    ht = h.clone()
    ht[17, 3] = float("inf")
    key = PerturbedFeatures(0.05, 0.5).key
    head = LinearHead(torch.randn(3, 20))
    with pytest.raises(ValueError, match=r"adascale_l: the fit set's perturbed features hold NaN or inf \(first at "
                                         r"row 17\)"):
        get_scorer("adascale_l").fit_features(Features(head.fc(h), h, head=head, extras={key: ht}))
    h[4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the fit set's features hold NaN or inf \(first at row 4\)"):
        get_scorer("adascale_l").fit_features(Features(head.fc(h.nan_to_num()), h, head=head, extras={key: ht}))


def test_bad_extras_in_a_record_are_refused():
    with pytest.raises(ValueError, match="extras key must be"):
        Features(torch.zeros(3, 2), extras={"a/b": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        Features(torch.zeros(3, 2), extras={"ok": torch.zeros(4, 4)})
    with pytest.raises(TypeError, match="extras must be a dict"):
        Features(torch.zeros(3, 2), extras=[torch.zeros(3)])


def test_small_feature_counts_warn_that_a_term_vanishes():
    h = torch.rand(10, 30)
    key = PerturbedFeatures(0.05, 0.5).key
    with pytest.warns(UserWarning, match=r"k2 = 1% of m = 30 features is 0 activations"):
        get_scorer("adascale_a").fit_features(Features(torch.zeros(10, 2), h, head=LinearHead(torch.ones(2, 30)),
                                                       extras={key: h}))


def test_fit_subsample_is_seeded_and_bounded():
    h = torch.rand(50, 20)
    key = PerturbedFeatures(0.05, 0.5).key
    rec = Features(torch.zeros(50, 2), h, head=LinearHead(torch.ones(2, 20)), extras={key: h * 0.9})
    a = get_scorer("adascale_a", num_samples=7, k1=10, k2=10).fit_features(rec)
    b = get_scorer("adascale_a", num_samples=7, k1=10, k2=10).fit_features(rec)
    assert a.fit_c.shape == (7,) and torch.equal(a.fit_c, b.fit_c)
    assert get_scorer("adascale_a", num_samples=None, k1=10, k2=10).fit_features(rec).fit_c.shape == (50,)


# -- (d) records with extras, the cache and the APS sweep -------------------------------------------------------
def test_record_extras_round_trip_through_files_take_slice_and_chunks(tmp_path):
    g = torch.Generator().manual_seed(0)
    rec = Features(torch.randn(9, 3, generator=g), torch.randn(9, 4, generator=g), torch.arange(9),
                   extras={"p_o0.1": torch.randn(9, 4, generator=g), "q": torch.randn(9, 2, 3, generator=g)})
    rec.extras["p_o0.1"][5, 1] = float("nan")
    rec.save(tmp_path, "r")
    back = Features.load(tmp_path, "r")
    assert isinstance(back.extras["q"], np.memmap) and back.nonfinite == {"extras.p_o0.1": 5}
    for k in rec.extras:
        torch.testing.assert_close(torch.as_tensor(np.asarray(back.extras[k])), rec.extras[k], equal_nan=True)
    idx = torch.tensor([7, 2, 2, 0])
    torch.testing.assert_close(back.take(idx).extras["q"], rec.extras["q"][idx])
    assert back.slice(3).extras["q"].shape == (3, 2, 3)
    chunks = list(back.chunks(4, extras=["q"]))
    assert [c[3]["q"].shape[0] for c in chunks] == [4, 4, 1]
    torch.testing.assert_close(torch.cat([c[3]["q"] for c in chunks]), rec.extras["q"])
    assert [len(c) for c in back.chunks(4)] == [3, 3, 3]  # without extras: the three arrays, as before
    with pytest.raises(ValueError, match=r"needs the extra per-row arrays \['nope'\]"):
        next(back.chunks(4, extras=["nope"]))
    with open(tmp_path / "r.json", encoding="utf-8") as f:
        assert set(json.load(f)["arrays"]) == {"logits", "features", "labels"}  # extras in their own table


def _Body():
    return ConvBody(24)


def _sweep_data():
    torch.manual_seed(0)
    model = ascood.ASCOODNet(_Body(), 3, head="linear").eval()
    g = torch.Generator().manual_seed(1)
    val_id = _loader(torch.randn(24, 3, 6, 6, generator=g), 8)
    val_ood = _loader(torch.rand(20, 3, 6, 6, generator=g) * 4, 8)
    return model, val_id, val_ood


@pytest.mark.parametrize("variant", ["a", "l"])
def test_sweep_runs_the_default_grid_with_one_extraction_per_split(variant):
    model, val_id, val_ood = _sweep_data()
    cache = FeatureCache(model)
    s = get_scorer(f"adascale_{variant}", k1=25, k2=10)
    res = sweep(s, model, val_id, val_ood, cache=cache, grid={**s.default_grid, "k1": [25], "k2": [10]})
    assert len(res.trials) == len(PERCENTILE_GRID) == 36
    assert cache.extractions == 2  # ID val (also the fit split) and OOD val, each with the perturbed features
    assert res.best_auroc == max(a for _, a in res.trials)
    assert s.get_params()["percentile"] == tuple(res.best_params["percentile"])
    # The best point scored again by a fresh scorer through the model gives the same AUROC.
    fresh = get_scorer(f"adascale_{variant}", **{k: v for k, v in res.best_params.items()})
    fresh.fit(model, val_id)
    from ascood.scoring.metrics import ood_metrics
    s_id = torch.cat([fresh.score(model, x)[1] for x, _ in val_id])
    s_ood = torch.cat([fresh.score(model, x)[1] for x, _ in val_ood])
    assert ood_metrics(s_id, s_ood)["auroc"] == pytest.approx(res.best_auroc, abs=1e-9)


@pytest.mark.parametrize("directory", [False, True])
def test_a_grid_over_o_extracts_each_split_once_per_o(directory, tmp_path):
    model, val_id, val_ood = _sweep_data()
    cache = FeatureCache(model, directory=tmp_path if directory else None)
    s = get_scorer("adascale_a", k1=25, k2=10)
    grid = {"o": [0.05, 0.2], "k1": [25], "k2": [10], "lmbda": [10], "percentile": [[60, 65], [70, 90]]}
    res = sweep(s, model, val_id, val_ood, cache=cache, grid=grid)
    assert len(res.trials) == 4
    assert cache.extractions == 4  # 2 splits x 2 values of o (the second o: a pass for the extra alone)
    rec = cache.get(val_ood)
    keys = {PerturbedFeatures(o, 0.5).key for o in (0.05, 0.2)}
    assert set(rec.extras) == keys
    if directory:
        assert isinstance(rec.features, np.memmap) and all(isinstance(v, np.memmap) for v in rec.extras.values())
    # Each trial equals a fresh scorer fitted and scored through the model at that point.
    from ascood.scoring.metrics import ood_metrics
    for params, auroc in res.trials:
        fresh = get_scorer("adascale_a", **params)
        fresh.fit(model, val_id)
        s_id = torch.cat([fresh.score(model, x)[1] for x, _ in val_id])
        s_ood = torch.cat([fresh.score(model, x)[1] for x, _ in val_ood])
        assert ood_metrics(s_id, s_ood)["auroc"] == pytest.approx(auroc, abs=1e-9), params


def test_evaluate_scores_adascale_from_the_shared_cache():
    model, val_id, val_ood = _sweep_data()
    features = FeatureCache(model)
    s = get_scorer("adascale_l", k1=25, k2=10)
    table = ascood.evaluate(model, val_id, {"ood": val_ood}, scorers={"ada": s}, id_val_loader=val_id,
                            features=features)
    assert len(table.rows) == 1 and 0 <= table.rows[0]["auroc"] <= 100
    # ID val: the clean pass, then its perturbed features alone; OOD: one pass with them.
    assert features.extractions == 3


def test_a_detector_stores_adascale_and_export_refuses_it_by_name(tmp_path):
    import deployhelpers as H
    from ascood.deploy import Detector
    from ascood.deploy.graph import build_graph

    det = H.fitted("adascale_l")
    loaded = Detector.load(det.save(tmp_path / "det"))
    torch.testing.assert_close(loaded.scorer.fit_c, det.scorer.fit_c)
    assert loaded.scorer.get_params() == det.scorer.get_params()
    with pytest.raises(ValueError, match="scorer adascale_l cannot be exported yet"):
        build_graph(det)
