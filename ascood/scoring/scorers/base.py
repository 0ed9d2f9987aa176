"""Scorer protocol shared by the post-hoc scorers: one implementation on features, two ways in.

Every scorer maps model outputs to a score (N,) float32 where **higher means
more in-distribution**, and can be used two ways:

* on cached features (pytorch-ood's ``fit_features`` / ``predict_features``
  style): ``fit_features(features, labels, logits=..., head=...)`` or
  ``fit_features(record)`` with a :class:`~.features.Features` record, then
  ``score_features(logits (B, C), features (B, m), head=None) -> (B,)``;
* on a model: ``fit(model, loader)`` and ``score(model, x) -> (pred, score)``,
  which run the model and call the two methods above (one implementation).
  pred (B,) int64 is the model's predicted class (argmax of its own logits,
  so ID accuracy is the model's whatever the scorer; ODIN and i-ODIN report
  the argmax on their perturbed input, as the reference, and DICE with
  ``pred="masked"`` its masked head's; :meth:`Scorer.predict_features`).

Scorers that need the input itself (``needs_input``: ODIN, i-ODIN, MDS with
input preprocessing) perturb images with input gradients; they score only
through ``score(model, x)`` and say so when given cached features.

Scorers that read more than logits and features of the clean input (AdaSCALE:
the features of a perturbed input) declare it in :meth:`Scorer.record_extras`:
the record then carries those arrays (``Features.extras``, extracted once per
split by :func:`~.features.extract_features` / :class:`~.features.FeatureCache`)
and ``score_features`` takes them as ``extras={key: (B, ...)}``.

Scorers that need ID statistics (``needs_fit``) read them in row chunks
(``chunk_rows``) from a record, a memory-mapped feature file or, for the
one-pass statistics (``streams_fit``), straight from a loader; see each
scorer's docstring for its memory bound.

Feature-based scorers use ``feature_space``:

* ``"raw"`` (default, as the authors' code): the backbone's raw feature h, and
  the linear layer applied directly to it (``fc(h)``) wherever a scorer
  reshapes features (ReAct, ASH, SCALE, DICE) or needs the head's weights
  (ViM). For an ASCOOD model this bypasses the z-score: SCALE's rescaling
  would otherwise be undone by the standardisation.
* ``"head"``: the vector the linear layer sees in the model (h~ for the
  z-score head), so fc(feature) are exactly the model's logits.
"""
from __future__ import annotations

import itertools
import numbers
import warnings

import torch
from torch import nn

from .fastops import all_finite, argmax_rows
from .features import (Features, LinearHead, StreamedFeatures, as_features, energy, extract_features,
                       iterate_loader, model_device, model_features)

__all__ = ["Scorer", "FeatureScorer", "model_features", "iterate_loader", "energy", "model_device", "check_int",
           "warn_once"]

#: Causes already warned about in this process (see :func:`warn_once`).
_WARNED: set = set()


