"""``ascood.Detector``: a trained model + one fitted scorer + preprocessing + a calibrated decision rule.

    det = ascood.Detector.fit("runs/mine", id_train="data/train", id_val="data/val",
                              ood_val="data/ood_val", scorer="aps", tpr=0.95)
    pred = det.predict(["img1.png", "img2.png"])      # label, probability, score, is_ood, p_value
    pred = det.predict(images, fdr=0.1)                # + Benjamini-Hochberg over the batch
    det.save("det/"); det = ascood.Detector.load("det/")

How the ID validation data is used (the decision's guarantee needs a
calibration set that nothing else has seen, :mod:`.conformal`):

* the scorer's statistics are fitted on ``id_train`` (KNN, MDS, ViM, ...) or,
  for the scorers OpenOOD fits on validation data (ReAct, TempScale,
  KL-Matching), on a *tuning* part of ``id_val``;
* with ``ood_val``, APS picks the hyperparameters (``scorer="aps"`` also the
  scorer) by AUROC of the tuning part of ``id_val`` against ``ood_val``, as
  ``ascood eval --aps-id/--aps-ood`` does;
* the threshold and the p-values come from the *calibration* part of
  ``id_val`` only. When no tuning is needed the whole of ``id_val`` calibrates;
  otherwise ``id_val`` is split at random (``calibration_fraction``, seed
  ``seed``), or pass ``id_calibration`` to calibrate on a set of its own.

Data arguments are paths (class folders, flat folders, image lists, CIFAR
directories; read with the detector's preprocessing), torch Datasets, or
DataLoaders whose images are already normalised as the model expects.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.datasets import DataError, dataset_from_path
from ..scoring.metrics import ood_metrics
from ..scoring.scorers import FeatureCache, Scorer, get_scorer, loader_scores, scorer_for_model, sweep
from ..scoring.scorers.features import LinearHead, has_feature_head, iterate_loader, model_features
from ..scoring.scorers.perturb import model_input_std
from ..scoring.scorers.sweep import fit_scorer
from .conformal import benjamini_hochberg, check_fdr, check_tpr, conformal_p_values, threshold_at_tpr
from .inputs import PathDataset, Preprocessing, check_image_tensor, expand_paths

__all__ = ["Detector", "Predictions", "APS_CANDIDATES", "FORWARD_ONLY"]

#: Scorers ``scorer="aps"`` chooses among: forward-only ones (ODIN / i-ODIN cost a backward pass per image and
#: 28 grid points; name them explicitly). Those that fit on ID train join only when ``id_train`` is given.
APS_CANDIDATES = ("msp", "mls", "ebo", "gen", "tempscale", "react", "ash", "scale", "knn", "vim", "mds", "rmds",
                  "nnguide", "relation")
#: Scorers whose score needs only forward passes (they export to every format, ONNX included).
FORWARD_ONLY = ("msp", "mls", "ebo", "gen", "entropy", "tempscale", "klm", "react", "ash", "scale", "dice",
                "gradnorm", "knn", "nnguide", "vim", "mds", "rmds", "relation", "she")


@dataclass
class Predictions:
    """What :meth:`Detector.predict` returns for B inputs.

    label (B,) int64 and probability (B,) float32: the model's class and its
    softmax probability; label_name: the class names; score (B,) float32 (higher
    = more ID); p_value (B,) float64, the conformal p-value; is_ood (B,) bool:
    ``p_value <= 1 - tpr`` (= ``score < threshold``); bh_ood (B,) bool or None:
    Benjamini-Hochberg at ``fdr`` over this batch; source: the file per row
    (None for tensors).
    """

    label: torch.Tensor
    label_name: list[str]
    probability: torch.Tensor
    score: torch.Tensor
    p_value: torch.Tensor
    is_ood: torch.Tensor
    bh_ood: torch.Tensor | None = None
    fdr: float | None = None
    source: list[str] | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.score.numel())

    def rows(self) -> list[dict]:
        """One dict per input (for CSV / JSON lines)."""
        out = []
        for i in range(len(self)):
            row = {"path": self.source[i] if self.source else i, "label": int(self.label[i]),
                   "label_name": self.label_name[i], "probability": float(self.probability[i]),
                   "score": float(self.score[i]), "p_value": float(self.p_value[i]), "is_ood": bool(self.is_ood[i])}
            if self.bh_ood is not None:
                row["bh_ood"] = bool(self.bh_ood[i])
            out.append(row)
        return out


class _Calibrated(torch.utils.data.Dataset):
    """A dataset's items as (image, label) pairs (labels -1 where absent)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        if isinstance(item, (tuple, list)):
            return item[0], item[1] if len(item) > 1 else -1
        return item, -1


