"""Table-driven bad input for the CLI: each case runs the real command (``ascood.apps.main.main``, and a
representative subset through ``python -m ascood`` in a subprocess) and asserts the exit status, a one-line
message naming the culprit, no traceback, and that the files of earlier runs were not changed."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ascood.training.checkpoint import load_checkpoint
from ascood.apps.main import main
from clihelpers import TINY_TRAIN, make_class_tree, run_cli, tree_hashes, write_images


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Paths the cases refer to by name: data, an earlier training run and an earlier evaluation."""
    root = tmp_path_factory.mktemp("bad")
    p = {"data": make_class_tree(root / "train")}
    write_images(root / "flat", 4, (128, 128, 128))
    p["flat"] = str(root / "flat")
    (root / "empty").mkdir()
    p["empty"] = str(root / "empty")
    red = os.path.join(p["data"], "red")
    for name, text in (("floats.txt", "0.png 0\n1.png 1.5\n"), ("half.txt", "0.png 0\n1.png\n"),
                       ("gaps.txt", "0.png 0\n1.png 3\n2.png 3\n")):
        (root / name).write_text(text)
        p[name] = str(root / name)
    for name in ("floats.txt", "half.txt", "gaps.txt"):
        p[name + "_root"] = red
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "pic.png")
    p["png"] = str(root / "pic.png")
    (root / "notes.txt").write_text("101\n")
    p["text"] = str(root / "notes.txt")
    (root / "afile").write_text("x")
    p["file"] = str(root / "afile")
    p["run"] = str(root / "run")
    assert main(["train", p["data"], "--out", p["run"], *TINY_TRAIN]) == 0
    p["ckpt"] = os.path.join(p["run"], "last.pt")
    p["res"] = str(root / "res")
    assert main(["eval", p["ckpt"], "--id", p["data"], "--ood", p["flat"], "--scorers", "msp", "--out", p["res"]]) == 0
    ck = load_checkpoint(p["ckpt"])
    ck["model_build"]["num_classes"] = 5
    torch.save(ck, root / "other_classes.pt")
    p["mismatch"] = str(root / "other_classes.pt")
    p["new"] = str(root / "new_run")  # bad-input cases must leave no checkpoint here
    p["gaps_run"] = str(root / "gaps_run")
    return p


