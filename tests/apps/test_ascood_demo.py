"""`ascood demo`: a tiny run writes the table (CSV + markdown) and figures; --help; one-line errors.

The runs here are tiny (1 seed, 1 epoch, one or two settings, few scorers); the
assertions are about the outputs' shape and sanity, never the demo's numbers.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("skimage", reason="the bundled benchmarks need scikit-image")

from ascood.apps import demo  # noqa: E402
from ascood.apps.main import main as cli_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--seeds", "1", "--epochs", "1", "--no-progress"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run shared by the output tests: 2 settings, 1 seed, 1 epoch, MSP + i-ODIN + KNN."""
    out = tmp_path_factory.mktemp("demo")
    argv = [*TINY, "--settings", "spurious,conventional", "--scorers", "msp,iodin,knn", "--out", str(out)]
    rc = demo.main(argv)
    return rc, out


def test_tiny_run_writes_table_and_figures(tiny_run, capsys):
    rc, out = tiny_run
    assert rc == 0
    for name in ("table.md", "table.csv", "all_results.csv", "summary.csv", "hparams.json"):
        assert (out / name).is_file(), name
    from ascood.scoring.plots import have_matplotlib
    if have_matplotlib():
        figs = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
        assert any(f.startswith("hist_") for f in figs), figs
        assert "outliers_spurious.png" in figs and "outliers_conventional_relative.png" in figs, figs


def test_table_rows_and_columns(tiny_run):
    _, out = tiny_run
    rows = _rows(out / "table.csv")
    methods = {r["method"] for r in rows}
    # baseline rows (each scorer on the CE net), ASCOOD (its scorer) and the relative-alpha variant
    for m in ("CE + MSP", "CE + i-ODIN", "CE + KNN", "ASCOOD", "ASCOOD + MSP", "ASCOOD (relative alpha)",
              "ASCOOD (relative alpha) + MSP"):
        assert m in methods, (m, methods)
    assert {r["setting"] for r in rows} == {"spurious", "conventional"}
    for r in rows:
        assert r["n_seeds"] == "1"
        for k in ("fpr95_mean", "auroc_mean", "id_acc_mean"):
            v = float(r[k])
            assert math.isfinite(v) and 0.0 <= v <= 100.0, (k, v)
    md = (out / "table.md").read_text()
    assert "| Method | spurious: FPR@95 / AUROC | conventional: FPR@95 / AUROC |" in md
    assert "ID accuracy: CE" in md and "ID accuracy: ASCOOD" in md
    assert "Hyperparameters" in md and "p_inv" in md and "Target check" in md


def test_all_results_has_every_run_and_aps_choice(tiny_run):
    _, out = tiny_run
    rows = _rows(out / "all_results.csv")
    # 2 settings x 1 seed x 3 methods x scorers (msp, iodin, knn)
    assert len(rows) == 2 * 3 * 3
    assert {r["method"] for r in rows} == set(demo.METHODS)
    for r in rows:
        for k in ("fpr95", "auroc", "id_acc", "val_auroc"):
            assert 0.0 <= float(r[k]) <= 100.0
        params = json.loads(r["params"])
        if r["scorer"] == "iodin":  # chosen on the validation split (APS)
            assert set(params) == {"temperature", "eps"}
        else:
            assert params == {}
    hp = json.loads((out / "hparams.json").read_text())
    assert set(hp["configs"]) == {"spurious", "conventional"} and hp["configs"]["spurious"]["epochs"] == 1
    assert "reached" in hp["verdict"]


def test_printed_table(tiny_run, capsys):
    # the module fixture's output was captured by an earlier test; run once more, tiny, one setting
    rc = demo.main([*TINY, "--settings", "fine-grained", "--scorers", "msp", "--no-figures", "--out",
                    str(tiny_run[1] / "again")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FPR@95" in out and "AUROC" in out and "ASCOOD (relative alpha)" in out
    assert "Hyperparameters (fixed per setting" in out and "wall time" in out


def test_deterministic_given_seed(tmp_path):
    args = [*TINY, "--settings", "fine-grained", "--scorers", "msp", "--no-figures"]
    assert demo.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert demo.main([*args, "--out", str(tmp_path / "b")]) == 0
    key = ("setting", "seed", "method", "scorer", "fpr95", "auroc", "id_acc", "val_auroc")
    a = [tuple(r[k] for k in key) for r in _rows(tmp_path / "a" / "all_results.csv")]
    b = [tuple(r[k] for k in key) for r in _rows(tmp_path / "b" / "all_results.csv")]
    assert a == b


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("--seeds", "--quick", "--out", "--settings", "APS"):
        assert needle in out, needle


def test_help_through_cli(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


BAD = [
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "two"], "--seeds"),
    (["--settings", "medical"], "unknown setting"),
    (["--scorers", "msp,nope"], "unknown scorer"),
    (["--epochs", "-1"], "--epochs"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv,needle", BAD)
def test_bad_arguments_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ascood demo: error:") and needle in err[0], err


def test_bad_argument_through_python_m_has_no_traceback():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "ascood", "demo", "--seeds", "0"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["ascood demo: error: argument --seeds: must be >= 1, got 0"]


def test_demo_ends_with_a_saved_detector_and_decisions(tiny_run, capsys):
    # The ending: a detector from the first setting's ASCOOD network, saved, then used on held-out images.
    _, out = tiny_run
    from ascood.deploy import Detector

    det = Detector.load(out / "detector")
    assert det.tpr == 0.95 and det.provenance["scorer_choice"]["mode"] == "fixed"
    assert det.provenance["data"]["n_calibration"] >= 19  # held-out half of the ID validation split
    card = (out / "detector" / "README.md").read_text()
    assert "threshold" in card and "exchangeable" in card
