"""GradNorm (Huang, Geng & Li, NeurIPS 2021) in closed form from the logits and the last layer's input."""
from __future__ import annotations

import torch

from .base import FeatureScorer

__all__ = ["GradNorm"]


class GradNorm(FeatureScorer):
    """GradNorm: the L1 norm of d KL(u || softmax(z / T)) / dW for the last layer's weight W.

    As the paper's code and OpenOOD, the loss is the cross-entropy to the
    uniform target summed over the C classes, L = -sum_c log softmax(z / T)_c
    (KL(u || p) up to a constant and the factor C), and only the last layer's
    weight W (C, m) is differentiated. With z = W x + b, dL/dz_c = (C p_c - 1) / T
    and dL/dW = (dL/dz) x^T, so

        score = ||dL/dW||_1 = (1 / T) * sum_c |C p_c - 1| * sum_j |x_j|,

    computed here from the logits and x, the vector the linear layer is
    differentiated at, by ``feature_space``:

    * ``"head"`` (default): x = the vector the model's linear layer sees
      (standardize(h) for an ASCOOD head) and z = the model's logits, so the
      score is the norm of the model's true last-layer gradient.
    * ``"raw"``: OpenOOD's quantity. x = the raw feature h and z = fc(h), the
      linear layer with its own weights applied to the raw h (needs the head;
      without one the given logits are taken as fc(h), i.e. a plain linear
      head). This is what OpenOOD's GradNormPostprocessor computes on every
      network, its own ASCOOD networks included (their ``return_feature`` is
      the feature before the z-score), and the package's "raw" convention
      (ReAct, ASH, SCALE and DICE apply fc to the raw h too). On a z-score
      model it is not the model's gradient (use "head" for that); it was not
      refused because it is the number OpenOOD users compare with, and for a
      plain linear head both spaces agree.

    No backward pass is run, so it scores cached features; OpenOOD's per-sample
    autograd loop and pytorch-ood's ``GradNorm(param_filter=W)`` (its loss is
    averaged over the classes and negated: -score / C) give the same numbers
    (``tests/scoring``). Higher = more ID. T = 1 (the paper's); not searched by
    APS (OpenOOD has no grid).
    """

    name = "gradnorm"
    param_names = ("temperature",)

    def __init__(self, temperature: float = 1.0, feature_space: str = "head") -> None:
        super().__init__(feature_space)
        self.temperature = temperature
        self._validate()

    def _validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"gradnorm temperature must be > 0, got {self.temperature}")

    def _score(self, logits, h, head):
        x = self.in_space(h, head).double()
        # "raw" differentiates the last layer at the raw h: its logits are fc(h), not the model's (docstring).
        z = head.fc(x) if self.feature_space == "raw" and head is not None else logits.double()
        p = torch.softmax(z / self.temperature, 1)
        dz = (p * p.shape[1] - 1).abs().sum(1)
        return (dz * x.abs().sum(1) / self.temperature).float()
