"""Detector <-> artifact directory (:mod:`.artifact` holds the file format and its checks) and the model card."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..scoring.scorers.features import has_feature_head
from ..files import TMP_SUFFIX, TMP_TAG, atomic_write_dir, remove_stale_dir_temporaries
from ..training.rundir import LOCK_NAME, claim_output_file
from .artifact import (ARTIFACT_FILES, ARTIFACT_FORMAT, CALIBRATION_FILE, MANIFEST, MODEL_FILE, SCORER_FILE, SPEC,
                       open_tensor_file, read_artifact, read_tensors, write_artifact)
from .conformal import check_tpr, min_calibration_size
from .inputs import Preprocessing, resolve_device
from .state import BANK_DTYPES, BANK_SCORERS, STORABLE_SCORERS, ArtifactError, StoredBank, restore_scorer, scorer_state

__all__ = ["save_detector", "load_detector", "model_card", "BUILD_KEYS", "check_detector_out", "claim_detector_out"]

#: The keys of a model build record (the arguments of ascood.build_model that a checkpoint stores).
BUILD_KEYS = {"name": str, "num_classes": int, "in_channels": int, "head": str, "sigma": (int, float),
              "width": (int, type(None)), "input_mean": (list, type(None)), "input_std": (list, type(None)),
              "model_kwargs": dict}


def _version() -> str:
    from .. import __version__

    return __version__


def _is_detector(path: str) -> bool:
    """Whether ``path`` holds a manifest of this artifact format (the folder was written by Detector.save)."""
    import json

    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read(2 ** 20).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == ARTIFACT_FORMAT


def check_detector_out(path: str, flag: str = "path") -> None:
    """``path`` may take a detector: a new folder, an empty one, or an existing detector (replaced as one unit).

    Any other existing folder (a user's notes, the ID data, a training run) or a file is refused with a
    ValueError naming ``flag``: saving would replace what is there. Files a save itself leaves (its lock, a
    killed write's temporaries) do not count against an existing detector.
    """
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is an existing file, not a folder: a detector is a folder of files; "
                         "choose a new folder name")
    # An old-style lock or a killed write's temporaries are ours: they make no folder a user's.
    entries = [e for e in sorted(os.listdir(path))
               if not e.endswith(LOCK_NAME) and not (TMP_TAG in e and e.endswith(TMP_SUFFIX))]
    if not entries:
        return
    from .export import DEFAULT_NAMES, is_ascood_export

    # `ascood export DET` writes DET/detector.onnx (.pt2, .ts) by default: graphs of the detector being
    # replaced, which would no longer match it; they go with it (when ascood wrote them: a user's file of
    # that name stays, and the folder is refused).
    foreign = [e for e in entries if e not in ARTIFACT_FILES
               and not (e in DEFAULT_NAMES.values() and is_ascood_export(os.path.join(path, e)))]
    if _is_detector(path) and not foreign:
        return
    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    what = (f"a detector folder that also holds other files ({shown})" if _is_detector(path)
            else f"an existing folder that is not a detector (it holds {shown or ', '.join(entries[:5])}"
                 f"{' ...' if len(entries) > 5 and not foreign else ''})")
    raise ValueError(f"{flag} {path} is {what}: saving replaces the whole folder, so nothing was written; "
                     "choose a new or empty folder, or an earlier detector's folder")


def claim_detector_out(path: str, flag: str = "path"):
    """The lock of a detector folder (beside it, ``.NAME.ascood.lock``), after :func:`check_detector_out`."""
    check_detector_out(path, flag)
    return claim_output_file(path, flag=flag)


def save_detector(det, path: str, bank_dtype: str = "float32") -> str:
    """Write ``det`` to the folder ``path`` as one unit (checked and claimed first, see :func:`check_detector_out`):
    a sibling temporary folder is filled, then swapped in, so an earlier detector there is replaced whole or
    not at all."""
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype must be one of {BANK_DTYPES}, got {bank_dtype!r}")
    params, scorer_tensors = scorer_state(det.scorer, bank_dtype)
    model = det.model
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # clones: no shared storage
    build = getattr(model, "build_args", None)
    spec = {
        "format": ARTIFACT_FORMAT, "ascood_version": _version(),
        "model": {"build": build, "class": type(model).__name__, "num_classes": det.num_classes,
                  "feature_dim": int(model.feature_dim) if has_feature_head(model) else None},
        "preprocessing": det.preprocessing.to_json(),
        "classes": det.classes,
        "scorer": {"name": det.scorer.name, "params": params,
                   "bank_dtype": bank_dtype if det.scorer.name in BANK_SCORERS else None},
        "decision": {"tpr": det.tpr, "alpha": det.alpha, "threshold": det.threshold, "k": det.k,
                     "n_calibration": int(det.calibration.numel()),
                     "rule": "is_ood = p_value <= k / (n + 1) (= score < threshold); p_value = "
                             "(1 + #{calibration <= score}) / (n + 1); higher score = more ID"},
        "provenance": det.provenance,
        "validation": det.validation,
    }
    card = model_card(det, spec)
    with claim_detector_out(path, flag="path"):
        check_detector_out(path, flag="path")  # again under the lock: the folder may have changed meanwhile
        remove_stale_dir_temporaries(path)
        atomic_write_dir(path, lambda tmp: write_artifact(tmp, spec, state, scorer_tensors, det.calibration, card))
    return path


def _check_build(build, where: str) -> dict:
    if not isinstance(build, dict):
        raise ArtifactError(f"{where}: model build record must be a JSON object, got {type(build).__name__}")
    unknown = sorted(set(build) - set(BUILD_KEYS))
    if unknown:
        raise ArtifactError(f"{where}: model build record has unknown keys {unknown} (allowed: {sorted(BUILD_KEYS)})")
    for key, types in BUILD_KEYS.items():
        if key in build and (not isinstance(build[key], types) or isinstance(build[key], bool)):
            raise ArtifactError(f"{where}: model build {key!r} has the wrong type ({type(build[key]).__name__})")
    for key in ("name", "num_classes"):
        if key not in build:
            raise ArtifactError(f"{where}: model build record lacks {key!r}")
    for key in ("input_mean", "input_std"):
        if build.get(key) is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in build[key]):
            raise ArtifactError(f"{where}: model build {key!r} must be a list of numbers")
    return build


def load_detector(cls, path: str, model: nn.Module | None = None, device=None, max_bank_mb: float = 1024):
    """Read and verify the artifact at ``path``; see :meth:`ascood.Detector.load`."""
    if device is not None:
        resolve_device(device, "device")  # before reading anything: the CLI's --device wording
    spec, paths = read_artifact(path)
    where = paths[SPEC]
    try:
        prep = Preprocessing.from_json(spec.get("preprocessing"), f"{where}: preprocessing")
    except ValueError as err:
        raise ArtifactError(str(err)) from None
    classes = spec.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ArtifactError(f"{where}: 'classes' must be a non-empty list of names")
    model, n_classes = _load_model(spec, paths, model)
    if len(classes) != n_classes:
        raise ArtifactError(f"{where}: {len(classes)} class names for a model with {n_classes} outputs")
    scorer = _load_scorer(spec, paths, model, n_classes, max_bank_mb)
    det = _load_decision(cls, spec, paths, model, scorer, prep, classes)
    if device is not None:
        det.to(device)
    return det


def _load_model(spec: dict, paths: dict, model: nn.Module | None) -> tuple[nn.Module, int]:
    """(the model in eval mode, its number of outputs): rebuilt from its build record (or the one given), then
    its weights from safetensors."""
    where = paths[SPEC]
    minfo = spec.get("model")
    if not isinstance(minfo, dict):
        raise ArtifactError(f"{where}: 'model' must be a JSON object")
    if model is None:
        if minfo.get("build") is None:
            raise ArtifactError(f"{where}: the model was not made by ascood.build_model (no build record): pass "
                                f"model= (a {minfo.get('class', 'model')} of the same architecture) to load its weights")
        build = _check_build(minfo["build"], where)
        from ..nets.registry import build_model

        try:
            model = build_model(**build)
        except Exception as err:
            raise ArtifactError(f"{where}: cannot build the model {build.get('name')!r}: {err}") from None
    state = read_tensors(paths[MODEL_FILE])
    from ..training.checkpoint import load_state_dict_checked

    try:
        load_state_dict_checked(model, state, paths[MODEL_FILE])
    except RuntimeError as err:
        raise ArtifactError(str(err)) from None
    model.eval()
    return model, (model.num_classes if hasattr(model, "num_classes") else minfo.get("num_classes"))


def _load_scorer(spec: dict, paths: dict, model: nn.Module, n_classes: int, max_bank_mb: float):
    """The scorer: JSON hyperparameters + safetensors state; a bank larger than max_bank_mb stays on disk."""
    where = paths[SPEC]
    sinfo = spec.get("scorer")
    if not isinstance(sinfo, dict) or not isinstance(sinfo.get("name"), str):
        raise ArtifactError(f"{where}: 'scorer' must be a JSON object with a name")
    name = sinfo["name"]
    if name not in STORABLE_SCORERS:
        raise ArtifactError(f"{where}: unknown scorer {name[:60]!r} (known: {', '.join(STORABLE_SCORERS)})")
    bank = None
    if name in BANK_SCORERS:
        handle = open_tensor_file(paths[SCORER_FILE])
        if "bank" not in handle.keys():
            raise ArtifactError(f"{paths[SCORER_FILE]}: scorer {name} needs a 'bank' tensor")
        bank = _stored_bank(handle, paths[SCORER_FILE], max_bank_mb)
    tensors = read_tensors(paths[SCORER_FILE], skip=("bank",) if name in BANK_SCORERS else ())
    if name not in BANK_SCORERS and "bank" in tensors:
        raise ArtifactError(f"{paths[SCORER_FILE]}: unexpected tensor 'bank' for scorer {name}")
    feature_dim = int(model.feature_dim) if has_feature_head(model) else None
    scorer = restore_scorer(name, sinfo.get("params"), tensors, num_classes=n_classes, feature_dim=feature_dim,
                            bank=bank, where=where)
    if hasattr(scorer, "max_device_bank_mb"):
        scorer.max_device_bank_mb = max_bank_mb
    return scorer


def _load_decision(cls, spec: dict, paths: dict, model, scorer, prep, classes):
    """The detector, its threshold recomputed from the stored calibration scores and checked against the JSON."""
    where = paths[SPEC]
    dinfo = spec.get("decision")
    if not isinstance(dinfo, dict):
        raise ArtifactError(f"{where}: 'decision' must be a JSON object")
    try:
        tpr = check_tpr(dinfo.get("tpr"), "decision tpr")
    except ValueError as err:
        raise ArtifactError(f"{where}: {err}") from None
    cal = read_tensors(paths[CALIBRATION_FILE])
    scores = cal.get("scores")
    if set(cal) != {"scores"} or scores is None or scores.dim() != 1 or scores.dtype != torch.float64:
        raise ArtifactError(f"{paths[CALIBRATION_FILE]}: expected one float64 vector 'scores'")
    if scores.numel() < min_calibration_size(tpr):
        raise ArtifactError(f"{paths[CALIBRATION_FILE]}: {scores.numel()} calibration scores are too few for tpr "
                            f"{tpr} (at least {min_calibration_size(tpr)})")
    try:
        det = cls(model, scorer, prep, classes, scores, tpr, provenance=_obj(spec.get("provenance")),
                  validation=_obj(spec.get("validation")))
    except ValueError as err:
        raise ArtifactError(f"{paths[CALIBRATION_FILE]}: {err}") from None
    stored = dinfo.get("threshold")
    if not isinstance(stored, (int, float)) or isinstance(stored, bool) or stored != det.threshold:
        raise ArtifactError(f"{where}: decision threshold {stored!r} is not the one its calibration scores give "
                            f"({det.threshold!r}) at tpr {tpr}: the threshold was edited or does not belong to "
                            "these scores")
    return det


def _obj(v) -> dict:
    return v if isinstance(v, dict) else {}


def _stored_bank(handle, path: str, max_bank_mb: float) -> StoredBank:
    """The bank tensor of a safetensors handle, read by row slices (memory-mapped; never loaded whole when large)."""
    sl = handle.get_slice("bank")
    shape = sl.get_shape()
    dtype = {"F32": torch.float32, "F16": torch.float16}.get(sl.get_dtype())
    if dtype is None or len(shape) != 2:
        raise ArtifactError(f"{path}: 'bank' must be a 2-d float32 or float16 tensor, got {sl.get_dtype()} "
                            f"{list(shape)}")

    def rows(start: int, stop: int) -> torch.Tensor:
        # No finiteness pass here: it would cost as much as the search itself on a CPU, the sha256 already ties
        # the file to what was saved, and a NaN row could only give NaN scores, which count as OOD (p = 1/(n+1)).
        return sl[start:stop]

    n, width = int(shape[0]), int(shape[1])
    bank = StoredBank(n, width, rows, dtype, max_device_mb=max_bank_mb)
    bank._handle = handle  # keeps the file mapping open as long as the bank lives
    return bank


def model_card(det, spec: dict) -> str:
    """The artifact's README.md: data, scorer, threshold, validation numbers, guarantees and limits."""
    v, prov = det.validation, det.provenance
    data = prov.get("data", {})
    choice = prov.get("scorer_choice", {})

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines = [
        "# ascood detector", "",
        f"Scorer **{det.scorer.name}** {spec['scorer']['params']}; decision at target TPR **{det.tpr}**: "
        f"is_ood when p <= {det.k}/{det.calibration.numel() + 1} = {det.cutoff:.4g} (the false-alarm bound; "
        f"nominal 1 - tpr = {det.alpha:.4g}).", "",
        "This card is for people: you may edit it. It is not read back and not in manifest.json; every other "
        "file is checked against its sha256 on load.", "",
        "## Model and preprocessing", "",
        f"- model: {spec['model']['class']} ({(spec['model']['build'] or {}).get('name', 'no build record')}), "
        f"{det.num_classes} classes: {', '.join(det.classes[:20])}{' ...' if len(det.classes) > 20 else ''}",
        f"- source: {prov.get('source')} {prov.get('checkpoint', '')}",
        f"- input: resize shorter side to {det.preprocessing.resize}, centre crop {det.preprocessing.image_size}, "
        f"{det.preprocessing.channels} channel(s), mean {det.preprocessing.mean}, std {det.preprocessing.std}", "",
        "## Data", "",
        *([f"- ID train (scorer statistics): {data.get('id_train')} ({data.get('n_id_train')} images)"]
          if data.get("id_train") else ["- ID train: not used (the scorer fits no statistics on it)"]),
        f"- ID validation: {data.get('id_val')}; tuning part {data.get('n_tune')} images, calibration part "
        f"{data.get('n_calibration')} images (split seed {data.get('split_seed')})",
        *([f"- OOD validation (APS, validation numbers): {data.get('ood_val')}"] if data.get("ood_val") else []),
        f"- scorer choice: {choice.get('mode')}" + (f", validation AUROC {pct(choice.get('val_auroc'))}"
                                                    if choice.get("val_auroc") is not None else ""), "",
        "## Decision", "",
        f"- threshold {det.threshold:.6g}: is_ood when score < threshold (higher score = more ID)",
        f"- conformal p-value = (1 + #{{calibration scores <= score}}) / (n + 1), n = {det.calibration.numel()}; "
        f"is_ood = p <= {det.k}/{det.calibration.numel() + 1}",
        f"- calibration TPR (in-sample) {pct(v.get('calibration_tpr'))}",
    ]
    if "ood_val_fpr" in v:
        lines.append(f"- OOD validation: AUROC {pct(v['ood_val_auroc'])}, OOD accepted as ID (FPR) "
                     f"{pct(v['ood_val_fpr'])} at this threshold ({v['n_ood_val']} images; optimistic: the same "
                     "images chose the hyperparameters)")
    if "calibration_accuracy" in v:
        lines.append(f"- ID accuracy on the calibration images {pct(v['calibration_accuracy'])}")
    lines += [
        "", "## Guarantee and limits", "",
        f"- If new ID images are exchangeable with the calibration images (same distribution, same model and "
        f"preprocessing), P(an ID image is flagged) <= {det.cutoff:.4g}, over the calibration draw and the image. "
        "With one fixed calibration set the realised rate varies by about "
        f"{(det.cutoff * (1 - det.cutoff) / max(det.calibration.numel(), 1)) ** 0.5:.3g} (one standard deviation).",
        "- Batches: Benjamini-Hochberg over conformal p-values (`predict --fdr q`) keeps the expected share of ID "
        "images among the flagged ones <= q under the same assumption. It can flag a lone OOD image in a batch of "
        f"m only when n + 1 >= m / q (n = {det.calibration.numel()}: batches of at most "
        f"{int(0.1 * (det.calibration.numel() + 1) + 1e-9)} images at q = 0.1).",
        "- Nothing is guaranteed about which OOD images are caught: that depends on the scorer and the kind of shift.",
        "- A shift of the ID data itself (new camera, new season) breaks exchangeability: recalibrate on fresh ID data.",
        "", "Files: detector.json (all settings), model.safetensors, scorer.safetensors, calibration.safetensors; "
        "manifest.json holds each of their sha256 (checked on load; this README.md is not covered).", "",
    ]
    return "\n".join(lines)
