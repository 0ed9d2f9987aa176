"""Trainer: each ood_type steps, alpha schedule, outlier = gradient_outlier(true-class saliency),
relative alpha, exact kill-and-resume, atomic checkpoints, non-finite loss."""
import json
import math
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ascood
import ascood_kernels as ak
from ascood.training.checkpoint import load_checkpoint
from ascood.training.outliers import alpha_at, relative_saliency, synthesize_outliers, true_class_saliency
from ascood.training.trainer import NonFiniteLossError, TrainConfig, Trainer, cosine_factor


def tiny_data(n=32, size=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def tiny_model(seed=0, classes=3):
    torch.manual_seed(seed)
    return ascood.build_model("small_cnn", classes, width=4)


def loader(ds, seed=0):
    return DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ood_type", ["gradient", "shuffle", "gaussian", "none"])
def test_each_ood_type_trains(ood_type):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = Trainer(model, loader(tiny_data()), TrainConfig(epochs=1, ood_type=ood_type, p_inv=0.2, alpha_min=0.5,
                                                         alpha_max=1.0, lr=0.05, seed=0), progress=False)
    tr.fit()
    m = tr.history[0]
    # One epoch of one: the 1-based schedule uses exactly alpha_min (reference-facts.md).
    assert math.isfinite(m["loss"]) and 0 <= m["acc"] <= 1 and m["alpha"] == 0.5
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert "fc.weight" in changed and any(k.startswith("backbone") for k in changed)


def test_alpha_schedule_values():
    # reference-facts.md: alpha(e) = (max - min) * (1 - e/E) + min with e counted from 1 (OpenOOD loops
    # epochs 1..E): the first epoch uses max - (max - min)/E, the last exactly min.
    E, a_min, a_max = 100, 30.0, 300.0
    assert alpha_at(1, E, a_min, a_max) == pytest.approx(a_max - (a_max - a_min) / E)  # 297.3
    assert alpha_at(E, E, a_min, a_max) == a_min
    assert [alpha_at(e, 4, 30, 300) for e in range(1, 5)] == [232.5, 165, 97.5, 30]
    assert alpha_at(1, 10, 0.1, 0.1) == pytest.approx(0.1)
    for bad in (0, E + 1):
        with pytest.raises(ValueError, match="1-based"):
            alpha_at(bad, E, a_min, a_max)
    model = tiny_model()
    tr = Trainer(model, loader(tiny_data(16)), TrainConfig(epochs=3, alpha_min=1.0, alpha_max=4.0, lr=0.01, seed=0),
                 progress=False)
    tr.fit()
    assert [h["alpha"] for h in tr.history] == [3.0, 2.0, 1.0]


def test_cosine_schedule_per_step():
    assert cosine_factor(0, 10, 1e-6) == 1.0
    assert cosine_factor(10, 10, 1e-6) == pytest.approx(1e-6)
    assert cosine_factor(5, 10, 1e-6) == pytest.approx(0.5 + 0.5e-6)
    model = tiny_model()
    tr = Trainer(model, loader(tiny_data(16)), TrainConfig(epochs=1, lr=0.2, fc_lr_factor=0.05, seed=0),
                 progress=False)
    assert TrainConfig().min_lr == 1e-6  # reference-facts.md: cosine to an absolute lr of 1e-6
    assert [g["lr"] for g in tr.optimizer.param_groups] == [0.2, pytest.approx(0.01)]
    assert tr.optimizer.param_groups[1]["params"] == list(model.fc.parameters())
    seen = []
    tr.callbacks.append(lambda t, m: seen.append([g["lr"] for g in t.optimizer.param_groups]))
    tr.fit()  # 2 steps of 2
    # The reference's LambdaLR multiplier runs from 1 to 1e-6 / lr and is shared by every group:
    # the body ends at exactly 1e-6 (not 1e-6 * lr), the fc group at 1e-6 * fc_lr_factor.
    assert seen[-1][0] == pytest.approx(1e-6, rel=1e-9)
    assert seen[-1][1] == pytest.approx(1e-6 * 0.05, rel=1e-9)
    # Halfway (after step 1 of 2) the cosine is at its midpoint: lr/2 + 1e-6/2.
    tr2 = Trainer(tiny_model(), loader(tiny_data(16)), TrainConfig(epochs=1, lr=0.2, min_lr=1e-3, seed=0),
                  progress=False)
    tr2.train_step(*next(iter(tr2.loader)), alpha=1.0)
    assert tr2.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 + 0.5e-3)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-7).validate()


def test_outlier_equals_gradient_outlier_of_true_class_saliency():
    model = tiny_model()
    x, y = tiny_data(8)[:]
    model.train()
    # Saliency by hand: d(sum_b z[b, y_b]) / dx in eval mode.
    model.eval()
    xg = x.clone().requires_grad_(True)
    model(xg).gather(1, y.view(-1, 1)).sum().backward()
    g_ref = xg.grad.clone()
    model.train()
    running = model.backbone.body[0][1].running_mean.clone()
    out = synthesize_outliers(model, x, y, ood_type="gradient", p_inv=0.1, alpha=3.0)
    assert model.training  # mode restored
    assert torch.equal(model.backbone.body[0][1].running_mean, running)  # eval-mode saliency: BN stats untouched
    assert torch.allclose(true_class_saliency(model, x, y), g_ref)
    expected = ak.gradient_outlier(x, g_ref, 0.1, 3.0)
    torch.testing.assert_close(out, expected)
    # Exactly the top 10% |G| elements per sample moved, by alpha * G.
    moved = out != x
    assert moved.flatten(1).sum(1).max() <= int(0.1 * x[0].numel()) + 1
    assert not out.requires_grad


