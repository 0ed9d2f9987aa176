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
import warnings
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
from .conformal import (benjamini_hochberg, bh_min_calibration, check_fdr, check_tpr, conformal_p_values,
                        min_calibration_size, threshold_at_tpr)
from .inputs import PathDataset, Preprocessing, check_image_tensor, expand_paths, resolve_device

__all__ = ["Detector", "Predictions", "APS_CANDIDATES", "FORWARD_ONLY", "check_fit_data", "ignored_data_notes"]

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
    (None for tensors); error: per row, why the file could not be read (None
    for rows read fine; the whole list None when every row was read), with
    ``on_error="skip"``: such rows have label -1 and NaN probability, score
    and p-value, and are never flagged.
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
    error: list[str | None] | None = None

    @property
    def failed(self) -> list[int]:
        """Rows of files that could not be read (``predict(on_error="skip")``): no score, never flagged."""
        return [i for i, e in enumerate(self.error or []) if e is not None]

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
            if self.error is not None:
                row["error"] = self.error[i]
                if self.error[i] is not None:  # nothing was computed: empty cells, not a made-up number
                    row.update({k: None for k in ("label", "label_name", "probability", "score", "p_value",
                                                  "is_ood", "bh_ood") if k in row})
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

    def feature_store_source(self):
        """(tag, wrapped dataset) for the feature store's key: the rows are the wrapped dataset's."""
        return "calibrated", self.ds


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
        tpr = check_tpr(tpr)
        c = torch.as_tensor(id_scores).detach().double().cpu().reshape(-1)
        threshold, k = threshold_at_tpr(c, tpr)  # raises before anything is set: a failed call changes nothing
        self.tpr, self.threshold, self.k, self.calibration = tpr, threshold, k, torch.sort(c).values
        return self

    @property
    def alpha(self) -> float:
        """1 - tpr: the bound on the false-alarm rate of :attr:`is_ood` decisions."""
        return 1.0 - self.tpr

    @property
    def cutoff(self) -> float:
        """k / (n + 1): the p-value cut-off the rule really uses (``is_ood = p_value <= cutoff``), at most
        :attr:`alpha`; the calibrated false-alarm rate is this, not the nominal 1 - tpr."""
        return self.k / (self.calibration.numel() + 1.0)

    def decide(self, scores: torch.Tensor, fdr: float | None = None):
        """(p_value (B,) float64, is_ood (B,) bool, bh_ood (B,) bool or None) of scores (B,)."""
        p = conformal_p_values(scores, self.calibration)
        # p <= alpha is the same set as score < threshold (conformal.threshold_at_tpr); p is the one computed.
        is_ood = p <= self.cutoff
        bh = benjamini_hochberg(p, fdr) if fdr is not None else None
        return p, is_ood, bh

    # -- scoring ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device) -> "Detector":
        """Move the model to ``device`` (banks are streamed to it per batch); checked like the CLI's --device."""
        self.model.to(resolve_device(device, "device"))
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def score_normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C) float32, score (B,) float32) of normalised images (B, C, S, S) on the model's device."""
        return _score_batch(self.model, self.scorer, x)

    def predict(self, inputs, *, fdr: float | None = None, normalized: bool = False, batch_size: int = 64,
                workers: int = 0, progress: bool = False, on_error: str = "raise") -> Predictions:
        """Predictions for images: a tensor (B, C, S, S) / (C, S, S) (float pixel values in [0, 1], uint8,
        or normalised with ``normalized=True``), PIL images, or image paths / folders / image lists.

        ``fdr``: also decide the whole batch by Benjamini-Hochberg at this false
        discovery rate (``bh_ood``); a warning says when the calibration set is
        too small for BH to flag a lone image in a batch this size (n + 1 >=
        m / fdr). Files are read, resized and cropped as in training (through
        the data layer's one reader: a greyscale file for an RGB model is
        converted, an alpha channel dropped, as training did); tensors of the
        wrong size, channel count or order are refused with a message saying
        what was expected. ``on_error``: "raise" (default) stops at the first
        file that cannot be read; "skip" gives it a row with ``error`` set (no
        score, not flagged, left out of Benjamini-Hochberg) and goes on.
        """
        if fdr is not None:
            fdr = check_fdr(fdr)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        _check_count(batch_size, "batch_size", 1)
        _check_count(workers, "workers", 0)
        prep, source = self.preprocessing, None
        if isinstance(inputs, (str, os.PathLike)) or (isinstance(inputs, (list, tuple)) and inputs
                                                       and all(isinstance(p, (str, os.PathLike)) for p in inputs)):
            files = expand_paths(inputs, name="inputs")
            ds = PathDataset(files, prep, skip=on_error == "skip")
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
            batches, source, total = ((x, False, list(err)) for x, _, err in loader), files, len(files)
        else:
            x = self._as_tensor(inputs, normalized)
            batches = ((x[i:i + batch_size], normalized, None) for i in range(0, x.shape[0], batch_size))
            total = x.shape[0]
        z, s, errors = self._score_batches(batches, total, progress)
        ok = torch.tensor([e is None for e in errors], dtype=torch.bool)
        if fdr is not None:
            self._warn_bh_size(int(ok.sum()), fdr)
        prob, label = torch.softmax(z.float(), 1).max(1)
        p = torch.full((len(errors),), math.nan, dtype=torch.float64)
        is_ood = torch.zeros(len(errors), dtype=torch.bool)
        bh = torch.zeros(len(errors), dtype=torch.bool) if fdr is not None else None
        if bool(ok.any()):
            p[ok], is_ood[ok], bh_ok = self.decide(s[ok], fdr)
            if bh is not None:
                bh[ok] = bh_ok
        label[~ok] = -1
        prob[~ok] = math.nan
        return Predictions(label=label, label_name=["" if not k else self._class_name(int(i))
                                                    for i, k in zip(label, ok.tolist())],
                           probability=prob, score=s, p_value=p, is_ood=is_ood, bh_ood=bh, fdr=fdr, source=source,
                           logits=z, error=errors if any(e is not None for e in errors) else None)

    def _score_batches(self, batches, total: int, progress: bool):
        """(logits (N, C), scores (N,) NaN where unread, errors (N,) str or None) over (x, normalized, errors)."""
        logits, scores, errors = [], [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="predict", unit="img")
        device, prep = self.device, self.preprocessing
        for xb, is_norm, errs in batches:
            errs = [e or None for e in errs] if errs is not None else [None] * xb.shape[0]
            good = torch.tensor([e is None for e in errs], dtype=torch.bool)
            z = torch.full((xb.shape[0], self.num_classes), math.nan)
            sc = torch.full((xb.shape[0],), math.nan)
            if bool(good.any()):
                xg = xb[good].to(device)
                zg, sg = self.score_normalized(xg if is_norm else prep.normalize(xg))
                z[good], sc[good] = zg.detach().float().cpu(), sg.detach().float().cpu()
            logits.append(z)
            scores.append(sc)
            errors.extend(errs)
            if bar is not None:
                bar.update(xb.shape[0])
        if bar is not None:
            bar.close()
        if not scores:
            raise ValueError("no images to predict")
        return torch.cat(logits), torch.cat(scores), errors

    def _warn_bh_size(self, m: int, fdr: float) -> None:
        """Benjamini-Hochberg flags a lone OOD image only when 1/(n+1) <= fdr/m: warn when n is below that."""
        n = int(self.calibration.numel())
        need = bh_min_calibration(m, fdr)
        if m and n < need:
            warnings.warn(f"fdr {fdr:g} over {m} images: with {n} calibration scores the smallest p-value is "
                          f"1/{n + 1}, above fdr/m = {fdr / m:.3g}, so Benjamini-Hochberg flags an image only when "
                          f"many are beyond every calibration score; to flag a lone OOD image it needs n + 1 >= "
                          f"m / fdr, i.e. {need} calibration images: score smaller batches (at most "
                          f"{max(1, math.floor(fdr * (n + 1) + 1e-9))} images) or recalibrate with more ID data",
                          stacklevel=3)

    def _class_name(self, i: int) -> str:
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)

    def _as_tensor(self, inputs, normalized: bool) -> torch.Tensor:
        from PIL import Image

        from ..data.datasets import to_mode

        if isinstance(inputs, Image.Image):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, Image.Image) for i in inputs):
            if normalized:
                raise ValueError("normalized=True applies to tensors, not PIL images")
            tf = self.preprocessing.pixel_transform()
            return torch.stack([tf(to_mode(img, self.preprocessing.mode)) for img in inputs])
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
            log=None, arg_names: dict | None = None, feature_store=None, ranks=None) -> "Detector":
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
            feature_store: a :class:`~ascood.scoring.store.FeatureStore` (or its folder) keeping each split's
                features across runs: a split stored under the same key (the checkpoint's sha256 for a run,
                else the model's state dict; the files; the preprocessing; the layer) is read, not run through
                the model. ``feature_dir`` then holds only the splits the store cannot key.
            log: a ``print``-like callable for progress lines (default: silent).
            arg_names: what messages call the data arguments and tpr (``{"id_val": "--id-val", ...}``, as the
                CLI passes its flags; default their own names).
            ranks: under torchrun, the :class:`~ascood.scoring.distributed.Ranks` of this process: every rank
                calls ``fit`` with the same arguments (and a ``feature_store`` they all see); each split's
                features are extracted once over all ranks and ODIN / i-ODIN score their images sharded
                (:mod:`ascood.scoring.distributed`), so every rank returns the detector one process would.

        Refused before any fitting (ValueError naming the arguments): calibration
        images the scorer's fit saw (``id_val`` or ``id_calibration`` overlapping
        ``id_train`` for a scorer fitted on it, ``id_calibration`` overlapping
        the tuning ``id_val``), ``ood_val`` overlapping the ID data, and fewer
        calibration images than ``tpr`` needs. Data the chosen scorer does not
        use (``id_train`` for msp, ``ood_val`` for a scorer without
        hyperparameters) gets a warning naming it.
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
        distributed = ranks is not None and ranks.enabled
        if distributed and feature_store is None:
            raise ValueError("fitting under torchrun needs feature_store, a folder every rank can read")
        device = ranks.device(resolve_device(device, "device")) if distributed else \
            torch.device(resolve_device(device, "device"))
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
        cal_ds = _as_dataset(id_calibration, prep, "id_calibration") if id_calibration is not None else None
        # Before any fitting: calibration images the fit saw, OOD = ID, too few calibration images for tpr.
        _check_roles({"id_train": id_train, "id_val": id_val, "ood_val": ood_val, "id_calibration": id_calibration},
                     {"id_train": train_ds, "id_val": val_ds, "ood_val": ood_ds, "id_calibration": cal_ds},
                     fits_on_train=train_ds is not None and any(_fits_on_train(s, True) for s in to_try),
                     tunes=tunes, tpr=tpr, calibration_fraction=calibration_fraction, names=arg_names or {})
        if not is_aps:
            for note in ignored_data_notes(to_try[0], id_train=id_train, ood_val=ood_val, names=arg_names):
                warnings.warn(note, stacklevel=2)
        if id_calibration is not None:
            tune_ds, calib_ds = val_ds, cal_ds
        elif tunes:
            tune_ds, calib_ds = _split(val_ds, calibration_fraction, seed)
        else:
            tune_ds, calib_ds = None, val_ds

        def loader(ds):
            return None if ds is None else torch.utils.data.DataLoader(_Calibrated(ds), batch_size=batch_size,
                                                                        shuffle=False, num_workers=workers)

        train_l, tune_l, calib_l, ood_l = loader(train_ds), loader(tune_ds), loader(calib_ds), loader(ood_ds)
        cache = _feature_cache(model, feature_store, provenance, feature_dir, ranks if distributed else None)
        input_std = model_input_std(model) or prep.std
        t0 = time.perf_counter()
        if is_aps:
            fitted, choice = _choose_by_aps(to_try, input_std, model, tune_l, ood_l, train_l, cache, say)
        else:
            fitted, choice = _fit_named(scorer, input_std, model, tune_l, ood_l, train_l, cache, say)
        fit_seconds = time.perf_counter() - t0
        choice.update({"scorer": fitted.name, "params": _public_params(fitted)})

        if distributed:
            say(cache.summary())  # collective: every rank calls it
        used_train = _fits_on_train(fitted, True)
        calib_scores, calib_labels, calib_pred = _scores_of(model, fitted, calib_l, cache)
        det = cls(model, fitted, prep, names, calib_scores, tpr, provenance)
        det.validation = _validation_summary(det, calib_labels, calib_pred, ood_l, fit_seconds, cache)
        det.provenance.update({
            "scorer_choice": choice,
            # Only the data the scorer used: an id_train that msp ignored is not listed as its statistics' source.
            "data": {"id_train": _describe(id_train) if used_train else None, "id_val": _describe(id_val),
                     "ood_val": _describe(ood_val), "id_calibration": _describe(id_calibration),
                     "n_id_train": len(train_ds) if train_ds and used_train else None,
                     "n_tune": len(tune_ds) if tune_ds is not None else 0, "n_calibration": len(calib_ds),
                     "calibration_fraction": None if (id_calibration is not None or not tunes)
                     else calibration_fraction, "split_seed": seed},
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        })
        return det

    # -- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, bank_dtype: str = "float32") -> str:
        """Write the artifact directory (:mod:`.artifact`), claiming it first; returns the path.

        ``path`` must be a new folder, an empty one, or an earlier detector, which is replaced as one unit
        (a sibling temporary folder is written, then swapped in); any other existing folder or a file is
        refused with a ValueError naming ``path``, before anything is written.

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


# -- the data's roles -----------------------------------------------------------------------------------------
#: The API's names of the data arguments (the CLI passes its flags instead).
DATA_NAMES = {"id_train": "id_train", "id_val": "id_val", "ood_val": "ood_val", "id_calibration": "id_calibration",
              "tpr": "tpr"}


def _scorer_probe(scorer) -> Scorer | None:
    """The named scorer (unfitted), or None for "aps"."""
    if isinstance(scorer, str):
        return None if scorer.lower() == "aps" else get_scorer(scorer)
    return scorer


def _fits_on_train(scorer, has_train: bool) -> bool:
    """Whether the scorer (or, for APS, some candidate) fits statistics on id_train."""
    probe = _scorer_probe(scorer)
    if probe is None:
        return has_train  # APS tries knn, mds, vim, ... when id_train is given
    return bool(probe.needs_fit and probe.fit_split == "train")


def _tunes(scorer, has_ood: bool) -> bool:
    """Whether id_val must give a tuning part (APS with ood_val, or a scorer fitted on ID validation data)."""
    probe = _scorer_probe(scorer)
    return has_ood or probe is None or bool(probe.needs_fit and probe.fit_split == "val")


def _files_of(ds) -> list[str] | None:
    """The image files of a dataset (folders, flat folders, lists, their Subsets), or None when it has none."""
    if isinstance(ds, torch.utils.data.Subset):
        inner = _files_of(ds.dataset)
        return None if inner is None else [inner[i] for i in ds.indices]
    samples = getattr(ds, "samples", None) or getattr(ds, "paths", None)
    if not samples:
        return None
    folders: dict[str, str] = {}  # realpath once per folder, not per file (ImageNet: 1000 folders, 1.28M files)

    def real(path: str) -> str:
        head, tail = os.path.split(path)
        if head not in folders:
            folders[head] = os.path.realpath(head)
        return os.path.join(folders[head], tail)

    return [real(s[0] if isinstance(s, (tuple, list)) else s) for s in samples]


def _same_data(a, ds_a, b, ds_b) -> str | None:
    """How two data arguments overlap ("the same folder", "N shared images (first: X)"), or None."""
    if a is None or b is None:
        return None
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        if os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b)):
            return "the same data"
    elif a is b:
        return "the same object"
    fa, fb = _files_of(ds_a), _files_of(ds_b)
    if fa is None or fb is None:
        return None
    shared = sorted(set(fa) & set(fb))
    if not shared:
        return None
    return f"{len(shared)} shared image(s) (first: {shared[0]})"


def _check_roles(data: dict, datasets: dict, *, fits_on_train: bool, tunes: bool, tpr: float,
                 calibration_fraction: float, names: dict) -> None:
    """ValueError when data roles overlap (calibration must be unseen by every fit) or calibration is too small."""
    n = {**DATA_NAMES, **(names or {})}
    train, val, ood, cal = (data.get(k) for k in ("id_train", "id_val", "ood_val", "id_calibration"))
    dtrain, dval, dood, dcal = (datasets.get(k) for k in ("id_train", "id_val", "ood_val", "id_calibration"))
    calib_name = n["id_calibration"] if cal is not None else n["id_val"]
    if fits_on_train:
        for name, other, dother in ((n["id_val"], val, dval), (n["id_calibration"], cal, dcal)):
            how = _same_data(train, dtrain, other, dother)
            if how:
                raise ValueError(f"{name} and {n['id_train']} are {how}: the scorer fits its statistics on "
                                 f"{n['id_train']}, so scores of those images are biased (a KNN's distance to "
                                 f"itself is 0) and the calibrated threshold has no guarantee; use ID images the "
                                 f"scorer never saw for {name}")
    how = _same_data(val, dval, cal, dcal)
    if how:
        raise ValueError(f"{n['id_calibration']} and {n['id_val']} are {how}: {n['id_val']} tunes the scorer, so "
                         f"{n['id_calibration']} must be images it never saw")
    for name, other, dother in ((n["id_val"], val, dval), (n["id_calibration"], cal, dcal)):
        how = _same_data(ood, dood, other, dother)
        if how:
            raise ValueError(f"{n['ood_val']} and {name} are {how}: OOD validation data must be other images than "
                             "the ID data (APS would compare a set with itself)")
    if dcal is not None:
        n_cal = len(dcal)
    elif tunes:
        n_cal = int(round(len(dval) * calibration_fraction))
    else:
        n_cal = len(dval)
    need = min_calibration_size(tpr)
    if n_cal < need:
        split = (f" ({len(dval)} images, {calibration_fraction:g} of them kept for calibration)"
                 if dcal is None and tunes else "")
        raise ValueError(f"{calib_name} gives {n_cal} calibration image(s){split}: too few for {n['tpr']} {tpr} "
                         f"(the conformal rule needs at least {need} to flag anything; more is better); "
                         f"pass more ID validation images or a lower {n['tpr']}")


def check_fit_data(*, id_train=None, id_val, ood_val=None, id_calibration=None, scorer="aps", tpr: float = 0.95,
                   calibration_fraction: float = 0.5, names: dict | None = None) -> None:
    """The data checks of :meth:`Detector.fit`, before any model is loaded: calibration images that the
    scorer's fit saw (id_val or id_calibration overlapping id_train for scorers fitted on it, id_calibration
    overlapping the tuning id_val), ood_val overlapping the ID data, and too few calibration images for
    ``tpr``. ValueError naming the arguments (``names`` maps them to, e.g., the CLI's flags)."""
    data = {"id_train": id_train, "id_val": id_val, "ood_val": ood_val, "id_calibration": id_calibration}
    datasets = {k: _listing(v, k) for k, v in data.items() if v is not None}
    _check_roles(data, datasets, fits_on_train=id_train is not None and _fits_on_train(scorer, True),
                 tunes=_tunes(scorer, ood_val is not None), tpr=check_tpr(tpr),
                 calibration_fraction=calibration_fraction, names=names or {})


def _listing(data, what: str):
    """A dataset of ``data`` for counting and comparing files only (paths are listed, no image is read)."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.exists(path):
            raise DataError(f"{what} not found: {path}")
        return dataset_from_path(path, None, train=False)
    return _as_dataset(data, None, what)


def ignored_data_notes(scorer, *, id_train=None, ood_val=None, names: dict | None = None) -> list[str]:
    """One line per data argument the chosen scorer does not use (id_train for a scorer that fits nothing on it;
    ood_val for a scorer with no hyperparameters for APS to choose)."""
    n = {**DATA_NAMES, **(names or {})}
    probe = _scorer_probe(scorer)
    if probe is None:
        return []
    notes = []
    if id_train is not None and not _fits_on_train(probe, True):
        notes.append(f"{n['id_train']} is not used: scorer {probe.name} fits no statistics on ID training data")
    if ood_val is not None and probe.grid() == [{}]:
        notes.append(f"{n['ood_val']}: scorer {probe.name} has no hyperparameters for APS to choose, so "
                     f"{n['ood_val']} only gives validation numbers (and still splits {n['id_val']} into tuning and "
                     f"calibration parts); leave it out to calibrate on all of {n['id_val']}")
    return notes


# -- helpers --------------------------------------------------------------------------------------------------
def _score_batch(model: nn.Module, scorer: Scorer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, C), score (B,)) of normalised images x: the scorers' own code, as ``ascood eval`` runs it."""
    if scorer.supports_features and not scorer.record_extras():
        with torch.no_grad():
            if scorer.uses_features:
                z, h = model_features(model, x, "raw")
                head = LinearHead.from_model(model)
            else:
                z, h, head = model(x).float(), None, None
            return z, scorer.score_features(z, h, head=head)
    # Input-gradient scorers (ODIN, i-ODIN, MDS with eps > 0) and those reading a perturbed input (AdaSCALE).
    _, score = scorer.score(model, x)
    with torch.no_grad():
        return model(x).float(), score


def _scores_of(model, scorer, loader, cache: FeatureCache | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(scores (N,) float32, labels (N,) or None, predicted class (N,)) over a loader through :func:`_score_batch`,
    or, for a feature scorer with a feature store, from the split's stored features (the same scorer code on
    the same logits and features, no model forward)."""
    from ..scoring.store import StoreFeatureCache

    if isinstance(cache, StoreFeatureCache) and scorer.supports_features:
        pred, score, labels = loader_scores(scorer, model, loader, cache)
        return score, labels, pred
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


def _validation_summary(det: "Detector", calib_labels, calib_pred, ood_l, fit_seconds: float,
                        cache: FeatureCache | None = None) -> dict:
    """The numbers the model card shows: the calibration set's TPR and accuracy, and ood_val's FPR / AUROC."""
    calib = det.calibration
    out = {"n_calibration": int(calib.numel()), "tpr_target": det.tpr, "threshold": det.threshold,
           "calibration_tpr": float((calib >= det.threshold).double().mean()), "fit_seconds": round(fit_seconds, 3)}
    if calib_labels is not None and bool((calib_labels >= 0).all()):
        out["calibration_accuracy"] = float((calib_pred == calib_labels).double().mean())
    if ood_l is not None:
        ood_scores, _, _ = _scores_of(det.model, det.scorer, ood_l, cache)
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


def _feature_cache(model, feature_store, provenance: dict, feature_dir, ranks=None) -> FeatureCache:
    """The fit's FeatureCache: in RAM / ``feature_dir``, or backed by ``feature_store`` (a FeatureStore or a path);
    under torchrun (``ranks``) one whose extraction and scoring are shared over the ranks."""
    directory = None if feature_dir is None else os.fspath(feature_dir)
    if feature_store is None:
        return FeatureCache(model, directory=directory)
    from ..scoring.store import FeatureStore, StoreFeatureCache

    store = feature_store if isinstance(feature_store, FeatureStore) else FeatureStore(os.fspath(feature_store))
    if ranks is not None:
        from ..scoring.distributed import ShardedFeatureCache

        return ShardedFeatureCache(model, store, ranks, checkpoint=provenance.get("checkpoint"))
    return StoreFeatureCache(model, store, checkpoint=provenance.get("checkpoint"), directory=directory)


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
