"""Activation-shaping scorers on the feature h (B, m): ReAct, ASH, SCALE, and DICE (weight sparsification).

ReAct, ASH and SCALE reshape h, apply the linear head and score the energy
logsumexp(fc(h_shaped)). With ``feature_space="raw"`` (default, the authors'
way) fc is applied directly to the shaped raw h; with ``standardize=True``
the shaped h goes through the model's full head (z-score then fc) instead.
The feature is assumed non-negative (post-ReLU), as the methods do. They need
the model's head (:class:`~.features.LinearHead`): from the model, from a
:class:`~.features.Features` record, or passed as ``head=``.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import FeatureScorer, energy
from .fastops import top_values

__all__ = ["ReAct", "ASH", "SCALE", "DICE", "top_k_count"]

_PERCENTILE_GRID = [65, 70, 75, 80, 85, 90, 95]  # benchmarks.md: SCALE / ASH


def top_k_count(m: int, percentile: float) -> int:
    """Number of kept activations: m - round(m * percentile / 100), at least 1."""
    return max(1, m - int(np.round(m * percentile / 100.0)))


class _Shaping(FeatureScorer):
    def __init__(self, percentile: float, standardize: bool = False) -> None:
        super().__init__("raw")
        self.percentile = percentile
        self.standardize = standardize
        self._validate()

    def _validate(self) -> None:
        if not 0 <= self.percentile < 100:
            raise ValueError(f"{self.name} percentile must be in [0, 100), got {self.percentile}")

    def _shape(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, logits, h, head):
        head = self._need_head(head)
        shaped = self._shape(h)
        return energy(head.logits(shaped) if self.standardize else head.fc(shaped))


class ReAct(_Shaping):
    """ReAct: clip h at the ``percentile``-th percentile of all ID activations (default 90).

    The activations are collected on the ID validation split, as OpenOOD
    (``fit_split = "val"``: the evaluator passes its ``id_val_loader``). The
    clip value is computed once per percentile and kept (:attr:`threshold`;
    the APS grid's percentiles each cost one ``np.percentile``, and scoring
    none). Fit memory: the activations, N*m float32 values up to
    ``max_values`` (2**25, 128 MiB); beyond, a fixed uniform sample of that
    many (with replacement, seed 0), read chunk by chunk.
    """

    name = "react"
    needs_fit = True
    fit_split = "val"
    default_grid = {"percentile": [85, 90, 95, 99]}
    max_values = 2 ** 25

    def __init__(self, percentile: float = 90, standardize: bool = False) -> None:
        super().__init__(percentile, standardize)
        self._activations: np.ndarray | None = None
        self._thresholds: dict[float, float] = {}

    def _fit(self, feats) -> None:
        feats.require("features", self.name)
        n, m = len(feats), feats.features.shape[1]
        total = n * m
        if total <= self.max_values:
            acts = torch.cat([h.reshape(-1) for _, h, _ in feats.chunks(self.chunk_rows)])
        else:
            flat = torch.randint(total, (self.max_values,), generator=torch.Generator().manual_seed(0)).sort().values
            parts, rows = [], self.chunk_rows
            for start in range(0, n, rows):
                lo, hi = torch.searchsorted(flat, torch.tensor([start * m, min(n, start + rows) * m]))
                if hi > lo:
                    parts.append(feats.feature_rows(start, min(n, start + rows)).reshape(-1)[flat[lo:hi] - start * m])
            acts = torch.cat(parts)
        self._activations = acts.numpy()
        self._thresholds = {}
        _ = self.threshold  # the current percentile's clip value: a fit's work, not the first scoring's

    def _percentile(self, percentile: float) -> float:
        """The clip value of one percentile (one pass over the stored activations)."""
        return float(np.percentile(self._activations, percentile))

    @property
    def threshold(self) -> float:
        """Clip value of the current ``percentile``, computed on first use and cached per percentile."""
        if self._activations is None:
            raise RuntimeError("react: call fit first")
        key = float(self.percentile)
        if key not in self._thresholds:
            self._thresholds[key] = self._percentile(key)
        return self._thresholds[key]

    def _shape(self, h: torch.Tensor) -> torch.Tensor:
        return h.clamp(max=self.threshold)


def _top_k_mask(h: torch.Tensor, k: int) -> torch.Tensor | None:
    """A float32 (B, m) mask, 1 on each row's k largest entries, when every row's k-th largest value is
    unique (then the kept set is the one ``h.topk(k)`` keeps); None when some row has a tie there (topk's
    choice among tied entries is its own) or h is not finite. Selection by numpy's introselect: 7x torch's topk on
    512 ReLU features (many tied zeros) here."""
    if h.device.type != "cpu" or h.dtype != torch.float32 or not 0 < k < h.shape[1]:
        return None
    if not bool(torch.isfinite(h.sum())):  # inf / NaN: a 0 * inf in the mask product would differ from topk's 0
        return None
    kth = top_values(h, k).amin(1, keepdim=True)  # the k-th largest value of each row
    keep = (h >= kth).float()
    if not bool((keep.sum(1) == k).all()):  # a tie at the k-th value (or NaN): not a unique set
        return None
    return keep


class ASH(_Shaping):
    """ASH on the pooled feature: keep the top (100 - percentile)% activations per sample.

    variant "b" (default, OpenOOD's): kept entries all set to sum(h) / k
    (binarised, sum preserved); "p": kept entries unchanged; "s": kept entries
    scaled by exp(sum(h) / sum(kept)). Others are zeroed.
    """

    name = "ash"
    default_grid = {"percentile": _PERCENTILE_GRID}

    def __init__(self, percentile: float = 90, variant: str = "b", standardize: bool = False) -> None:
        if variant not in ("b", "p", "s"):
            raise ValueError(f"ash variant must be 'b', 'p' or 's', got {variant!r}")
        self.variant = variant
        super().__init__(percentile, standardize)

    def _shape(self, h: torch.Tensor) -> torch.Tensor:
        k = top_k_count(h.shape[1], self.percentile)
        s1 = h.sum(1, keepdim=True)
        keep = _top_k_mask(h, k)
        if keep is None:  # a tie at the k-th value: topk's own choice of the tied entries, as before
            vals, idx = h.topk(k, dim=1)
            if self.variant == "b":
                vals = (s1 / k).expand_as(vals)
            elif self.variant == "s":
                vals = vals * torch.exp(s1 / vals.sum(1, keepdim=True))
            return torch.zeros_like(h).scatter_(1, idx, vals)
        if self.variant == "b":
            return keep.mul_(s1 / k)
        kept = keep.mul_(h)
        if self.variant == "s":
            kept *= torch.exp(s1 / kept.sum(1, keepdim=True))
        return kept


class SCALE(_Shaping):
    """SCALE: h * exp(sum(h) / sum(top-k of h)), k from ``percentile`` (default 85); no pruning."""

    name = "scale"
    default_grid = {"percentile": _PERCENTILE_GRID}

    def __init__(self, percentile: float = 85, standardize: bool = False) -> None:
        super().__init__(percentile, standardize)

    def _shape(self, h: torch.Tensor) -> torch.Tensor:
        k = top_k_count(h.shape[1], self.percentile)
        s1 = h.sum(1, keepdim=True)
        s2 = top_values(h, k).sum(1, keepdim=True)  # a sum: the k largest in any order
        return h * torch.exp(s1 / s2)


class DICE(FeatureScorer):
    """DICE (Sun & Li, ECCV 2022): energy of a sparsified last layer.

    contrib = mean ID-train feature (1, m) * W (C, m); the weights whose
    contribution is at or below the ``p``-th percentile of all C*m of them are
    zeroed (OpenOOD's ``np.percentile`` threshold and strict ``>``); score =
    logsumexp(h @ W_masked^T + b). ``p`` in percent, default 90 and APS grid
    {90} (OpenOOD's config; pytorch-ood takes the fraction p / 100). The mean
    is fitted on ID train (one streamed pass: (m,) float64); the mask is
    computed once per ``p`` from it, so the APS grid needs no refit. Features
    in ``feature_space`` ("raw": fc on the raw h, the package's convention).

    ``pred``, the class the scorer reports (``score(model, x)``'s pred, the
    evaluator's ``scorer_id_acc`` column): ``"model"`` (default) the model's
    argmax, as every other forward scorer, so ``scorer_id_acc`` equals
    ``id_acc`` (OpenOOD's ACC, the clean forward's) and the table hides the
    column; ``"masked"`` the argmax of the masked head, argmax(h @ W_masked^T
    + b), which OpenOOD's DICEPostprocessor returns as its pred: then
    ``scorer_id_acc`` is that head's accuracy (shown where it differs). The
    score is the same either way; a deployed Detector's label is always the
    model's (pred is not stored in detector artifacts).
    """

    name = "dice"
    needs_fit = True
    streams_fit = True
    default_grid = {"p": [90]}
    param_names = ("p", "pred")
    PREDS = ("model", "masked")

    def __init__(self, p: float = 90, feature_space: str = "raw", pred: str = "model") -> None:
        super().__init__(feature_space)
        self.p = p
        self.pred = pred
        self._validate()
        self._masks: dict[float, torch.Tensor] = {}

    def _validate(self) -> None:
        if not 0 <= self.p < 100:
            raise ValueError(f"dice p must be a percentile in [0, 100), got {self.p}")
        if self.pred not in self.PREDS:
            raise ValueError(f"dice pred must be one of {', '.join(self.PREDS)}, got {self.pred!r}")

    def _fit(self, feats) -> None:
        feats.require("head", self.name)
        total, n = None, 0
        for _, h, _ in self.space_chunks(feats):
            s = h.double().sum(0)
            total = s if total is None else total + s
            n += h.shape[0]
        if not n:
            raise ValueError("dice: the ID training data is empty")
        self.mean_act = (total / n).float()
        self.weight = feats.head.weight.detach().float().cpu().clone()
        self.bias = feats.head.bias_or_zero().detach().float().cpu().clone()
        self.head = feats.head
        self._masks = {}

    def masked_weight(self) -> torch.Tensor:
        """W with the contributions at or below the p-th percentile zeroed, (C, m) float32 (cached per p)."""
        key = float(self.p)
        if key not in self._masks:
            contrib = self.mean_act[None, :] * self.weight
            thresh = np.percentile(contrib.numpy(), key)
            self._masks[key] = torch.where(contrib > float(thresh), self.weight, torch.zeros(()))
        return self._masks[key]

    def masked_logits(self, h: torch.Tensor, head=None) -> torch.Tensor:
        """The masked head's logits (B, C) float32 of raw features h (B, m): in_space(h) @ W_masked^T + b."""
        x = self.in_space(h, head)
        return x @ self.masked_weight().to(x.device).T + self.bias.to(x.device)

    def _score(self, logits, h, head):
        return energy(self.masked_logits(h, head))

    def predict_features(self, logits, features=None, head=None):
        """pred="model": the model's argmax of ``logits``; "masked": argmax of :meth:`masked_logits` (OpenOOD's)."""
        if self.pred == "model":
            return logits.argmax(1)
        self._check_fitted()
        if features is None:
            raise ValueError("dice with pred='masked' needs the features (B, m) to predict with the masked head")
        return self.masked_logits(features.float(), head or self.head).argmax(1)
