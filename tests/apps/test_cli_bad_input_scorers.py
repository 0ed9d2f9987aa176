"""Issue 30, scorer fits through ``ascood eval``: a split that a scorer fits on the ID classes of (tempscale on
--val / --aps-id, mds / rmds / she on --train) must be labelled; an unlabelled one is named by its flag (exit 2,
one line, no traceback), before the model runs over it. Same style as test_cli_bad_input.py."""
import os

import pytest

from ascood.apps.main import main
from clihelpers import TINY_TRAIN, make_class_tree, run_cli, tree_hashes, write_images


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer_fits")
    p = {"data": make_class_tree(root / "train")}
    write_images(root / "flat", 4, (128, 128, 128))
    p["flat"] = str(root / "flat")
    p["run"] = str(root / "run")
    assert main(["train", p["data"], "--out", p["run"], *TINY_TRAIN]) == 0
    p["ckpt"] = os.path.join(p["run"], "last.pt")
    (root / "half.txt").write_text("0.png 0\n1.png\n2.png 1\n")
    p["half.txt"] = str(root / "half.txt")
    p["red"] = os.path.join(p["data"], "red")
    return p


EVAL = ["eval", "{ckpt}", "--id", "{data}", "--ood", "{flat}", "--batch-size", "4"]

# (id, argv, exit status, text of the one error line, also through `python -m ascood`)
CASES = [
    ("tempscale-unlabelled-val", [*EVAL, "--scorers", "tempscale", "--val", "{flat}"], 2,
     "--val {flat} has no labels: scorer(s) tempscale fit on the ID class of every image there", True),
    ("tempscale-unlabelled-aps-id", [*EVAL, "--scorers", "msp,tempscale", "--aps-id", "{flat}", "--aps-ood", "{flat}"],
     2, "--aps-id {flat} has no labels: scorer(s) tempscale", False),
    ("mds-she-unlabelled-train", [*EVAL, "--scorers", "mds,she,knn", "--train", "{flat}"], 2,
     "--train {flat} has no labels: scorer(s) mds, she fit on the ID class", False),
    ("tempscale-val-list-line-without-label", [*EVAL, "--scorers", "tempscale", "--val", "{half.txt}", "--root",
                                               "{red}"], 2,
     "--val {half.txt}:2: no label (1 unlabelled line(s)): scorer(s) tempscale", False),
    ("rmds-unlabelled-train", [*EVAL, "--scorers", "rmds", "--train", "{flat}"], 2,
     "--train {flat} has no labels: scorer(s) rmds", False),
]


def _sub(text, env):
    for key, value in env.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(case, env, capsys):
    _, argv, rc_want, needle, _ = case
    before = tree_hashes(env["run"])
    try:
        rc = main([_sub(a, env) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    needle = _sub(needle, env)
    assert rc == rc_want, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and needle in errors[0], err
    assert tree_hashes(env["run"]) == before


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_bad_input_through_python_m_ascood(case, env):
    _, argv, rc_want, needle, _ = case
    r = run_cli(*[_sub(a, env) for a in argv])
    assert r.returncode == rc_want, r.stderr
    assert _sub(needle, env) in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_labelled_splits_still_fit(env, capsys):
    """The control: the same scorers on labelled --val / --train evaluate (exit 0)."""
    argv = [_sub(a, env) for a in EVAL] + ["--scorers", "tempscale,mds", "--val", env["data"], "--train", env["data"]]
    assert main(argv) == 0, capsys.readouterr().err


def test_demo_says_the_capped_k_warning_once(tmp_path, capsys):
    """`ascood demo` fits a fresh NNGuide per network (9 in --quick; banks of 9 to 11 rows < K = 100): the
    note that K is capped is printed once, with what to do (it was printed once per network)."""
    pytest.importorskip("skimage", reason="the bundled benchmarks need scikit-image")
    argv = ["demo", "--quick", "--scorers", "msp,nnguide", "--epochs", "1", "--no-figures", "--no-detector",
            "--no-progress", "--out", str(tmp_path / "demo")]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "larger than its bank" in line]
    assert len(notes) == 1, notes
    assert "nnguide: K = 100" in notes[0] and "a larger alpha or bank='all'" in notes[0]
