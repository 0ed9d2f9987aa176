"""Scorers on the logits z (B, K) alone: MSP, TempScale, EBO, MLS, GEN."""
from __future__ import annotations

import torch
from torch import nn

from .base import Scorer, energy, iterate_loader, model_device

__all__ = ["MSP", "TempScale", "EBO", "MLS", "GEN"]


class MSP(Scorer):
    """Maximum softmax probability: max_k softmax(z)_k."""

    name = "msp"

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        z = model(x).float()
        return z.argmax(1), torch.softmax(z, 1).amax(1)


class TempScale(Scorer):
    """MSP of temperature-scaled logits, max softmax(z / T), T fitted by NLL on ID validation data.

    As OpenOOD's TemperatureScalingPostprocessor: T itself is the parameter
    (not log T), initialised at 1.5, and L-BFGS (lr 0.01, 50 iterations)
    minimises the cross-entropy of z / T over the ID validation split
    (``fit_split = "val"``: the evaluator passes its ``id_val_loader``).
    ``temperature`` can also be set by hand (then no fit is needed). Not
    searched by APS.
    """

    name = "tempscale"
    needs_fit = True
    fit_split = "val"
    param_names = ("temperature",)
    INIT_T = 1.5

    def __init__(self, temperature: float | None = None, max_iter: int = 50) -> None:
        super().__init__()
        self.temperature = temperature
        self.max_iter = max_iter
        self.fitted = temperature is not None

    def fit(self, model: nn.Module, id_train_loader) -> "TempScale":
        device = model_device(model)
        logits, labels = [], []
        with torch.no_grad():
            for x, y in iterate_loader(id_train_loader, device):
                logits.append(model(x).float().cpu())
                labels.append(y.long())
        if not logits:
            raise ValueError("tempscale: the ID validation loader is empty")
        z, y = torch.cat(logits), torch.cat(labels)
        t = torch.full((1,), self.INIT_T, requires_grad=True)
        opt = torch.optim.LBFGS([t], lr=0.01, max_iter=self.max_iter)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(z / t, y)
            loss.backward()
            return loss

        opt.step(closure)
        temperature = float(t.detach())
        if not (temperature > 0 and temperature == temperature):
            raise ValueError(f"tempscale: fitted T = {temperature} is not positive (logits/labels degenerate?)")
        self.temperature = temperature
        self.fitted = True
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        self._check_fitted()
        z = model(x).float()
        return z.argmax(1), torch.softmax(z / self.temperature, 1).amax(1)


class EBO(Scorer):
    """Energy score: T * logsumexp(z / T) (the negative free energy), T = 1 by default."""

    name = "ebo"
    default_grid = {"temperature": [1]}  # benchmarks.md: T 1, grid {1}

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self._validate()

    def _validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        z = model(x).float()
        return z.argmax(1), energy(z, self.temperature)


class MLS(Scorer):
    """Maximum logit: max_k z_k."""

    name = "mls"

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        z = model(x).float()
        return z.argmax(1), z.amax(1)


class GEN(Scorer):
    """Generalized entropy: -sum over the M largest p_k of p_k^gamma (1 - p_k)^gamma."""

    name = "gen"
    default_grid = {"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100, 200, 500, 1000]}

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        super().__init__()
        self.gamma, self.M = gamma, M
        self._validate()

    def _validate(self) -> None:
        if not self.gamma > 0 or self.M < 1:
            raise ValueError(f"GEN needs gamma > 0 and M >= 1, got gamma={self.gamma}, M={self.M}")

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        z = model(x).float()
        p = torch.softmax(z, 1)
        top = p.topk(min(self.M, p.shape[1]), dim=1).values
        return z.argmax(1), -(top.pow(self.gamma) * (1 - top).pow(self.gamma)).sum(1)
