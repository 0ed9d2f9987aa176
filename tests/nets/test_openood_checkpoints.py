"""OpenOOD v1.5 checkpoints read by ascood (``ascood.nets.openood``) give OpenOOD's own numbers, per sample.

The reference values in tests/fixtures/openood_ckpt/ were computed by OpenOOD's network and postprocessor code
(the repository and commit are in cases.json; make_openood_fixture.py made them) from weights that
tests/openood_weights.py derives from each key's name and shape. Here the same weights are rebuilt from the
stored key list, written the way OpenOOD writes ``best.ckpt`` (``torch.save(net.state_dict())``, with and
without DataParallel's ``module.``), loaded through ascood's loader and scored by ascood's scorers.

Tolerance: float32 through a ResNet on two different code paths (ascood's fused z-score op, torchvision's
layers vs OpenOOD's subclass): rtol 1e-4 / atol 1e-5 on logits, features and scores (observed ~1e-6).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from openood_weights import RULE_VERSION, make_inputs, make_state_dict  # noqa: E402

from ascood.data.datasets import build_transforms  # noqa: E402
from ascood.data.normalization import OPENOOD_PREPROCESSING, openood_preprocessing  # noqa: E402
from ascood.nets.openood import (OPENOOD_MODEL_NAMES, load_openood_model, parse_openood_name,  # noqa: E402
                                 read_state_dict)
from ascood.scoring.scorers import get_scorer  # noqa: E402
from ascood.scoring.scorers.features import LinearHead  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(HERE), "fixtures", "openood_ckpt")
with open(os.path.join(FIXTURE, "cases.json")) as _f:
    META = json.load(_f)
RTOL, ATOL = 1e-4, 1e-5
ARCH = {"resnet18_32x32": "resnet18_32x32", "ascood_resnet18_32x32": "resnet18_32x32",
        "resnet18_224x224": "resnet18_224x224", "resnet50": "resnet50"}


def openood_state(case: str) -> dict[str, torch.Tensor]:
    """The case's OpenOOD state dict (the fixture's key list, the shared rule; sigma as OpenOOD's set_params);
    a new dict each call (its tensors shared: tests replace entries, never change them in place)."""
    return dict(_openood_state(case))


@functools.lru_cache(maxsize=None)
def _openood_state(case: str) -> dict[str, torch.Tensor]:
    meta = META["cases"][case]
    state = make_state_dict(meta["keys"], META["weights"]["seed"])
    if meta["ascood_wrapper"]:
        state["sigma"] = torch.tensor(float(meta["sigma"]))
    return state


def save(state: dict, path, module: bool = False) -> str:
    torch.save({("module." + k if module else k): v for k, v in state.items()}, path)
    return str(path)


def reference(case: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(FIXTURE, f"{case}.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def close(actual, expected, what: str) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               rtol=RTOL, atol=ATOL, err_msg=what)


def test_fixture_provenance():
    assert META["source"]["repository"] == "Jingkang50/OpenOOD" and len(META["source"]["commit"]) == 40
    assert META["weights"]["rule_version"] == RULE_VERSION  # the rule the fixture was made with


@pytest.mark.parametrize("case,name,module", [
    ("resnet18_32x32", "openood:resnet18_32x32", False),
    ("resnet18_32x32", "openood:resnet18_32x32", True),
    ("ascood_resnet18_32x32", "openood:ascood_resnet18_32x32", False),
    ("ascood_resnet18_32x32", "openood:resnet18_32x32", True),  # the wrapper found from its keys
    ("resnet18_224x224", "openood:resnet18_224x224", False),
    ("resnet50", "openood:resnet50", True),
])
def test_same_features_logits_and_scores_as_openood(tmp_path, case, name, module):
    meta, ref = META["cases"][case], reference(case)
    path = save(openood_state(case), tmp_path / "best.ckpt", module=module)
    loaded = load_openood_model(name, path, num_classes=meta["num_classes"])
    model = loaded.model
    assert loaded.source["ascood_wrapper"] == meta["ascood_wrapper"]
    assert loaded.source["module_prefix_removed"] == module
    assert model.head_type == ("zscore" if meta["ascood_wrapper"] else "linear")
    if meta["ascood_wrapper"]:
        assert model.sigma == pytest.approx(meta["sigma"])
    x = make_inputs(case, meta["inputs"]["shape"], meta["inputs"]["seed"])
    with torch.no_grad():
        logits, h = model(x, return_features=True)
    close(h, ref["features"], f"{case}: raw features h")
    close(logits, ref["logits"], f"{case}: logits")
    # The scorers' cached-feature path, from this one forward pass (the model path runs the same _score).
    labels, head = torch.zeros(len(x), dtype=torch.long), LinearHead.from_model(model)
    for scorer_name, params in (("msp", {}), ("ebo", {}), ("react", {"percentile": 90}), ("scale", {"percentile": 85})):
        scorer = get_scorer(scorer_name, **params)
        if scorer.needs_fit:  # ReAct: OpenOOD's setup ran on the same inputs as its ID val split
            scorer.fit_features(h, labels, logits=logits, head=head)
            close(scorer.threshold, ref["react_threshold"], f"{case}: react clip value")
        score = scorer.score_features(logits, h, head=head)
        close(score, ref[scorer_name], f"{case}: {scorer_name} per-sample scores")
    if case == "ascood_resnet18_32x32" and not module:  # and once through the model path
        _, score = get_scorer("scale", percentile=85).score(model, x)
        close(score, ref["scale"], f"{case}: scale through score(model, x)")


def test_scores_change_when_the_weights_do(tmp_path):
    """The comparison can fail: one changed BatchNorm statistic moves the logits off OpenOOD's."""
    state = openood_state("resnet18_32x32")
    state["layer4.1.bn2.running_mean"] = state["layer4.1.bn2.running_mean"] + 0.5
    model = load_openood_model("openood:resnet18_32x32", save(state, tmp_path / "b.ckpt")).model
    meta = META["cases"]["resnet18_32x32"]
    x = make_inputs("resnet18_32x32", meta["inputs"]["shape"], meta["inputs"]["seed"])
    with torch.no_grad():
        logits = model(x)
    with pytest.raises(AssertionError):
        close(logits, reference("resnet18_32x32")["logits"], "changed")


