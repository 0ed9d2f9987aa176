"""``ascood reproduce`` end to end on a fake OpenOOD v1.5 tree (CPU, tiny images, small_cnn)."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time

import pytest
import torch

from ascood.apps import reproduce as R
from ascood.apps.main import main
from ascood.data.openood import resolve_benchmark
from ascood.scoring.plots import have_matplotlib
from fake_openood import list_entry_path, make_tree

QUICK = ["--epochs", "1", "--model", "small_cnn", "--image-size", "16", "--seeds", "0"]


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished quick run of the brief's command (sun's list removed, so --allow-missing skips it)."""
    base = tmp_path_factory.mktemp("reproduce")
    root = make_tree(str(base / "data"), benchmarks=["waterbirds"])
    os.remove(os.path.join(root, "benchmark_imglist/sun/sun.txt"))
    out = str(base / "out")
    t0 = time.time()
    rc = main(["reproduce", "waterbirds", "--data-root", root, *QUICK, "--out", out, "--allow-missing"])
    return {"root": root, "out": out, "rc": rc, "seconds": time.time() - t0}


def test_end_to_end_writes_table_with_published_numbers(done):
    assert done["rc"] == 0
    assert done["seconds"] < 60
    out = done["out"]
    table = open(os.path.join(out, "table.md")).read()
    assert "| MSP (CE network) | msp |" in table and "| ASCOOD | odin |" in table
    for published in ("60.41 ± 1.52", "77.18 ± 0.66", "11.37 ± 0.42", "97.48 ± 0.10", "93.72", "93.59"):
        assert published in table
    assert "near OOD set (waterbirds_ood)" in table
    assert "Skipped (missing from the data tree): far sun" in table
    summary = json.load(open(os.path.join(out, "summary.json")))
    measured = summary["methods"]["ascood"]["per_seed"][0]
    rows = list(csv.DictReader(open(os.path.join(out, "results_per_set.csv"))))
    near = [r for r in rows if r["method"] == "ascood" and r["scorer"] == "odin" and r["dataset"] == "waterbirds_ood"]
    assert len(near) == 1 and float(near[0]["fpr95"]) == pytest.approx(measured["fpr95"], abs=1e-3)
    assert f"{measured['fpr95']:.2f} ± 0.00" in table
    assert {r["dataset"] for r in rows if r["method"] == "ce"} >= {"waterbirds_ood", "ninco", "texture", "far mean"}
    assert not any(r["dataset"] == "sun" for r in rows)
    cfg = json.load(open(os.path.join(out, "config.json")))
    src = cfg["resolved"]["sources"]
    assert (src["epochs"], src["lr"], src["w"], src["pretrained"]) == ("flag", "preset", "preset", "derived")
    assert cfg["resolved"]["values"]["w"] == 0.1 and cfg["steps_per_run"] == 1
    assert [s["name"] for s in cfg["data"]["skipped"]] == ["sun"]
    for method in R.METHODS:
        run = os.path.join(out, method, "seed0")
        for name in ("last.pt", "best.pt", "train_done.json", "run.json", "eval/results.csv", "eval/aps.json"):
            assert os.path.isfile(os.path.join(run, name)), name
        hist = json.loads(open(os.path.join(run, "log.jsonl")).readline())
        assert "val_acc" in hist
    aps = json.load(open(os.path.join(out, "ascood", "seed0", "eval", "aps.json")))
    assert set(aps["odin"]["params"]) == {"temperature", "eps"}
    ck = torch.load(os.path.join(out, "ce", "seed0", "best.pt"), weights_only=True)
    assert ck["train_config"]["ood_type"] == "none" and ck["model_build"]["head"] == "linear"
    ck = torch.load(os.path.join(out, "ascood", "seed0", "best.pt"), weights_only=True)
    assert ck["train_config"]["w"] == 0.1 and ck["model_build"]["head"] == "zscore"
    if have_matplotlib():
        assert os.path.isfile(os.path.join(out, "ascood", "seed0", "eval", "hist_odin.png"))


def test_rerun_does_not_retrain(done, capsys):
    out = done["out"]
    before = {m: _digest(os.path.join(out, m, "seed0", "last.pt")) for m in R.METHODS}
    table = open(os.path.join(out, "table.md")).read()
    capsys.readouterr()
    assert main(["reproduce", "waterbirds", "--data-root", done["root"], *QUICK, "--out", out,
                 "--allow-missing"]) == 0
    text = capsys.readouterr()
    assert "training already finished" in text.err + text.out
    assert "epoch 1/1" not in text.out
    assert {m: _digest(os.path.join(out, m, "seed0", "last.pt")) for m in R.METHODS} == before
    assert open(os.path.join(out, "table.md")).read() == table


