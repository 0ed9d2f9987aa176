"""Fuzzing Detector.load: flipped bytes, edited JSON values and types (detector.json, manifest.json and the
safetensors headers), swapped or truncated safetensors, extra and missing files, links.

Most cases run twice: as the file was left (the manifest's sha256 refuses the change) and with the manifest
re-computed after the edit ("resealed", what anyone who can write the folder can do), so the parsers behind
the checksum are reached. Each example ends in the clean detector's predictions, a working detector (resealed
edits may legitimately make another detector), or an ArtifactError naming the detector's folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deployhelpers as H
import fuzzhelpers as F
from ascood.deploy import Detector
from ascood.deploy.artifact import CALIBRATION_FILE, CARD_FILE, MANIFEST, MODEL_FILE, SCORER_FILE, SPEC

SCORERS = ("knn", "mds")
PIECES = (MANIFEST, SPEC, MODEL_FILE, SCORER_FILE, CALIBRATION_FILE, CARD_FILE)
TENSOR_FILES = (MODEL_FILE, SCORER_FILE, CALIBRATION_FILE)

#: detector.json entries that do not change what the detector computes: an edit of them alone must give the
#: clean predictions (or a named refusal), never other predictions.
INERT = (("ascood_version",), ("provenance",), ("validation",), ("model", "class"), ("decision", "rule"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """{scorer: (clean artifact folder, its predictions on the probe images)}."""
    root = tmp_path_factory.mktemp("fuzz-art")
    out = {}
    for name in SCORERS:
        path = str(H.fitted(name).save(root / name))
        out[name] = (path, _predict(Detector.load(path)))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz-work"))


PROBE = torch.cat([H.id_pixels(6, seed=11)[0], H.ood_pixels(4, seed=12)])


def _predict(det) -> dict:
    p = det.predict(PROBE, batch_size=5)
    return {"score": p.score, "is_ood": p.is_ood, "label": p.label}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def _fresh_copy(clean, scorer: str, work: str) -> str:
    d = tempfile.mkdtemp(dir=work)
    dst = os.path.join(d, "det")
    shutil.copytree(clean[scorer][0], dst)
    return dst


def _reseal(d: str) -> None:
    """Re-compute the manifest for the files it lists (what anyone who can write the folder can do)."""
    with open(os.path.join(d, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    for name in manifest["files"]:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            data = open(path, "rb").read()
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(os.path.join(d, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def _load_and_check(d: str, clean_pred: dict, must_match: bool):
    """The property: an ArtifactError naming ``d``, the clean predictions, or (``must_match`` False) a detector
    that predicts on the probe without any other error."""
    def load_and_predict():
        return _predict(Detector.load(d))

    kind, got = F.outcome(load_and_predict, "detector", d)
    if kind == "ok" and must_match:
        assert _same(got, clean_pred), "an edit the checks should catch (or that changes nothing) gave other predictions"
    if kind == "ok":
        assert got["score"].shape == (PROBE.shape[0],)
    shutil.rmtree(os.path.dirname(d), ignore_errors=True)
    return kind


# -- flipped bytes -------------------------------------------------------------------------------------------
_MUTATION = F.byte_mutations(2 ** 20)


@settings(max_examples=F.budget(400))
@given(scorer=st.sampled_from(SCORERS), piece=st.sampled_from(PIECES),
       mutations=st.lists(_MUTATION, min_size=1, max_size=3), reseal=st.booleans())
def test_flipped_bytes(scorer, piece, mutations, reseal, clean, work):
    """Flipped, inserted, deleted and truncated bytes in any piece, with or without a re-computed manifest."""
    F.count("detector: flipped bytes")
    d = _fresh_copy(clean, scorer, work)
    path = os.path.join(d, piece)
    data = open(path, "rb").read()
    new = F.mutate_bytes(data, mutations)
    with open(path, "wb") as f:
        f.write(new)
    if reseal and piece != MANIFEST:
        _reseal(d)
    # Unsealed, any changed byte of a listed piece must be refused; the card (README.md) is not read back.
    must_match = new == data or (piece == CARD_FILE and reseal) or not reseal
    _load_and_check(d, clean[scorer][1], must_match)


# -- edited JSON values and types ----------------------------------------------------------------------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12)
    | st.sampled_from([0, 1, -1, 0.5, 1e308, "", "knn", "mds", "../x", "/etc/passwd", "model.safetensors",
                       "a" * 64, "0" * 64, 2 ** 63, 10 ** 9]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


def _paths(node, prefix=()):
    """Every (path of keys / indices) in a JSON tree, the root excluded."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


