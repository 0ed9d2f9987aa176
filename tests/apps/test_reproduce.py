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
from clihelpers import tree_hashes
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
            key = "hist_<scorer>.png" if name.startswith("hist_") else \
                "shard-<i>.safetensors" if name.startswith("shard-") else name
            assert key in documented, f"{os.path.join(dirpath, name)} is not explained"
            assert key in help_text, f"{name} is not in ascood reproduce --help"


# -- CIFAR: the conventional mean (issue 20) -------------------------------------------------------------------
CONVENTIONAL = ("mnist", "svhn", "isun", "texture", "places365")  # the paper's Sec. 4 sets for CIFAR


def _csv_rows(out: str) -> list[dict]:
    return list(csv.DictReader(open(os.path.join(out, "results_per_set.csv"))))


def _mean_of(rows, method, scorer, names, metric="fpr95", seed="0"):
    vals = [float(r[metric]) for r in rows
            if r["method"] == method and r["scorer"] == scorer and r["seed"] == seed and r["dataset"] in names]
    assert len(vals) == len(names), (method, scorer, names)
    return sum(vals) / len(vals)


@pytest.fixture(scope="module")
def c10(tmp_path_factory):
    """One quick cifar10 reproduction on a full fake tree (iSUN included); scorers msp + scale."""
    base = tmp_path_factory.mktemp("c10")
    root = make_tree(str(base / "data"), benchmarks=["cifar10"])
    out = str(base / "out")
    rc = main(["reproduce", "cifar10", "--data-root", root, *QUICK, "--out", out, "--scorers", "msp", "--no-progress"])
    return {"root": root, "out": out, "rc": rc, "base": base}


def test_cifar_table_compares_the_conventional_mean(c10):
    assert c10["rc"] == 0
    out = c10["out"]
    rows, summary = _csv_rows(out), json.load(open(os.path.join(out, "summary.json")))
    table = open(os.path.join(out, "table.md")).read()
    for method, scorer in (("ce", "msp"), ("ascood", "scale")):
        conv = _mean_of(rows, method, scorer, CONVENTIONAL)
        everything = _mean_of(rows, method, scorer, CONVENTIONAL + ("cifar100", "tin"))
        near = _mean_of(rows, method, scorer, ("cifar100", "tin"))
        got = summary["methods"][method]["per_seed"][0]
        assert got["fpr95"] == pytest.approx(conv, abs=1e-3) and got["near_fpr95"] == pytest.approx(near, abs=1e-3)
        assert f"| {scorer} | {conv:.2f} ± 0.00 | " in table
        assert abs(conv - everything) > 1e-6  # the fake sets differ, so a near+far mean would show
    assert summary["target"] == "conventional" and summary["target_sets"] == list(CONVENTIONAL)
    assert "the conventional mean, the mean over mnist, svhn, isun, texture, places365" in table
    assert "7.69 ± 0.29" in table and "98.32 ± 0.07" in table and "95.06" in table
    assert "Near-OOD mean (cifar100, tin; not part of the paper's number)" in table
    assert "Approximate comparison" not in table
    assert "population std over seeds (ddof 0" in table


def test_cifar_without_isun_new_root_reevaluates_keeps_training_and_says_so(c10, tmp_path, capsys):
    # The user moves the tree (same training lists) and it has no iSUN (OpenOOD's download has none).
    root, out = str(tmp_path / "moved"), str(tmp_path / "out")
    shutil.copytree(c10["root"], root)
    shutil.copytree(c10["out"], out)
    shutil.rmtree(os.path.join(root, "images_classic/iSUN"))
    os.remove(os.path.join(root, "benchmark_imglist/cifar10/test_isun.txt"))
    trained = {m: _digest(os.path.join(out, m, "seed0", "last.pt")) for m in R.METHODS}
    capsys.readouterr()
    assert main(["reproduce", "cifar10", "--data-root", root, *QUICK, "--out", out, "--scorers", "msp",
                 "--no-progress"]) == 0  # no --allow-missing needed for iSUN
    err = capsys.readouterr().err
    assert "training already finished" in err and "byte-identical, so the run is kept" in err
    assert "evaluating again (" in err and f"-> {os.path.abspath(root)!r}" in err and "sets:" in err
    assert {m: _digest(os.path.join(out, m, "seed0", "last.pt")) for m in R.METHODS} == trained
    rows, table = _csv_rows(out), open(os.path.join(out, "table.md")).read()
    assert not any(r["dataset"] == "isun" for r in rows)
    four = tuple(n for n in CONVENTIONAL if n != "isun")
    conv = _mean_of(rows, "ascood", "scale", four)
    assert json.load(open(os.path.join(out, "summary.json")))["methods"]["ascood"]["per_seed"][0]["fpr95"] == \
        pytest.approx(conv, abs=1e-3)
    assert "**Approximate comparison:** isun is missing from the data tree" in table
    assert "over 4 of the paper's 5 sets (mnist, svhn, texture, places365)" in table
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["data"]["root"] == os.path.abspath(root)
    assert json.load(open(os.path.join(out, "ascood", "seed0", "eval", "signature.json")))["data_root"] == \
        os.path.abspath(root)


