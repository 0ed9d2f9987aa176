"""``ascood detector | predict | export`` from the command line: the path from a run to decisions, and bad input."""
import csv
import json
import os

import pytest

from ascood.apps.main import main
from clihelpers import TINY_TRAIN, make_class_tree, write_images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploycli")
    train = make_class_tree(root / "train", n_per_class=12)
    val = make_class_tree(root / "val", n_per_class=20, seed=5)
    write_images(str(root / "ood"), 16, (30, 30, 220), seed=3)
    run = root / "run"
    assert main(["train", train, "--out", str(run), *TINY_TRAIN]) == 0
    det = root / "det"
    assert main(["detector", str(run), "--id-val", val, "--id-train", train, "--ood-val", str(root / "ood"),
                 "--scorer", "mds", "--tpr", "0.9", "--out", str(det)]) == 0
    return {"root": root, "train": train, "val": val, "ood": str(root / "ood"), "run": str(run), "det": str(det)}


def test_detector_writes_a_verified_artifact(setup):
    from ascood.deploy import Detector

    names = sorted(os.listdir(setup["det"]))
    assert names == sorted(["manifest.json", "detector.json", "model.safetensors", "scorer.safetensors",
                            "calibration.safetensors", "README.md"])
    det = Detector.load(setup["det"])
    assert det.scorer.name == "mds" and det.tpr == 0.9 and det.classes == ["green", "red"]
    # No tuning needed for MDS without a grid, but --ood-val makes APS run: id-val is split in two.
    assert det.provenance["data"]["n_calibration"] == 20 and det.provenance["data"]["n_tune"] == 20


def test_predict_table_summary_and_exit_status(setup, tmp_path, capsys):
    from ascood.deploy import Detector

    det = Detector.load(setup["det"])
    out = tmp_path / "p.csv"
    status = main(["predict", setup["det"], setup["val"], setup["ood"], "--out", str(out), "--no-progress"])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 56
    ref = det.predict([setup["val"], setup["ood"]])
    assert [r["path"] for r in rows] == ref.source
    assert [r["is_ood"] == "True" for r in rows] == ref.is_ood.tolist()
    assert [float(r["score"]) for r in rows] == pytest.approx(ref.score.tolist(), rel=1e-6)
    flagged = int(ref.is_ood.sum())
    assert status == (3 if flagged else 0)
    assert f"56 image(s): {flagged} flagged OOD" in capsys.readouterr().out
    # One image the detector keeps as ID: exit status 0; OOD images only: 3.
    keep = next(p for p, o in zip(ref.source, ref.is_ood.tolist()) if not o and "/val/" in p)
    assert main(["predict", setup["det"], keep, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("path,label,label_name,probability,score,p_value,is_ood\n")  # table on stdout
    assert "1 image(s): 0 flagged OOD" in captured.err  # summary on stderr
    assert main(["predict", setup["det"], setup["ood"], "--no-progress"]) == 3


def test_predict_jsonl_with_benjamini_hochberg(setup, tmp_path):
    out = tmp_path / "p.jsonl"
    main(["predict", setup["det"], setup["ood"], setup["val"], "--out", str(out), "--fdr", "0.2", "--no-progress"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 56 and all("bh_ood" in r for r in rows)
    import torch

    from ascood.deploy.conformal import benjamini_hochberg

    assert [r["bh_ood"] for r in rows] == benjamini_hochberg(torch.tensor([r["p_value"] for r in rows]), 0.2).tolist()


def test_export_formats(setup, tmp_path, capsys):
    from ascood.deploy.export import read_metadata

    assert main(["export", setup["det"], "--format", "onnx", "--out", str(tmp_path / "d.onnx")]) == 0
    assert read_metadata(str(tmp_path / "d.onnx"), "onnx")["classes"] == ["green", "red"]
    assert main(["export", setup["det"], "--format", "torchscript", "--out", str(tmp_path / "d.ts")]) == 0
    assert "exported:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "msp", "--tpr", "1.5", "--out", "{tmp}/d"],
     "--tpr: must be in (0, 1)"),
    (["detector", "{run}", "--id-val", "{tmp}/missing", "--scorer", "msp", "--out", "{tmp}/d"],
     "--id-val data not found"),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "nope", "--out", "{tmp}/d"], "--scorer: unknown scorer"),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "aps", "--out", "{tmp}/d"], "give --ood-val"),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "knn", "--out", "{tmp}/d"], "pass the ID training data"),
    (["predict", "{tmp}/nodet", "{val}"], "detector not found"),
    (["predict", "{det}", "{val}", "--out", "{tmp}/p.txt"], "expected a .csv or .jsonl"),
    (["predict", "{det}", "{val}", "--fdr", "2"], "--fdr: must be in (0, 1)"),
    (["export", "{det}", "--format", "torch-export", "--out", "{tmp}/d.pt"], "must be named *.pt2"),
    (["export", "{det}", "--format", "torchscript", "--out", "{tmp}/d.onnx"], "the ending of onnx files"),
    (["export", "{det}", "--format", "onnx", "--out", "{tmp}/d.ts"], "the ending of torchscript files"),
    (["predict", "{det}", "{val}", "--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "msp", "--out", "{tmp}/d", "--device", "tpu"],
     "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["predict", "{det}", "{tmp}"], "no images"),  # an empty folder is bad input, found before the detector loads
    (["predict", "{det}", "{tmp}/list.txt"], "list.txt:1: image"),  # a list naming a missing image
])
def test_bad_input_is_named(argv, message, setup, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, **setup) for a in argv]
    if any(a.endswith("list.txt") for a in argv):
        (tmp_path / "list.txt").write_text("gone.png\n")
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_runtime_failures_name_the_file(setup, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    # Issue 30: an unreadable image is an error row and exit status 4 (2 with --strict: bad input).
    assert main(["predict", setup["det"], str(bad), "--no-progress"]) == 4
    assert "broken.png" in capsys.readouterr().err
    assert main(["predict", setup["det"], str(bad), "--no-progress", "--strict"]) == 2
    assert "broken.png" in capsys.readouterr().err
    (tmp_path / "odin").mkdir()
    assert main(["detector", setup["run"], "--id-val", setup["val"], "--scorer", "odin", "--tpr", "0.9",
                 "--out", str(tmp_path / "odin")]) == 0
    assert main(["export", str(tmp_path / "odin"), "--format", "onnx"]) == 2
    assert "needs an input gradient" in capsys.readouterr().err
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(setup["det"], tampered)
    with open(tampered / "model.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    assert main(["predict", str(tampered), setup["val"], "--no-progress"]) == 2  # a tampered artifact: bad input
    assert "model.safetensors does not match its sha256" in capsys.readouterr().err


def test_predict_skips_hidden_files_in_folders(setup, tmp_path, capsys):
    """A folder copied from macOS (``._x.png``) or a notebook (``.ipynb_checkpoints``) scores only its images."""
    import shutil

    first = sorted(os.listdir(os.path.join(setup["val"], "red")))[0]
    src = os.path.join(setup["val"], "red", first)
    (tmp_path / "imgs" / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(src, tmp_path / "imgs" / "a.png")
    shutil.copy(src, tmp_path / "imgs" / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "imgs" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not an image")
    out = tmp_path / "p.csv"
    status = main(["predict", setup["det"], str(tmp_path / "imgs"), "--out", str(out), "--no-progress"])
    assert status in (0, 3)
    assert "skipped 2 hidden file(s)/folder(s)" in capsys.readouterr().err
    assert [r["path"] for r in csv.DictReader(out.open())] == [str(tmp_path / "imgs" / "a.png")]