class Detector:
    """A model, one fitted scorer, the preprocessing, class names and a calibrated decision rule.

    Build one with :meth:`fit` (or :meth:`load`); see the module docstring.
    Attributes: ``model`` (eval mode), ``scorer``, ``preprocessing``
    (:class:`~ascood.deploy.inputs.Preprocessing`), ``classes`` (C names),
    ``tpr``, ``threshold``, ``calibration`` (sorted ID calibration scores, (n,)
    float64), ``provenance`` and ``validation`` (JSON dicts).
    """

    def __init__(self, model: nn.Module, scorer: Scorer, preprocessing: Preprocessing, classes: Sequence[str],
                 calibration: torch.Tensor, tpr: float, provenance: dict | None = None,
                 validation: dict | None = None) -> None:
        self.model = model.eval()
        self.scorer = scorer
        self.preprocessing = preprocessing
        self.classes = [str(c) for c in classes]
        self.provenance = dict(provenance or {})
        self.validation = dict(validation or {})
        self.calibrate(calibration, tpr)

    # -- the decision rule ------------------------------------------------------------------------------
    def calibrate(self, id_scores, tpr: float) -> "Detector":
        """Set the calibration scores (ID, held out from every fit) and the threshold at ``tpr``."""
        self.tpr = check_tpr(tpr)
        c = torch.as_tensor(id_scores).detach().double().cpu().reshape(-1)
        self.threshold, self.k = threshold_at_tpr(c, self.tpr)
        self.calibration = torch.sort(c).values
        return self

    @property
    def alpha(self) -> float:
        """1 - tpr: the bound on the false-alarm rate of :attr:`is_ood` decisions."""
        return 1.0 - self.tpr

    def decide(self, scores: torch.Tensor, fdr: float | None = None):
        """(p_value (B,) float64, is_ood (B,) bool, bh_ood (B,) bool or None) of scores (B,)."""
        p = conformal_p_values(scores, self.calibration)
        # p <= alpha is the same set as score < threshold (conformal.threshold_at_tpr); p is the one computed.
        is_ood = p <= self.k / (self.calibration.numel() + 1.0)
        bh = benjamini_hochberg(p, fdr) if fdr is not None else None
        return p, is_ood, bh

    # -- scoring ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device) -> "Detector":
        """Move the model to ``device`` (banks are streamed to it per batch)."""
        self.model.to(device)
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def score_normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C) float32, score (B,) float32) of normalised images (B, C, S, S) on the model's device."""
        return _score_batch(self.model, self.scorer, x)

    def predict(self, inputs, *, fdr: float | None = None, normalized: bool = False, batch_size: int = 64,
                workers: int = 0, progress: bool = False) -> Predictions:
        """Predictions for images: a tensor (B, C, S, S) / (C, S, S) (float pixel values in [0, 1], uint8,
        or normalised with ``normalized=True``), PIL images, or image paths / folders / image lists.

        ``fdr``: also decide the whole batch by Benjamini-Hochberg at this false
        discovery rate (``bh_ood``). Files are read, resized and cropped as in
        training (a greyscale file for an RGB model is converted, as training
        did); tensors of the wrong size or channel count are refused with a
        message saying what was expected.
        """
        if fdr is not None:
            fdr = check_fdr(fdr)
        _check_count(batch_size, "batch_size", 1)
        _check_count(workers, "workers", 0)
        prep, source = self.preprocessing, None
        if isinstance(inputs, (str, os.PathLike)) or (isinstance(inputs, (list, tuple)) and inputs
                                                       and all(isinstance(p, (str, os.PathLike)) for p in inputs)):
            files = expand_paths(inputs)
            loader = torch.utils.data.DataLoader(PathDataset(files, prep), batch_size=batch_size, num_workers=workers)
            batches, source, total = ((x, False) for x, _ in loader), files, len(files)
        else:
            x = self._as_tensor(inputs, normalized)
            batches = ((x[i:i + batch_size], normalized) for i in range(0, x.shape[0], batch_size))
            total = x.shape[0]
        logits, scores = [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="predict", unit="img")
        device = self.device
        for xb, is_norm in batches:
            xb = xb.to(device)
            xn = xb if is_norm else prep.normalize(xb)
            z, s = self.score_normalized(xn)
            logits.append(z.detach().cpu())
            scores.append(s.detach().float().cpu())
            if bar is not None:
                bar.update(xb.shape[0])
        if bar is not None:
            bar.close()
        if not scores:
            raise ValueError("no images to predict")
        z, s = torch.cat(logits), torch.cat(scores)
        prob, label = torch.softmax(z.float(), 1).max(1)
        p, is_ood, bh = self.decide(s, fdr)
        return Predictions(label=label, label_name=[self._class_name(int(i)) for i in label], probability=prob,
                           score=s, p_value=p, is_ood=is_ood, bh_ood=bh, fdr=fdr, source=source, logits=z)

    def _class_name(self, i: int) -> str:
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)

    def _as_tensor(self, inputs, normalized: bool) -> torch.Tensor:
        from PIL import Image

        if isinstance(inputs, Image.Image):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, Image.Image) for i in inputs):
            if normalized:
                raise ValueError("normalized=True applies to tensors, not PIL images")
            tf = self.preprocessing.pixel_transform()
            return torch.stack([tf(img.convert(self.preprocessing.mode)) for img in inputs])
        if isinstance(inputs, np.ndarray):
            inputs = torch.from_numpy(inputs)
        if isinstance(inputs, (list, tuple)):
            raise TypeError("inputs must be a tensor, PIL image(s) or image path(s); got a list of "
                            f"{sorted({type(i).__name__ for i in inputs}) or 'nothing'}")
        return check_image_tensor(inputs, self.preprocessing, normalized, name="inputs")

    # -- fitting ----------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, model_or_run, *, id_train=None, id_val, ood_val=None, scorer: str | Scorer = "aps",
            tpr: float = 0.95, id_calibration=None, calibration_fraction: float = 0.5, seed: int = 0,
            preprocessing: Preprocessing | dict | None = None, classes: Sequence[str] | None = None,
            which: str | None = None, batch_size: int = 128, workers: int = 0, device=None,
            candidates: Sequence[str] = APS_CANDIDATES, feature_dir: str | os.PathLike | None = None,
            log=None) -> "Detector":
        """Fit the scorer, choose hyperparameters (APS, with ``ood_val``), calibrate the threshold at ``tpr``.

        Args:
            model_or_run: a run folder or checkpoint of ``ascood train`` (best.pt
                when present; ``which`` = "best"/"last"), or a model (an
                ``ASCOODNet`` from ``build_model`` / ``wrap``, or any classifier
                for the logit scorers).
            id_train: ID training data; needed by the scorers that fit on it
                (knn, mds, vim, ...).
            id_val: ID validation data (the threshold's calibration set; see the
                module docstring for how it is split when tuning needs some).
            ood_val: OOD validation data for APS; required for ``scorer="aps"``.
            scorer: a scorer name, a scorer object, or "aps" (the best of
                ``candidates`` by validation AUROC).
            tpr: the target true-positive rate of ID samples, in (0, 1).
            id_calibration: a separate calibration set (then all of ``id_val``
                tunes).
            calibration_fraction: the part of ``id_val`` kept for calibration
                when it must also tune, in (0, 1).
            preprocessing: needed with a model (image_size, mean, std, channels);
                read from the checkpoint for a run.
            classes: class names (default: the run's, else "0".."C-1").
            device: where to run (default cuda when available).
            feature_dir: extract each split's features to raw files there and
                memory-map them (ImageNet-size ID train: 1.28M x 2048 float32
                is 10 GiB) instead of holding them in RAM; a KNN / NNGuide /
                Relation bank then reads from those files and is streamed
                into the artifact block by block.
            log: a ``print``-like callable for progress lines (default: silent).
        """
        say = log or (lambda *a, **k: None)
        tpr = check_tpr(tpr)
        if not 0 < calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
        if id_val is None:
            raise ValueError("id_val is required: the threshold is calibrated on ID validation data only")
        _check_count(batch_size, "batch_size", 1)
        _check_count(workers, "workers", 0)
        model, prep, run_classes, provenance = _load_source(model_or_run, preprocessing, which)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.to(device).eval()
        names = _class_names(classes or run_classes, _num_classes(model, prep))

        val_ds = _as_dataset(id_val, prep, "id_val")
        train_ds = _as_dataset(id_train, prep, "id_train") if id_train is not None else None
        ood_ds = _as_dataset(ood_val, prep, "ood_val") if ood_val is not None else None
        is_aps = isinstance(scorer, str) and scorer.lower() == "aps"
        if is_aps and ood_ds is None:
            raise ValueError("scorer='aps' chooses the scorer by AUROC against OOD validation data: pass ood_val "
                             "(or name a scorer)")
        to_try = _aps_names(candidates, model, train_ds is not None) if is_aps else [_check_named(scorer, model,
                                                                                                   train_ds)]
        tunes = ood_ds is not None or any(_fits_on_val(s) for s in to_try)
        if id_calibration is not None:
            tune_ds, calib_ds = val_ds, _as_dataset(id_calibration, prep, "id_calibration")
        elif tunes:
            tune_ds, calib_ds = _split(val_ds, calibration_fraction, seed)
        else:
            tune_ds, calib_ds = None, val_ds

        def loader(ds):
            return None if ds is None else torch.utils.data.DataLoader(_Calibrated(ds), batch_size=batch_size,
                                                                        shuffle=False, num_workers=workers)

        train_l, tune_l, calib_l, ood_l = loader(train_ds), loader(tune_ds), loader(calib_ds), loader(ood_ds)
        cache = FeatureCache(model, directory=None if feature_dir is None else os.fspath(feature_dir))
        input_std = model_input_std(model) or prep.std
        t0 = time.perf_counter()
        if is_aps:
            fitted, choice = _choose_by_aps(to_try, input_std, model, tune_l, ood_l, train_l, cache, say)
        else:
            fitted, choice = _fit_named(scorer, input_std, model, tune_l, ood_l, train_l, cache, say)
        fit_seconds = time.perf_counter() - t0
        choice.update({"scorer": fitted.name, "params": _public_params(fitted)})

        calib_scores, calib_labels, calib_pred = _scores_of(model, fitted, calib_l)
        det = cls(model, fitted, prep, names, calib_scores, tpr, provenance)
        det.validation = _validation_summary(det, calib_labels, calib_pred, ood_l, fit_seconds)
        det.provenance.update({
            "scorer_choice": choice,
            "data": {"id_train": _describe(id_train), "id_val": _describe(id_val), "ood_val": _describe(ood_val),
                     "id_calibration": _describe(id_calibration), "n_id_train": len(train_ds) if train_ds else None,
                     "n_tune": len(tune_ds) if tune_ds is not None else 0, "n_calibration": len(calib_ds),
                     "calibration_fraction": None if (id_calibration is not None or not tunes)
                     else calibration_fraction, "split_seed": seed},
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        })
        return det

    # -- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, bank_dtype: str = "float32") -> str:
        """Write the artifact directory (:mod:`.artifact`), claiming it first; returns the path.

        ``bank_dtype="float16"`` halves a KNN / NNGuide / Relation bank on disk
        and in memory (scores change by ~1e-3 relative; BENCHMARKS.md).
        """
        from .saving import save_detector

        return save_detector(self, os.fspath(path), bank_dtype=bank_dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: nn.Module | None = None, device=None,
             max_bank_mb: float = 1024) -> "Detector":
        """Read a verified artifact (checksums, then JSON / safetensors; nothing is unpickled or executed).

        ``model``: an architecture to load the weights into, for a detector
        whose model was not made by ``ascood.build_model`` (no build record).
        ``max_bank_mb``: a bank larger than this stays memory-mapped on disk and
        is read chunk by chunk while scoring.
        """
        from .saving import load_detector

        return load_detector(cls, os.fspath(path), model=model, device=device, max_bank_mb=max_bank_mb)

    def export(self, path: str | os.PathLike, format: str = "onnx", **kw) -> str:
        """Write one graph (images -> logits, score, is_ood, p_value); see :func:`ascood.deploy.export.export`."""
        from .export import export

        return export(self, os.fspath(path), format, **kw)

    def __repr__(self) -> str:
        return (f"Detector(scorer={self.scorer!r}, tpr={self.tpr}, threshold={self.threshold:.6g}, "
                f"n_calibration={self.calibration.numel()}, classes={len(self.classes)})")