EVAL = ["eval", "{ckpt}", "--id", "{data}", "--ood", "{flat}", "--batch-size", "4"]
# (id, argv, exit status, text the message must contain, through a subprocess too)
CASES = [
    ("out-exists-no-resume", ["train", "{data}", "--out", "{run}", *TINY_TRAIN], 2, "exists: pass --resume", True),
    ("resume-changed-lr", ["train", "{data}", "--out", "{run}", "--resume", "--lr", "0.5", "--no-progress"], 1,
     "-> 0.5", False),
    ("resume-other-num-classes", ["train", "{data}", "--out", "{new}", "--resume", "{mismatch}", "--no-progress"],
     1, "model num_classes: 5 -> 2", False),
    ("resume-text-file", ["train", "{data}", "--out", "{new}", "--resume", "{text}"], 1,
     "is not a torch checkpoint file", False),
    ("out-is-a-file", ["train", "{data}", "--out", "{file}", *TINY_TRAIN], 1, "--out {file} is an existing file", False),
    ("std-zero", ["train", "{data}", "--out", "{new}", "--mean", "0.5,0.5,0.5", "--std", "0,1,1"], 2,
     "--std values must be > 0", False),
    ("std-count", ["train", "{data}", "--out", "{new}", "--std", "1,1"], 2, "--std needs 3", False),
    ("image-size-1", ["train", "{data}", "--out", "{new}", "--image-size", "1", "--width", "4"], 2,
     "--image-size 1 is too small for --model small_cnn (needs at least", False),
    ("alpha-order", ["train", "{data}", "--out", "{new}", "--alpha-min", "5", "--alpha-max", "1"], 2,
     "|--alpha-min| (5.0) must be <= |--alpha-max| (1.0)", False),
    ("unlabelled-train", ["train", "{flat}", "--out", "{new}", *TINY_TRAIN], 2, "{flat} has no labels", False),
    ("float-label", ["train", "{floats.txt}", "--root", "{floats.txt_root}", "--out", "{new}", *TINY_TRAIN], 1,
     "floats.txt:2: label '1.5' is not an integer", False),
    ("unlabelled-line", ["train", "{half.txt}", "--root", "{half.txt_root}", "--out", "{new}", *TINY_TRAIN], 2,
     "half.txt:2: no label", False),
    ("png-as-list", ["train", "{png}", "--out", "{new}", *TINY_TRAIN], 1, "pic.png is not a text image list", True),
    ("cifar-missing", ["train", "{data}", "--data-format", "cifar10", "--out", "{new}", *TINY_TRAIN], 1,
     "CIFAR batch file not found", False),
    ("eval-text-ckpt", ["eval", "{text}", "--id", "{data}", "--ood", "{flat}"], 1, "is not a torch checkpoint file",
     False),
    ("eval-mismatch", ["eval", "{mismatch}", "--id", "{data}", "--ood", "{flat}"], 1,
     "does not fit this model (shape mismatch: fc.weight", False),
    ("scorers-empty", [*EVAL, "--scorers", ","], 2, "--scorers names no scorer", True),
    ("scorers-unknown", [*EVAL, "--scorers", "msp,bogus"], 2, "--scorers: unknown scorer 'bogus'", False),
    ("knn-no-train", [*EVAL, "--scorers", "knn"], 2, "knn fit ID statistics: pass the ID training data with --train",
     False),
    ("aps-half", [*EVAL, "--aps-id", "{data}"], 2, "APS needs both --aps-id and --aps-ood", False),
    ("aps-vim", [*EVAL, "--scorers", "vim", "--train", "{data}", "--aps-id", "{data}", "--aps-ood", "{flat}"], 1,
     "no valid hyperparameter combination for vim among 2: {'dim': 256}: vim dim must be in", False),
    ("eval-out-file", [*EVAL, "--scorers", "msp", "--out", "{file}"], 1, "--out {file} is an existing file", False),
    ("empty-ood", ["eval", "{ckpt}", "--id", "{data}", "--far", "e={empty}"], 1, "no images", False),
    ("eval-unlabelled-id", ["eval", "{ckpt}", "--id", "{flat}", "--ood", "{data}", "--scorers", "msp"], 0,
     "--id {flat} has no labels: ID accuracy is reported as n/a", False),
    ("label-gaps", ["train", "{gaps.txt}", "--root", "{gaps.txt_root}", "--out", "{gaps_run}", *TINY_TRAIN], 0,
     "no samples for 2 class(es) (1, 2); training 4 classes", False),
]


def _fill(argv, env):
    return [_sub(a, env) for a in argv]


def _sub(text, env):
    for key, value in env.items():
        text = text.replace("{" + key + "}", value)
    return text


def _snapshot(env):
    return {k: tree_hashes(env[k]) for k in ("run", "res")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(case, env, capsys):
    name, argv, rc_want, needle, _ = case
    before = _snapshot(env)
    try:
        rc = main(_fill(argv, env))
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    needle = _sub(needle, env)
    assert rc == rc_want, err
    assert needle in err, err
    assert "Traceback" not in err
    if rc_want:
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and needle in errors[0], err
    assert _snapshot(env) == before, "an earlier run's files changed"
    if os.path.isdir(env["new"]):
        assert "last.pt" not in os.listdir(env["new"])  # nothing trained on bad input


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_bad_input_through_python_m_ascood(case, env):
    name, argv, rc_want, needle, _ = case
    before = _snapshot(env)
    r = run_cli(*_fill(argv, env))
    assert r.returncode == rc_want, r.stderr
    assert _sub(needle, env) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if ": error: " in line]) == 1, r.stderr
    assert _snapshot(env) == before
