"""CLI: --help, a tiny end-to-end train + eval, and one-line errors for bad arguments."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ascood.apps.main import main
from clihelpers import write_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ascood", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_help_explains_hyperparameters(capsys):
    for cmd in ([], ["train"], ["eval"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("p_inv", "alpha_max", "alpha_min", "sigma", "fc-lr-factor", "KL(U || softmax", "relative",
                   "--convention", "i-ODIN"):
        assert needle in out, needle


BAD_ARGS = [
    (["train", "DATA", "--ood-type", "mixup"], "--ood-type"),
    (["train", "DATA", "--p-inv", "0"], "--p-inv"),
    (["train", "/no/such/dir"], "data path not found: /no/such/dir"),
    (["eval", "/no/ckpt.pt", "--id", "DATA", "--ood", "DATA"], "checkpoint not found"),
]


@pytest.mark.parametrize("args,needle", BAD_ARGS)
def test_bad_arguments_one_line(args, needle, tmp_path, capsys):
    args = [str(tmp_path) if a == "DATA" else a for a in args]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc != 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_bad_argument_through_python_m_has_no_traceback(tmp_path):
    r = run_cli("train", str(tmp_path), "--p-inv", "0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["ascood train: error: argument --p-inv: must be in (0, 1], got 0"]


def test_demo_hook_without_module(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ascood.apps.demo" else real(n, *a))
    assert main(["demo"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_end_to_end_train_and_eval(tmp_path, capsys):
    for split, seed in (("train", 0), ("test", 1)):
        write_images(tmp_path / split / "red", 8, (220, 30, 30), size=10, seed=seed)
        write_images(tmp_path / split / "green", 8, (30, 220, 30), size=10, seed=seed + 10)
    write_images(tmp_path / "ood", 6, (128, 128, 128), size=10, seed=5)
    out = tmp_path / "run"
    rc = main(["train", str(tmp_path / "train"), "--out", str(out), "--epochs", "2", "--batch-size", "8",
               "--image-size", "10", "--width", "4", "--alpha-mode", "relative", "--alpha-max", "1",
               "--alpha-min", "0.5", "--lr", "0.05", "--no-progress"])
    assert rc == 0
    assert {"last.pt", "config.json", "log.jsonl"} <= set(os.listdir(out))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2] and {"loss", "acc", "alpha"} <= set(log[0])
    assert json.load(open(out / "config.json"))["train_config"]["alpha_mode"] == "relative"
    res = tmp_path / "res"
    rc = main(["eval", str(out / "last.pt"), "--id", str(tmp_path / "test"), "--far", f"grey={tmp_path / 'ood'}",
               "--train", str(tmp_path / "train"), "--scorers", "msp,iodin,knn", "--batch-size", "8",
               "--out", str(res)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "OpenOOD convention" in printed and "far mean" in printed
    rows = json.load(open(res / "results.json"))["rows"]
    assert {r["scorer"] for r in rows} == {"msp", "iodin", "knn"}
    assert all(0 <= r["auroc"] <= 100 for r in rows)
    assert (out / "outliers.png").is_file()  # Figure 3 style grid
    assert {f"hist_{s}.png" for s in ("msp", "iodin", "knn")} <= set(os.listdir(res))  # Figure 4 style
    # APS: hyperparameters picked on a validation split (here: the train folder vs the grey images).
    rc = main(["eval", str(out / "last.pt"), "--id", str(tmp_path / "test"), "--ood", f"grey={tmp_path / 'ood'}",
               "--scorers", "ebo", "--batch-size", "8", "--aps-id", str(tmp_path / "train"),
               "--aps-ood", str(tmp_path / "ood")])
    assert rc == 0
    assert "APS ebo: {'temperature'" in capsys.readouterr().out


def test_bench_runs_pytest_on_benchmarks(monkeypatch):
    import ascood.apps.tools as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["bench", "-k", "zscore"]) == 0
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "pytest"] and cmd[3].endswith("benchmarks") and cmd[4:] == ["--benchmark-only", "-k",
                                                                                            "zscore"]
    assert main(["bench", "--quick", "--json", "out.json", "--md=t.md"]) == 0
    assert calls[1][4:] == ["--benchmark-only", "--quick", "--benchmark-json", "out.json", "--bench-md=t.md"]


def test_bench_quick_prints_the_table(tmp_path):
    """The real suite in quick mode on one op: the summary table and the JSON come out."""
    import subprocess as sp

    out = tmp_path / "b.json"
    proc = sp.run([sys.executable, "-m", "ascood", "bench", "--quick", "-k", "gradient_outlier and eager",
                   "-p", "no:cacheprovider", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ascood: fused ops vs eager PyTorch" in proc.stdout and "copy bandwidth" in proc.stdout
    assert "gradient_outlier" in proc.stdout and out.exists() and out.stat().st_size > 0


def test_demo_hook_calls_demo_main(monkeypatch):
    import types

    got = []
    fake = types.ModuleType("ascood.apps.demo")
    fake.main = lambda args: got.append(args) or 0
    monkeypatch.setitem(sys.modules, "ascood.apps.demo", fake)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "ascood.apps.demo" else real(n, *a))
    assert main(["demo", "--fast", "x"]) == 0
    assert got == [["--fast", "x"]]
