"""Crafted and tampered detector artifacts are refused, naming the piece, and never run code.

A payload that creates a marker file when unpickled is put where each tensor
file goes (with the manifest rewritten to match, so only the format itself
protects); altered, missing, renamed or inconsistent pieces are refused with
a message naming them.
"""
import ast
import hashlib
import json
import os
import pathlib
import pickle
import shutil

import pytest
import torch

import deployhelpers as H
from ascood.deploy import ArtifactError, Detector
from ascood.deploy.artifact import CALIBRATION_FILE, MANIFEST, MODEL_FILE, SCORER_FILE, SPEC

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "ascood" / "deploy"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    return {name: str(H.fitted(name).save(root / name)) for name in ("knn", "msp")}


def copy(saved, name, tmp_path) -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(saved[name], dst)
    return dst


def reseal(d: pathlib.Path) -> None:
    """Rewrite the manifest to match the directory's current files (what an attacker with write access can do)."""
    m = json.loads((d / MANIFEST).read_text())
    for name in m["files"]:
        data = (d / name).read_bytes()
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / MANIFEST).write_text(json.dumps(m))


def edit_spec(d: pathlib.Path, change) -> None:
    spec = json.loads((d / SPEC).read_text())
    change(spec)
    (d / SPEC).write_text(json.dumps(spec))
    reseal(d)


def test_the_payload_would_run_under_pickle(tmp_path):
    # The test must be able to fail: plain pickle.loads of the payload creates the marker.
    marker = tmp_path / "PROBE"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("victim", [MODEL_FILE, SCORER_FILE, CALIBRATION_FILE, SPEC, MANIFEST])
def test_pickled_payload_in_place_of_a_piece_is_refused_without_running(victim, saved, tmp_path):
    d = copy(saved, "knn", tmp_path)
    marker = tmp_path / "MARKER"
    # torch.save writes a zip whose data.pkl holds the payload: what a .pt "model" could smuggle.
    torch.save({"weights": _Payload(marker)}, d / victim)
    if victim != MANIFEST:
        reseal(d)
    with pytest.raises(ArtifactError, match=victim.replace(".", r"\.")):
        Detector.load(d)
    assert not marker.exists()


def test_tampered_piece_is_named(saved, tmp_path):
    d = copy(saved, "knn", tmp_path)
    data = bytearray((d / SCORER_FILE).read_bytes())
    data[-5] ^= 0xFF  # one bank value changes: same size, other hash
    (d / SCORER_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"scorer\.safetensors does not match its sha256"):
        Detector.load(d)
    (d / SCORER_FILE).write_bytes(bytes(data[:-8]))
    with pytest.raises(ArtifactError, match=r"scorer\.safetensors has \d+ bytes, manifest.json says"):
        Detector.load(d)


@pytest.mark.parametrize("victim", [MODEL_FILE, SCORER_FILE, CALIBRATION_FILE, SPEC, MANIFEST])
def test_missing_piece_is_named(victim, saved, tmp_path):
    d = copy(saved, "knn", tmp_path)
    (d / victim).unlink()
    with pytest.raises(ArtifactError, match=victim.replace(".", r"\.") + ".*(missing|interrupted)"):
        Detector.load(d)


def test_manifest_cannot_point_outside_the_directory(saved, tmp_path):
    d = copy(saved, "msp", tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    m["files"]["../outside.json"] = m["files"].pop(SPEC)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"refusing the file name '\.\./outside\.json'"):
        Detector.load(d)


@pytest.mark.parametrize("change,message", [
    (lambda s: s["model"]["build"].update(weights="/etc/passwd"), r"unknown keys \['weights'\]"),
    (lambda s: s["model"]["build"].update(name=["small_cnn"]), r"model build 'name' has the wrong type"),
    (lambda s: s["scorer"].update(name="__import__('os').system('x')"), "unknown scorer"),
    (lambda s: s["scorer"]["params"].update(K="5; rm -rf /"), r"parameter 'K' must be an integer >= 1"),
    (lambda s: s["scorer"]["params"].update(extra=1), "parameters must be exactly"),
    (lambda s: s["decision"].update(threshold=1e9), r"decision threshold 1000000000\.0 is not the one"),
    (lambda s: s["decision"].update(tpr=1.5), r"decision tpr must be in \(0, 1\)"),
    (lambda s: s["preprocessing"].update(channels=2), "channels must be 1"),
    (lambda s: s.update(classes=["only-one"]), r"1 class names for a model with 3 outputs"),
    (lambda s: s.update(format="ascood-detector-v0"), "not an ascood detector description"),
])
def test_crafted_description_is_refused(change, message, saved, tmp_path):
    d = copy(saved, "knn", tmp_path)
    edit_spec(d, change)
    with pytest.raises(ArtifactError, match=message):
        Detector.load(d)


def test_crafted_tensors_are_refused(saved, tmp_path):
    from safetensors.torch import save_file

    d = copy(saved, "knn", tmp_path)
    good = H.fitted("knn").scorer
    save_file({"bank": torch.zeros(10, 7)}, str(d / SCORER_FILE))  # wrong width for 16-d features
    reseal(d)
    with pytest.raises(ArtifactError, match=r"bank \(N, 16\) expected, got \(10, 7\)"):
        Detector.load(d)
    save_file({"bank": torch.zeros(10, 16, dtype=torch.int64)}, str(d / SCORER_FILE))
    reseal(d)
    with pytest.raises(ArtifactError, match="'bank' must be a 2-d float32 or float16"):
        Detector.load(d)
    save_file({"scores": torch.tensor([float("nan")] * 50, dtype=torch.float64)}, str(d / CALIBRATION_FILE))
    save_file({"bank": good.bank.block(0, good.bank.n)}, str(d / SCORER_FILE))
    reseal(d)
    with pytest.raises(ArtifactError, match=r"calibration\.safetensors.*not finite"):
        Detector.load(d)
    (d / MODEL_FILE).write_bytes(b"\xff" * 64)  # a header length far beyond the file
    reseal(d)
    with pytest.raises(ArtifactError, match=r"model\.safetensors is not a valid safetensors file"):
        Detector.load(d)


def test_not_a_detector_is_named(saved, tmp_path):
    with pytest.raises(ArtifactError, match="detector not found"):
        Detector.load(tmp_path / "nope")
    f = tmp_path / "last.pt"
    f.write_bytes(b"PK\x03\x04")
    with pytest.raises(ArtifactError, match="is a file, not a detector directory"):
        Detector.load(f)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        Detector.load(tmp_path)


def test_deploy_layer_never_unpickles():
    # The artifact path holds no pickle, torch.load or jit/export loading of user files (export.load_exported
    # only reads files this package wrote, for parity checks, and is never called by Detector.load).
    for path in DEPLOY.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        attrs = {f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "pickle" not in imports and "pickle" not in names, path
        if path.name != "export.py":
            assert "torch.load" not in attrs and "jit.load" not in str(attrs), path
