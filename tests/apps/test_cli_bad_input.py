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
    # issue 25: classes by name, data that leaves its folder, duplicate OOD names, messages
    write_images(root / "extra" / "red", 2, (220, 30, 30))
    write_images(root / "extra" / "fish", 2, (30, 30, 220))
    p["extra"] = str(root / "extra")
    write_images(root / "swapped" / "cyan", 6, (220, 30, 30))  # same size as data, other classes
    write_images(root / "swapped" / "magenta", 6, (30, 220, 30))
    p["swapped"] = str(root / "swapped")
    for name, text in (("escape.txt", "0.png 0\n../../pic.png 1\n"), ("absolute.txt", f"0.png 0\n{root}/pic.png 1\n"),
                       ("missing.txt", "0.png 0\nnope.png 1\n")):
        (root / name).write_text(text)
        p[name] = str(root / name)
    (root / "binary.txt").write_bytes(b"\x89PNG\x00\x01 0\n")
    p["binary.txt"] = str(root / "binary.txt")
    torch.save({"features.0.weight": torch.zeros(3, 3)}, root / "wrong_arch.pt")
    p["wrong_arch"] = str(root / "wrong_arch.pt")
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
    # issue 25, item 1: classes matched by name
    ("id-unknown-class", ["eval", "{ckpt}", "--id", "{extra}", "--ood", "{flat}", "--scorers", "msp"], 2,
     "--id {extra}: class 'fish' is not one of the model's classes (green, red)", True),
    ("val-unlabelled", ["train", "{data}", "--val", "{flat}", "--out", "{new}", *TINY_TRAIN], 2,
     "--val {flat} has no labels", False),
    ("train-other-ckpt-classes", ["eval", "{ckpt}", "--id", "{swapped}", "--ood", "{flat}", "--scorers", "msp"], 2,
     "class 'cyan' is not one of the model's classes", False),
    # item 3: resume compares the input pipeline and the data
    ("resume-image-size", ["train", "{data}", "--out", "{run}", "--resume", "--image-size", "12", "--no-progress"], 1,
     "--image-size: 8 -> 12", False),
    ("resume-other-data", ["train", "{swapped}", "--out", "{run}", "--resume", "--no-progress"], 1,
     "class names: ['green', 'red'] -> ['cyan', 'magenta']", False),
    # item 4: --out inside a data folder
    ("out-in-data", ["train", "{data}", "--out", "{data}/red/run", *TINY_TRAIN], 2,
     "--out {data}/red/run is inside the data folder of DATA", True),
    # item 7: duplicate OOD names
    ("ood-same-name", ["eval", "{ckpt}", "--id", "{data}", "--ood", "x={flat}", "--ood", "x={data}"], 2,
     "two OOD sets are named 'x': --ood x={flat} and --ood x={data}", False),
    ("ood-name-is-group", ["eval", "{ckpt}", "--id", "{data}", "--ood", "near={flat}", "--near", "y={data}"], 2,
     "--ood near={flat}: the name 'near' is taken by the --near group", False),
    # item 9: list entries that leave the data root
    ("list-dotdot", ["train", "{escape.txt}", "--root", "{gaps.txt_root}", "--out", "{new}", *TINY_TRAIN], 1,
     "escape.txt:2: path '../../pic.png' leaves the image root", True),
    ("list-absolute", ["train", "{absolute.txt}", "--root", "{gaps.txt_root}", "--out", "{new}", *TINY_TRAIN], 1,
     "absolute.txt:2: path", False),
    # item 10: messages that name the culprit
    ("list-missing-image", ["train", "{missing.txt}", "--root", "{gaps.txt_root}", "--out", "{new}", *TINY_TRAIN], 1,
     "missing.txt:2: image", False),
    ("binary-ood-list", [*EVAL, "--scorers", "msp", "--ood", "b={binary.txt}"], 1,
     "binary.txt is not a text image list", False),
    ("wrong-arch-weights", ["train", "{data}", "--out", "{new}", "--weights", "{wrong_arch}", *TINY_TRAIN], 1,
     "wrong_arch.pt", False),
    ("workers-negative", ["train", "{data}", "--out", "{new}", "--workers", "-1", *TINY_TRAIN], 2,
     "argument --workers: must be >= 0", False),
    ("device-tpu", ["train", "{data}", "--out", "{new}", "--device", "tpu", *TINY_TRAIN], 2,
     "argument --device: expected cpu, cuda or cuda:N, got 'tpu'", True),
    ("abbreviated-flag", ["train", "{data}", "--out", "{new}", "--epoch", "3", "--no-progress"], 2,
     "unrecognized arguments: --epoch 3", False),
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


# -- issue 25, item 10: cases that need an environment variable, worker processes or a signal -------------------
def test_bad_backend_variable_names_the_variable(env, capsys, monkeypatch):
    monkeypatch.setenv("ASCOOD_BACKEND", "bogus")
    before = _snapshot(env)
    assert main(["train", env["data"], "--out", env["new"], *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert "environment variable ASCOOD_BACKEND='bogus': expected one of auto" in err
    assert "--image-size" not in err and "Traceback" not in err
    assert _snapshot(env) == before and not os.path.exists(os.path.join(env["new"], "last.pt"))


def test_corrupt_image_in_a_worker_process_names_the_file(tmp_path):
    data = make_class_tree(tmp_path / "data")
    bad = os.path.join(data, "red", "0.png")
    with open(bad, "wb") as f:
        f.write(b"not a png at all")
    r = run_cli("train", data, "--out", str(tmp_path / "run"), "--workers", "2", *TINY_TRAIN)
    assert r.returncode == 1, r.stderr
    assert "cannot read image" in r.stderr and "0.png" in r.stderr, r.stderr
    assert "DataLoader worker" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from clihelpers import ROOT

    # SIGINT while the command is still importing torch (well before any work): one line, no traceback.
    (tmp_path / "data").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ascood", "train", str(tmp_path / "data"), "--out",
                             str(tmp_path / "r")],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            # A shell without job control starts background jobs with SIGINT ignored,
                            # and Python keeps it ignored: the child gets the default back, as a terminal's.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Not a fixed sleep: on a loaded machine the interpreter may not have started our code by then (a
    # SIGINT inside Python's own start-up is Python's traceback, not ours). torch's library mapped into
    # the process means its import has begun, which takes seconds more.
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        with open(f"/proc/{proc.pid}/maps") as maps:
            if "libtorch" in maps.read():
                break
        time.sleep(0.01)
    assert proc.poll() is None, "the command ended before it imported torch"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "ascood: interrupted", err
