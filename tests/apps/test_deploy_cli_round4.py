"""Issue 30, round 4 (deploy, CLI): ``ascood detector | predict | export`` either work or stop before any work
with the documented exit status and a message naming the argument; nothing of the user's is overwritten."""
import csv
import json
import os
import shutil
import socket
import zipfile

import numpy as np
import pytest
from PIL import Image

from ascood.apps.main import main
from clihelpers import TINY_TRAIN, make_class_tree, tree_hashes, write_images


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("r4cli")
    p = {"root": str(root), "train": make_class_tree(root / "train", n_per_class=12),
         "val": make_class_tree(root / "val", n_per_class=20, seed=5)}
    write_images(str(root / "ood"), 16, (30, 30, 220), seed=3)
    p["ood"] = str(root / "ood")
    p["run"] = str(root / "run")
    assert main(["train", p["train"], "--out", p["run"], *TINY_TRAIN]) == 0
    p["det"] = str(root / "det")
    assert main(["detector", p["run"], "--id-val", p["val"], "--id-train", p["train"], "--scorer", "mds",
                 "--tpr", "0.9", "--out", p["det"]]) == 0  # MDS flags the blue OOD images of this tiny run
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("my notes, not a model card\n")
    p["notes"] = str(root / "notes")
    (root / "afile").write_text("x")
    p["file"] = str(root / "afile")
    # a list naming the training images by other paths (relative to the list): the same files
    train_files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(p["train"]) for f in fs)
    (root / "train_list.txt").write_text("".join(f + "\n" for f in train_files))
    p["train_list"] = str(root / "train_list.txt")
    (root / "val_abs.txt").write_text(os.path.join(p["val"], "red", "0.png") + "\n")
    p["val_abs"] = str(root / "val_abs.txt")
    (root / "broken.png").write_bytes(b"not an image")
    p["broken"] = str(root / "broken.png")
    (root / "dir.csv").mkdir()
    p["dircsv"] = str(root / "dir.csv")
    (root / "outdir").mkdir()
    p["outdir"] = str(root / "outdir")
    # not a detector / a detector with a missing or linked piece
    p["missing_piece"] = str(root / "missing_piece")
    shutil.copytree(p["det"], p["missing_piece"])
    os.remove(os.path.join(p["missing_piece"], "scorer.safetensors"))
    # files of the user's at predict / export --out: not written by ascood, never replaced
    mine = root / "mine"
    mine.mkdir()
    (mine / "t.csv").write_text("path,label,score\nx.png,1,0.5\n")  # a table of the user's, similar columns
    (mine / "extra.csv").write_text("path,label,label_name,probability,score,p_value,is_ood,note\n")
    (mine / "t.jsonl").write_text('{"path": "x.png", "label": 1, "mine": true}\n')
    (mine / "m.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # another producer's ONNX header
    with zipfile.ZipFile(mine / "m.pt2", "w") as z:  # a zip archive without ascood's metadata member
        z.writestr("m/models/model.json", "{}")
    p["mine"] = str(mine)
    p["linked_piece"] = str(root / "linked_piece")
    shutil.copytree(p["det"], p["linked_piece"])
    os.replace(os.path.join(p["linked_piece"], "model.safetensors"), root / "model.safetensors")
    os.symlink(root / "model.safetensors", os.path.join(p["linked_piece"], "model.safetensors"))
    return p


# (argv, exit status, message on stderr, paths whose files must be unchanged, paths that must not appear)
CASES = [
    # 1: --out of detector: only a new folder, an empty one, or an earlier detector
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "msp", "--out", "{notes}"], 2,
     "--out {notes} is an existing folder that is not a detector (it holds README.md)", ["notes"], []),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "msp", "--out", "{train}"], 2,
     "is an existing folder that is not a detector", ["train"], []),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "msp", "--out", "{run}"], 2,
     "is an existing folder that is not a detector", ["run"], []),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "msp", "--out", "{file}"], 2,
     "--out {file} is an existing file", [], []),
    # 5: statistical misuse
    (["detector", "{run}", "--id-train", "{train}", "--id-val", "{train}", "--scorer", "knn", "--out", "{tmp}/d"], 2,
     "--id-val and --id-train are the same data", [], ["d"]),
    (["detector", "{run}", "--id-train", "{train}", "--id-val", "{train_list}", "--scorer", "knn", "--out",
      "{tmp}/d"], 2, "--id-val and --id-train are 24 shared image(s)", [], ["d"]),
    (["detector", "{run}", "--id-val", "{val}", "--ood-val", "{val}", "--scorer", "ebo", "--out", "{tmp}/d"], 2,
     "--ood-val and --id-val are the same data", [], ["d"]),
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "msp", "--tpr", "0.99", "--out", "{tmp}/a/b/d"], 2,
     "--id-val gives 40 calibration image(s): too few for --tpr 0.99", [], ["a"]),
    # 7: the flag named as this command calls it
    (["detector", "{run}", "--id-val", "{val}", "--scorer", "knn", "--out", "{tmp}/d"], 2,
     "pass the ID training data with --id-train", [], ["d"]),
    (["detector", "{run}", "--id-val", "{val_abs}", "--scorer", "msp", "--out", "{tmp}/d"], 2,
     "is absolute; training and OpenOOD image lists hold paths relative to the image root", [], ["d"]),
    # 4: bad input is exit status 2
    (["predict", "{train}", "{val}"], 2, "is not an ascood detector: manifest.json is missing", [], []),
    (["predict", "{missing_piece}", "{val}"], 2, "scorer.safetensors is missing", [], []),
    (["predict", "{linked_piece}", "{val}"], 2, "model.safetensors is a symbolic link", [], []),
    (["predict", "{det}", "{val}", "--out", "{dircsv}"], 2, "--out {dircsv} is a folder", [], []),
    (["predict", "{det}", "{broken}", "--strict"], 2, "cannot read image {broken}: not an image file", [], []),
    (["export", "{det}", "--format", "onnx", "--out", "{outdir}"], 2, "--out {outdir} is a folder", ["outdir"], []),
    (["predict", "{det}", "{val}", "--device", "cuda:99"], 2, "argument --device:", [], []),
    # an existing --out file that ascood did not write is never replaced (deploy follow-up)
    (["predict", "{det}", "{ood}", "--out", "{mine}/t.csv"], 2, "--out {mine}/t.csv is an existing file that ascood "
     "did not write (its first line is not ascood's CSV header (path,label,label_name,", ["mine"], []),
    (["predict", "{det}", "{ood}", "--out", "{mine}/extra.csv"], 2, "is an existing file that ascood did not write",
     ["mine"], []),
    (["predict", "{det}", "{ood}", "--out", "{mine}/t.jsonl"], 2, "--out {mine}/t.jsonl is an existing file that "
     "ascood did not write (its first line is not a JSON record with exactly ascood's keys)", ["mine"], []),
    (["export", "{det}", "--format", "onnx", "--out", "{mine}/m.onnx"], 2, "--out {mine}/m.onnx is an existing file "
     "that ascood did not write (no ascood export metadata in it), so nothing was written: remove it or choose "
     "another file name", ["mine"], []),
    (["export", "{det}", "--format", "torch-export", "--out", "{mine}/m.pt2"], 2,
     "--out {mine}/m.pt2 is an existing file that ascood did not write", ["mine"], []),
]


