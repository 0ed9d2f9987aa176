"""The feature-level API (issue 22): feature path == model path for every scorer, features extracted once
per split, ReAct's clip computed once per percentile, chunked fits equal to brute-force float64, NNGuide's
banks, memory-mapped feature files, TempScale's tolerance stop."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.scorers import (SCORERS, FeatureCache, Features, LinearHead, extract_features, features_scores,
                                    get_scorer, loader_scores, sweep)
from ascood.scoring.scorers.shaping import ReAct
from scorerhelpers import ConvBody

C = 4


def _Body():
    return ConvBody(24)


def _data(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 3, 6, 6, generator=g) + shift
    x[torch.arange(n), y % 3] += 1.5 * (y[:, None, None] + 1)  # class structure
    return x, y


def _model(head="zscore"):
    """A random conv body whose linear layer is least-squares fitted to the training classes (accurate enough
    that every class has correctly classified training samples, which SHE needs)."""
    torch.manual_seed(0)
    model = ascood.ASCOODNet(_Body(), C, head=head, input_mean=[0.0] * 3, input_std=[0.5, 0.25, 0.5]).eval()
    x, y = _data(96, 0)
    with torch.no_grad():
        a = model.standardize(model.features(x)).double()
        a = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, 4.0 * nn.functional.one_hot(y, C).double()).solution
        model.fc.weight.copy_(sol[:-1].T)
        model.fc.bias.copy_(sol[-1])
    return model


def _loader(n, seed, shift=0.0, bs=16):
    return DataLoader(TensorDataset(*_data(n, seed, shift)), batch_size=bs)


# Small hyperparameters so every scorer has something to do on 96 training rows.
SMALL = {"knn": {"K": 5}, "vim": {"dim": 8}, "nnguide": {"K": 5, "bank": "all"}, "relation": {"pow": 2}}


def _make(name):
    return get_scorer(name, **SMALL.get(name, {}))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_feature_path_equals_model_path(name):
    """fit(model, loader) + score(model, x) == fit_features(extract_features(...)) + score_features(logits, h)."""
    model = _model()
    train = _loader(96, 0)
    fit_split = _make(name).fit_split
    fit_loader = train if fit_split == "train" else _loader(48, 5)
    x, _ = _data(20, 1, shift=0.3)
    a, b = _make(name), _make(name)
    if a.needs_fit:
        a.fit(model, fit_loader)
        b.fit_features(extract_features(model, fit_loader, extras=b.record_extras()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ODIN / i-ODIN: no std on the model is fine here
        pred, score = a.score(model, x)
    logits, h = model(x, return_features=True)
    assert torch.equal(pred, logits.argmax(1)) or a.needs_input
    if a.needs_input:
        with pytest.raises(TypeError, match="images"):
            b.score_features(logits, h, head=LinearHead.from_model(model))
        return
    # AdaSCALE also reads the features of a perturbed input (its record extra); the others nothing more.
    extras = {"extras": {e.key: e(model, x) for e in b.record_extras()}} if b.record_extras() else {}
    got = b.score_features(logits.detach(), h.detach(), head=LinearHead.from_model(model), **extras)
    assert got.shape == (20,) and got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, score, rtol=1e-5, atol=1e-5)
    # The whole-record helper is the same numbers, and the head stored at fit is used when none is passed.
    feats = extract_features(model, DataLoader(TensorDataset(x, torch.zeros(20, dtype=torch.long)), batch_size=7),
                             extras=b.record_extras())
    pred2, score2, _ = features_scores(b, feats, rows=6)
    torch.testing.assert_close(score2, score, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred2, pred)


@pytest.mark.parametrize("name", ["knn", "mds", "vim", "scale", "gradnorm"])
def test_head_space_and_memory_mapped_record_equal_in_ram(name, tmp_path):
    """feature_space="head" derives standardize(h) chunk by chunk; a memory-mapped record scores the same."""
    model = _model()
    train = _loader(96, 0)
    # MDS reads raw features: z-scored rows all sum to 0, so the head-space covariance is singular and its
    # pseudo-inverse depends on rounding (see MDS's docstring).
    kw = {"knn": {"K": 5, "feature_space": "head"}, "mds": {"feature_space": "raw"},
          "vim": {"dim": 8, "feature_space": "head"}, "scale": {"standardize": True}, "gradnorm": {}}[name]
    ram = extract_features(model, train)
    mm = extract_features(model, train, directory=tmp_path, name="train")
    assert isinstance(mm.features, np.memmap) and mm.batch_size == 16
    assert np.array_equal(np.asarray(mm.features), ram.features.numpy())
    a, b = get_scorer(name, **kw), get_scorer(name, **kw)
    if a.needs_fit:
        a.fit_features(ram)
        b.chunk_rows = 10  # the memory-mapped file is read 10 rows at a time
        b.fit_features(mm)
    test = extract_features(model, _loader(24, 2), directory=tmp_path, name="test")
    s_ram = features_scores(a, extract_features(model, _loader(24, 2)))[1]
    s_mm = features_scores(b, test)[1]
    torch.testing.assert_close(s_mm, s_ram, rtol=1e-5, atol=1e-5)
    # ... and the model path agrees in the head space too.
    x, _ = _data(24, 2)
    torch.testing.assert_close(a.score(model, x)[1], s_ram, rtol=1e-5, atol=1e-5)


def test_features_record_checks_and_reload(tmp_path):
    with pytest.raises(ValueError, match=r"features must be \(N, m\)"):
        Features(logits=torch.zeros(3, 2), features=torch.zeros(3))
    with pytest.raises(ValueError, match="number of rows"):
        Features(logits=torch.zeros(3, 2), features=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="head weight"):
        Features(logits=torch.zeros(3, 2), features=torch.zeros(3, 5), head=LinearHead(torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="labels"):
        get_scorer("mds").fit_features(torch.randn(10, 3))
    with pytest.raises(ValueError, match="head"):
        get_scorer("vim", dim=2).fit_features(torch.randn(10, 3), logits=torch.randn(10, 2))
    with pytest.raises(ValueError, match="needs features"):
        get_scorer("knn").fit_features(logits=torch.randn(10, 2))
    f = Features(torch.randn(5, 3), torch.randn(5, 4), torch.arange(5), batch_size=2)
    f.save(tmp_path, "s")
    back = Features.load(tmp_path, "s")
    assert back.batch_size == 2 and torch.equal(back.labels, f.labels)
    assert np.array_equal(np.asarray(back.features), f.features.numpy())
    (tmp_path / "s.features.bin").write_bytes(b"\0" * 12)  # truncated
    with pytest.raises(ValueError, match="truncated"):
        Features.load(tmp_path, "s")


class _CountingModel(nn.Module):
    """Wraps an ASCOODNet and counts the images its backbone sees."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.seen = model, 0
        self.fc = model.fc

    def features(self, x):
        self.seen += x.shape[0]
        return self.inner.features(x)

    def head(self, h):
        return self.inner.head(h)

    def standardize(self, h):
        return self.inner.standardize(h)

    def forward(self, x):
        return self.head(self.features(x))


