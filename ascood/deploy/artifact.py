"""The detector artifact on disk: safetensors for tensors, JSON for the rest, a sha256 per file. No pickle.

A detector directory holds::

    manifest.json            format, and the sha256 + size of every file that affects results (written last)
    detector.json            preprocessing, classes, model build arguments, scorer name and
                             hyperparameters, decision rule (tpr, threshold), provenance, validation
    model.safetensors        the network's state dict
    scorer.safetensors       the scorer's fitted tensors (KNN bank, MDS means/precision, ViM basis, ...)
    calibration.safetensors  the sorted ID calibration scores (the conformal p-values' reference)
    README.md                the model card (for people: not read back and not in the manifest, so it
                             may be edited; an old manifest that lists it is not checked for it)

Loading reads ``manifest.json`` (JSON, size-capped), refuses any listed name
that is not a plain file name of this directory (no ``..``, no ``/``), checks
that every file the detector needs is listed, present, of the listed size and
sha256, and only then parses it: JSON with :mod:`json`, tensors with
safetensors (a header of names, dtypes, shapes and offsets, then raw bytes).
Neither format can run code, so a crafted artifact can at most be refused.
The checksums catch a missing, truncated or altered piece (named in the
error); they are not a signature: someone who can write the directory can
also rewrite the manifest, and what keeps that harmless is that loading never
executes anything from the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import torch

from ..files import atomic_write, atomic_write_text, write_json
from .state import ArtifactError, StreamedTensor

__all__ = ["StreamedTensor", "ARTIFACT_FORMAT", "MANIFEST", "SPEC", "MODEL_FILE", "SCORER_FILE", "CALIBRATION_FILE",
           "CARD_FILE",
           "ARTIFACT_FILES", "VERIFIED_FILES", "write_artifact", "read_artifact", "require_deploy_extra", "sha256_file",
           "read_tensors", "open_tensor_file"]

ARTIFACT_FORMAT = "ascood-detector-v1"
MANIFEST = "manifest.json"
SPEC = "detector.json"
MODEL_FILE = "model.safetensors"
SCORER_FILE = "scorer.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
CARD_FILE = "README.md"
ARTIFACT_FILES = (MANIFEST, SPEC, MODEL_FILE, SCORER_FILE, CALIBRATION_FILE, CARD_FILE)
_REQUIRED = (SPEC, MODEL_FILE, SCORER_FILE, CALIBRATION_FILE)
#: The files the manifest's sha256 covers: everything that affects a result (the model card does not).
VERIFIED_FILES = _REQUIRED
_JSON_LIMIT = 64 * 2 ** 20  # a detector.json of tens of MB is already not one of ours
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def require_deploy_extra(module: str):
    """Import one of the ``[deploy]`` extra's libraries (safetensors, onnx, onnxruntime) or say how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for this (detector artifacts and export): "
                          f"pip install 'ascood[deploy]' (onnx, onnxruntime, safetensors); {err}") from None


