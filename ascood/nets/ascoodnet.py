"""ASCOODNet: a feature extractor, the z-score op and a linear head.

Paper notation: h = backbone(x) (B, m) is the raw feature;
h~ = (h - mean(h)) / (std(h) + 1e-6) * sigma (unbiased std, per sample over the
m features) is the standardised feature; logits z = W h~ + b. With
``head="linear"`` h~ = h (the plain cross-entropy baseline's network); with
``head="l2"`` h~ = h / ||h||_2 (the paper's Table 6 / Figure 5 ablation,
L2-normalised feature space; the paper writes it without a scale, so none is
applied; a 1e-6 guards the all-zero feature).

The model also carries the input normalisation it was trained with
(``input_mean`` / ``input_std``, per channel, or None when unknown); it is
part of ``build_args`` and so of every checkpoint, and ODIN / i-ODIN use
``input_std`` to express eps in [0, 1] pixel units.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import _ops

__all__ = ["ASCOODNet", "HEADS", "check_normalization"]

HEADS = ("zscore", "linear", "l2")
L2_EPS = 1e-6


class ASCOODNet(nn.Module):
    """Classifier with ASCOOD's standardised-feature head.

    Args:
        backbone: module mapping (B, C, H, W) -> (B, m); ``m`` is read from its
            ``feature_dim`` attribute unless ``feature_dim`` is given.
        num_classes: number of ID classes C.
        sigma: the paper's sigma, scale of the standardised feature (default 0.5).
        head: "zscore" (ASCOOD), "linear" (baseline: logits = fc(h)) or "l2"
            (ablation, Table 6 / Fig. 5: logits = fc(h / ||h||_2)).
        feature_dim: m, when the backbone has no ``feature_dim`` attribute.
        input_mean, input_std: per-channel normalisation of the model's inputs
            (None = unknown); used by ODIN / i-ODIN when no ``std`` is given.

    Scorers that reshape features (ReAct, ASH, SCALE) or measure distances
    (KNN, MDS, ViM, ...) use :meth:`features` (raw h) and :attr:`fc`, exactly
    as the authors' code does (its SCALE feeds the raw h to the linear layer).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, sigma: float = 0.5, head: str = "zscore",
                 feature_dim: int | None = None, input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        m = feature_dim if feature_dim is not None else getattr(backbone, "feature_dim", None)
        if m is None:
            raise ValueError("backbone has no feature_dim attribute; pass feature_dim=")
        if head == "zscore" and m < 2:
            raise ValueError("the z-score head needs feature_dim >= 2")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.head_type = head
        self.feature_dim = int(m)
        self.fc = nn.Linear(self.feature_dim, self.num_classes)
        self.input_mean, self.input_std = check_normalization(input_mean, input_std)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (un-standardised) feature h: (B, C, H, W) -> (B, m)."""
        return self.backbone(x)

    def standardize(self, h: torch.Tensor) -> torch.Tensor:
        """h -> h~: the fused z-score op ("zscore"), h / ||h||_2 ("l2"), identity ("linear")."""
        if self.head_type == "zscore":
            return _ops.zscore(h, self.sigma)
        if self.head_type == "l2":
            return h / (torch.linalg.vector_norm(h, dim=-1, keepdim=True) + L2_EPS)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from a raw feature: fc(standardize(h)), (B, m) -> (B, C)."""
        return self.fc(self.standardize(h))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits (B, num_classes); with ``return_features`` also the raw h (B, m)."""
        h = self.features(x)
        logits = self.head(h)
        return (logits, h) if return_features else logits

    def config(self) -> dict:
        """The constructor arguments that rebuild this head (stored in checkpoints)."""
        return {"num_classes": self.num_classes, "sigma": self.sigma, "head": self.head_type,
                "input_mean": self.input_mean, "input_std": self.input_std}


def check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None
                         ) -> tuple[list[float] | None, list[float] | None]:
    """Both None, or two equally long lists of finite floats with std > 0 (ValueError otherwise)."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("input_mean and input_std must be given together")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != len(std) or not mean:
        raise ValueError(f"input_mean and input_std need one value per channel, got {len(mean)} and {len(std)}")
    if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
        raise ValueError(f"input_mean must be finite and input_std finite and > 0, got {mean}, {std}")
    return mean, std
