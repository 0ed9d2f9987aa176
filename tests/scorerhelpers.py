"""Shared pieces of the scorer tests: a tiny conv body for ASCOODNet models."""
from __future__ import annotations

import torch
from torch import nn


class ConvBody(nn.Module):
    """(B, 3, H, W) -> (B, width) non-negative features: a 3x3 conv (padding 1), ReLU, global mean.

    ``feature_dim`` is what ASCOODNet reads. The same layers, in the same order, as the per-file bodies it
    replaced, so a seeded model has the same weights as before.
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.feature_dim = width
        self.conv = nn.Conv2d(3, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))
