"""Activation-shaping scorers on the feature h (B, m): ReAct, ASH, SCALE.

Each reshapes h, applies the linear head and scores the energy
logsumexp(fc(h_shaped)). With ``feature_space="raw"`` (default, the authors'
way) fc is applied directly to the shaped raw h; with ``standardize=True``
the shaped h goes through the model's full head (z-score then fc) instead.
The feature is assumed non-negative (post-ReLU), as the methods do.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import FeatureScorer, energy, model_features

__all__ = ["ReAct", "ASH", "SCALE", "top_k_count"]

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

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        self._check_fitted()
        logits, h = model_features(model, x, "raw")
        shaped = self._shape(h)
        z = model.head(shaped) if self.standardize else model.fc(shaped)
        return logits.argmax(1), energy(z.float())


class ReAct(_Shaping):
    """ReAct: clip h at the ``percentile``-th percentile of all ID activations (default 90).

    The activations are collected on the ID validation split, as OpenOOD
    (``fit_split = "val"``: the evaluator passes its ``id_val_loader``).
    """

    name = "react"
    needs_fit = True
    fit_split = "val"
    default_grid = {"percentile": [85, 90, 95, 99]}
    # Activation sample size cap: the exact percentile of up to 2**25 values, a fixed
    # uniform subsample beyond (keeps fit's CPU memory bounded on large train sets).
    max_values = 2 ** 25

    def __init__(self, percentile: float = 90, standardize: bool = False) -> None:
        super().__init__(percentile, standardize)
        self._activations: np.ndarray | None = None

    def fit(self, model: nn.Module, id_train_loader) -> "ReAct":
        h = self.collect(model, id_train_loader)["feature"].reshape(-1)
        if h.numel() > self.max_values:
            idx = torch.randperm(h.numel(), generator=torch.Generator().manual_seed(0))[: self.max_values]
            h = h[idx]
        self._activations = h.numpy()
        self.fitted = True
        return self

    @property
    def threshold(self) -> float:
        """Clip value; recomputed from the stored activations when ``percentile`` changes."""
        if self._activations is None:
            raise RuntimeError("react: call fit first")
        return float(np.percentile(self._activations, self.percentile))

    def score(self, model: nn.Module, x: torch.Tensor):
        self._thr = self.threshold
        return super().score(model, x)

    def _shape(self, h: torch.Tensor) -> torch.Tensor:
        return h.clamp(max=self._thr)


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
        vals, idx = h.topk(k, dim=1)
        s1 = h.sum(1, keepdim=True)
        if self.variant == "b":
            vals = (s1 / k).expand_as(vals)
        elif self.variant == "s":
            vals = vals * torch.exp(s1 / vals.sum(1, keepdim=True))
        return torch.zeros_like(h).scatter_(1, idx, vals)


class SCALE(_Shaping):
    """SCALE: h * exp(sum(h) / sum(top-k of h)), k from ``percentile`` (default 85); no pruning."""

    name = "scale"
    default_grid = {"percentile": _PERCENTILE_GRID}

    def __init__(self, percentile: float = 85, standardize: bool = False) -> None:
        super().__init__(percentile, standardize)

    def _shape(self, h: torch.Tensor) -> torch.Tensor:
        k = top_k_count(h.shape[1], self.percentile)
        s1 = h.sum(1, keepdim=True)
        s2 = h.topk(k, dim=1).values.sum(1, keepdim=True)
        return h * torch.exp(s1 / s2)
