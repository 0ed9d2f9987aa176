"""Issue 30, round 4 (deploy, API): no silently wrong result from ``ascood.Detector``.

Table-driven bad input (each case: the error type and a message naming the argument), then the behaviour
each fix adds: the detector folder written as one unit, unreadable files as error rows, data roles that must
not overlap, the BH size rule, one image reader (alpha), an editable model card.
"""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import deployhelpers as H
from ascood.data.datasets import DataError, list_entry_path
from ascood.deploy import Detector
from ascood.deploy.artifact import ArtifactError, sha256_file
from ascood.deploy.conformal import bh_min_calibration
from ascood.deploy.inputs import expand_paths


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("r4") / "det"
    H.fitted("msp").save(path)
    return str(path)


def _copy(saved, tmp_path, name="det"):
    dst = tmp_path / name
    shutil.copytree(saved, dst)
    return dst


# -- bad input, table-driven ------------------------------------------------------------------------------------------
def _export_to_folder(tmp_path, saved):
    (tmp_path / "out").mkdir()
    H.fitted("msp").export(tmp_path / "out", "onnx")


def _save_onto_user_folder(tmp_path, saved):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("mine")
    H.fitted("msp").save(tmp_path / "notes")


def _save_onto_detector_with_a_foreign_graph(tmp_path, saved):
    det = _copy(saved, tmp_path)
    (det / "detector.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # the user's own model, not an ascood export
    H.fitted("ebo").save(det)


def _save_onto_file(tmp_path, saved):
    (tmp_path / "f").write_text("x")
    H.fitted("msp").save(tmp_path / "f")


def _symlinked_piece(tmp_path, saved):
    det = _copy(saved, tmp_path)
    os.replace(det / "model.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", det / "model.safetensors")
    Detector.load(det)


def _cuda_device(tmp_path, saved):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    Detector.load(saved, device="cuda")


def _cuda_fit(tmp_path, saved):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _, val, _ = H.splits()
    Detector.fit(H.trained_model(), id_val=val, scorer="msp", preprocessing=H.PREP, device="cuda")


def _channels_last_image(tmp_path, saved):
    H.fitted("msp").predict(np.zeros((8, 8, 3), np.float32))


def _channels_last_batch(tmp_path, saved):
    H.fitted("msp").predict(np.zeros((2, 8, 8, 3), np.uint8))


def _knn_val_is_train(tmp_path, saved):
    train, _, _ = H.splits()
    Detector.fit(H.trained_model(), id_train=train, id_val=train, scorer="knn", preprocessing=H.PREP, device="cpu")


def _knn_val_files_in_train(tmp_path, saved):
    H.write_png_dir(str(tmp_path / "train"), H.id_pixels(30, seed=40)[0])
    # The calibration list names the very files of the training folder (other paths, same files).
    (tmp_path / "cal.txt").write_text("".join(f"train/img{i:03d}.png\n" for i in range(25)))
    Detector.fit(H.trained_model(), id_train=str(tmp_path / "train"), id_val=str(tmp_path / "cal.txt"),
                 scorer="knn", preprocessing=H.PREP, device="cpu")


def _ood_is_id_val(tmp_path, saved):
    _, val, _ = H.splits()
    Detector.fit(H.trained_model(), id_val=val, ood_val=val, scorer="ebo", preprocessing=H.PREP, device="cpu")


def _calibration_is_tuning(tmp_path, saved):
    _, val, ood = H.splits()
    Detector.fit(H.trained_model(), id_val=val, id_calibration=val, ood_val=ood, scorer="ebo",
                 preprocessing=H.PREP, device="cpu")


def _too_few_for_tpr(tmp_path, saved):
    _, val, _ = H.splits()
    few = torch.utils.data.Subset(val, range(50))
    Detector.fit(H.trained_model(), id_val=few, scorer="msp", tpr=0.99, preprocessing=H.PREP, device="cpu")


def _knn_without_train(tmp_path, saved):
    _, val, _ = H.splits()
    Detector.fit(H.trained_model(), id_val=val, scorer="knn", preprocessing=H.PREP, device="cpu")


def _unreadable_strict(tmp_path, saved):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    H.fitted("msp").predict([str(tmp_path / "bad.png")])


def _export_onto_foreign_onnx(tmp_path, saved):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # another producer's ONNX model
    H.fitted("msp").export(tmp_path / "m.onnx", "onnx")


def _export_onto_foreign_torchscript(tmp_path, saved):
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.ts", "w") as z:  # ascood.json of another program: not ascood's format
        z.writestr("m/extra/ascood.json", json.dumps({"format": "something-else"}))
    H.fitted("msp").export(tmp_path / "m.ts", "torchscript")


def _bad_on_error(tmp_path, saved):
    H.fitted("msp").predict(torch.zeros(1, 3, 8, 8), on_error="ignore")


CASES = [
    ("export onto a folder", _export_to_folder, ValueError, r"path .*out is a folder: name the file"),
    ("export onto a foreign onnx file", _export_onto_foreign_onnx, ValueError,
     r"path .*m.onnx is an existing file that ascood did not write \(no ascood export metadata in it\), so nothing "
     r"was written: remove it or choose another file name"),
    ("export onto a foreign torchscript file", _export_onto_foreign_torchscript, ValueError,
     r"path .*m.ts is an existing file that ascood did not write"),
    ("save onto a user folder", _save_onto_user_folder, ValueError, r"path .*notes is an existing folder that is "
                                                                     r"not a detector \(it holds README.md\)"),
    ("save onto a file", _save_onto_file, ValueError, r"path .*f is an existing file"),
    ("save onto a detector holding a foreign detector.onnx", _save_onto_detector_with_a_foreign_graph, ValueError,
     r"path .*det is a detector folder that also holds other files \(detector.onnx\)"),
    ("symlinked artifact file", _symlinked_piece, ArtifactError, r"model.safetensors is a symbolic link"),
    ("load on cuda without a GPU", _cuda_device, ValueError, r"device: 'cuda': no CUDA device is available"),
    ("fit on cuda without a GPU", _cuda_fit, ValueError, r"device: 'cuda': no CUDA device is available"),
    ("channels-last image", _channels_last_image, ValueError, r"channels-last \(H, W, C\).*transpose\(2, 0, 1\)"),
    ("channels-last batch", _channels_last_batch, ValueError, r"channels-last \(B, H, W, C\)"),
    ("knn calibrated on its bank", _knn_val_is_train, ValueError, r"id_val and id_train are the same object"),
    ("knn calibrated on bank files", _knn_val_files_in_train, ValueError,
     r"id_val and id_train are 25 shared image\(s\)"),
    ("ood_val = id_val", _ood_is_id_val, ValueError, r"ood_val and id_val are the same object"),
    ("id_calibration = tuning id_val", _calibration_is_tuning, ValueError,
     r"id_calibration and id_val are the same object"),
    ("too few calibration images for tpr", _too_few_for_tpr, ValueError,
     r"id_val gives 50 calibration image\(s\): too few for tpr 0.99 .*at least 99"),
    ("knn without id_train", _knn_without_train, ValueError, r"pass id_train"),
    ("unreadable file (on_error=raise)", _unreadable_strict, DataError,
     r"cannot read image .*bad.png: not an image file"),
    ("on_error value", _bad_on_error, ValueError, r"on_error must be 'raise' or 'skip'"),
]


@pytest.mark.parametrize("case,action,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(case, action, error, message, saved, tmp_path):
    with pytest.raises(error, match=message):
        action(tmp_path, saved)
    if case.startswith("export onto a foreign"):  # the user's file is as it was
        name = "m.onnx" if "onnx" in case else "m.ts"
        assert sorted(os.listdir(tmp_path)) == [name] and (tmp_path / name).stat().st_size > 0
    if case == "save onto a detector holding a foreign detector.onnx":
        assert (tmp_path / "det" / "detector.onnx").read_bytes() == b"\x08\x08\x12\x07pytorch"
        assert Detector.load(tmp_path / "det").scorer.name == "msp"
    if case == "save onto a user folder":  # nothing written: the user's file is as it was, nothing beside it
        assert (tmp_path / "notes" / "README.md").read_text() == "mine"
        assert sorted(os.listdir(tmp_path / "notes")) == ["README.md"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder or lock left


# -- the folder is written as one unit ------------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_replaces_an_earlier_detector_whole(exchange, saved, tmp_path, monkeypatch):
    import ascood.files as F

    if not exchange:
        monkeypatch.setattr(F, "_exchange", lambda a, b: False)
    det = _copy(saved, tmp_path)
    (det / "detector.onnx").write_bytes(b"\x08\x08\x12\x06ascood")  # the old detector's graph goes with it
    H.fitted("ebo").save(det)
    assert Detector.load(det).scorer.name == "ebo"
    assert not (det / "detector.onnx").exists()
    assert sorted(os.listdir(tmp_path)) == ["det"]  # no temporary sibling, no lock left behind


def test_save_into_an_empty_folder_and_a_new_nested_one(tmp_path):
    (tmp_path / "empty").mkdir()
    H.fitted("msp").save(tmp_path / "empty")
    assert Detector.load(tmp_path / "empty").scorer.name == "msp"
    H.fitted("msp").save(tmp_path / "a" / "b" / "det")
    assert Detector.load(tmp_path / "a" / "b" / "det").tpr == 0.9


def test_a_failed_save_leaves_an_earlier_detector_as_it_was(saved, tmp_path, monkeypatch):
    import ascood.deploy.saving as S

    det = _copy(saved, tmp_path)
    before = {n: sha256_file(det / n) for n in os.listdir(det)}

    def broken(*a, **k):
        raise OSError(28, "disk full")

    monkeypatch.setattr(S, "write_artifact", broken)
    with pytest.raises(OSError):
        H.fitted("ebo").save(det)
    assert {n: sha256_file(det / n) for n in os.listdir(det)} == before
    assert sorted(os.listdir(tmp_path)) == ["det"]


# -- the model card may be edited; everything else stays checked -------------------------------------------------
def test_model_card_can_be_edited_results_cannot(saved, tmp_path):
    det = _copy(saved, tmp_path)
    assert "README.md" not in json.loads((det / "manifest.json").read_text())["files"]
    with open(det / "README.md", "a") as f:
        f.write("\nOur notes: deployed on camera 3.\n")
    assert Detector.load(det).scorer.name == "msp"
    with open(det / "calibration.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(ArtifactError, match="calibration.safetensors"):
        Detector.load(det)


def test_an_old_manifest_listing_the_card_still_loads_after_an_edit(saved, tmp_path):
    det = _copy(saved, tmp_path)
    manifest = json.loads((det / "manifest.json").read_text())
    manifest["files"]["README.md"] = {"sha256": sha256_file(det / "README.md"),
                                      "bytes": os.path.getsize(det / "README.md")}
    (det / "manifest.json").write_text(json.dumps(manifest))
    (det / "README.md").write_text("edited")
    assert Detector.load(det).tpr == 0.9


def test_card_lists_only_the_data_the_scorer_used_and_the_real_cutoff(tmp_path):
    train, val, _ = H.splits()
    with pytest.warns(UserWarning, match="id_train is not used: scorer msp"):
        det = Detector.fit(H.trained_model(), id_train=train, id_val=val, scorer="msp", tpr=0.9,
                           preprocessing=H.PREP, device="cpu")
    assert det.provenance["data"]["id_train"] is None
    card = open(os.path.join(det.save(tmp_path / "d"), "README.md")).read()
    assert "ID train: not used" in card
    n = det.calibration.numel()
    assert det.cutoff == det.k / (n + 1) and det.cutoff <= det.alpha
    assert f"p <= {det.k}/{n + 1}" in card and "you may edit it" in card


# -- calibrate, predict ----------------------------------------------------------------------------------------------
def test_failed_calibrate_changes_nothing():
    import copy

    det = copy.deepcopy(H.fitted("msp"))
    state = (det.tpr, det.threshold, det.k, det.calibration.clone())
    with pytest.raises(ValueError, match="too few for tpr 0.999"):
        det.calibrate(det.calibration[:50], 0.999)
    assert (det.tpr, det.threshold, det.k) == state[:3] and torch.equal(det.calibration, state[3])


def test_unreadable_files_become_error_rows(tmp_path, monkeypatch):
    good = H.write_png_dir(str(tmp_path / "imgs"), H.id_pixels(3, seed=30)[0])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    pred = H.fitted("msp").predict(str(tmp_path / "imgs"), on_error="skip", fdr=0.5)
    assert pred.failed == [0] and pred.source[0].endswith("broken.png")  # sorted: broken.png comes first
    assert pred.error[0].startswith("not an image file") and "PIL" in pred.error[0]
    assert "cannot identify" not in pred.error[0]  # our words, not the decoder's text
    assert not bool(pred.is_ood[0]) and not bool(pred.bh_ood[0]) and torch.isnan(pred.score[0])
    row = pred.rows()[0]
    assert row["score"] is None and row["is_ood"] is None and row["error"] == pred.error[0]
    assert pred.rows()[1]["error"] is None
    ref = H.fitted("msp").predict(good)
    torch.testing.assert_close(pred.score[1:], ref.score)


def test_a_decompression_bomb_is_an_error_row(tmp_path, monkeypatch):
    H.write_png_dir(str(tmp_path / "imgs"), H.id_pixels(2, seed=31)[0])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 = 64 pixels > 2 x 10: PIL refuses to decode
    pred = H.fitted("msp").predict(str(tmp_path / "imgs"), on_error="skip")
    assert pred.failed == [0, 1] and "decompression-bomb guard" in pred.error[0]


def test_bh_size_rule_warns_with_the_n_it_needs():
    assert bh_min_calibration(150, 0.1) == 1499  # n + 1 >= m / q
    det = H.fitted("msp")  # 200 calibration scores
    x = H.ood_pixels(40, seed=32)
    with pytest.warns(UserWarning, match=r"fdr 0.1 over 40 images: .* i.e. 399 calibration images"):
        det.predict(x, fdr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.predict(x[:20], fdr=0.1)  # 201 >= 20 / 0.1: no warning


def test_rgba_reads_as_training_reads_it_and_is_said_once(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # transparent red
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    det = H.fitted("msp")
    with pytest.warns(UserWarning, match="alpha channel is dropped"):
        by_file = det.predict([str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    with pytest.warns(UserWarning, match="alpha channel is dropped"):
        by_pil = det.predict([Image.open(tmp_path / "a.png")])
    # Training reads through the same function (open_image -> to_mode): the same pixels, alpha dropped.
    from ascood.data.datasets import dataset_from_path

    with pytest.warns(UserWarning, match="alpha channel is dropped"):
        train_img = dataset_from_path(str(tmp_path), None, train=False)[0][0]
        assert np.array_equal(np.asarray(train_img), rgba[..., :3])
    assert by_pil.score[0] == by_file.score[0]


# -- paths -----------------------------------------------------------------------------------------------------------
def test_predict_lists_take_absolute_and_relative_paths(tmp_path, monkeypatch):
    files = H.write_png_dir(str(tmp_path / "imgs"), H.id_pixels(3, seed=33)[0])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text(f"{files[0]}\n../imgs/img001.png 2\n# a comment\n{files[2]} 0\n")
    got = expand_paths([str(tmp_path / "lists" / "l.txt")])
    assert [os.path.realpath(p) for p in got] == [os.path.realpath(p) for p in files]
    monkeypatch.chdir(tmp_path)
    assert expand_paths(["imgs/img000.png"]) == ["imgs/img000.png"]


def test_training_list_refusal_does_not_contradict_itself(tmp_path):
    inside = str(tmp_path / "red" / "0.png")
    with pytest.raises(DataError) as err:
        list_entry_path("l.txt", 3, inside, str(tmp_path))
    text = str(err.value)
    assert "is absolute" in text and "write it as 'red/0.png'" in text and "leaves" not in text
    with pytest.raises(DataError, match=r"leaves the image root .* \('\.\.' climbs above it\)"):
        list_entry_path("l.txt", 4, "../x.png", str(tmp_path))


def test_graph_metadata_calls_the_preprocessing_as_detector_json_does(saved):
    from ascood.deploy.export import _upgrade_metadata, metadata

    det = Detector.load(saved)
    meta = metadata(det, "onnx")
    spec = json.load(open(os.path.join(saved, "detector.json")))
    assert meta["preprocessing"] == spec["preprocessing"] and meta["input"]["name"] == "images"
    old = {"input": {"name": "images", **spec["preprocessing"]}}  # what files exported before round 4 hold
    assert _upgrade_metadata(old)["preprocessing"] == spec["preprocessing"]


# -- export replaces only its own files, found by a marker read without loading the file ---------------------------
def test_export_replaces_its_own_files_found_without_loading_them(tmp_path, monkeypatch):
    from ascood.deploy.export import FORMATS, DEFAULT_NAMES, is_ascood_export

    det = H.fitted("msp")
    for fmt in FORMATS:
        det.export(tmp_path / DEFAULT_NAMES[fmt], fmt, check=False)

    def refuse(*a, **kw):
        raise AssertionError("the marker check must not load the file")

    for module in (torch, torch.jit, torch.export):  # no loader may run on a file being checked
        monkeypatch.setattr(module, "load", refuse)
    for fmt in FORMATS:
        assert is_ascood_export(str(tmp_path / DEFAULT_NAMES[fmt])), fmt
    monkeypatch.undo()
    for fmt in FORMATS:  # written again over their own earlier file
        before = (tmp_path / DEFAULT_NAMES[fmt]).stat().st_mtime_ns
        det.export(tmp_path / DEFAULT_NAMES[fmt], fmt, check=False)
        assert (tmp_path / DEFAULT_NAMES[fmt]).stat().st_mtime_ns >= before
    (tmp_path / "empty.onnx").write_bytes(b"")  # an empty file (mktemp) holds nothing to lose
    det.export(tmp_path / "empty.onnx", "onnx", check=False)
    assert is_ascood_export(str(tmp_path / "empty.onnx")) and (tmp_path / "empty.onnx").stat().st_size > 0
    assert sorted(os.listdir(tmp_path)) == sorted([*DEFAULT_NAMES.values(), "empty.onnx"])  # no lock left


def test_a_foreign_file_is_never_taken_for_an_export(tmp_path):
    import zipfile

    from ascood.deploy.export import is_ascood_export

    (tmp_path / "text.onnx").write_text("hello")
    with zipfile.ZipFile(tmp_path / "no_meta.pt2", "w") as z:
        z.writestr("a/models/model.json", "{}")
    with zipfile.ZipFile(tmp_path / "bad_json.ts", "w") as z:
        z.writestr("a/extra/ascood.json", "not json")
    (tmp_path / "fake.pt2").write_bytes(b"PK\x03\x04 but not a zip")
    for name in ("text.onnx", "no_meta.pt2", "bad_json.ts", "fake.pt2", "missing.onnx"):
        assert not is_ascood_export(str(tmp_path / name)), name
