"""``--features`` on ``ascood eval`` / ``ascood detector`` (issue 33, done-when): a second command on the same run
with other scorers runs no model forward for the stored splits; a changed checkpoint or file list extracts again
(said in one line); ``--features none`` opts out. The forwards are counted on the model the command loads."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ascood.apps.main import main
from ascood.training import checkpoint as checkpoint_module
from clihelpers import TINY_TRAIN, make_class_tree, write_images


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("storecli")
    train = make_class_tree(root / "train", n_per_class=8)
    test = make_class_tree(root / "test", n_per_class=6, seed=7)
    val = make_class_tree(root / "val", n_per_class=12, seed=9)
    write_images(str(root / "ood"), 10, (30, 30, 220), seed=3)
    run = root / "run"
    assert main(["train", train, "--out", str(run), *TINY_TRAIN]) == 0
    return {"root": root, "train": train, "test": test, "val": val, "ood": str(root / "ood"), "run": str(run)}


@pytest.fixture
def forwards(monkeypatch):
    """The images the backbone of every model a command loads sees (a pre-hook on model.backbone)."""
    seen = {"images": 0}
    real = checkpoint_module.load_model

    def counting(*a, **k):
        model, ckpt = real(*a, **k)
        model.backbone.register_forward_pre_hook(lambda m, args: seen.__setitem__("images", seen["images"]
                                                                                  + args[0].shape[0]))
        return model, ckpt

    monkeypatch.setattr(checkpoint_module, "load_model", counting)
    return seen


def _eval(env, out, scorers, *extra):
    return main(["eval", env["run"], "--id", env["test"], "--ood", f"blue={env['ood']}", "--train", env["train"],
                 "--scorers", scorers, "--batch-size", "4", "--shard-rows", "8", "--out", str(out), *extra])


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return {(r["scorer"], r["dataset"]): r for r in csv.DictReader(line for line in f if not line.startswith("#"))}


def test_a_second_eval_with_other_scorers_runs_no_forward_and_changes_extract_again(env, forwards, tmp_path, capsys):
    run, store = env["run"], os.path.join(env["run"], "features")
    assert _eval(env, tmp_path / "a", "msp,knn") == 0
    n_train, n_test, n_ood = 16, 12, 10
    assert forwards["images"] == n_train + n_test + n_ood  # one pass per split
    keys = sorted(os.listdir(store))
    assert len(keys) == 3 and all(json.load(open(os.path.join(store, k, "manifest.json")))["complete"] for k in keys)
    # Other scorers (fitted on --train, scored on ID and OOD): every split is read from the store.
    forwards["images"] = 0
    assert _eval(env, tmp_path / "b", "mls,ebo,mds,knn,scale") == 0
    assert forwards["images"] == 0
    assert sorted(os.listdir(store)) == keys
    # The same numbers as without the store, which runs the model again.
    assert _eval(env, tmp_path / "c", "mls,ebo,mds,knn,scale", "--features", "none") == 0
    assert forwards["images"] == n_train + n_test + n_ood
    with_store, without = _rows(tmp_path / "b"), _rows(tmp_path / "c")
    assert with_store.keys() == without.keys()
    for k in with_store:
        for metric in ("fpr95", "auroc", "aupr_in", "aupr_out", "id_acc"):
            assert float(with_store[k][metric]) == pytest.approx(float(without[k][metric]), abs=1e-9), (k, metric)
    # An image added to the OOD folder: that split only is extracted again, said in one line.
    Image.fromarray(np.full((8, 8, 3), 60, np.uint8)).save(os.path.join(env["ood"], "extra.png"))
    capsys.readouterr()
    forwards["images"] = 0
    assert _eval(env, tmp_path / "d", "mls,knn") == 0
    assert forwards["images"] == n_ood + 1
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "file list, number of images changed" in line]) == 1, err
    # Other weights in the run's checkpoint (a retrained run): every split is extracted again, said.
    path = os.path.join(run, "last.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.dim() > 1)
    ckpt["model"][name] = ckpt["model"][name] * 1.5
    torch.save(ckpt, path)
    forwards["images"] = 0
    assert _eval(env, tmp_path / "e", "mls,knn") == 0
    assert forwards["images"] == n_train + n_test + n_ood + 1
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "checkpoint changed" in line]) == 3, err


def test_detector_reuses_the_eval_store_and_a_second_detector_runs_no_forward(env, forwards, tmp_path):
    shared = tmp_path / "store"
    args = ["detector", env["run"], "--id-val", env["val"], "--id-train", env["train"], "--ood-val", env["ood"],
            "--tpr", "0.9", "--batch-size", "4", "--shard-rows", "8", "--features", str(shared)]
    assert main([*args, "--scorer", "knn", "--out", str(tmp_path / "d1")]) == 0
    first = forwards["images"]
    assert first > 0
    forwards["images"] = 0
    assert main([*args, "--scorer", "mds", "--out", str(tmp_path / "d2")]) == 0
    assert forwards["images"] == 0  # train, the tune and calibration halves of val, and ood_val: all stored
    # The same detector as one fitted without the store.
    assert main([*args[:-2], "--features", "none", "--scorer", "mds", "--out", str(tmp_path / "d3")]) == 0
    from ascood.deploy import Detector

    a, b = Detector.load(tmp_path / "d2"), Detector.load(tmp_path / "d3")
    assert a.threshold == pytest.approx(b.threshold, rel=1e-6)
    torch.testing.assert_close(a.calibration, b.calibration, rtol=1e-6, atol=1e-6)


def test_bad_features_folder_is_one_line_before_any_work(env, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc = main(["eval", env["run"], "--id", env["test"], "--ood", env["ood"], "--features", str(f),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--features {f}: cannot use it as the feature store" in err, err
    assert not os.path.exists(tmp_path / "o")


def test_help_names_the_feature_store_flags(capsys):
    for cmd in ("eval", "detector", "reproduce"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        for flag in ("--features DIR", "--no-feature-store", "--features-dtype", "--shard-rows"):
            assert flag in out, (cmd, flag)
