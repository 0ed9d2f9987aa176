"""ascood.wrap on torchvision and timm classifiers (random weights: nothing is downloaded).

Per architecture: the wrapped network with a linear head reproduces the
original model's logits (the classifier's weights were kept and nothing
before it was lost), then a z-score ASCOODNet on the same feature extractor
trains one step with ASCOODCriterion and is scored with MSP, SCALE and KNN.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.scorers import KNN, MSP, SCALE
from ascood.nets.wrapping import WrappedFeatures, build_external, split_classifier

torchvision = pytest.importorskip("torchvision")

# (constructor kwargs, input size): small inputs where the architecture allows.
TORCHVISION = {
    "resnet50": ({}, 32),
    "wide_resnet50_2": ({}, 32),
    "densenet121": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "convnext_tiny": ({}, 32),
    "regnet_y_400mf": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "swin_t": ({}, 32),
}
TIMM = {
    "resnet18": ({}, 32),
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),
    "convnext_atto": ({}, 32),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Many small ops on big models: intra-op threads only add contention on a loaded 2-core CI box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_wrapped(model: nn.Module, px: int) -> None:
    """Logits preserved by wrap(head="linear"); then one ASCOOD step and three scorers."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, px, px)
    y = torch.tensor([0, 2])
    model.eval()
    with torch.no_grad():
        want = model(x)
    net = ascood.wrap(model, head="linear")
    assert isinstance(net.backbone, WrappedFeatures) and net.num_classes == 3
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), want, rtol=1e-4, atol=1e-5)

    zs = ascood.ASCOODNet(net.backbone, 3, head="zscore")  # same feature extractor, ASCOOD head
    opt = torch.optim.SGD(zs.parameters(), lr=0.01)
    crit = ascood.ASCOODCriterion("gradient", p_inv=0.1, alpha=1.0, w=1.0)
    zs.train()
    before = zs.fc.weight.detach().clone()
    loss = crit(zs, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(zs.fc.weight, before)

    zs.eval()
    loader = DataLoader(TensorDataset(torch.randn(4, 3, px, px), torch.tensor([0, 1, 2, 0])), batch_size=2)
    for scorer in (MSP(), SCALE(), KNN(K=2).fit(zs, loader)):
        pred, score = scorer.score(zs, x)
        assert pred.shape == (2,) and score.shape == (2,) and torch.isfinite(score).all(), scorer.name


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_torchvision_classifier(arch):
    kwargs, px = TORCHVISION[arch]
    _check_wrapped(torchvision.models.get_model(arch, weights=None, num_classes=3, **kwargs), px)


@pytest.mark.parametrize("arch", list(TIMM))
def test_timm_classifier(arch):
    timm = pytest.importorskip("timm")
    kwargs, px = TIMM[arch]
    _check_wrapped(timm.create_model(arch, pretrained=False, num_classes=3, **kwargs), px)


def test_new_num_classes_gets_a_new_head_and_same_keeps_the_weights():
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7)
    old = model.classifier[-1]
    kept = ascood.wrap(model)
    assert kept.num_classes == 7 and torch.equal(kept.fc.weight, old.weight) and torch.equal(kept.fc.bias, old.bias)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7)
    new = ascood.wrap(model, num_classes=4, sigma=0.3)
    assert new.fc.weight.shape == (4, 1024) and new.sigma == 0.3 and new.head_type == "zscore"
    # The pre-head layers (Linear 576->1024, Hardswish, Dropout) stay in the feature extractor.
    assert isinstance(model.classifier[-1], nn.Identity) and isinstance(model.classifier[0], nn.Linear)


def test_convnext_keeps_its_norm_and_flatten():
    model = torchvision.models.convnext_tiny(weights=None, num_classes=3)
    linear, where = split_classifier(model)
    assert where == "classifier[-1]" and linear.out_features == 3
    assert [type(m).__name__ for m in model.classifier] == ["LayerNorm2d", "Flatten", "Identity"]


