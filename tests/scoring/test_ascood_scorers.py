"""Every scorer on a tiny model: shapes, finite scores, and the sign convention (ID scores higher)."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.metrics import ood_metrics
from ascood.scoring.scorers import SCORERS, get_scorer, loader_scores, sweep

C, BLOCK = 4, 12  # 4 classes, each owning a block of 12 of the 48 input elements


class Flatten(nn.Module):
    feature_dim = 3 * 4 * 4

    def forward(self, x):
        return torch.relu(x.flatten(1))


def confident_model(head="linear"):
    """h = relu(flatten(x)); class c's logit sums block c of h: confident on block-structured ID inputs."""
    model = ascood.ASCOODNet(Flatten(), C, head=head)
    with torch.no_grad():
        model.fc.weight.zero_()
        for c in range(C):
            model.fc.weight[c, c * BLOCK:(c + 1) * BLOCK] = 1.0
        model.fc.bias.zero_()
    return model.eval()


def id_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.rand(n, 48, generator=g) * 0.3
    for i in range(n):
        x[i, y[i] * BLOCK:(y[i] + 1) * BLOCK] += 3.0 + 0.3 * torch.randn(BLOCK, generator=g)
    return x.view(n, 3, 4, 4), y


def ood_data(n, seed):
    """Weak activations everywhere plus three moderate spikes at random places (no class block)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 48, generator=g) * 0.3
    for i in range(n):
        x[i, torch.randperm(48, generator=g)[:3]] += 1.5
    return x.view(n, 3, 4, 4), torch.full((n,), -1)


def make_loader(xy, bs=16):
    return DataLoader(TensorDataset(*xy), batch_size=bs)


SMALL = {"knn": {"K": 5}, "vim": {"dim": 8}, "nnguide": {"K": 5}}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_shapes_finite_and_sign(name):
    model = confident_model()
    train = make_loader(id_data(64, 0))
    scorer = get_scorer(name, **SMALL.get(name, {}))
    if scorer.needs_fit:
        with pytest.raises(RuntimeError, match="fit"):
            scorer.score(model, id_data(2, 9)[0])
        scorer.fit(model, train)
    x_id, y_id = id_data(40, 1)
    x_ood, _ = ood_data(40, 2)
    pred, s_id = scorer.score(model, x_id)
    assert pred.shape == (40,) and pred.dtype == torch.int64 and s_id.shape == (40,)
    assert torch.isfinite(s_id).all()
    assert (pred == y_id).all()  # pred is the model's own prediction
    _, s_ood = scorer.score(model, x_ood)
    assert torch.isfinite(s_ood).all()
    # Higher = more ID: the model is confident on ID and not on OOD.
    assert ood_metrics(s_id, s_ood)["auroc"] > 0.9, name


def test_scorers_on_zscore_head_and_head_feature_space():
    model = confident_model(head="zscore")
    train = make_loader(id_data(64, 0))
    for scorer in (get_scorer("knn", K=3, feature_space="head"), get_scorer("mds", feature_space="head"),
                   get_scorer("scale", standardize=True), get_scorer("vim", dim=8, feature_space="head")):
        if scorer.needs_fit:
            scorer.fit(model, train)
        pred, score = scorer.score(model, id_data(8, 3)[0])
        assert score.shape == (8,) and torch.isfinite(score).all()


def test_odin_moves_every_element_iodin_only_top_k(monkeypatch):
    import ascood.scoring.scorers.perturb as P

    seen = {}
    real = P._ops.iodin_perturb

    def spy(x, grad, eps, std, k=1):
        out = real(x, grad, eps, std, k=k)
        seen["changed"] = (out != x).flatten(1).sum(1)
        return out

    monkeypatch.setattr(P._ops, "iodin_perturb", spy)
    model = confident_model()
    x = id_data(4, 5)[0]
    get_scorer("odin", temperature=10, eps=0.01).score(model, x)
    assert (seen["changed"] > 40).all()  # every element with a non-zero... nearly all of 48 move
    get_scorer("iodin", temperature=10, eps=0.01, k=2).score(model, x)
    assert (seen["changed"] == 2).all()


def test_tempscale_fit_and_params():
    model = confident_model()
    s = get_scorer("tempscale").fit(model, make_loader(id_data(32, 0)))
    assert s.temperature > 0
    assert get_scorer("ebo").get_params() == {"temperature": 1.0}
    with pytest.raises(ValueError, match="temperature"):
        get_scorer("ebo", temperature=0)
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("nope")


def test_react_threshold_is_percentile_of_train_activations():
    model = confident_model()
    x, y = id_data(32, 0)
    s = get_scorer("react", percentile=90).fit(model, make_loader((x, y)))
    acts = torch.relu(x.flatten(1)).flatten()
    assert s.threshold == pytest.approx(torch.quantile(acts, 0.9).item(), rel=1e-5)
    s.set_params(percentile=50)
    assert s.threshold == pytest.approx(torch.quantile(acts, 0.5).item(), rel=1e-5)


def test_knn_streams_bank_in_chunks_same_result():
    model = confident_model()
    train = make_loader(id_data(64, 0))
    a = get_scorer("knn", K=5).fit(model, train)
    b = get_scorer("knn", K=5, max_device_bank_mb=0).fit(model, train)  # forces chunked streaming
    b.bank.chunk = 7
    x = id_data(10, 4)[0]
    torch.testing.assert_close(a.score(model, x)[1], b.score(model, x)[1])


def test_sweep_selects_by_validation_auroc():
    model = confident_model()
    train = make_loader(id_data(64, 0))
    val_id, val_ood = make_loader(id_data(32, 1)), make_loader(ood_data(32, 2))
    scorer = get_scorer("knn")
    res = sweep(scorer, model, val_id, val_ood, grid={"K": [1, 3, 200]}, id_train_loader=train)
    assert {tuple(p.items()) for p, _ in res.trials} == {(("K", 1),), (("K", 3),), (("K", 200),)}
    best = max(res.trials, key=lambda t: t[1])
    assert res.best_auroc == best[1] and res.best_params == best[0] and scorer.K == res.best_params["K"]
    # The chosen value reproduces its validation AUROC.
    _, s_id, _ = loader_scores(scorer, model, val_id)
    _, s_ood, _ = loader_scores(scorer, model, val_ood)
    assert ood_metrics(s_id, s_ood)["auroc"] == pytest.approx(res.best_auroc)


def test_iodin_default_grid_matches_paper():
    grid = get_scorer("iodin").default_grid
    assert grid["temperature"] == [1, 10, 100, 1000]
    assert grid["eps"] == pytest.approx([0.0014 * i for i in range(1, 8)])


def _bench_eager():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "eager.py"
    spec = importlib.util.spec_from_file_location("bench_eager", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["odin", "iodin"])
def test_perturbation_scorer_equals_authors_eager_and_skips_weight_grads(name):
    """Same (pred, score) as the authors' eager post-processor on a conv net, while the
    input-gradient pass asks no backward node for a weight gradient and fills no .grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = ascood.build_model("small_cnn", 5, in_channels=3).eval()
    x = torch.randn(6, 3, 16, 16)
    std = (0.2, 0.25, 0.3)
    scorer = get_scorer(name, temperature=100, eps=0.004, std=std)

    masks = []

    class ConvBackwardSpy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                masks.append(tuple(args[-1]))  # output_mask: (input, weight, bias)
            return func(*args, **(kwargs or {}))

    with ConvBackwardSpy():
        pred, score = scorer.score(model, x)
    assert masks and all(m[1] is False and m[2] is False for m in masks), masks
    assert all(p.grad is None for p in model.parameters())
    want_pred, want_score = _bench_eager().perturbation_score_eager(
        model, x, 100, 0.004, torch.tensor(std), None if name == "odin" else 1)
    assert torch.equal(pred, want_pred)
    torch.testing.assert_close(score, want_score, rtol=1e-5, atol=1e-6)
    assert not score.is_inference()
