"""Issue 30 (no silently wrong result, round 4), data readers and training UX through the CLI.

Table-driven as tests/apps/test_cli_bad_input.py: each case runs ``ascood.apps.main.main`` (a few also
through ``python -m ascood``) and asserts the exit status, the message and that no traceback is printed.
"""
import os
import unicodedata

import pytest

from ascood.apps.main import main
from ascood.training.checkpoint import load_checkpoint
from clihelpers import TINY_TRAIN, make_class_tree, run_cli, write_images


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("data30")
    p = {"data": make_class_tree(root / "train")}  # red/0..5.png, green/0..5.png
    write_images(root / "flat", 4, (128, 128, 128))
    p["flat"] = str(root / "flat")
    os.symlink(p["data"], root / "alias")
    p["alias"] = str(root / "alias")
    os.symlink(p["flat"], root / "flat_alias")
    p["flat_alias"] = str(root / "flat_alias")
    red = os.path.join(p["data"], "red")

    def list_file(name, text, raw=None):
        path = root / name
        path.write_bytes(raw if raw is not None else text.encode("utf-8"))
        p[name] = str(path)

    six = "".join(f"{i}.png {i % 2}\n" for i in range(6))
    list_file("bom.txt", None, raw=("\ufeff" + six).encode("utf-8"))
    list_file("underscore.txt", "0.png 0\n1.png 1_0\n2.png 1\n")
    list_file("plus.txt", "0.png 0\n1.png +1\n")
    list_file("arabic.txt", "0.png 0\n1.png \u0661\n")
    list_file("minus2.txt", "0.png 0\n1.png -2\n2.png 1\n")
    list_file("far.txt", "".join(f"{i}.png {i % 3}\n" for i in range(5)) + "5.png 5000\n")
    p["list_root"] = red
    # a list of the training tree's own images (the same files as DATA)
    list_file("same.txt", "".join(f"{c}/{i}.png {k}\n" for k, c in enumerate(["green", "red"]) for i in range(6)))
    # a class tree with macOS residue and an empty folder
    macos = make_class_tree(root / "macos")
    write_images(os.path.join(macos, "__MACOSX", "red"), 2, (0, 0, 0))
    for f in os.listdir(os.path.join(macos, "__MACOSX", "red")):
        os.rename(os.path.join(macos, "__MACOSX", "red", f), os.path.join(macos, "__MACOSX", "red", "._" + f))
    os.makedirs(os.path.join(macos, "empty"))
    p["macos"] = macos
    # a tree whose class folders are links out of it (only)
    os.makedirs(root / "links_only")
    os.symlink(os.path.join(p["data"], "red"), root / "links_only" / "red")
    os.symlink(os.path.join(p["data"], "green"), root / "links_only" / "green")
    p["links_only"] = str(root / "links_only")
    # a list whose root links to a folder elsewhere: lists/ext -> train/
    os.makedirs(root / "lists")
    os.symlink(p["data"], root / "lists" / "ext")
    (root / "lists" / "via_link.txt").write_text("".join(f"ext/{c}/{i}.png {k}\n" for k, c in
                                                         enumerate(["green", "red"]) for i in range(3)))
    (root / "lists" / "classes.txt").write_text("green\nred\n")  # so a class-folder --val matches by name
    p["via_link"] = str(root / "lists" / "via_link.txt")
    p["lists"] = str(root / "lists")
    # NFD class names (a tree copied from macOS) beside the NFC model
    write_images(root / "nfd" / unicodedata.normalize("NFD", "caf\u00e9"), 6, (220, 30, 30))
    write_images(root / "nfd" / "tea", 6, (30, 220, 30))
    write_images(root / "nfc" / "caf\u00e9", 6, (220, 30, 30), seed=3)
    write_images(root / "nfc" / "tea", 6, (30, 220, 30), seed=3)
    p["nfd"], p["nfc"] = str(root / "nfd"), str(root / "nfc")
    write_images(root / "cyr" / "c\u0430f\u00e9", 2, (220, 30, 30))  # Cyrillic a
    write_images(root / "cyr" / "tea", 2, (30, 220, 30))
    p["cyr"] = str(root / "cyr")
    p["nfc_run"] = str(root / "nfc_run")
    assert main(["train", p["nfc"], "--out", p["nfc_run"], *TINY_TRAIN]) == 0
    p["run"] = str(root / "run")
    assert main(["train", p["data"], "--out", p["run"], *TINY_TRAIN]) == 0
    p["new"] = str(root / "new_run")
    p["missing_dir"] = str(root / "no_such_dir")
    return p


