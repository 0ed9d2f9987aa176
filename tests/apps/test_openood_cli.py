"""``ascood eval`` and ``ascood detector`` (then ``predict``) on an OpenOOD-format ResNet18_32x32 checkpoint.

The checkpoint is OpenOOD's format (``torch.save(net.state_dict())`` with DataParallel's ``module.`` prefixes)
holding tests/openood_weights.py's weights for the key list OpenOOD's own ResNet18_32x32 produced
(tests/fixtures/openood_ckpt/cases.json). Per-image scores of ``predict`` are checked against the same network
run on the same images with OpenOOD's CIFAR-10 test preprocessing written out here (Resize(32), CenterCrop(32),
ToTensor, Normalize with OpenOOD's mean / std) and MSP = max softmax, as OpenOOD's BasePostprocessor.
"""
from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ascood.apps.main import main
from clihelpers import run_cli, write_images
from fake_openood import make_tree
from openood_weights import make_state_dict

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "openood_ckpt")
CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("openood_cli")
    with open(os.path.join(FIXTURE, "cases.json")) as f:
        meta = json.load(f)
    state = make_state_dict(meta["cases"]["resnet18_32x32"]["keys"], meta["weights"]["seed"])
    p = {"root": root, "state": state}
    p["ckpt"] = str(root / "best.ckpt")
    torch.save({"module." + k: v for k, v in state.items()}, p["ckpt"])
    write_images(root / "id", 20, (150, 90, 60), size=8, seed=1)
    write_images(root / "ood", 6, (20, 200, 220), size=8, seed=2)
    p["id"], p["ood"] = str(root / "id"), str(root / "ood")
    partial = dict(state)
    del partial["layer4.1.bn2.weight"]
    torch.save(partial, root / "partial.ckpt")
    p["partial"] = str(root / "partial.ckpt")
    return p