@pytest.mark.parametrize("argv,status,message,unchanged,absent", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) + f"-{i}"
                                                                           for i, c in enumerate(CASES)])
def test_bad_input(argv, status, message, unchanged, absent, env, tmp_path, capsys):
    if "cuda:99" in argv and __import__("torch").cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    fill = dict(env, tmp=tmp_path)
    before = {k: tree_hashes(env[k]) for k in unchanged}
    try:
        got = main([a.format(**fill) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        got = exit_.code
    err = capsys.readouterr().err
    assert got == status, err
    assert message.format(**fill) in err, err
    assert "Traceback" not in err
    for k in unchanged:
        assert tree_hashes(env[k]) == before[k], k
    for name in absent:  # nothing written, no empty folder left behind
        assert not os.path.exists(tmp_path / name)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no lock, no temporary left


def test_detector_out_empty_or_earlier_detector_is_replaced_whole(env, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["detector", env["run"], "--id-val", env["val"], "--scorer", "msp", "--tpr", "0.9",
                 "--out", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "is_ood when p <= 4/41 = 0.09756" in out  # the rule's real cut-off k/(n+1), not 1 - tpr
    (empty / "detector.onnx").write_bytes(b"\x08\x08\x12\x06ascood")  # an ONNX header written by ascood
    assert main(["detector", env["run"], "--id-val", env["val"], "--scorer", "ebo", "--tpr", "0.8",
                 "--out", str(empty)]) == 0
    from ascood.deploy import Detector

    det = Detector.load(empty)
    assert det.scorer.name == "ebo" and det.tpr == 0.8 and not (empty / "detector.onnx").exists()
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_ignored_flags_are_named_once_and_left_off_the_card(env, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["detector", env["run"], "--id-val", env["val"], "--id-train", env["train"], "--ood-val", env["ood"],
                 "--scorer", "msp", "--tpr", "0.9", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --id-train is not used: scorer msp") == 1, err
    assert err.count("warning: --ood-val: scorer msp has no hyperparameters for APS to choose") == 1, err
    card = (out / "README.md").read_text()
    assert "ID train: not used" in card and env["train"] not in card


def test_predict_failed_files_are_rows_with_an_error(env, tmp_path, capsys):
    good = os.path.join(env["val"], "red", "0.png")
    table = tmp_path / "p.csv"
    status = main(["predict", env["det"], good, env["broken"], "--out", str(table), "--no-progress"])
    err_out = capsys.readouterr()
    rows = list(csv.DictReader(table.open()))
    assert [r["path"] for r in rows] == [good, env["broken"]]
    assert rows[1]["error"].startswith("not an image file") and rows[1]["score"] == "" and rows[0]["error"] == ""
    assert f"cannot read {env['broken']}" in err_out.err
    assert "1 file(s) could not be read" in err_out.out
    flagged = rows[0]["is_ood"] == "True"
    assert status == (5 if flagged else 4)
    # every image OOD, one unreadable: 5; the OOD folder alone: 3
    assert main(["predict", env["det"], env["ood"], env["broken"], "--no-progress"]) == 5
    assert main(["predict", env["det"], env["ood"], "--no-progress"]) == 3


def test_predict_help_lists_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    for line in ("0  every image was read and none is flagged OOD", "3  at least one image is flagged OOD",
                 "4  some file(s) could not be read", "5  both", "2  bad input", "1  any other error"):
        assert line in text


@pytest.mark.parametrize("command, lines", [
    ("detector", ("0  the detector was written", "2  bad input", "1  any other error", "--out rule: a new folder")),
    ("export", ("0  the file was written", "2  bad input", "1  any other error", "--out rule: an existing FILE")),
])
def test_detector_and_export_help_state_exit_statuses_and_the_out_rule(command, lines, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for line in lines:
        assert line in text


def test_predict_takes_a_find_pwd_list_and_relative_paths(env, tmp_path, capsys, monkeypatch):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(env["ood"]) for f in fs)
    (tmp_path / "list.txt").write_text("".join(f + "\n" for f in files))  # find $PWD -name '*.png' > list.txt
    assert main(["predict", env["det"], str(tmp_path / "list.txt"), "--no-progress"]) == 3
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + len(files)
    monkeypatch.chdir(env["root"])
    assert main(["predict", "det", "ood/0.png", "--no-progress"]) in (0, 3)
    assert capsys.readouterr().out.splitlines()[1].startswith("ood/0.png,")


def test_predict_fdr_warns_when_the_batch_is_too_large(env, capsys):
    # 40 calibration scores: BH at 0.1 flags a lone image only in batches of at most 4 (n + 1 >= m / q)
    main(["predict", env["det"], env["ood"], "--fdr", "0.1", "--no-progress"])
    err = capsys.readouterr().err
    assert "warning: fdr 0.1 over 16 images" in err and "i.e. 159 calibration images" in err, err


def test_rgba_images_are_said_once(env, tmp_path, capsys):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0], a[..., 3] = 200, 128
    for i in range(3):
        Image.fromarray(a, "RGBA").save(tmp_path / f"{i}.png")
    assert main(["predict", env["det"], str(tmp_path), "--no-progress"]) in (0, 3)
    assert capsys.readouterr().err.count("alpha channel is dropped") == 1


def test_edited_model_card_still_loads(env, tmp_path):
    det = tmp_path / "det"
    shutil.copytree(env["det"], det)
    with open(det / "README.md", "a") as f:
        f.write("\nDeployed 2026-12 on line 4.\n")
    assert main(["predict", str(det), env["ood"], "--no-progress"]) == 3


def test_out_files_are_locked_alone(env, tmp_path):
    """Two tables in one folder: the folder is not locked, each file is (a lock beside it while writing)."""
    import json
    import socket

    # Another live process holds the folder's lock (pid 1 is always alive) and the lock of one file in it.
    held = {"pid": 1, "host": socket.gethostname(), "started": "earlier", "proc_start": None}
    (tmp_path / ".ascood.lock").write_text(json.dumps(held))
    (tmp_path / ".busy.csv.ascood.lock").write_text(json.dumps(held))
    assert main(["predict", env["det"], env["ood"], "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 3
    assert main(["export", env["det"], "--format", "onnx", "--out", str(tmp_path / "d.onnx"), "--no-check"]) == 0
    assert main(["predict", env["det"], env["ood"], "--out", str(tmp_path / "busy.csv"), "--no-progress"]) == 1
    assert not (tmp_path / "busy.csv").exists()
    assert sorted(os.listdir(tmp_path)) == [".ascood.lock", ".busy.csv.ascood.lock", "d.onnx", "p.csv"]
    from ascood.deploy.export import read_metadata

    meta = read_metadata(str(tmp_path / "d.onnx"), "onnx")
    assert meta["preprocessing"]["image_size"] == 8 and meta["input"]["name"] == "images"


def test_a_killed_write_of_the_table_is_cleaned_up_alone(env, tmp_path):
    (tmp_path / "p.csv.ascood.abcd1234.tmp").write_text("half a table")
    (tmp_path / "q.csv.ascood.abcd1234.tmp").write_text("another writer's, maybe alive")
    assert main(["predict", env["det"], env["ood"], "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 3
    assert sorted(os.listdir(tmp_path)) == ["p.csv", "q.csv.ascood.abcd1234.tmp"]


# -- deploy follow-up: --out replaces only ascood's own files; a held lock is exit status 1 everywhere ------------
@pytest.mark.parametrize("name,fdr", [("p.csv", []), ("p.jsonl", []), ("p.csv", ["--fdr", "0.5"])])
def test_predict_out_replaces_an_earlier_table_or_an_empty_file(name, fdr, env, tmp_path, capsys):
    table = tmp_path / name
    table.write_bytes(b"")  # e.g. a name from mktemp
    assert main(["predict", env["det"], env["ood"], "--out", str(table), "--no-progress"]) == 3
    first = table.read_text()
    # again, with another column set (bh_ood with --fdr; error rows for an unreadable file): still our table
    assert main(["predict", env["det"], env["ood"], env["broken"], *fdr, "--out", str(table), "--no-progress"]) == 5
    assert table.read_text() != first and len(table.read_text().splitlines()) == name.endswith(".csv") + 16 + 1
    assert sorted(os.listdir(tmp_path)) == [name]


def test_export_out_replaces_its_own_file_or_an_empty_one(env, tmp_path):
    out = tmp_path / "d.onnx"
    out.write_bytes(b"")
    assert main(["export", env["det"], "--format", "onnx", "--out", str(out), "--no-check"]) == 0
    first = out.stat().st_mtime_ns
    assert main(["export", env["det"], "--format", "onnx", "--out", str(out), "--no-check"]) == 0
    assert out.stat().st_mtime_ns >= first and sorted(os.listdir(tmp_path)) == ["d.onnx"]


def test_a_file_appearing_at_out_while_scoring_is_kept(env, tmp_path, capsys, monkeypatch):
    """The rule is checked again just before the table is written (under the lock)."""
    from ascood.deploy import Detector

    table = tmp_path / "p.csv"
    predict = Detector.predict

    def user_writes_meanwhile(self, *a, **kw):
        table.write_text("my,own\n")
        return predict(self, *a, **kw)

    monkeypatch.setattr(Detector, "predict", user_writes_meanwhile)
    assert main(["predict", env["det"], env["ood"], "--out", str(table), "--no-progress"]) == 2
    assert "--out " + str(table) + " is an existing file that ascood did not write" in capsys.readouterr().err
    assert table.read_text() == "my,own\n" and sorted(os.listdir(tmp_path)) == ["p.csv"]


def test_out_in_use_by_another_run_is_status_1_for_every_deploy_command(env, tmp_path, capsys):
    """A held lock is not bad input (the same command works once the other run ends): status 1, as documented."""
    held = json.dumps({"pid": 1, "host": socket.gethostname(), "started": "earlier", "proc_start": None})
    for name in ("p.csv", "d.onnx", "det"):
        (tmp_path / f".{name}.ascood.lock").write_text(held)
    runs = [["predict", env["det"], env["ood"], "--out", str(tmp_path / "p.csv"), "--no-progress"],
            ["export", env["det"], "--format", "onnx", "--out", str(tmp_path / "d.onnx"), "--no-check"],
            ["detector", env["run"], "--id-val", env["val"], "--scorer", "msp", "--out", str(tmp_path / "det")]]
    for argv in runs:
        assert main(argv) == 1, argv
        assert "--out " + argv[argv.index("--out") + 1] + " is in use by another ascood run (pid 1" in \
            capsys.readouterr().err
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == []
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "1  any other error, among them --out FILE in use by another ascood run" in capsys.readouterr().out