def test_changed_training_list_is_refused_before_anything_changes(c10, tmp_path, capsys):
    root, out = str(tmp_path / "edited"), str(tmp_path / "out")
    shutil.copytree(c10["root"], root)
    shutil.copytree(c10["out"], out)
    with open(os.path.join(root, "benchmark_imglist/cifar10/train_cifar10.txt"), "a") as f:
        f.write("# one more line\n")
    before = tree_hashes(out)
    rc = main(["reproduce", "cifar10", "--data-root", root, *QUICK, "--out", out, "--scorers", "msp",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "was trained on other image lists (benchmark_imglist/cifar10/train_cifar10.txt differ" in err
    assert "nothing was changed" in err
    assert tree_hashes(out) == before


def test_every_flag_is_checked_before_anything_is_written(c10, tmp_path, capsys):
    fresh = str(tmp_path / "fresh")
    for flags, culprit in ((["--scorers", "msp,bogus"], "--scorers: unknown scorer 'bogus'"),
                           (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nope"],
                            "--device"),
                           (["--batch-size", "7", "--image-size", "1"], "--image-size 1 is too small")):
        try:
            rc = main(["reproduce", "cifar10", "--data-root", c10["root"], *QUICK, "--out", fresh, "--no-progress",
                       *flags])
        except SystemExit as e:  # a flag's type is checked by the parser
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and culprit in err and "Traceback" not in err, err
        assert not os.path.exists(fresh)  # not even the directory
    # The same on an --out that holds a reproduction: nothing in it changes.
    before = tree_hashes(c10["out"])
    assert main(["reproduce", "cifar10", "--data-root", c10["root"], *QUICK, "--out", c10["out"],
                 "--scorers", "bogus"]) == 2
    assert tree_hashes(c10["out"]) == before


def test_out_of_another_preset_is_refused_before_anything_changes(c10, capsys):
    before = tree_hashes(c10["out"])
    rc = main(["reproduce", "cifar10_random", "--data-root", c10["root"], *QUICK, "--out", c10["out"],
               "--scorers", "msp", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"--out {c10['out']} holds a reproduction of cifar10, not cifar10_random; nothing was changed" in err
    assert tree_hashes(c10["out"]) == before


def test_out_in_use_by_another_reproduce_is_refused(c10, capsys):
    import socket

    from ascood.training.rundir import LOCK_NAME, _process_start

    other = os.getppid()  # a live process that is not this one holds the lock
    lock = os.path.join(c10["out"], LOCK_NAME)
    before = tree_hashes(c10["out"])
    with open(lock, "w") as f:
        json.dump({"pid": other, "host": socket.gethostname(), "started": "earlier",
                   "proc_start": _process_start(other)}, f)
    try:
        rc = main(["reproduce", "cifar10", "--data-root", c10["root"], *QUICK, "--out", c10["out"],
                   "--scorers", "msp", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err
        assert f"--out {c10['out']} is in use by another ascood run (pid {other}" in err
        after = tree_hashes(c10["out"])
        after.pop(LOCK_NAME)
        assert after == before
    finally:
        os.remove(lock)


def test_list_shows_both_cifar10_presets_with_provenance(capsys):
    assert main(["reproduce", "--list"]) == 0
    text = capsys.readouterr().out
    lines = {ln.split(":", 1)[0].strip(): ln for ln in text.splitlines() if ln.startswith("  ")}
    assert "train script" in lines["cifar10"] and "p_inv 0.15" in lines["cifar10"] and "exp(G_c)" in lines["cifar10"]
    assert "published ASCOOD CIFAR-10 result files" in lines["cifar10_random"]
    assert "chosen at random, p_inv 0.2" in lines["cifar10_random"]
    assert "Table 3" in lines["imagenet100"] and "DreamOOD" in lines["imagenet100"]
    assert "shuffle (random)" in text and "shuffle (exp)" in text
    assert main(["reproduce", "--data-root", "."]) == 2
    assert "give a preset NAME" in capsys.readouterr().err


def test_cifar10_random_preset_resolves(c10, capsys):
    assert main(["reproduce", "cifar10_random", "--data-root", c10["root"], "--print-config"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert " random " in lines["shuffle_rank"] and lines["shuffle_rank"].endswith("[preset]")
    assert " 0.2 " in lines["p_inv"] and " cifar10 " in lines["benchmark"]
    v = R.resolve_config("cifar10_random", {}).values
    assert R.method_settings(v, "ascood")[0]["shuffle_rank"] == "random"
    assert R.method_settings(R.resolve_config("cifar10", {}).values, "ascood")[0]["shuffle_rank"] == "exp"


# -- ImageNet-100 (Table 3) ------------------------------------------------------------------------------------
def test_imagenet100_preset_resolves_and_reports_table3(tmp_path, capsys):
    from fake_openood import CLASS_LIST_NAME

    root = make_tree(str(tmp_path / "data"), benchmarks=["imagenet100"])
    classes = os.path.join(root, CLASS_LIST_NAME)
    assert main(["reproduce", "imagenet100", "--data-root", root, "--print-config"]) == 2
    assert "needs --class-list FILE" in capsys.readouterr().err
    assert main(["reproduce", "imagenet100", "--data-root", root, "--class-list", classes, "--print-config"]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ")}
    for key, value in (("model", "resnet34"), ("epochs", "20"), ("batch_size", "40"), ("lr", "0.0005"),
                       ("pretrained", "True")):
        assert f" {value} " in lines[key] and lines[key].endswith("[preset]"), lines[key]
    assert "scorer" in lines and " ebo " in lines["scorer"]
    assert "200 train images -> 100 training steps per run" in text  # ceil(200 / 40) x 20
    assert "pass --weights FILE, a local copy of torchvision's ImageNet ResNet-34" in text
    # A quick run: Table 3's per-set numbers beside the measured ones.
    out = str(tmp_path / "out")
    assert main(["reproduce", "imagenet100", "--data-root", root, "--class-list", classes, *QUICK,
                 "--out", out, "--no-progress"]) == 0
    table = open(os.path.join(out, "table.md")).read()
    assert "measured vs the paper's Table 3" in table
    assert "| ASCOOD | ebo |" in table and "| 23.12 |" in table and "| 94.02 |" in table and "| 87.27 |" in table
    for published in ("21.09", "94.87", "62.82", "18.11", "95.73", "26.04", "91.95"):
        assert published in table
    rows = _csv_rows(out)
    three = ("inaturalist", "textures", "openimage_o")
    assert f"| ebo | {_mean_of(rows, 'ascood', 'ebo', three):.2f} ± 0.00 |" in table
    assert not any(r["dataset"] == "ninco" for r in rows) and any(r["dataset"] == "ssb_hard" for r in rows)
    ck = torch.load(os.path.join(out, "ascood", "seed0", "best.pt"), weights_only=True)
    assert ck["model_build"]["num_classes"] == 100
    # The ± of the table is np.std (ddof 0): a second seed whose ebo AUROC is 3 points higher on every set
    # gives ± 1.50 (the sample std would print 2.12).
    tree = resolve_benchmark("imagenet100", root, class_list=classes)
    first = [r for r in json.load(open(os.path.join(out, "results_per_set.json")))["rows"] if r["seed"] == 0]
    runs = {}
    for seed, shift in ((0, 0.0), (1, 3.0)):
        for method in R.METHODS:
            runs[(method, seed)] = [{**r, "auroc": r["auroc"] + (shift if r["scorer"] == "ebo" else 0.0)}
                                    for r in first if r["method"] == method]
    summary = R.summarize("imagenet100", R.resolve_config("imagenet100", {}).values, runs, [0, 1], tree)
    two = R.format_table(summary, tree)
    auroc = _mean_of(rows, "ascood", "ebo", three, "auroc")
    assert f"| {auroc + 1.5:.2f} ± 1.50 | 94.02 |" in two


def test_mean_std_is_the_population_std():
    from ascood.scoring.summary import mean_std

    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, 1.25 ** 0.5))  # np.std: sqrt(mean sq. dev.)
    assert mean_std([7.0]) == (7.0, 0.0)


def test_aircraft_preset_gives_nnguide_the_whole_training_set_as_bank():
    import inspect

    from ascood.apps.presets import PRESETS
    from ascood.scoring.scorers import NNGuide

    assert PRESETS["aircraft"].params_for("nnguide") == {"bank": "all"}
    assert R.scorer_params("aircraft", ["msp", "nnguide"]) == {"nnguide": {"bank": "all"}}
    if "bank" not in inspect.signature(NNGuide).parameters:
        pytest.skip("needs NNGuide(bank=...) from issue 22")
    from torch.utils.data import DataLoader, TensorDataset

    import ascood
    from ascood.scoring.scorers import scorer_for_model
    from ascood.scoring.scorers.base import model_features

    model = ascood.build_model("small_cnn", 3, width=4).eval()
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    scorer = scorer_for_model("nnguide", [1.0] * 3, **R.scorer_params("aircraft", ["nnguide"])["nnguide"])
    scorer.fit(model, DataLoader(TensorDataset(train, torch.zeros(40, dtype=torch.long)), batch_size=16))
    _, got = scorer.score(model, test)
    # K = 100 > 40 rows: with the whole set as bank the guidance is the mean over ALL 40 training samples.
    with torch.no_grad():
        z_tr, h_tr = model_features(model, train)
        z, h = model_features(model, test)
    n = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
    bank = n(h_tr) * torch.logsumexp(z_tr, 1)[:, None]
    expected = (n(h) @ bank.T).mean(1) * torch.logsumexp(z, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