# -- helpers --------------------------------------------------------------------------------------------------
def _score_batch(model: nn.Module, scorer: Scorer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, C), score (B,)) of normalised images x: the scorers' own code, as ``ascood eval`` runs it."""
    if scorer.supports_features:
        with torch.no_grad():
            if scorer.uses_features:
                z, h = model_features(model, x, "raw")
                head = LinearHead.from_model(model)
            else:
                z, h, head = model(x).float(), None, None
            return z, scorer.score_features(z, h, head=head)
    _, score = scorer.score(model, x)  # input-gradient scorers (ODIN, i-ODIN, MDS with eps > 0)
    with torch.no_grad():
        return model(x).float(), score


def _scores_of(model, scorer, loader) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(scores (N,) float32, labels (N,) or None, predicted class (N,)) over a loader through :func:`_score_batch`."""
    scores, labels, preds = [], [], []
    device = next(model.parameters()).device if next(model.parameters(), None) is not None else torch.device("cpu")
    for x, y in iterate_loader(loader, device):
        z, s = _score_batch(model, scorer, x)
        scores.append(s.detach().float().cpu())
        preds.append(z.argmax(1).cpu())
        if y is not None:
            labels.append(y.long().cpu())
    if not scores:
        raise ValueError("a data set is empty")
    return torch.cat(scores), (torch.cat(labels) if labels else None), torch.cat(preds)


def _tune(scorer: Scorer, model, tune_l, ood_l, train_l, cache) -> tuple[Scorer, float]:
    """APS: sweep the grid when there is one (else just fit); (the fitted scorer, its validation AUROC)."""
    if scorer.default_grid and scorer.grid() != [{}]:
        res = sweep(scorer, model, tune_l, ood_l, id_train_loader=train_l, id_val_loader=tune_l, cache=cache)
        return scorer, float(res.best_auroc)
    if scorer.needs_fit and not scorer.fitted:
        with torch.enable_grad():
            fit_scorer(scorer, model, scorer.fit_loader(train_l, tune_l), cache)
    _, s_id, _ = loader_scores(scorer, model, tune_l, cache)
    _, s_ood, _ = loader_scores(scorer, model, ood_l, cache)
    return scorer, float(ood_metrics(s_id, s_ood)["auroc"])


def _aps_names(candidates: Sequence[str], model: nn.Module, has_train: bool) -> list[str]:
    """The APS candidates this model and data can run (feature scorers need a feature head, train fits id_train)."""
    names = [n for n in candidates if _usable(n, model, has_train)]
    if not names:
        raise ValueError("scorer='aps': no candidate scorer fits this model and data")
    return names


def _check_named(scorer: str | Scorer, model: nn.Module, train_ds) -> str | Scorer:
    """A named scorer (or scorer object) checked against the model and data before any work; returned as given."""
    probe = get_scorer(scorer) if isinstance(scorer, str) else scorer
    if probe.needs_fit and probe.fit_split == "train" and train_ds is None:
        raise ValueError(f"scorer {probe.name!r} fits ID training statistics: pass id_train")
    if probe.uses_features and not has_feature_head(model):
        raise ValueError(f"scorer {probe.name!r} reads features: the model needs features(x)/head(h)/fc "
                         "(build it with ascood.build_model or ascood.wrap)")
    return scorer


def _fits_on_val(scorer: str | Scorer) -> bool:
    """Whether the scorer fits on ID validation data (then id_val must be split into tuning and calibration)."""
    s = get_scorer(scorer) if isinstance(scorer, str) else scorer
    return s.needs_fit and s.fit_split == "val"


def _choose_by_aps(names, input_std, model, tune_l, ood_l, train_l, cache, say) -> tuple[Scorer, dict]:
    """APS over scorers: each candidate tuned on its grid; the best validation AUROC wins (a tie keeps the first)."""
    best, trials = None, []
    for name in names:
        try:
            s, res = _tune(scorer_for_model(name, input_std), model, tune_l, ood_l, train_l, cache)
        except ValueError as err:  # e.g. ViM's grid needs more feature dimensions than this model has
            say(f"APS {name}: skipped ({err})")
            trials.append({"scorer": name, "skipped": str(err)})
            continue
        trials.append({"scorer": name, "params": _public_params(s), "val_auroc": res})
        say(f"APS {name}: {_public_params(s)} (validation AUROC {100 * res:.2f})")
        if best is None or res > best[1]:
            best = (s, res)
    if best is None:
        raise ValueError("scorer='aps': every candidate failed: " + "; ".join(t["skipped"] for t in trials))
    return best[0], {"mode": "aps", "val_auroc": best[1], "trials": trials}


def _fit_named(scorer, input_std, model, tune_l, ood_l, train_l, cache, say) -> tuple[Scorer, dict]:
    """One named scorer: its grid swept by APS when ood_val is given, else just fitted (when it needs a fit)."""
    s = scorer_for_model(scorer, input_std) if isinstance(scorer, str) else scorer
    choice: dict = {"mode": "fixed"}
    if ood_l is not None:
        s, auroc = _tune(s, model, tune_l, ood_l, train_l, cache)
        choice["val_auroc"] = auroc
        say(f"APS {s.name}: {_public_params(s)} (validation AUROC {100 * auroc:.2f})")
    elif s.needs_fit and not s.fitted:
        with torch.enable_grad():
            fit_scorer(s, model, s.fit_loader(train_l, tune_l), cache)
    return s, choice


def _validation_summary(det: "Detector", calib_labels, calib_pred, ood_l, fit_seconds: float) -> dict:
    """The numbers the model card shows: the calibration set's TPR and accuracy, and ood_val's FPR / AUROC."""
    calib = det.calibration
    out = {"n_calibration": int(calib.numel()), "tpr_target": det.tpr, "threshold": det.threshold,
           "calibration_tpr": float((calib >= det.threshold).double().mean()), "fit_seconds": round(fit_seconds, 3)}
    if calib_labels is not None and bool((calib_labels >= 0).all()):
        out["calibration_accuracy"] = float((calib_pred == calib_labels).double().mean())
    if ood_l is not None:
        ood_scores, _, _ = _scores_of(det.model, det.scorer, ood_l)
        m = ood_metrics(calib, ood_scores)
        out.update({"n_ood_val": int(ood_scores.numel()), "ood_val_auroc": m["auroc"],
                    "ood_val_fpr": float((ood_scores >= det.threshold).double().mean()),
                    "ood_val_detected": float((ood_scores < det.threshold).double().mean()),
                    "ood_val_note": "ood_val also chose the hyperparameters (APS): optimistic"})
    return out


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _class_names(given: Sequence | None, n_classes: int) -> list[str]:
    names = [str(c) for c in (given or range(n_classes))]
    if len(names) != n_classes:
        raise ValueError(f"classes has {len(names)} names, the model has {n_classes} outputs")
    return names


def _public_params(scorer: Scorer) -> dict:
    out = {}
    for k, v in scorer.get_params().items():
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out


def _usable(name: str, model, has_train: bool) -> bool:
    s = get_scorer(name)
    if s.uses_features and not has_feature_head(model):
        return False
    return not (s.needs_fit and s.fit_split == "train" and not has_train)


def _split(ds, calibration_fraction: float, seed: int):
    """(tune, calibration) Subsets of ``ds``, disjoint, at random with ``seed``."""
    n = len(ds)
    n_cal = int(round(n * calibration_fraction))
    if n_cal < 1 or n - n_cal < 1:
        raise ValueError(f"id_val has {n} samples: too few to split into a tuning part and a calibration part "
                         f"(calibration_fraction {calibration_fraction}); pass more data or id_calibration")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.utils.data.Subset(ds, sorted(perm[n_cal:])), torch.utils.data.Subset(ds, sorted(perm[:n_cal]))


def _as_dataset(data, prep: Preprocessing, what: str):
    """A path (read with the preprocessing), a Dataset, or a DataLoader's dataset."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.exists(path):
            raise DataError(f"{what} not found: {path}")
        ds = dataset_from_path(path, prep.transform(), train=False, mode=prep.mode)
        if len(ds) == 0:
            raise DataError(f"{what} {path} holds no images")
        return ds
    if isinstance(data, torch.utils.data.DataLoader):
        return data.dataset
    if isinstance(data, torch.utils.data.Dataset):
        return data
    raise TypeError(f"{what} must be a path, a torch Dataset or a DataLoader, got {type(data).__name__}")