def test_other_settings_in_the_same_out_is_an_error_and_changes_nothing(done, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(done["out"], out)
    before = _digest(os.path.join(out, "ce", "seed0", "last.pt"))
    rc = main(["reproduce", "waterbirds", "--data-root", done["root"], "--epochs", "2", "--model", "small_cnn",
               "--image-size", "16", "--seeds", "0", "--out", out, "--allow-missing", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "was trained with other settings (train_config.epochs: 1 -> 2)" in err and "nothing was changed" in err
    assert _digest(os.path.join(out, "ce", "seed0", "last.pt")) == before


def test_undecodable_ood_image_names_file_and_line_and_keeps_checkpoints(done, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(done["out"], out)
    ckpts = {m: _digest(os.path.join(out, m, "seed0", "best.pt")) for m in R.METHODS}
    tree = resolve_benchmark("waterbirds", done["root"], allow_missing=True)
    spec = [s for s in tree.present if s.name == "ninco"][0]
    root = str(tmp_path / "data")
    shutil.copytree(done["root"], root)
    with open(list_entry_path(root, spec, 4), "wb") as f:
        f.write(b"\x89PNG broken")
    # New scorers force a new evaluation of the finished runs.
    rc = main(["reproduce", "waterbirds", "--data-root", root, *QUICK, "--out", out, "--allow-missing",
               "--scorers", "ebo", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "test_ninco.txt:4: cannot read image" in err
    assert {m: _digest(os.path.join(out, m, "seed0", "best.pt")) for m in R.METHODS} == ckpts


def test_interrupted_run_resumes_from_last_pt(tmp_path, monkeypatch):
    root = make_tree(str(tmp_path / "data"), benchmarks=["waterbirds"])
    tree = resolve_benchmark("waterbirds", root)
    values = R.resolve_config("waterbirds", {"epochs": 2, "model": "small_cnn", "image_size": 16}).values
    run = str(tmp_path / "run")
    original = R.Trainer

    class Interrupted(original):
        def train_epoch(self):
            if self.epoch == 1:
                raise KeyboardInterrupt
            return super().train_epoch()

    monkeypatch.setattr(R, "Trainer", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        R.train_run(run, tree, values, "ascood", 0, weights=None, device="cpu", workers=0, progress=False)
    first = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    assert first["epoch"] == 1 and not os.path.exists(os.path.join(run, "train_done.json"))
    monkeypatch.setattr(R, "Trainer", original)
    best, trained = R.train_run(run, tree, values, "ascood", 0, weights=None, device="cpu", workers=0,
                                progress=False)
    assert trained
    final = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    assert final["epoch"] == 2 and final["history"][0] == first["history"][0]  # epoch 1 kept, not redone
    assert os.path.isfile(best)
    assert R.train_run(run, tree, values, "ascood", 0, weights=None, device="cpu", workers=0,
                       progress=False)[1] is False


def test_print_config_and_missing_weights(done, capsys):
    assert main(["reproduce", "cars", "--data-root", done["root"], "--print-config"]) == 2  # cars lists absent
    assert "benchmark cars needs pieces missing" in capsys.readouterr().err
    assert main(["reproduce", "waterbirds", "--data-root", done["root"], "--print-config", "--allow-missing",
                 "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "16 train images -> 30 training steps per run; 4 runs" in out
    assert "note: preset waterbirds fine-tunes an ImageNet-pretrained resnet18: pass --weights" in out
    assert main(["reproduce", "waterbirds", "--data-root", done["root"], "--allow-missing"]) == 2
    assert "pass --weights FILE" in capsys.readouterr().err


def test_seeds_flag_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "waterbirds", "--data-root", ".", "--seeds", "0,0"])
    assert "--seeds" in capsys.readouterr().err


def test_every_output_file_is_documented(done, capsys):
    documented = " ".join(f"{k} {v}" for k, v in R.OUTPUT_FILES.items())
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for dirpath, _, files in os.walk(done["out"]):
        for name in files:
            key = "hist_<scorer>.png" if name.startswith("hist_") else name
            assert key in documented, f"{os.path.join(dirpath, name)} is not explained"
            assert key in help_text, f"{name} is not in ascood reproduce --help"