def test_unsplittable_model_says_what_was_looked_for():
    model = torchvision.models.squeezenet1_0(weights=None)  # a conv classifier, no final nn.Linear
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"looked for an nn.Linear at timm's get_classifier\(\) and at fc, "
                                         r"classifier, classifier\[-1\], head, heads.head, head.fc"):
        ascood.wrap(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # left unchanged
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ascood.wrap("resnet50")


@pytest.mark.parametrize("kwargs, match", [(dict(num_classes=1), "num_classes must be an int >= 2"),
                                           (dict(num_classes=2.5), "num_classes"), (dict(head="mlp"), "head must"),
                                           (dict(sigma=0), "sigma must be > 0")])
def test_bad_arguments_leave_the_model_alone(kwargs, match):
    model = torchvision.models.mobilenet_v3_small(weights=None)
    with pytest.raises(ValueError, match=match):
        ascood.wrap(model, **kwargs)
    assert isinstance(model.classifier[-1], nn.Linear)


def test_bad_external_names():
    with pytest.raises(ValueError, match="torchvision:ARCH or timm:ARCH"):
        build_external("keras:resnet", 3)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet9000'"):
        build_external("torchvision:resnet9000", 3)


def test_weights_file_loads_the_whole_model(tmp_path):
    src = torchvision.models.mobilenet_v3_small(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src(x)
    bare = tmp_path / "bare.pt"
    torch.save(src.state_dict(), bare)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, wrapped)
    for path in (bare, wrapped):
        net = ascood.build_model("torchvision:mobilenet_v3_small", 5, head="linear", weights=path,
                                 model_kwargs={"num_classes": 5}).eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x), want)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": object()}}, evil)  # a pickled object: refused by weights_only
    with pytest.raises(RuntimeError, match="cannot read weights file"):
        ascood.build_model("torchvision:mobilenet_v3_small", 5, weights=evil)


def test_checkpoint_rebuilds_an_external_model(tmp_path):
    from ascood.training.checkpoint import load_model

    model = ascood.build_model("torchvision:regnet_y_400mf", 2, sigma=0.4)
    assert model.build_args["name"] == "torchvision:regnet_y_400mf"
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 2
    tr = ascood.Trainer(model, DataLoader(TensorDataset(x, y), batch_size=4),
                        ascood.TrainConfig(epochs=1, alpha_min=0.5, alpha_max=1.0, lr=0.01, seed=0),
                        out_dir=tmp_path, progress=False)
    trained = tr.fit()
    rebuilt, ckpt = load_model(tmp_path / "last.pt")
    assert json.load(open(tmp_path / "config.json"))["model_build"]["name"] == "torchvision:regnet_y_400mf"
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x))
    assert rebuilt.sigma == 0.4


def test_cli_accepts_external_model_names():
    from ascood.apps.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "d", "--model", "torchvision:resnet50"]).model == "torchvision:resnet50"
    assert parser.parse_args(["train", "d", "--model", "timm:convnext_atto"]).model == "timm:convnext_atto"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "d", "--model", "keras:resnet"])


def test_cli_trains_and_evaluates_a_torchvision_model(tmp_path, capsys):
    from clihelpers import write_images as _images

    from ascood.apps.main import main

    for split, seed in (("train", 0), ("test", 1)):
        _images(tmp_path / split / "red", 4, (220, 30, 30), size=32, seed=seed)
        _images(tmp_path / split / "green", 4, (30, 220, 30), size=32, seed=seed + 10)
    _images(tmp_path / "ood", 4, (128, 128, 128), size=32, seed=5)
    src = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(src.state_dict(), tmp_path / "mnv3.pth")  # "pretrained" weights of the whole model
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "train"), "--out", str(out), "--model", "torchvision:mobilenet_v3_small",
                 "--weights", str(tmp_path / "mnv3.pth"), "--epochs", "1", "--batch-size", "4",
                 "--image-size", "32", "--alpha-max", "1", "--alpha-min", "1", "--lr", "0.01", "--no-progress",
                 "--no-figures"]) == 0
    assert json.load(open(out / "config.json"))["model_build"]["name"] == "torchvision:mobilenet_v3_small"
    assert main(["eval", str(out / "last.pt"), "--id", str(tmp_path / "test"), "--far", f"grey={tmp_path / 'ood'}",
                 "--train", str(tmp_path / "train"), "--scorers", "msp,scale,knn", "--batch-size", "4"]) == 0
    assert "far mean" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "train"), "--out", str(tmp_path / "r2"), "--model",
                 "torchvision:squeezenet1_0", "--epochs", "1", "--no-progress"]) == 1
    assert "cannot split SqueezeNet" in capsys.readouterr().err