EVAL = ["eval", "{run}", "--id", "{data}", "--scorers", "msp", "--batch-size", "4"]
LIST = ["--root", "{list_root}", "--out", "{new}", *TINY_TRAIN]
# (id, argv, exit status, text the message must contain, through a subprocess too)
CASES = [
    # item 1: labels
    ("label-underscore", ["train", "{underscore.txt}", *LIST], 1,
     "underscore.txt:2: label '1_0' is not an integer class index in plain decimal", True),
    ("label-plus", ["train", "{plus.txt}", *LIST], 1, "plus.txt:2: label '+1' is not an integer", False),
    ("label-arabic-indic", ["train", "{arabic.txt}", *LIST], 1, "arabic.txt:2: label '\u0661' is not an integer",
     False),
    ("label-minus-two", ["train", "{minus2.txt}", *LIST], 1, "minus2.txt:2: label -2 is negative", False),
    ("label-far-beyond", ["train", "{far.txt}", *LIST], 2,
     "far.txt:6: label 5000 is far beyond the others (the other labels are 0..2 (3 distinct)): 4997 of the 5001 "
     "classes", True),
    # item 2/4: class folders that are links leaving the root are named
    ("class-links-out", ["train", "{links_only}", "--out", "{new}", *TINY_TRAIN], 1,
     "2 class folder link(s) leading out of {links_only}: green -> {data}/green, red -> {data}/red", False),
    ("look-alike-class", ["eval", "{nfc_run}", "--id", "{cyr}", "--ood", "{flat}", "--scorers", "msp"], 2,
     "looks like the model's class 'caf\u00e9' but differs in its characters", False),
    # item 3: list entries through a symlink leaving the root
    ("list-link-out", ["train", "{via_link}", "--out", "{new}", *TINY_TRAIN], 1,
     "via_link.txt:1: 'ext/green/0.png' leads through a symlink to {data}/green/0.png", True),
    ("allow-links-missing", ["train", "{via_link}", "--allow-links-into", "{missing_dir}", "--out", "{new}",
                             *TINY_TRAIN], 2, "argument --allow-links-into: expected an existing folder", False),
    # item 4: the same data in two roles
    ("val-is-data", ["train", "{data}", "--val", "{data}", "--out", "{new}", *TINY_TRAIN], 2,
     "--val {data} reads the same 12 images as DATA {data}", True),
    ("val-is-a-link-to-data", ["train", "{data}", "--val", "{alias}", "--out", "{new}", *TINY_TRAIN], 2,
     "--val {alias} reads the same 12 images as DATA {data}", False),
    ("val-list-of-data", ["train", "{data}", "--val", "{same.txt}", "--root", "{data}", "--out", "{new}",
                          *TINY_TRAIN], 2, "--val {same.txt} reads the same 12 images", False),
    ("ood-is-id", [*EVAL, "--ood", "{data}"], 2, "--ood train={data} reads the same 12 images as --id {data}", True),
    ("ood-is-a-link-to-id", ["eval", "{run}", "--id", "{flat}", "--far", "f={flat_alias}", "--scorers", "msp"], 2,
     "--far f={flat_alias} reads the same 4 images as --id {flat}", False),
]


def _sub(text, env):
    for key, value in env.items():
        text = text.replace("{" + key + "}", value)
    return text