def test_built_as_ascoods_own_model(tmp_path):
    """build_args name ascood's backbone, so a detector or checkpoint made from it rebuilds without OpenOOD."""
    loaded = load_openood_model("openood:ascood_resnet18_32x32",
                                save(openood_state("ascood_resnet18_32x32"), tmp_path / "a.ckpt"),
                                input_mean=[0.4914, 0.4822, 0.4465], input_std=[0.2470, 0.2435, 0.2616])
    args = loaded.model.build_args
    assert (args["name"], args["head"], args["num_classes"]) == ("resnet18_32x32", "zscore", 10)
    assert args["sigma"] == pytest.approx(0.5) and args["input_std"] == [0.2470, 0.2435, 0.2616]
    from ascood.nets import build_model

    again = build_model(**args)
    again.load_state_dict(loaded.model.state_dict())


def test_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    state = openood_state("ascood_resnet18_32x32")
    path = tmp_path / "best.safetensors"
    safetensors.save_file(state, str(path))
    model = load_openood_model("openood:ascood_resnet18_32x32", path).model
    meta = META["cases"]["ascood_resnet18_32x32"]
    x = make_inputs("ascood_resnet18_32x32", meta["inputs"]["shape"], meta["inputs"]["seed"])
    with torch.no_grad():
        close(model(x), reference("ascood_resnet18_32x32")["logits"], "safetensors logits")


# -- refusals ------------------------------------------------------------------------------------------------
def _refused(tmp_path, state, name="openood:resnet18_32x32", **kw) -> str:
    with pytest.raises(ValueError) as err:
        load_openood_model(name, save(state, tmp_path / "bad.ckpt"), **kw)
    return str(err.value)


def test_missing_keys_named(tmp_path):
    state = openood_state("resnet18_32x32")
    for k in ("layer3.0.shortcut.0.weight", "bn1.running_var"):
        del state[k]
    msg = _refused(tmp_path, state)
    assert "missing keys: " in msg and "layer3.0.shortcut.0.weight" in msg and "bn1.running_var" in msg
    assert "(2)" in msg and "unexpected" not in msg


def test_unexpected_keys_named_with_count(tmp_path):
    state = openood_state("resnet18_32x32")
    for i in range(7):
        state[f"extra_head.{i}.weight"] = torch.zeros(2)
    msg = _refused(tmp_path, state)
    assert "unexpected keys: extra_head.0.weight" in msg and "(7 in all)" in msg and "missing" not in msg


