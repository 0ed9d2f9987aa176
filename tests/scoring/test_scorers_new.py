"""DICE, SHE, KL-Matching, Entropy, GradNorm and MDS's input preprocessing against their references.

Each scorer is checked against (a) its paper's formula or OpenOOD's postprocessor code, written out here
in numpy / plain torch, and (b) per sample, against pytorch-ood 0.4.0 on the same model and data (a test
dependency; those tests are skipped, saying so, where it is not installed). pytorch-ood's detectors return
outlier scores (higher = more OOD), so ascood's score is their negative, up to the scale noted per test.
"""
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch import nn

import ascood
from ascood.scoring.scorers import LinearHead, get_scorer

C, M = 5, 16


def _feats(n, seed, scale=1.0):
    """Non-negative features with class structure, and their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    centres = torch.rand(C, M, generator=torch.Generator().manual_seed(99)) * 3
    h = (centres[y] + torch.randn(n, M, generator=g) * 0.7 * scale).relu()
    return h, y


def _head(seed=7):
    g = torch.Generator().manual_seed(seed)
    return LinearHead(torch.randn(C, M, generator=g) * 0.5, torch.randn(C, generator=g) * 0.1)


def _pood():
    return pytest.importorskip("pytorch_ood", reason="pytorch-ood (test extra) is not installed")


# --- DICE -------------------------------------------------------------------------------------------------
def _dice_openood(train_h, W, b, p, test_h):
    """OpenOOD's DICEPostprocessor: mean train activation, np.percentile mask, vote sum, logsumexp."""
    mean_act = train_h.numpy().mean(0)
    contrib = mean_act[None, :] * W.numpy()
    thresh = np.percentile(contrib, p)
    masked_w = W.numpy() * (contrib > thresh)
    vote = test_h.numpy()[:, None, :] * masked_w
    output = vote.sum(2) + b.numpy()
    return torch.from_numpy(scipy.special.logsumexp(output.astype(np.float64), axis=1))


@pytest.mark.parametrize("p", [10, 50, 90])
def test_dice_equals_openood_and_pytorch_ood(p):
    h, y = _feats(300, 0)
    q, _ = _feats(60, 1, scale=2.0)
    head = _head()
    dice = get_scorer("dice", p=p).fit_features(h, y, head=head)
    got = dice.score_features(q @ head.weight.T + head.bias, q)
    torch.testing.assert_close(got.double(), _dice_openood(h, head.weight, head.bias, p, q), rtol=1e-5, atol=1e-5)
    # Paper: the fraction p of weights with the smallest contributions is dropped.
    assert (dice.masked_weight() == 0).float().mean().item() == pytest.approx(p / 100, abs=1 / (C * M))
    pood = _pood().detector.DICE(None, head.weight, head.bias, p=p / 100).fit_features(h, y)
    torch.testing.assert_close(got, -pood.predict_features(q), rtol=1e-5, atol=1e-5)


def test_dice_mask_per_p_needs_no_refit():
    h, y = _feats(100, 0)
    dice = get_scorer("dice").fit_features(h, y, head=_head())
    w90 = dice.masked_weight()
    dice.set_params(p=50)
    assert dice.fitted and (dice.masked_weight() == 0).sum() < (w90 == 0).sum()
    with pytest.raises(ValueError, match="p must be a percentile"):
        dice.set_params(p=100)


def _dice_openood_pred(train_h, W, b, p, test_h):
    """OpenOOD's DICEPostprocessor's pred: torch.max(softmax(masked vote sum + b)) of the masked head."""
    contrib = train_h.numpy().mean(0)[None, :] * W.numpy()
    masked_w = torch.from_numpy(W.numpy() * (contrib > np.percentile(contrib, p)))
    output = (test_h[:, None, :] * masked_w).sum(2) + b
    return torch.max(torch.softmax(output, dim=1), dim=1)[1]