def test_each_split_runs_through_the_model_once_for_all_scorers_and_grid_points(monkeypatch):
    """APS sweeps of several scorers plus the evaluation share one FeatureCache: 1 pass per split."""
    model = _CountingModel(_model())
    train, val_id, val_ood = _loader(64, 0), _loader(32, 1), _loader(32, 2, shift=-2.0)
    test_id, test_ood = _loader(40, 3), _loader(24, 4, shift=2.0)
    calls = []
    monkeypatch.setattr(ReAct, "_percentile", lambda self, q: calls.append(q) or float(
        np.percentile(self._activations, q)))
    cache = FeatureCache(model)
    scorers = [get_scorer(n) for n in ("react", "knn", "scale", "vim", "gen", "dice")]
    scorers[1].set_params(K=5)
    for sc in scorers:
        grid = {"dim": [4, 8, 12]} if sc.name == "vim" else {"K": [1, 3, 5]} if sc.name == "knn" else None
        sweep(sc, model, val_id, val_ood, grid=grid, id_train_loader=train, cache=cache)
    table = ascood.evaluate(model, test_id, {"o": test_ood}, scorers=scorers + [get_scorer("msp")],
                            id_train_loader=train, id_val_loader=val_id, features=cache)
    assert cache.extractions == 5 and model.seen == 64 + 32 + 32 + 40 + 24
    # ReAct's clip value: one percentile computation per grid value, none per scored batch.
    assert sorted(calls) == [85.0, 90.0, 95.0, 99.0]
    assert {r["scorer"] for r in table.rows} == {s.name for s in scorers} | {"msp"}


def test_react_threshold_computed_once_per_percentile(monkeypatch):
    model = _model()
    calls = []
    real = ReAct._percentile
    monkeypatch.setattr(ReAct, "_percentile", lambda self, q: calls.append(q) or real(self, q))
    react = get_scorer("react").fit(model, _loader(48, 0))
    x = _data(16, 1)[0]
    for _ in range(5):
        react.score(model, x)
    react.set_params(percentile=95)
    react.score(model, x)
    react.set_params(percentile=90)
    react.score(model, x)
    assert calls == [90.0, 95.0]
    acts = model.features(_data(48, 0)[0]).detach().flatten().numpy()
    assert react.threshold == pytest.approx(float(np.percentile(acts, 90)), rel=1e-6)
    react.fit(model, _loader(48, 0))  # a refit forgets the cached clip values
    react.score(model, x)
    assert calls == [90.0, 95.0, 90.0]