def _fill(argv, env):
    return [_sub(a, env) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_data_in_process(case, env, capsys):
    _, argv, status, text, _ = case
    try:
        rc = main(_fill(argv, env))
    except SystemExit as stop:  # argparse's own errors (a flag's value type) exit from the parser
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == status, err
    assert _sub(text, env) in err, err
    assert "Traceback" not in err
    assert not os.path.exists(os.path.join(env["new"], "last.pt"))


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_bad_data_through_python_m_ascood(case, env):
    _, argv, status, text, _ = case
    proc = run_cli(*_fill(argv, env))
    assert proc.returncode == status, proc.stderr
    assert _sub(text, env) in proc.stderr and "Traceback" not in proc.stderr


# -- runs that must work, and say the right thing once ------------------------------------------------------------
def _train(env, tmp_path, capsys, *args):
    out = str(tmp_path / "run")
    rc = main(["train", *_fill(args, env), "--out", out, *TINY_TRAIN])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return load_checkpoint(os.path.join(out, "last.pt")), captured


def test_a_list_with_a_byte_order_mark_trains(env, tmp_path, capsys):
    ck, _ = _train(env, tmp_path, capsys, "{bom.txt}", "--root", "{list_root}")
    assert ck["extra"]["num_images"] == 6 and ck["extra"]["classes"] == ["0", "1"]


def test_macos_residue_and_empty_folders_are_not_classes(env, tmp_path, capsys):
    ck, out = _train(env, tmp_path, capsys, "{macos}")
    assert ck["extra"]["classes"] == ["green", "red"]
    said = [ln for ln in out.err.splitlines() if "folder(s) with no images" in ln]
    assert len(said) == 1 and "2 folder(s) with no images, not classes: __MACOSX, empty" in said[0], out.err


def test_nfd_data_evaluates_against_an_nfc_model(env, capsys):
    rc = main(["eval", env["nfc_run"], "--id", env["nfd"], "--ood", env["flat"], "--scorers", "msp"])
    err = capsys.readouterr().err
    assert rc == 0 and "not one of the model's classes" not in err and "holds" not in err, err


@pytest.mark.parametrize("extra,warned", [
    (["--allow-links-into", "{data}"], None),  # the link's target, named by the flag
    (["--val", "{data}"], "6 of the 12 images of --val {data} are also in DATA {via_link}"),  # a data path named
])
def test_list_links_into_a_named_folder_are_followed(env, tmp_path, capsys, extra, warned):
    ck, out = _train(env, tmp_path, capsys, "{via_link}", *extra)
    assert ck["extra"]["num_images"] == 6
    if warned:
        assert _sub(warned, env) in out.err, out.err


def test_few_steps_per_epoch_warn_once_naming_batch_size(env, tmp_path, capsys):
    _, out = _train(env, tmp_path, capsys, "{data}")  # 12 images, batch 6: 2 steps
    said = [ln for ln in out.err.splitlines() if "optimiser step" in ln]
    assert len(said) == 1, out.err
    assert "an epoch makes only 2 optimiser step(s) (12 images, batch size 6; fewer than 20" in said[0]
    assert "--epochs" in said[0]


def test_no_progress_keeps_the_epoch_lines(env, tmp_path, capsys):
    """--no-progress (in TINY_TRAIN) hides the bars only: the per-epoch summary line is printed."""
    out = str(tmp_path / "run")
    args = [a for a in TINY_TRAIN]
    args[args.index("--epochs") + 1] = "2"
    assert main(["train", env["data"], "--out", out, *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1/2", "2/2"], lines


def test_no_progress_help_says_what_it_hides():
    proc = run_cli("train", "--help")
    assert "no progress bars (the one summary line per epoch is still printed)" in " ".join(proc.stdout.split())


@pytest.mark.parametrize("value", ["1_0", "\u0661", "1.0", "ten"])
def test_integer_flags_take_plain_decimal_only(value, tmp_path, capsys):
    """--epochs 1_0 was read as 10 epochs (int() accepts underscores and other scripts' digits)."""
    with pytest.raises(SystemExit) as stop:
        main(["train", str(tmp_path), "--epochs", value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert f"argument --epochs: expected a positive integer (decimal digits), got {value!r}" in err