def _draw_path(data, tree) -> tuple:
    """A node of ``tree``: first a top-level entry, then a node below it (uniform over all nodes would spend most
    examples in the large provenance / validation records and rarely reach the scorer or the decision)."""
    top = data.draw(st.sampled_from(sorted(tree, key=str)), label="section")
    below = [p for p in _paths(tree) if p[0] == top]
    return data.draw(st.sampled_from(below), label="path")


@settings(max_examples=F.budget(600))
@given(scorer=st.sampled_from(SCORERS), piece=st.sampled_from([SPEC, MANIFEST]), data=st.data(),
       action=st.sampled_from(["replace", "delete", "add", "wrap", "stringify"]), value=_JSON,
       reseal=st.sampled_from([True, True, False]))  # mostly resealed: the parsers behind the checksum
def test_edited_json_values_and_types(scorer, piece, data, action, value, reseal, clean, work):
    """One value of detector.json or manifest.json replaced (any JSON type), deleted, added, wrapped in a list or
    turned into a string; detector.json with or without a re-computed manifest."""
    F.count("detector: edited JSON")
    d = _fresh_copy(clean, scorer, work)
    path = os.path.join(d, piece)
    with open(path, encoding="utf-8") as f:
        tree = json.load(f)
    where = _draw_path(data, tree)
    before = json.dumps(tree, sort_keys=True)
    F.edit_tree(tree, where, action, value)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tree, f)  # NaN / Infinity go out as Python's json writes them
    if reseal and piece == SPEC:
        _reseal(d)
    unchanged = json.dumps(tree, sort_keys=True) == before
    inert = piece == SPEC and any(where[:len(p)] == p for p in INERT) and reseal
    must_match = unchanged or inert or (piece == SPEC and not reseal)
    _load_and_check(d, clean[scorer][1], must_match)


# -- safetensors: edited headers, swapped and truncated files ------------------------------------------------
def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length % 2 ** 64) + raw + body


_HEADER_VALUE = st.one_of(
    _JSON,
    st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "U64", "X"]),
    st.lists(st.integers(-3, 2 ** 40), max_size=4),
)


@settings(max_examples=F.budget(400))
@given(scorer=st.sampled_from(SCORERS), piece=st.sampled_from(TENSOR_FILES), data=st.data(),
       action=st.sampled_from(["replace", "delete", "add", "wrap", "rename"]), value=_HEADER_VALUE,
       length=st.none() | st.integers(0, 2 ** 64 - 1) | st.sampled_from([0, 7, 2 ** 63, 2 ** 64 - 1]),
       body=st.sampled_from(["keep", "drop-tail", "add-tail", "zero"]), reseal=st.booleans())