def test_train_mode_saliency_differs_and_updates_bn():
    model = tiny_model()
    x, y = tiny_data(8)[:]
    bn = model.backbone.body[0][1]
    before = bn.running_mean.clone()
    g_train = true_class_saliency(model, x, y, mode="train")
    assert not torch.equal(bn.running_mean, before)
    assert not torch.allclose(g_train, true_class_saliency(model, x, y, mode="eval"))


def test_relative_alpha_mean_step_equals_alpha():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    g = torch.randn(4, 3, 8, 8) * torch.tensor([1e-4, 1.0, 50.0, 3.0]).view(4, 1, 1, 1)
    g_rel = relative_saliency(g, 0.25)
    assert torch.equal(ak.invariant_mask(g_rel, 0.25), ak.invariant_mask(g, 0.25))
    out = ak.gradient_outlier(x, g_rel, 0.25, 0.7)
    mask = ak.invariant_mask(g, 0.25)
    step = ((out - x).abs() * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
    # Whatever the saliency's scale (1e-4 .. 50), the selected elements move by alpha on average.
    torch.testing.assert_close(step, torch.full((4,), 0.7), rtol=1e-4, atol=1e-5)
    assert torch.equal(relative_saliency(torch.zeros(2, 3, 4, 4), 0.5), torch.zeros(2, 3, 4, 4))


def _run(tmp, epochs, kill_after=None, resume=None, seed=0, model_seed=0):
    model = tiny_model(model_seed)

    def killer(trainer, metrics):
        if kill_after is not None and trainer.epoch == kill_after:
            raise KeyboardInterrupt("simulated kill")

    cfg = TrainConfig(epochs=epochs, ood_type="shuffle", p_inv=0.2, lr=0.05, seed=seed)
    tr = Trainer(model, loader(tiny_data(24), seed=seed), cfg, out_dir=tmp, resume=resume, progress=False,
                 callbacks=[killer])
    try:
        tr.fit()
    except KeyboardInterrupt:
        pass
    return model


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    full = _run(tmp_path / "a", 3)
    _run(tmp_path / "b", 3, kill_after=1)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    resumed = _run(tmp_path / "b", 3, resume=tmp_path / "b", model_seed=99)
    for (k, v), (_, w) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), k
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    full_log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]
    cfg = json.load(open(tmp_path / "b" / "config.json"))
    assert cfg["train_config"]["ood_type"] == "shuffle" and cfg["model_build"]["name"] == "small_cnn"


def test_checkpoint_loads_weights_only_and_rebuilds_model(tmp_path):
    model = _run(tmp_path, 1)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # no pickled code needed
    assert ckpt["epoch"] == 1
    rebuilt, _ = ascood.checkpoint.load_model(tmp_path / "last.pt")
    x = tiny_data(4)[:][0]
    model.eval()
    torch.testing.assert_close(rebuilt(x), model(x))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, 1)
    before = (tmp_path / "last.pt").read_bytes()
    import ascood.training.checkpoint as C

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(C.torch, "save", broken_save)
    with pytest.raises(OSError):
        C.atomic_save({"x": 1}, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_non_finite_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    ds = tiny_data(16)

    def poison(trainer, metrics):
        ds.tensors[0][:] = float("nan")  # epoch 2 sees NaN inputs

    model = tiny_model()
    tr = Trainer(model, loader(ds), TrainConfig(epochs=3, lr=0.05, seed=0), out_dir=tmp_path, progress=False,
                 callbacks=[poison])
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*epoch 2"):
        tr.fit()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.dtype.is_floating_point)


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="ood_type"):
        TrainConfig(ood_type="mixup").validate()
    with pytest.raises(ValueError, match="p_inv"):
        TrainConfig(p_inv=0).validate()
    with pytest.raises(ValueError, match="alpha_min"):
        TrainConfig(alpha_min=5, alpha_max=1).validate()
    with pytest.raises(TypeError, match="unknown"):
        ascood.train(tiny_model(), loader(tiny_data(8)), epochs=1, bogus=1)


def test_train_function_returns_eval_model():
    model = ascood.train(tiny_model(), loader(tiny_data(8)), epochs=1, ood_type="gradient", p_inv=0.1,
                         alpha_min=1, alpha_max=2, w=1.0, lr=0.01, alpha_mode="relative", progress=False, seed=0)
    assert not model.training


@pytest.mark.parametrize("ood_type", ["gradient", "shuffle"])
def test_compile_and_channels_last_give_the_same_step(ood_type):
    """compile (dynamo, with the fast 'eager' backend here) and channels_last change how the step
    runs, not what it computes: same loss and parameters after one step as the plain trainer."""
    x, y = tiny_data(8).tensors
    results = []
    for opts in ({}, {"compile": "eager"}, {"channels_last": True}, {"compile": "eager", "channels_last": True}):
        model = tiny_model()
        cfg = TrainConfig(epochs=1, ood_type=ood_type, p_inv=0.2, alpha_min=0.5, alpha_max=1.0, lr=0.05, seed=0,
                          **opts)
        tr = Trainer(model, loader(tiny_data()), cfg, progress=False)
        loss, _ = tr.train_step(x, y, 1.0)
        if opts.get("channels_last"):
            conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert tr.raw_model is model and not any(k.startswith("_orig_mod") for k in model.state_dict())
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    for loss, params in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(params, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_option_validated():
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="").validate()
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile=3).validate()