def openood_msp(state: dict, paths: list[str]) -> np.ndarray:
    """MSP of OpenOOD's network on ``paths``: the same weights in ascood's network (tests/nets checks that equals
    OpenOOD's own per sample), OpenOOD's CIFAR-10 test preprocessing written out from its values."""
    from torchvision import transforms as T

    from ascood.nets import build_model

    model = build_model("resnet18_32x32", 10, head="linear").eval()
    model.load_state_dict({("fc." + k[3:]) if k.startswith("fc.") else "backbone." + k: v for k, v in state.items()})
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(*CIFAR10)])
    x = torch.stack([tf(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        return torch.softmax(model(x), 1).max(1).values.numpy()


def test_eval_on_folders(env, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["eval", "--model", "openood:resnet18_32x32", "--weights", env["ckpt"], "--preprocessing", "cifar10",
               "--num-classes", "10", "--id", env["id"], "--ood", f"blue={env['ood']}", "--scorers", "msp,ebo,scale",
               "--out", str(out), "--device", "cpu", "--batch-size", "8"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "scoring OpenOOD checkpoint" in text and "plain network, linear head, 10 classes" in text
    assert "preprocessing openood:cifar10" in text
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["scorer"] for r in rows} >= {"msp", "ebo", "scale"}
    # The table's MSP AUROC is the one OpenOOD's scores on these images give.
    from ascood.scoring.metrics import ood_metrics

    ids = sorted(glob.glob(os.path.join(env["id"], "*.png")))
    oods = sorted(glob.glob(os.path.join(env["ood"], "*.png")))
    want = ood_metrics(openood_msp(env["state"], ids), openood_msp(env["state"], oods))
    got = next(r for r in rows if r["scorer"] == "msp" and r.get("dataset") == "blue")
    assert got["auroc"] == pytest.approx(100 * want["auroc"], abs=1e-6)


def test_eval_on_an_openood_tree_reads_the_benchmarks_preprocessing(env, tmp_path, capsys):
    """--benchmark cifar10 --data-root: the preprocessing follows from the benchmark."""
    tree = make_tree(str(tmp_path / "data"), benchmarks=["cifar10"], size=8, n_train=4, n_other=2)
    rc = main(["eval", "--model", "openood:resnet18_32x32", "--weights", env["ckpt"], "--benchmark", "cifar10",
               "--data-root", tree, "--allow-missing", "--scorers", "msp", "--out", str(tmp_path / "res"),
               "--device", "cpu", "--batch-size", "32"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "preprocessing openood:cifar10" in text
    rows = json.loads((tmp_path / "res" / "results.json").read_text())["rows"]
    assert {r["group"] for r in rows if r["scorer"] == "msp"} >= {"near", "far"}


def test_python_m_ascood_help_documents_it():
    res = run_cli("eval", "--help")
    assert res.returncode == 0 and "--model openood:ARCH" in res.stdout and "openood:ascood_resnet50" in res.stdout


def test_detector_then_predict_gives_openoods_msp(env, tmp_path, capsys):
    det = tmp_path / "det"
    rc = main(["detector", "--model", "openood:resnet18_32x32", "--weights", env["ckpt"], "--preprocessing",
               "cifar10", "--id-val", env["id"], "--scorer", "msp", "--tpr", "0.9", "--out", str(det),
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr()
    card = (det / "README.md").read_text()
    assert "source: openood" in card and "best.ckpt" in card and "mean [0.4914, 0.4822, 0.4465]" in card
    table = tmp_path / "pred.csv"
    oods = sorted(glob.glob(os.path.join(env["ood"], "*.png")))
    rc = main(["predict", str(det), *oods, "--out", str(table), "--device", "cpu", "--no-progress"])
    assert rc in (0, 3), capsys.readouterr()
    with open(table) as f:
        rows = {os.path.basename(r["path"]): float(r["score"]) for r in csv.DictReader(f)}
    got = np.array([rows[os.path.basename(p)] for p in oods])
    np.testing.assert_allclose(got, openood_msp(env["state"], oods), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv,flag,words", [
    (["--model", "openood:vit_b_16", "--weights", "{ckpt}"], "--model", "unknown OpenOOD model"),
    (["--model", "openood:resnet18_32x32"], "--weights", "needs --weights FILE"),
    (["--weights", "{ckpt}"], "--weights", "give --model openood:ARCH"),
    (["--model", "openood:resnet18_32x32", "--weights", "{ckpt}"], "--preprocessing", "needs --preprocessing"),
    (["--model", "openood:resnet18_32x32", "--weights", "{partial}", "--preprocessing", "cifar10"], "--weights",
     "missing keys: layer4.1.bn2.weight (1)"),
    (["--model", "openood:resnet18_32x32", "--weights", "{id}/0.png", "--preprocessing", "cifar10"], "--weights",
     "neither a torch checkpoint"),
    (["--model", "openood:resnet18_32x32", "--weights", "{root}/nope.ckpt", "--preprocessing", "cifar10"],
     "--weights", "not found"),
    (["--model", "openood:resnet18_32x32", "--weights", "{ckpt}", "--preprocessing", "cifar10", "--num-classes",
      "100"], "--num-classes", "has 10 classes, not the 100 given"),
    (["{ckpt}", "--model", "openood:resnet18_32x32", "--weights", "{ckpt}", "--preprocessing", "cifar10"],
     "--model", "not both"),
])
@pytest.mark.parametrize("command", ["eval", "detector"])
def test_bad_input_exit_2_naming_the_flag(env, tmp_path, capsys, command, argv, flag, words):
    argv = [a.format(**{k: v for k, v in env.items() if isinstance(v, (str, os.PathLike))}) for a in argv]
    data = (["--id", env["id"], "--ood", env["ood"]] if command == "eval"
            else ["--id-val", env["id"], "--scorer", "msp", "--out", str(tmp_path / "det")])
    rc = main([command, *argv, *data, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert flag in err and words in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "det").exists()  # refused before --out was claimed


def test_pickle_bearing_checkpoint_refused(env, tmp_path, capsys):
    class Reduces:
        def __reduce__(self):
            return (os.getcwd, ())

    state = dict(env["state"])
    state["note"] = Reduces()
    torch.save(state, tmp_path / "pickled.ckpt")
    rc = main(["eval", "--model", "openood:resnet18_32x32", "--weights", str(tmp_path / "pickled.ckpt"),
               "--preprocessing", "cifar10", "--id", env["id"], "--ood", env["ood"]])
    err = capsys.readouterr().err
    assert rc == 2 and "--weights" in err and "weights_only=True" in err, err


def test_bare_state_dict_as_a_run_points_at_model(env, capsys):
    rc = main(["eval", env["ckpt"], "--id", env["id"], "--ood", env["ood"], "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and "--model openood:ARCH --weights FILE" in err, err


def test_eval_reads_openoods_ascood_wrapper(env, tmp_path, capsys):
    """OpenOOD's ASCOODNet checkpoint (backbone.* + sigma, saved under DataParallel) through plain openood:ARCH."""
    state = {"module.backbone." + k: v for k, v in env["state"].items()}
    state["module.sigma"] = torch.tensor(0.25)
    torch.save(state, tmp_path / "ascood.ckpt")
    rc = main(["eval", "--model", "openood:resnet18_32x32", "--weights", str(tmp_path / "ascood.ckpt"),
               "--preprocessing", "cifar100", "--id", env["id"], "--ood", env["ood"], "--scorers", "msp",
               "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ASCOODNet wrapper, z-score head, sigma 0.25, 10 classes; preprocessing openood:cifar100" in text


def test_feature_store_of_an_openood_checkpoint_only_with_features_and_keyed_by_the_weights(env, tmp_path, capsys):
    """No store is made beside a user's OpenOOD checkpoint by default; --features DIR keeps the splits, keyed by
    the --weights file's sha256, and a second eval with other scorers reads them (no extraction line)."""
    base = ["eval", "--model", "openood:resnet18_32x32", "--weights", env["ckpt"], "--preprocessing", "cifar10",
            "--id", env["id"], "--ood", f"blue={env['ood']}", "--device", "cpu", "--batch-size", "8"]
    assert main([*base, "--scorers", "msp", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert not os.path.exists(os.path.join(os.path.dirname(env["ckpt"]), "features"))
    store = tmp_path / "store"
    assert main([*base, "--scorers", "msp", "--features", str(store), "--out", str(tmp_path / "b")]) == 0
    first = capsys.readouterr()
    assert "feature store" in first.out + first.err and "extracted" in first.out + first.err
    assert main([*base, "--scorers", "ebo,scale", "--features", str(store), "--out", str(tmp_path / "c")]) == 0
    second = capsys.readouterr()
    assert "extracted" not in second.out + second.err
    manifests = glob.glob(str(store / "*" / "manifest.json"))
    assert len(manifests) == 2  # ID and the one OOD set
    from ascood.scoring.storekeys import file_sha256

    parts = [json.loads(open(m).read())["parts"]["checkpoint"] for m in manifests]
    assert all(file_sha256(env["ckpt"]) in json.dumps(p) for p in parts)