def test_edited_safetensors_headers(scorer, piece, data, action, value, length, body, reseal, clean, work):
    """A tensor file's JSON header edited (dtype, shape, data_offsets, names, __metadata__), its length prefix set
    to any 64-bit value, its data cut, grown or zeroed; with or without a re-computed manifest."""
    F.count("detector: edited safetensors headers")
    d = _fresh_copy(clean, scorer, work)
    path = os.path.join(d, piece)
    original = open(path, "rb").read()
    header, payload = _split_safetensors(original)
    where = _draw_path(data, header)
    if action == "rename" and len(where) == 1:
        header[str(value)[:20] or "x"] = header.pop(where[0])
    elif action != "rename":
        F.edit_tree(header, where, action, value)
    payload = {"keep": payload, "drop-tail": payload[:-max(1, len(payload) // 3)], "add-tail": payload + b"\0" * 24,
               "zero": bytes(len(payload))}[body]
    new = _join_safetensors(header, payload, length)
    with open(path, "wb") as f:
        f.write(new)
    if reseal:
        _reseal(d)
    _load_and_check(d, clean[scorer][1], must_match=not reseal or new == original)


@settings(max_examples=F.budget(150))
@given(scorer=st.sampled_from(SCORERS), victim=st.sampled_from(TENSOR_FILES),
       source=st.sampled_from(TENSOR_FILES + ("other:" + MODEL_FILE, "other:" + SCORER_FILE,
                                              "other:" + CALIBRATION_FILE)),
       cut=st.none() | st.integers(0, 10 ** 6), reseal=st.booleans())
def test_swapped_and_truncated_safetensors(scorer, victim, source, cut, reseal, clean, work):
    """A tensor file replaced by another piece (of this detector or of a detector with another scorer), or cut
    at any byte; with or without a re-computed manifest."""
    F.count("detector: swapped / truncated safetensors")
    d = _fresh_copy(clean, scorer, work)
    if source.startswith("other:"):
        other = next(s for s in SCORERS if s != scorer)
        src = os.path.join(clean[other][0], source.split(":", 1)[1])
    else:
        src = os.path.join(clean[scorer][0], source)
    data = open(src, "rb").read()
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    original = open(os.path.join(d, victim), "rb").read()
    with open(os.path.join(d, victim), "wb") as f:
        f.write(data)
    if reseal:
        _reseal(d)
    _load_and_check(d, clean[scorer][1], must_match=data == original or not reseal)


# -- extra and missing files, links --------------------------------------------------------------------------
_FILE_EDIT = st.one_of(
    st.tuples(st.just("remove"), st.sampled_from(PIECES)),
    st.tuples(st.just("extra-unlisted"), st.sampled_from(["notes.txt", "model.pt", ".hidden", "a" * 100])),
    st.tuples(st.just("extra-listed"), st.sampled_from(["notes.txt", "model.pt", "x.safetensors", "a" * 129,
                                                         "../escape", "sub/x", ".hidden", "-", "README.md"])),
    st.tuples(st.just("link-inside"), st.sampled_from(PIECES)),  # a piece as a link to its own copy
    st.tuples(st.just("link-outside"), st.sampled_from(PIECES)),  # a link to a copy outside the folder
    st.tuples(st.just("link-dangling"), st.sampled_from(PIECES)),
    st.tuples(st.just("link-to-dir"), st.sampled_from(PIECES)),
    st.tuples(st.just("dir"), st.sampled_from(PIECES)),  # a folder where a piece goes
    st.tuples(st.just("fifo"), st.sampled_from(PIECES)),  # a named pipe: a reader that opens it would hang
)


def _apply_file_edit(d: str, edit) -> bool:
    """Apply one edit; returns whether it leaves what the detector reads unchanged."""
    kind, name = edit
    path = os.path.join(d, name)
    if kind == "remove":
        os.unlink(path)
    elif kind == "extra-unlisted":
        with open(path, "w") as f:
            f.write("not part of the detector\n")
        return True
    elif kind == "extra-listed":
        if not os.path.isfile(os.path.join(d, MANIFEST)):  # an earlier edit removed or replaced the manifest
            return False
        target = os.path.normpath(os.path.join(d, name))
        if os.path.dirname(target) == d and not os.path.exists(target):
            with open(target, "wb") as f:
                f.write(b"extra")
        manifest = json.load(open(os.path.join(d, MANIFEST)))
        manifest["files"][name] = {"sha256": hashlib.sha256(b"extra").hexdigest(), "bytes": 5}
        json.dump(manifest, open(os.path.join(d, MANIFEST), "w"))
    elif kind.startswith("link"):
        copy = path + ".orig" if kind == "link-inside" else os.path.join(os.path.dirname(d), name + ".outside")
        os.replace(path, copy)
        if kind == "link-dangling":
            os.unlink(copy)
        if kind == "link-to-dir":
            copy = os.path.dirname(d)
        os.symlink(copy, path)
    elif kind == "dir":
        os.unlink(path)
        os.mkdir(path)
    elif kind == "fifo":
        os.unlink(path)
        os.mkfifo(path)
    return False


@settings(max_examples=F.budget(150))
@given(scorer=st.sampled_from(SCORERS), edits=st.lists(_FILE_EDIT, min_size=1, max_size=3, unique_by=lambda e: e[1]),
       reseal=st.booleans())
def test_extra_and_missing_files_and_links(scorer, edits, reseal, clean, work):
    """Pieces removed, replaced by links (inside, outside, dangling, to a folder), folders or named pipes;
    extra files listed or not: refused naming the folder, or (an unlisted extra file) the clean result."""
    F.count("detector: extra / missing files, links")
    d = _fresh_copy(clean, scorer, work)
    inert = all([_apply_file_edit(d, e) for e in edits])
    if reseal and os.path.isfile(os.path.join(d, MANIFEST)) and not os.path.islink(os.path.join(d, MANIFEST)):
        try:
            _reseal(d)
        except (ValueError, KeyError, OSError):
            pass
    _load_and_check(d, clean[scorer][1], must_match=inert or not reseal)


def test_inert_entries_really_are_inert(clean, work):
    """The INERT list is not a blind spot: editing one of them with a resealed manifest still loads the clean
    detector (so must_match above asks for exactly the clean predictions)."""
    d = _fresh_copy(clean, "knn", work)
    spec = json.load(open(os.path.join(d, SPEC)))
    spec["provenance"] = {"edited": math.pi}
    json.dump(spec, open(os.path.join(d, SPEC), "w"))
    _reseal(d)
    assert _load_and_check(d, clean["knn"][1], must_match=True) == "ok"