def test_dice_pred_model_or_masked_and_scorer_id_acc():
    model = _model("zscore")
    g = torch.Generator().manual_seed(11)
    x_train, x_id, x_ood = (torch.randn(n, 3, 6, 6, generator=g) for n in (40, 30, 20))
    y_train, y_id = torch.arange(40) % C, torch.arange(30) % C
    with torch.no_grad():
        z_id, h_train, h_id = model(x_id), model.features(x_train), model.features(x_id)
    masked = _dice_openood_pred(h_train, model.fc.weight.detach(), model.fc.bias.detach(), 90, h_id)
    assert not torch.equal(masked, z_id.argmax(1)), "data must make the masked head's prediction differ"
    by_model = get_scorer("dice").fit(model, [(x_train, y_train)])
    by_mask = get_scorer("dice", pred="masked").fit(model, [(x_train, y_train)])
    assert by_model.get_params() == {"p": 90, "pred": "model"} and by_mask.pred == "masked"
    pred_m, score_m = by_model.score(model, x_id)
    pred_k, score_k = by_mask.score(model, x_id)
    assert torch.equal(pred_m, z_id.argmax(1)) and torch.equal(pred_k, masked)
    assert torch.equal(score_m, score_k)  # the score does not depend on pred
    rec = ascood.scoring.scorers.extract_features(model, [(x_id, y_id)])
    assert torch.equal(ascood.scoring.scorers.features_scores(by_mask, rec)[0], masked)
    assert torch.equal(ascood.scoring.scorers.features_scores(by_model, rec)[0], z_id.argmax(1))
    # evaluate: id_acc is the clean forward's for both; scorer_id_acc is the reported pred's accuracy.
    table = ascood.scoring.evaluate(model, [(x_id, y_id)], {"ood": [(x_ood, torch.full((20,), -1))]},
                                    {"dice_model": by_model, "dice_masked": by_mask})
    clean = float((z_id.argmax(1) == y_id).double().mean() * 100)
    rows = {r["scorer"]: r for r in table.rows}
    assert rows["dice_model"]["id_acc"] == rows["dice_masked"]["id_acc"] == pytest.approx(clean)
    assert rows["dice_model"]["scorer_id_acc"] == pytest.approx(clean)
    assert rows["dice_masked"]["scorer_id_acc"] == pytest.approx(float((masked == y_id).double().mean() * 100))
    with pytest.raises(ValueError, match="dice pred must be one of model, masked, got 'head'"):
        get_scorer("dice", pred="head")
    with pytest.raises(ValueError, match="pred='masked' needs the features"):
        by_mask.predict_features(z_id)


# --- SHE --------------------------------------------------------------------------------------------------
def test_she_equals_openood_and_pytorch_ood():
    h, y = _feats(400, 2, scale=2.5)
    centres = torch.stack([h[y == c].mean(0) for c in range(C)])
    head = LinearHead(centres, -0.5 * (centres * centres).sum(1))  # nearest class mean, mostly right
    z = head.fc(h)
    assert 0.3 < (z.argmax(1) == y).float().mean() < 1.0  # some samples are misclassified: the filter matters
    she = get_scorer("she").fit_features(h, y, logits=z)
    q, _ = _feats(50, 3, scale=1.5)
    qz = head.fc(q)
    got = she.score_features(qz, q)
    # OpenOOD: patterns = mean feature of the train samples with label == pred == c; score = <h, S_pred>.
    pred = z.argmax(1)
    patterns = torch.stack([h[(y == c) & (pred == c)].double().mean(0) for c in range(C)])
    want = (q.double() * patterns[qz.argmax(1)]).sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    pood = _pood().detector.SHE(None, head.fc).fit_features(h, y)
    torch.testing.assert_close(got, -pood.predict_features(q), rtol=1e-5, atol=1e-4)


def test_she_names_a_class_without_correct_samples():
    h, y = _feats(50, 2)
    z = torch.zeros(50, C)
    z[:, 0] = 1  # everything predicted as class 0
    with pytest.raises(ValueError, match="class\\(es\\) 1, 2, 3, 4"):
        get_scorer("she").fit_features(h, y, logits=z)


# --- KL-Matching ------------------------------------------------------------------------------------------
def test_klm_equals_openood_and_pytorch_ood():
    g = torch.Generator().manual_seed(4)
    val = torch.randn(300, C, generator=g) * 2
    val[:, 4] -= 5  # class 4 is never predicted on the fitted data: OpenOOD gives it a one-hot posterior
    test = torch.randn(40, C, generator=g) * 2
    klm = get_scorer("klm").fit_features(logits=val)
    got = klm.score_features(test)
    # OpenOOD's KLMatchingPostprocessor: d_k = mean softmax of val samples predicted k (one-hot if none);
    # score = -min_k scipy.stats.entropy(p, d_k).
    p_val = torch.softmax(val, 1).numpy()
    pred = p_val.argmax(1)
    d = [p_val[pred == k].mean(0) if (pred == k).any() else np.eye(C)[k] for k in range(C)]
    p = torch.softmax(test, 1).numpy()
    want = [-min(scipy.stats.entropy(pi, dk) for dk in d) for pi in p]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert klm.classes.tolist() == [0, 1, 2, 3]
    pood = _pood().detector.KLMatching(None).fit_logits(val)
    torch.testing.assert_close(got, -pood.predict_logits(test), rtol=1e-4, atol=1e-5)