def warn_once(cause, message: str, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` the first time ``cause`` (a hashable key) is seen in this process.

    Why not Python's own "once per location" filter: any ``warnings.catch_warnings()`` block (torch opens
    them while loading and exporting) resets it, so a demo fitting 27 networks printed the same capped-K
    note 27 times. The key names the cause (e.g. scorer and K), so another cause still warns.
    """
    if cause in _WARNED:
        return
    _WARNED.add(cause)
    warnings.warn(message, stacklevel=stacklevel)


def check_int(owner: str, name: str, value, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    """``value`` as a Python int: ints and numpy integers pass, bools, floats and strings are refused.

    The one validator of every integer hyperparameter (KNN's K, GEN's M, ViM's dim, ...). ``owner`` and
    ``name`` make the message ("knn K must be an integer >= 1, got True"). Returns int(value) (so a
    numpy integer becomes a plain int, which JSON outputs such as APS results can write).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        want = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if allow_none else "")
        raise ValueError(f"{owner} {name} must be {want}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner} {name} must be an integer >= {minimum}, got {value}")
    return value


def _first_nonfinite(a: torch.Tensor) -> int | None:
    """Index of the first row of a (b, k) tensor holding NaN or inf, or None. One sum over the block proves
    it finite (:func:`~.fastops.all_finite`, 20x cheaper than isfinite per element); only a block that
    fails it is searched element by element."""
    if all_finite(a):
        return None
    bad = ~torch.isfinite(a)
    if not bool(bad.any()):
        return None
    return int(bad.reshape(a.shape[0], -1).any(1).nonzero()[0])


class Scorer:
    """Base class: override :meth:`_score` (and :meth:`_fit` when ``needs_fit``).

    ``default_grid`` lists the hyperparameter values the APS sweep
    (:func:`ascood.scoring.scorers.sweep`) tries (empty: not searched, as in the
    authors' configs for MSP, MLS, MDS, RMDS, TempScale, NNGuide);
    ``param_names`` the hyperparameters :meth:`get_params` reports (default:
    the grid's keys); ``refit_params`` those whose change invalidates fitted
    statistics. ``fit_split`` is the ID split :meth:`fit` is run on, as in
    OpenOOD: "train" (KNN, MDS, ...) or "val" (ReAct's clip percentile,
    TempScale's T, KL-Matching's typical posteriors); see :meth:`fit_loader`.

    ``uses_features``: the scorer reads the feature vectors (else the logits
    alone); ``needs_input``: it can only score images (input gradients);
    ``streams_fit``: its fit is one pass of running statistics, so
    :meth:`fit` streams the loader without storing features;
    ``uses_labels``: its fit reads the ID classes.

    Every fit path (``fit(model, loader)``, streamed or extracted, and
    ``fit_features`` of in-RAM or memory-mapped records) refuses the same bad
    data with the same message: an empty fit set, NaN / inf in the logits or
    features it reads (the first bad row counted over the whole set), and,
    where ``uses_labels``, a label outside the model's classes [0, C). A
    degenerate fit is refused when its result would be meaningless and
    warned about, once per cause (:func:`warn_once`), when merely weak; each
    scorer's docstring says which. Integer hyperparameters go through
    :func:`check_int` (numpy integers accepted, bools refused).
    """

    name: str = "scorer"
    needs_fit: bool = False
    default_grid: dict[str, list] = {}
    param_names: tuple[str, ...] = ()
    refit_params: tuple[str, ...] = ()
    fit_split: str = "train"
    uses_features: bool = False
    needs_input: bool = False
    streams_fit: bool = False
    #: The fit reads the class labels (MDS, RMDS, SHE, TempScale): they are checked against the classes.
    uses_labels: bool = False
    #: Rows per chunk when a fit reads a feature record (bounds a fit's working memory).
    chunk_rows: int = 8192

    def __init__(self) -> None:
        self.fitted = False
        self.head: LinearHead | None = None

    # hyperparameters ---------------------------------------------------------------------------
    def get_params(self) -> dict:
        """Current hyperparameters (``param_names``, else the keys of ``default_grid``)."""
        return {k: getattr(self, k) for k in (self.param_names or tuple(self.default_grid))}

    def set_params(self, **params) -> "Scorer":
        """Set hyperparameters; a change of a ``refit_params`` entry marks the scorer unfitted."""
        for k, v in params.items():
            if k not in self.default_grid and not hasattr(self, k):
                raise ValueError(f"{self.name} has no hyperparameter {k!r}")
            if k in self.refit_params and getattr(self, k, None) != v:
                self.fitted = False
            setattr(self, k, v)
        self._validate()
        return self

    def _validate(self) -> None:
        """Raise ValueError for out-of-range hyperparameters (overridden per scorer)."""

    def grid(self) -> list[dict]:
        """All combinations of ``default_grid`` as dicts."""
        keys = list(self.default_grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.default_grid[k] for k in keys))]

    def record_extras(self) -> tuple:
        """The :class:`~.features.RecordExtra` s this scorer reads beside logits and features (their keys
        follow the current hyperparameters); () for all but AdaSCALE."""
        return ()

    # the feature-level API ---------------------------------------------------------------------------
    @property
    def supports_features(self) -> bool:
        """Whether :meth:`score_features` works (False for input-gradient scorers and score()-only subclasses)."""
        return not self.needs_input and type(self)._score is not Scorer._score

    def fit_features(self, data=None, labels: torch.Tensor | None = None, *, logits: torch.Tensor | None = None,
                     head: LinearHead | None = None) -> "Scorer":
        """Fit from cached outputs: a :class:`~.features.Features` record, or features (N, m) float32,
        labels (N,) int64, logits (N, C) float32 and the model's :class:`~.features.LinearHead`
        (each only where the scorer needs it; a ValueError names a missing one). Returns self."""
        feats = as_features(data, labels, logits=logits, head=head)
        if feats.head is not None:
            self.head = feats.head  # the default head of later score_features calls
        if self.needs_fit:
            if isinstance(feats, Features):
                self._check_fit_data(feats)
            else:  # a loader stream: each batch is checked as it arrives
                feats = feats.checked(self.name, self._check_chunk)
            self._fit(feats)
        self._fit_widths = _widths(feats)
        self.fitted = True
        return self

    def _check_fit_data(self, feats: Features) -> None:
        """Refuse an empty fit set, NaN / inf in the in-RAM arrays the fit reads (one NaN row makes every
        KNN distance or class mean NaN, and every score with it) and, for scorers that read labels, a label
        outside the model's classes. Checked in row blocks of views (no copy); memory-mapped arrays are
        checked from the first non-finite row :func:`extract_features` / :meth:`Features.save` recorded
        while writing them (never read twice for it)."""
        if len(feats) == 0:
            raise ValueError(f"{self.name}: the fit set is empty (0 rows)")
        for what in self._checked_arrays():
            a = getattr(feats, what)
            if a is None:
                continue
            if not torch.is_tensor(a):
                row = (getattr(feats, "nonfinite", None) or {}).get(what)
                if row is not None:
                    self._refuse_nonfinite(what, row)
                continue
            for start in range(0, a.shape[0], 65536):
                row = _first_nonfinite(a[start:start + 65536])
                if row is not None:
                    self._refuse_nonfinite(what, start + row)
        if self.uses_labels and feats.labels is not None:
            self._check_labels(feats.labels, 0, _num_classes(feats.logits, feats.head))

    def _checked_arrays(self) -> tuple[str, ...]:
        return ("logits", "features") if self.uses_features else ("logits",)

    def _refuse_nonfinite(self, what: str, row: int) -> None:
        raise ValueError(f"{self.name}: the fit set's {what} hold NaN or inf (first at row {row}): "
                         "the model's outputs on that data are not finite")

    def _check_labels(self, y: torch.Tensor, start: int, classes: int | None) -> None:
        """Labels are class indices in [0, classes) (``classes`` None: only >= 0 is known)."""
        bad = (y < 0) if classes is None else (y < 0) | (y >= classes)
        if not bool(bad.any()):
            return
        i = int(bad.nonzero()[0])
        value = int(y[i])
        if value < 0:
            raise ValueError(f"{self.name}: label {value} at row {start + i} is not a class index: the fit needs "
                             "the ID class of every row (-1 marks an unlabelled or OOD image)")
        raise ValueError(f"{self.name}: label {value} at row {start + i} is outside the model's {classes} classes "
                         f"[0, {classes}) (labels of another class list, or 1-based?)")

    def _check_chunk(self, start: int, z: torch.Tensor | None, h: torch.Tensor | None, y: torch.Tensor | None,
                     head: LinearHead | None) -> None:
        """One streamed batch (already in memory) at global row ``start``: the checks of
        :meth:`_check_fit_data`, one isfinite per array."""
        for what, a in (("logits", z), ("features", h)):
            if a is not None and what in self._checked_arrays():
                row = _first_nonfinite(a)
                if row is not None:
                    self._refuse_nonfinite(what, start + row)
        if self.uses_labels and y is not None:
            self._check_labels(y, start, _num_classes(z, head))

    def score_features(self, logits: torch.Tensor, features: torch.Tensor | None = None,
                       head: LinearHead | None = None, extras: dict | None = None) -> torch.Tensor:
        """Scores (B,) float32 of cached outputs: logits (B, C), the raw features (B, m) where the
        scorer uses them, and the model's head where it needs one (default: the head seen at fit);
        ``extras`` {key: (B, ...)} the arrays of :meth:`record_extras` (ignored by scorers without)."""
        if self.needs_input:
            raise TypeError(f"{self.name} perturbs the input along its gradient: it needs the model and the "
                            "images (score(model, x)) and cannot score cached features")
        if not self.supports_features:
            raise TypeError(f"{type(self).__name__} implements score(model, x) only")
        self._check_fitted()
        if self.uses_features and features is None:
            raise ValueError(f"{self.name} needs features (B, m), the model's raw feature")
        if logits is None:
            raise ValueError(f"{self.name} needs logits (B, C)")
        self._check_widths(logits, features)
        if head is not None and head.weight.shape[0] != logits.shape[1]:
            raise ValueError(f"{self.name}: head has {head.weight.shape[0]} rows (classes), the logits have "
                             f"C = {logits.shape[1]} columns (the head of another model?)")
        args = (logits.float(), None if features is None else features.float(), head or self.head)
        keys = [e.key for e in self.record_extras()]
        if not keys:
            return self._score(*args)
        missing = [k for k in keys if k not in (extras or {})]
        if missing:
            raise ValueError(f"{self.name} needs extras={{key: (B, ...)}} with the keys {missing} (the record's "
                             "extras: extract_features(model, loader, extras=scorer.record_extras()))")
        ex = {}
        for k in keys:
            a = extras[k]
            if not torch.is_tensor(a) or a.dim() < 1 or a.shape[0] != logits.shape[0]:
                raise ValueError(f"{self.name}: extras[{k!r}] must be a (B, ...) tensor with the logits' "
                                 f"B = {logits.shape[0]} rows, got {getattr(a, 'shape', type(a).__name__)}")
            ex[k] = a.float()
        return self._score(*args, extras=ex)

    def _check_widths(self, logits: torch.Tensor, features: torch.Tensor | None) -> None:
        """Shapes of score_features' inputs, and their widths against those the scorer was fitted on."""
        if logits.dim() != 2:
            raise ValueError(f"{self.name}: logits must be (B, C), got shape {tuple(logits.shape)}")
        if features is not None and (features.dim() != 2 or features.shape[0] != logits.shape[0]):
            raise ValueError(f"{self.name}: features must be (B, m) with the logits' B = {logits.shape[0]} rows, "
                             f"got shape {tuple(features.shape)}")
        fitted = getattr(self, "_fit_widths", None) or {}
        for what, a in (("logits", logits), ("features", features if self.uses_features else None)):
            if a is not None and what in fitted and a.shape[1] != fitted[what]:
                raise ValueError(f"{self.name}: {what} have {a.shape[1]} columns, the scorer was fitted on "
                                 f"{fitted[what]} (another model or feature layer?)")

    def predict_features(self, logits: torch.Tensor, features: torch.Tensor | None = None,
                         head: LinearHead | None = None) -> torch.Tensor:
        """The class (B,) int64 the scorer reports for cached outputs (evaluate's ``scorer_id_acc``): the model's
        argmax of ``logits`` (B, C), unless a scorer predicts otherwise (DICE with ``pred="masked"``)."""
        return argmax_rows(logits)

    def _fit(self, feats) -> None:
        """Collect ID statistics from a record (``feats.chunks(rows)``); overridden by fitted scorers."""

    def _score(self, logits: torch.Tensor, features: torch.Tensor | None, head: LinearHead | None) -> torch.Tensor:
        raise NotImplementedError

    # the model path ----------------------------------------------------------------------------------
    def fit(self, model: nn.Module, id_train_loader) -> "Scorer":
        """Collect ID statistics from a loader through the model (one pass; no-op for scorers that need none)."""
        if not self.needs_fit:
            self.fitted = True
            return self
        if self.streams_fit:
            data = StreamedFeatures(model, id_train_loader, with_features=self.uses_features)
        else:
            data = extract_features(model, id_train_loader, with_features=self.uses_features,
                                    extras=self.record_extras())
        return self.fit_features(data)

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (B,) int64, score (B,) float32) of images x, higher score = more ID."""
        if not self.supports_features:
            raise NotImplementedError(f"{type(self).__name__} must implement score() or _score()")
        self._check_fitted()
        if self.uses_features:
            logits, h = model_features(model, x, "raw")
            head = LinearHead.from_model(model)
        else:
            logits, h, head = model(x).float(), None, None
        return self.predict_features(logits, h, head), self.score_features(logits, h, head=head)

    def fit_loader(self, id_train_loader=None, id_val_loader=None):
        """The loader :meth:`fit` runs on: ``id_val_loader`` when ``fit_split == "val"``, else ``id_train_loader``.

        Raises ValueError naming the scorer and the missing argument.
        """
        if self.fit_split == "val":
            if id_val_loader is None:
                raise ValueError(f"scorer {self.name!r} is fitted on ID validation data (as OpenOOD): "
                                 "pass id_val_loader")
            return id_val_loader
        if id_train_loader is None:
            raise ValueError(f"scorer {self.name!r} needs id_train_loader (it fits ID training statistics)")
        return id_train_loader

    def _check_fitted(self) -> None:
        if self.needs_fit and not self.fitted:
            raise RuntimeError(f"{self.name}: call fit(model, loader) or fit_features(...) before scoring")

    def _need_head(self, head: LinearHead | None) -> LinearHead:
        if head is None:
            raise ValueError(f"{self.name} needs the model's linear head: pass head=LinearHead(fc.weight, fc.bias) "
                             "(or LinearHead.from_model(model)), or fit/score through the model")
        return head

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def _num_classes(logits, head: LinearHead | None) -> int | None:
    """The model's number of classes C: the logits' width, else the head's rows, else None (unknown)."""
    if logits is not None:
        return int(logits.shape[1])
    return int(head.weight.shape[0]) if head is not None else None


def _widths(feats) -> dict[str, int]:
    """The logits' and features' widths a fit saw (from the arrays, else the head); {} when unknown."""
    out = {}
    for what in ("logits", "features"):
        a = getattr(feats, what, None)
        if a is not None:
            out[what] = int(a.shape[1])
    head = getattr(feats, "head", None)
    if head is not None:
        out.setdefault("logits", int(head.weight.shape[0]))
        out.setdefault("features", int(head.weight.shape[1]))
    return out


class FeatureScorer(Scorer):
    """A scorer that reads features (see the module docstring for ``feature_space``)."""

    uses_features = True

    def __init__(self, feature_space: str = "raw") -> None:
        super().__init__()
        if feature_space not in ("raw", "head"):
            raise ValueError(f"feature_space must be 'raw' or 'head', got {feature_space!r}")
        self.feature_space = feature_space

    def in_space(self, h: torch.Tensor, head: LinearHead | None) -> torch.Tensor:
        """Raw features (B, m) -> the scorer's feature space (the head's standardisation for "head")."""
        if self.feature_space == "raw":
            return h
        if head is None:
            raise ValueError(f"{self.name} with feature_space='head' needs the model's head (its standardisation): "
                             "pass head=LinearHead(fc.weight, fc.bias, standardize) or use extract_features")
        return head.to_space(h, "head")

    def space_chunks(self, feats, rows: int | None = None):
        """(logits, features in the scorer's space, labels) per chunk of a record."""
        feats.require("features", self.name)
        for z, h, y in feats.chunks(rows or self.chunk_rows):
            yield z, self.in_space(h, feats.head), y