def _describe(data) -> str | None:
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return os.path.abspath(os.fspath(data))
    return f"<{type(data).__name__} of {len(getattr(data, 'dataset', data))} items>"


def _num_classes(model: nn.Module, prep: Preprocessing) -> int:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    with torch.no_grad():
        x = torch.zeros(1, prep.channels, prep.image_size, prep.image_size, device=next(model.parameters()).device)
        return int(model(x).shape[1])


def _load_source(model_or_run, preprocessing, which):
    """(model, Preprocessing, class names or None, provenance) from a run folder / checkpoint or a model."""
    if isinstance(model_or_run, (str, os.PathLike)):
        from ..training.checkpoint import load_model
        from ..training.model_selection import resolve_checkpoint

        path = resolve_checkpoint(os.fspath(model_or_run), which)
        model, ckpt = load_model(path, map_location="cpu")
        extra = ckpt.get("extra") or {}
        prep = Preprocessing.from_checkpoint_extra(extra) if preprocessing is None else _prep(preprocessing)
        if getattr(model, "input_std", None) is None and "std" in extra:
            model.input_mean, model.input_std = list(map(float, extra["mean"])), list(map(float, extra["std"]))
        provenance = {"source": "run", "checkpoint": os.path.abspath(path), "epoch": ckpt.get("epoch"),
                      "best_val_acc": ckpt.get("best_val_acc"), "train_config": ckpt.get("train_config"),
                      "run_extra": {k: v for k, v in extra.items() if k != "classes"}}
        return model, prep, extra.get("classes"), _plain(provenance)
    if not isinstance(model_or_run, nn.Module):
        raise TypeError(f"model_or_run must be a run folder, a checkpoint path or an nn.Module, "
                        f"got {type(model_or_run).__name__}")
    model = model_or_run
    if preprocessing is None:
        mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
        raise ValueError("preprocessing is required with a model: pass preprocessing=dict(image_size=..., "
                         "mean=[...], std=[...], channels=3)" + (f" (the model carries mean {mean}, std {std})"
                                                                 if std is not None else ""))
    return model, _prep(preprocessing), None, {"source": "model", "model_class": type(model).__name__}


def _prep(p) -> Preprocessing:
    return p if isinstance(p, Preprocessing) else Preprocessing.from_json(p)


def _plain(obj):
    """A JSON-safe copy (numbers, strings, lists, dicts; other values as their str)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    return str(obj)
