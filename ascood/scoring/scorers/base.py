"""Scorer protocol and feature helpers shared by the post-hoc scorers.

A scorer maps a batch x (B, C, H, W) to ``(pred, score)``: pred (B,) int64 is
the model's predicted class (argmax of its own logits, so ID accuracy is the
model's whatever the scorer; ODIN and i-ODIN report the argmax on their
perturbed input, as the reference), score (B,) float32 is a confidence where
**higher means more in-distribution**. Scorers that need ID statistics
(``needs_fit``) get them from ``fit(model, id_train_loader)``, which streams
the loader batch by batch and keeps statistics on the CPU (a large train set's
features never sit on the GPU all at once).

Feature-based scorers use ``feature_space``:

* ``"raw"`` (default, as the authors' code): the backbone's raw feature h, and
  the linear layer applied directly to it (``fc(h)``) wherever a scorer
  reshapes features (ReAct, ASH, SCALE) or needs the head's weights (ViM).
  For an ASCOOD model this bypasses the z-score: SCALE's rescaling would
  otherwise be undone by the standardisation.
* ``"head"``: the vector the linear layer sees in the model (h~ for the
  z-score head), so fc(feature) are exactly the model's logits.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch import nn

from ...data.datasets import unpack_batch

__all__ = ["Scorer", "FeatureScorer", "model_features", "iterate_loader", "energy"]


def iterate_loader(loader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x on device, y on CPU) per batch of a (x, y) / {"data", "label"} loader."""
    for batch in loader:
        x, y = unpack_batch(batch) if isinstance(batch, (dict, list, tuple)) else (batch, None)
        yield x.to(device), (torch.as_tensor(y) if y is not None else None)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T * logsumexp(z / T) per row, (B, C) -> (B,) (negative free energy; higher = more ID)."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def model_features(model: nn.Module, x: torch.Tensor, space: str = "raw") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), feature (B, m)) of ``model`` on x; feature per ``space`` ("raw" or "head").

    Needs a model with ``features(x)`` and ``head(h)`` (an
    :class:`~ascood.nets.ASCOODNet`); ``standardize`` is used for "head".
    """
    if not (hasattr(model, "features") and hasattr(model, "head") and hasattr(model, "fc")):
        raise TypeError("feature-based scorers need a model with features(x), head(h) and fc "
                        "(e.g. ascood.ASCOODNet)")
    h = model.features(x)
    logits = model.head(h)
    if space == "head":
        h = model.standardize(h) if hasattr(model, "standardize") else h
    elif space != "raw":
        raise ValueError(f"feature_space must be 'raw' or 'head', got {space!r}")
    return logits.float(), h.float()


class Scorer:
    """Base class: override :meth:`score` (and :meth:`fit` when ``needs_fit``).

    ``default_grid`` lists the hyperparameter values the APS sweep
    (:func:`ascood.scoring.scorers.sweep`) tries (empty: not searched, as in the
    authors' configs for MSP, MLS, MDS, RMDS, TempScale, NNGuide);
    ``param_names`` the hyperparameters :meth:`get_params` reports (default:
    the grid's keys); ``refit_params`` those whose change invalidates fitted
    statistics. ``fit_split`` is the ID split :meth:`fit` is run on, as in
    OpenOOD: "train" (KNN, MDS, ...) or "val" (ReAct's clip percentile,
    TempScale's T); see :meth:`fit_loader`.
    """

    name: str = "scorer"
    needs_fit: bool = False
    default_grid: dict[str, list] = {}
    param_names: tuple[str, ...] = ()
    refit_params: tuple[str, ...] = ()
    fit_split: str = "train"

    def __init__(self) -> None:
        self.fitted = False

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

    # protocol ----------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, id_train_loader) -> "Scorer":
        """Collect ID statistics (no-op for scorers that need none)."""
        self.fitted = True
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (B,) int64, score (B,) float32), higher score = more ID."""
        raise NotImplementedError

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
            raise RuntimeError(f"{self.name}: call fit(model, id_train_loader) before score()")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


class FeatureScorer(Scorer):
    """A scorer that works on features (see the module docstring for ``feature_space``)."""

    def __init__(self, feature_space: str = "raw") -> None:
        super().__init__()
        if feature_space not in ("raw", "head"):
            raise ValueError(f"feature_space must be 'raw' or 'head', got {feature_space!r}")
        self.feature_space = feature_space

    def fitted_features(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of a batch, after checking that ``fit`` ran."""
        self._check_fitted()
        return model_features(model, x, self.feature_space)

    @torch.no_grad()
    def collect(self, model: nn.Module, loader) -> dict[str, torch.Tensor]:
        """Stream ``loader`` once: CPU tensors "feature" (N, m), "logits" (N, K), "label" (N,)."""
        device = model_device(model)
        feats, logits, labels = [], [], []
        for x, y in iterate_loader(loader, device):
            z, h = model_features(model, x, self.feature_space)
            feats.append(h.cpu())
            logits.append(z.cpu())
            if y is not None:
                labels.append(y.long().cpu())
        if not feats:
            raise ValueError(f"{self.name}: id_train_loader is empty")
        out = {"feature": torch.cat(feats), "logits": torch.cat(logits)}
        if labels:
            out["label"] = torch.cat(labels)
        return out