def test_reshaped_key_names_both_shapes(tmp_path):
    state = openood_state("resnet18_32x32")
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    msg = _refused(tmp_path, state)
    assert "layer2.0.conv1.weight: (128, 64, 1, 1) in the checkpoint vs (128, 64, 3, 3) in the model" in msg


def test_wrong_architecture_refused(tmp_path):
    """A ResNet-18 (224) checkpoint given as the CIFAR ResNet-18: the stem's shape and torchvision's keys differ."""
    msg = _refused(tmp_path, openood_state("resnet18_224x224"), num_classes=None)
    assert "conv1.weight: (64, 3, 7, 7) in the checkpoint vs (64, 3, 3, 3)" in msg
    assert "unexpected keys: " in msg and "layer2.0.downsample.0.weight" in msg
    assert "missing keys: " in msg and "layer2.0.shortcut.0.weight" in msg


def test_wrapper_required_for_ascood_name(tmp_path):
    msg = _refused(tmp_path, openood_state("resnet18_32x32"), name="openood:ascood_resnet18_32x32")
    assert "missing keys: sigma, backbone." in msg and "use openood:resnet18_32x32" in msg


def test_wrapper_without_sigma_refused(tmp_path):
    state = openood_state("ascood_resnet18_32x32")
    del state["sigma"]
    assert "missing keys: sigma (1)" in _refused(tmp_path, state)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_bad_sigma_refused(tmp_path, sigma):
    state = openood_state("ascood_resnet18_32x32")
    state["sigma"] = torch.tensor(sigma)
    assert "'sigma' must be finite and > 0" in _refused(tmp_path, state)


def test_num_classes_checked(tmp_path):
    msg = _refused(tmp_path, openood_state("resnet18_32x32"), num_classes=100)
    assert "fc.weight has 10 classes, not the 100 given" in msg


class _Reduces:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_bearing_checkpoint_refused(tmp_path):
    state = openood_state("resnet18_32x32")
    state["note"] = _Reduces()  # unpickling it would call os.getcwd: weights_only refuses the global
    path = tmp_path / "pickled.ckpt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(path)


def test_not_a_checkpoint_and_missing_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="neither a torch checkpoint"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    save({"fc.weight": torch.zeros(10, 512)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read weights file .*truncated.ckpt"):
        read_state_dict(truncated)
    if importlib.util.find_spec("safetensors") is not None:
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        with pytest.raises(ValueError, match="cannot read safetensors file"):
            read_state_dict(garbage)
    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, nested)
    with pytest.raises(ValueError, match="not a flat state dict"):
        read_state_dict(nested)


@pytest.mark.parametrize("name", ["openood:resnet34", "openood:ascood_vit", "openood:", "resnet18_32x32"])
def test_unknown_names(name):
    with pytest.raises(ValueError, match="openood:resnet18_32x32"):
        parse_openood_name(name)
    assert len(OPENOOD_MODEL_NAMES) == 6


# -- preprocessing -------------------------------------------------------------------------------------------
def test_preprocessing_table_is_openoods():
    theirs = META["preprocessing"]
    for name, ours in OPENOOD_PREPROCESSING.items():
        assert ours["pre_size"] == theirs[name]["pre_size"] and ours["image_size"] == theirs[name]["img_size"]
        assert [list(ours["mean"]), list(ours["std"])] == theirs[name]["normalization"]
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        openood_preprocessing("svhn")


@pytest.mark.parametrize("name", list(OPENOOD_PREPROCESSING))
def test_test_transform_is_openoods(name):
    """ascood's test transform = OpenOOD's TestStandardPreProcessor (Resize(pre_size, bilinear), CenterCrop,
    ToTensor, Normalize) written out from the table, on a non-square image."""
    from PIL import Image
    from torchvision import transforms as T

    spec, prep = OPENOOD_PREPROCESSING[name], openood_preprocessing(name)
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 410, 3), dtype=np.uint8))
    theirs = T.Compose([T.Resize(spec["pre_size"], interpolation=T.InterpolationMode.BILINEAR),
                        T.CenterCrop(spec["image_size"]), T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])
    ours = build_transforms(prep["image_size"], prep["mean"], prep["std"], train=False)
    torch.testing.assert_close(ours(img), theirs(img), rtol=0, atol=0)