# --- Entropy ----------------------------------------------------------------------------------------------
def test_entropy_is_negative_shannon_entropy_and_pytorch_ood():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(30, C, generator=g) * 2  # every p > 1e-7 here, so pytorch-ood's clip does nothing
    got = get_scorer("entropy").score_features(z)
    want = [-scipy.stats.entropy(p) for p in torch.softmax(z.double(), 1).numpy()]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, -_pood().detector.Entropy(None).predict_logits(z), rtol=1e-5, atol=1e-6)
    # Exact where probabilities underflow: a one-hot-like row has entropy ~0, not the clip's 1e-7 terms.
    big = torch.tensor([[200.0, 0.0, 0.0, 0.0, 0.0]])
    assert get_scorer("entropy").score_features(big).item() == pytest.approx(0.0, abs=1e-30)


# --- GradNorm ---------------------------------------------------------------------------------------------
def _gradnorm_openood(x, W, b, T=1.0):
    """OpenOOD's GradNormPostprocessor (the paper's code): per sample, backward of the summed CE to all-ones
    targets through the last layer; score = sum |dL/dW|."""
    fc = nn.Linear(W.shape[1], W.shape[0]).double()
    with torch.no_grad():
        fc.weight.copy_(W)
        fc.bias.copy_(b)
    targets = torch.ones(1, W.shape[0], dtype=torch.float64)
    out = []
    for xi in x.double():
        fc.zero_grad()
        loss = torch.mean(torch.sum(-targets * nn.functional.log_softmax(fc(xi[None]) / T, dim=-1), dim=-1))
        loss.backward()
        out.append(fc.weight.grad.abs().sum().item())
    return torch.tensor(out, dtype=torch.float64)


class _Body(nn.Module):
    feature_dim = M

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, M, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3)) + 0.5  # smooth: every input element has a gradient


def _model(head):
    torch.manual_seed(0)
    return ascood.ASCOODNet(_Body(), C, head=head, input_mean=[0.0] * 3, input_std=[0.5, 0.25, 0.4]).eval()


@pytest.mark.parametrize("head", ["linear", "zscore"])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_gradnorm_closed_form_equals_the_per_sample_backward(head, T):
    model = _model(head)
    x = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    pred, got = get_scorer("gradnorm", temperature=T).score(model, x)
    with torch.no_grad():
        fc_input = model.standardize(model.features(x))  # what the last layer sees
    want = _gradnorm_openood(fc_input, model.fc.weight.double(), model.fc.bias.double(), T)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(pred, model(x).argmax(1))


def test_gradnorm_equals_pytorch_ood_on_the_model():
    pood = _pood()
    model = _model("linear")
    x = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    got = get_scorer("gradnorm").score(model, x)[1]
    det = pood.detector.GradNorm(model, param_filter=lambda name: name == "fc.weight")
    # pytorch-ood averages the loss over the C classes and negates: its score is -ours / C.
    torch.testing.assert_close(got, -C * det.predict(x), rtol=1e-5, atol=1e-6)