def sha256_file(path: str, block: int = 2 ** 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (constant memory for multi-GB banks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _save_tensors(tensors: dict[str, "torch.Tensor | StreamedTensor"], path: str) -> None:
    """A safetensors file (the format: 8-byte little-endian header length, JSON header, raw little-endian data),
    written block by block so a multi-GB bank never sits in memory twice; read back with the safetensors library."""
    require_deploy_extra("safetensors")  # the files are for the [deploy] extra's reader: fail early without it
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        t = tensors[name]
        shape = list(t.shape)
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store {name} of dtype {t.dtype}")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=t.dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            t = tensors[name]
            parts = t.blocks() if isinstance(t, StreamedTensor) else [t.detach().cpu().contiguous()]
            for part in parts:
                # Raw bytes of a CPU tensor; this machine (and every torch platform) is little-endian.
                f.write(part.reshape(-1).view(torch.uint8).numpy().tobytes() if part.numel() else b"")

    atomic_write(path, write)


def write_artifact(directory: str, spec: dict, model_tensors: dict[str, torch.Tensor],
                   scorer_tensors: dict[str, "torch.Tensor | StreamedTensor"], calibration: torch.Tensor,
                   card: str) -> dict:
    """Write every file atomically, then ``manifest.json`` with their sha256; returns the manifest.

    The old manifest is removed first, so a directory whose rewrite is
    interrupted is refused on load (its files no longer match any manifest)
    instead of mixing two detectors.
    """
    os.makedirs(directory, exist_ok=True)
    old = os.path.join(directory, MANIFEST)
    if os.path.exists(old):
        os.unlink(old)
    _save_tensors(model_tensors, os.path.join(directory, MODEL_FILE))
    _save_tensors(scorer_tensors, os.path.join(directory, SCORER_FILE))
    _save_tensors({"scores": calibration.detach().double().cpu().contiguous()},
                  os.path.join(directory, CALIBRATION_FILE))
    write_json(spec, os.path.join(directory, SPEC))
    atomic_write_text(card, os.path.join(directory, CARD_FILE))
    files = {}
    for name in VERIFIED_FILES:
        path = os.path.join(directory, name)
        files[name] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    manifest = {"format": ARTIFACT_FORMAT, "files": files}
    write_json(manifest, old)
    return manifest


def _read_json(path: str, what: str) -> Any:
    size = os.path.getsize(path)
    if size > _JSON_LIMIT:
        raise ArtifactError(f"{path}: {what} is {size} bytes, more than a detector's {_JSON_LIMIT} (not ours)")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({type(err).__name__}: {str(err)[:120]})") from None


def read_artifact(directory: str) -> tuple[dict, dict[str, str]]:
    """(spec, {file name: path}) of a verified artifact directory; :class:`ArtifactError` naming what is wrong."""
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise ArtifactError(f"detector not found: {directory}")
    if not os.path.isdir(directory):
        raise ArtifactError(f"{directory} is a file, not a detector directory (expected the folder written by "
                            "`ascood detector ... --out DET` or Detector.save)")
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ArtifactError(f"{directory} is not an ascood detector: {MANIFEST} is missing (was the save "
                            "interrupted, or is this another folder?)")
    manifest = _read_json(manifest_path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{manifest_path}: format {got!r}, expected {ARTIFACT_FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{manifest_path}: 'files' must map file names to their sha256")
    paths = {}
    for name, entry in files.items():
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == MANIFEST:
            raise ArtifactError(f"{manifest_path}: refusing the file name {name!r} (only plain names inside the "
                                "detector directory are allowed)")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and isinstance(entry.get("bytes"), int)):
            raise ArtifactError(f"{manifest_path}: entry for {name} needs a hex 'sha256' and an integer 'bytes'")
        paths[name] = os.path.join(directory, name)
    for name in _REQUIRED:
        if name not in paths:
            raise ArtifactError(f"{manifest_path} does not list {name}: not a complete detector")
    for name, path in paths.items():
        if name == CARD_FILE:  # an old manifest listing the model card: people may edit it, it is not read
            continue
        if os.path.islink(path):
            raise ArtifactError(f"{path} is a symbolic link: a detector's files must be plain files in its "
                                "folder (a link could point anywhere); copy the file in instead of linking it")
        if not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing (listed in {MANIFEST}): the detector is incomplete")
        size = os.path.getsize(path)
        if size != files[name]["bytes"]:
            raise ArtifactError(f"{path} has {size} bytes, {MANIFEST} says {files[name]['bytes']}: the file was "
                                "truncated or altered after the detector was saved")
        if sha256_file(path) != files[name]["sha256"]:
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST}: the file was altered after "
                                "the detector was saved")
    spec = _read_json(paths[SPEC], SPEC)
    if not isinstance(spec, dict) or spec.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{paths[SPEC]}: not an ascood detector description (format {ARTIFACT_FORMAT!r})")
    paths.pop(CARD_FILE, None)
    return spec, paths


def open_tensor_file(path: str):
    """A safetensors handle (lazy reads: ``get_slice(name)[a:b]``) or :class:`ArtifactError` naming the file."""
    safetensors = require_deploy_extra("safetensors")
    try:
        return safetensors.safe_open(path, framework="pt", device="cpu")
    except Exception as err:  # the library raises its own SafetensorError on a malformed header
        raise ArtifactError(f"{path} is not a valid safetensors file ({type(err).__name__}: "
                            f"{str(err)[:160]})") from None


def read_tensors(path: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file except ``skip`` (which stay on disk), as CPU tensors."""
    handle = open_tensor_file(path)
    out = {}
    try:
        for key in handle.keys():
            if key not in skip:
                out[key] = handle.get_tensor(key)
    except Exception as err:
        raise ArtifactError(f"{path}: cannot read tensor data ({type(err).__name__}: {str(err)[:160]})") from None
    return out