class _ChunkSpy(Features):
    """A record that remembers the largest block of rows any reader asked for."""

    def __post_init__(self):
        super().__post_init__()
        self.largest = 0

    def chunks(self, rows):
        self.largest = max(self.largest, rows)
        return super().chunks(rows)

    def feature_rows(self, start, stop):
        self.largest = max(self.largest, stop - start)
        return super().feature_rows(start, stop)


def _bank_data(n, m, classes, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = torch.randn(classes, m, generator=g) * 2
    h = (means[y] + torch.randn(n, m, generator=g) * torch.linspace(0.2, 2.0, m)).relu()
    logits = h @ torch.randn(m, classes, generator=g) * 0.3
    return h.float(), logits.float(), y


def test_memory_bounded_fits_read_chunks_and_equal_float64_brute_force():
    """KNN / NNGuide / MDS / RMDS / ViM on a bank larger than their chunk equal the float64 formulas."""
    import sklearn.covariance

    n, m, k = 700, 16, 5
    h, z, y = _bank_data(n, m, k, 0)
    q_h, q_z, _ = _bank_data(50, m, k, 1)
    W, b = torch.randn(k, m, generator=torch.Generator().manual_seed(2)), torch.randn(k)
    head = LinearHead(W, b)
    hd, qd = h.double(), q_h.double()

    def normalize(a):
        return a / torch.sqrt((a * a).sum(1, keepdim=True) + 1e-10)

    # KNN: streamed bank (max_device_bank_mb=0) in 64-row blocks.
    feats = _ChunkSpy(z, h, y, head)
    knn = get_scorer("knn", K=7, max_device_bank_mb=0)
    knn.fit_features(feats)
    knn.bank.chunk = 64
    got = knn.score_features(q_z, q_h)
    sims = normalize(qd) @ normalize(hd).T
    want = -(2 - 2 * sims.topk(7, dim=1).values[:, -1])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert feats.largest <= 64

    # MDS / RMDS: 100-row chunks, against sklearn's EmpiricalCovariance + numpy pinv (two-pass, float64).
    for name in ("mds", "rmds"):
        feats = _ChunkSpy(z, h, y, head)
        sc = get_scorer(name)
        sc.chunk_rows = 100
        sc.fit_features(feats)
        assert feats.largest <= 100
        means = torch.stack([hd[y == c].mean(0) for c in range(k)])
        centred = (hd - means[y]).numpy()
        prec = torch.from_numpy(np.linalg.pinv(sklearn.covariance.EmpiricalCovariance().fit(centred).covariance_,
                                               hermitian=True))
        d = torch.stack([(((qd - mu) @ prec) * (qd - mu)).sum(1) for mu in means], 1)
        if name == "rmds":
            mu0 = hd.mean(0)
            prec0 = torch.from_numpy(np.linalg.pinv(np.cov(hd.numpy().T, bias=True), hermitian=True))
            d = d - (((qd - mu0) @ prec0) * (qd - mu0)).sum(1, keepdim=True)
        torch.testing.assert_close(sc.score_features(q_z, q_h).double(), (-d).amax(1), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sc.means, means, rtol=1e-10, atol=1e-10)

    # ViM: 100-row chunks, against the paper's formula in float64 with numpy's eigh.
    feats = _ChunkSpy(z, h, y, head)
    vim = get_scorer("vim", dim=6)
    vim.chunk_rows = 100
    vim.fit_features(feats)
    assert feats.largest <= 100
    Wd, bd = W.double(), b.double()
    u = -(torch.linalg.pinv(Wd) @ bd)
    ev, evec = np.linalg.eigh(((hd - u).T @ (hd - u)).numpy() / n)
    NS = torch.from_numpy(evec[:, np.argsort(ev)[::-1][6:]].copy())
    alpha = (hd @ Wd.T + bd).amax(1).mean() / torch.linalg.norm((hd - u) @ NS, dim=1).mean()
    want = torch.logsumexp(qd @ Wd.T + bd, 1) - alpha * torch.linalg.norm((qd - u) @ NS, dim=1)
    torch.testing.assert_close(vim.score_features(q_z, q_h).double(), want, rtol=1e-5, atol=1e-5)


def test_nnguide_whole_bank_equals_brute_force_knn_float64():
    n, m, k = 500, 12, 3
    h, z, y = _bank_data(n, m, k, 3)
    q_h, q_z, _ = _bank_data(40, m, k, 4)
    nn_all = get_scorer("nnguide", K=10, bank="all", max_device_bank_mb=0)
    nn_all.fit_features(h, y, logits=z)
    nn_all.bank_rows.chunk = 37  # several blocks
    hd, zd, qd, qzd = h.double(), z.double(), q_h.double(), q_z.double()

    def normalize(a):
        return a / torch.linalg.norm(a, dim=1, keepdim=True)

    bank = normalize(hd) * torch.logsumexp(zd, 1, keepdim=True)  # the authors' bank: every ID-train row
    sims = normalize(qd) @ bank.T
    want = sims.sort(1, descending=True).values[:, :10].mean(1) * torch.logsumexp(qzd, 1)
    torch.testing.assert_close(nn_all.score_features(q_z, q_h).double(), want, rtol=1e-5, atol=1e-5)
    assert nn_all.get_params() == {"K": 10, "alpha": 0.01, "bank": "all"}


def test_nnguide_bank_choices_random_first_and_the_capped_k_warning():
    n, m = 1000, 8
    h, z, y = _bank_data(n, m, 2, 5)
    feats = Features(z, h, y, batch_size=64)
    # "random" (the default): round(alpha * N) rows, a fixed random subset (NNGuide's paper code).
    r = get_scorer("nnguide", K=5, alpha=0.05)
    assert r.bank == "random"
    r.fit_features(feats)
    assert r.bank_rows.n == 50
    # "first": OpenOOD's loop appends a batch, then stops once batches * batch_size > int(N * alpha).
    taken, batches = 0, 0
    for start in range(0, n, 64):
        batches += 1
        taken += min(64, n - start)
        if batches * 64 > int(n * 0.05):
            break
    f = get_scorer("nnguide", K=5, alpha=0.05, bank="first").fit_features(feats)
    assert f.bank_rows.n == taken == 64
    # Scoring the first rows as the bank == a whole-bank scorer fitted on those rows.
    whole = get_scorer("nnguide", K=5, bank="all").fit_features(Features(z[:64], h[:64], y[:64]))
    torch.testing.assert_close(f.score_features(z[:20], h[:20]), whole.score_features(z[:20], h[:20]))
    with pytest.raises(ValueError, match="batch size"):
        get_scorer("nnguide", bank="first").fit_features(h, y, logits=z)
    with pytest.raises(ValueError, match="bank must be one of"):
        get_scorer("nnguide", bank="some")
    # A bank smaller than K: K is capped, with a warning that says so.
    small = get_scorer("nnguide", K=100, alpha=0.01).fit_features(feats)
    with pytest.warns(UserWarning, match="larger than its bank of 10"):
        small.score_features(z[:4], h[:4])
    # Changing the bank or alpha refits (sweep and evaluate see fitted == False).
    small.set_params(bank="all")
    assert not small.fitted


def test_tempscale_reference_budget_stops_short_tolerance_reaches_the_optimum():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    z = torch.randn(400, 5, generator=g) * 3
    z[torch.arange(400), y] += 4.0  # confident but over-scaled logits: the NLL optimum is far above 1.5
    zd = z.double()

    def argmin_nll(ts):  # the NLL of z / T on a grid of T, vectorised
        logp = torch.log_softmax(zd[None] / ts[:, None, None], 2)
        return ts[(-logp[:, torch.arange(400), y].mean(1)).argmin()].item()

    coarse = argmin_nll(torch.linspace(0.2, 10, 981, dtype=torch.float64))
    t_star = argmin_nll(torch.linspace(coarse - 0.02, coarse + 0.02, 401, dtype=torch.float64))  # 1e-4 apart
    ref = get_scorer("tempscale").fit_features(logits=z, labels=y)  # OpenOOD's 50 iterations at lr 0.01
    tol = get_scorer("tempscale", tol=1e-6).fit_features(logits=z, labels=y)
    assert abs(ref.temperature - t_star) > 0.1 and ref.grad_at_fit > 1e-3
    assert tol.temperature == pytest.approx(t_star, abs=2e-4) and tol.grad_at_fit < 1e-4
    with pytest.raises(ValueError, match="tol"):
        get_scorer("tempscale", tol=0)


def test_plain_classifier_scores_logit_scorers_and_names_what_feature_scorers_need():
    """A model without features()/head(): logit scorers work from cached logits; feature scorers say why not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, C)).eval()
    loader = _loader(32, 0)
    feats = extract_features(model, loader)
    assert feats.features is None and feats.logits.shape == (32, C)
    x = _data(32, 0)[0]
    for name in ("msp", "ebo", "entropy", "klm"):
        sc = get_scorer(name)
        if sc.needs_fit:
            sc.fit(model, loader)
        torch.testing.assert_close(loader_scores(sc, model, loader)[1], sc.score(model, x)[1])
    with pytest.raises(ValueError, match="needs features"):
        get_scorer("knn").fit_features(feats)


def test_pinvh_and_eigh_equal_numpy_on_a_rank_deficient_covariance():
    from ascood.scoring.scorers.distance import eigh, pinvh

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    a[:, 5] = 0.0  # a dead ReLU unit: zero variance
    a[:, 7] = a[:, 3] - a[:, 2]  # an exact linear dependence
    cov = a.T @ a / 40
    want = torch.from_numpy(np.linalg.pinv(cov.numpy(), hermitian=True))
    torch.testing.assert_close(pinvh(cov), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pinvh(cov), torch.linalg.pinv(cov, hermitian=True), rtol=1e-9, atol=1e-9)
    w, v = eigh(cov)
    torch.testing.assert_close((v * w) @ v.T, cov, rtol=1e-12, atol=1e-12)
    assert bool((w[1:] >= w[:-1]).all())


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_tied_gaussian_streamed_equals_two_pass_float64(offset):
    """Chunked class means and pooled scatter == the two-pass float64 computation, even with a common
    offset 1000x the spread (where a one-pass sum of squares in float32 would lose every digit)."""
    from ascood.scoring.scorers.distance import TiedGaussian

    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 7, (900,), generator=g)
    h = torch.randn(900, 10, generator=g, dtype=torch.float64) + 3 * y[:, None] + offset
    acc = TiedGaussian()
    for s in range(0, 900, 128):
        acc.update(h[s:s + 128], y[s:s + 128])
    classes, means, cov = acc.result()
    want_means = torch.stack([h[y == c].mean(0) for c in range(7)])
    centred = h - want_means[y]
    want_cov = centred.T @ centred / 900
    assert classes.tolist() == list(range(7))
    torch.testing.assert_close(means, want_means, rtol=1e-12, atol=1e-12 * max(1.0, offset))
    torch.testing.assert_close(cov, want_cov, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=">= 0"):
        acc.update(h[:3], torch.tensor([0, -1, 2]))


FITTED_ON_FEATURES = ("knn", "nnguide", "mds", "rmds", "vim", "relation", "she", "dice", "react")


@pytest.mark.parametrize("name", FITTED_ON_FEATURES)
def test_bad_fit_data_and_mismatched_widths_are_named(name):
    """NaN in the fit set, an empty fit set, and scoring features of another width fail with the scorer's name."""
    h, _, _ = _bank_data(120, 12, 3, 0)
    head = LinearHead(torch.randn(3, 12, generator=torch.Generator().manual_seed(11)), torch.zeros(3))
    z = head.logits(h)
    y = z.argmax(1)  # every sample correctly classified (SHE stores the correct ones' patterns)
    assert set(y.tolist()) == {0, 1, 2}
    kw = {"knn": {"K": 5}, "nnguide": {"K": 5, "alpha": 1.0}, "vim": {"dim": 4}}.get(name, {})
    bad = h.clone()
    bad[17, 2] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}: the fit set's features hold NaN or inf \(first at row 17\)"):
        get_scorer(name, **kw).fit_features(bad, y, logits=z, head=head)
    with pytest.raises(ValueError, match=rf"{name}: the fit set is empty"):
        get_scorer(name, **kw).fit_features(h[:0], y[:0], logits=z[:0], head=head)
    sc = get_scorer(name, **kw).fit_features(h, y, logits=z, head=head)
    assert torch.isfinite(sc.score_features(z[:4], h[:4])).all()
    with pytest.raises(ValueError, match=rf"{name}: features have 7 columns, the scorer was fitted on 12"):
        sc.score_features(z[:4], torch.randn(4, 7))
    with pytest.raises(ValueError, match=rf"{name}: logits must be \(B, C\)"):
        sc.score_features(z[0], h[0])


def test_float_labels_must_be_whole_numbers():
    h, z, y = _bank_data(30, 4, 3, 0)
    get_scorer("mds").fit_features(h, y.double(), logits=z)  # 0.0, 1.0, 2.0: class indices
    with pytest.raises(ValueError, match="labels must be integer class indices, got 0.5"):
        get_scorer("mds").fit_features(h, y.double() + 0.5, logits=z)