def _gradnorm_model_backward(model, x, T=1.0):
    """The model's own last-layer gradient, per sample: backward of -sum_c log softmax(model(x_i) / T)_c to
    model.fc.weight through the whole model (z-score head included), float64; score = sum |grad|."""
    m = model.double()
    out = []
    try:
        for xi in x.double():
            m.zero_grad()
            loss = -nn.functional.log_softmax(m(xi[None]) / T, dim=-1).sum()
            loss.backward()
            out.append(m.fc.weight.grad.abs().sum().item())
    finally:
        model.float()
        model.zero_grad()
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gradnorm_spaces_on_a_zscore_model(T):
    """"head" = the model's true last-layer gradient (autograd through the model); "raw" = OpenOOD's quantity,
    the last layer applied to the raw h (OpenOOD's per-sample loop on fc(h)). Both on the model path and on
    cached features; on a z-score model the two differ, and neither is the old mixture (raw h, head softmax)."""
    model = _model("zscore")
    x = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    head_space = get_scorer("gradnorm", temperature=T)
    raw_space = get_scorer("gradnorm", temperature=T, feature_space="raw")
    want_head = _gradnorm_model_backward(model, x, T)
    with torch.no_grad():
        h = model.features(x)
    want_raw = _gradnorm_openood(h, model.fc.weight.double(), model.fc.bias.double(), T)
    torch.testing.assert_close(head_space.score(model, x)[1].double(), want_head, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw_space.score(model, x)[1].double(), want_raw, rtol=1e-5, atol=1e-6)
    rec = ascood.scoring.scorers.extract_features(model, [(x, torch.zeros(10, dtype=torch.long))])
    torch.testing.assert_close(raw_space.score_features(rec.logits, rec.features, head=rec.head).double(), want_raw,
                               rtol=1e-5, atol=1e-6)
    assert ((want_raw - want_head).abs() > 1e-3 * want_head).all()
    with torch.no_grad():
        p = torch.softmax(model(x).double() / T, 1)
    mixture = (p * C - 1).abs().sum(1) * h.double().abs().sum(1) / T
    assert ((want_raw - mixture).abs() > 1e-3 * mixture).all()
    # A plain linear head: both spaces are the model's gradient.
    lin = _model("linear")
    torch.testing.assert_close(get_scorer("gradnorm", temperature=T, feature_space="raw").score(lin, x)[1].double(),
                               _gradnorm_model_backward(lin, x, T), rtol=1e-5, atol=1e-6)


# --- MDS with Lee et al.'s input preprocessing ------------------------------------------------------------
def _mds_preprocessed_by_hand(model, x, means, precision, eps, std):
    """Lee et al. (2018): x~ = x - eps * sign(d D_closest / dx) / std (sign(0) = +1 as their torch.ge code);
    score = max_c -D_c(f(x~)), D the squared Mahalanobis distance with the tied precision."""
    xg = x.clone().requires_grad_(True)
    f = model.features(xg).double()
    d = torch.stack([(((f - mu) @ precision) * (f - mu)).sum(1) for mu in means], 1)
    d.gather(1, d.argmin(1, keepdim=True)).sum().backward()
    sign = torch.where(xg.grad >= 0, 1.0, -1.0)
    x_t = x - eps * sign / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        f_t = model.features(x_t).double()
        d_t = torch.stack([(((f_t - mu) @ precision) * (f_t - mu)).sum(1) for mu in means], 1)
    return (-d_t).amax(1)


def test_mds_input_preprocessing_equals_lee_et_al_and_pytorch_ood():
    import sklearn.covariance

    model = _model("zscore")
    g = torch.Generator().manual_seed(8)
    y = torch.arange(200) % C
    x_train = torch.randn(200, 3, 6, 6, generator=g) + y.view(-1, 1, 1, 1) * 0.3
    x = torch.randn(16, 3, 6, 6, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y), batch_size=50)
    eps, std = 0.01, [0.5, 0.25, 0.4]
    mds = get_scorer("mds", eps=eps)  # std read from the model, as ODIN
    assert mds.needs_input and not mds.supports_features
    mds.fit(model, loader)
    pred, got = mds.score(model, x)
    with torch.no_grad():
        h = model.features(x_train).double()
    means = torch.stack([h[y == c].mean(0) for c in range(C)])
    cov = sklearn.covariance.EmpiricalCovariance().fit((h - means[y]).numpy()).covariance_
    precision = torch.from_numpy(np.linalg.pinv(cov, hermitian=True))
    want = _mds_preprocessed_by_hand(model, x, means, precision, eps, std)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(pred, model(x).argmax(1))  # the model's prediction on x itself
    plain = get_scorer("mds").fit(model, loader).score(model, x)[1]
    assert (got > plain).float().mean() > 0.9  # the step moves inputs towards their closest class mean
    with pytest.raises(TypeError, match="images"):
        mds.score_features(*[t.detach() for t in model(x, return_features=True)])
    # pytorch-ood's MahalanobisODIN: precision inv(scatter + 1e-6 I) (not / N), half the distance, negated;
    # ascood's score is -2 N times its score. Same perturbation (no zero gradients with this smooth model).
    pood = _pood().detector.MahalanobisODIN(model.features, eps=eps, norm_std=std)
    pood.fit_features(h.float(), y)
    torch.testing.assert_close(got.double(), -2 * 200 * pood.predict(x).double(), rtol=1e-3, atol=1e-3)
