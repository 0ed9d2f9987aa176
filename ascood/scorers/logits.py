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
    """MSP of temperature-scaled logits, max softmax(z / T), T fitted by NLL.

    ``fit`` minimises the cross-entropy of z / T over the given ID loader
    with L-BFGS (as OpenOOD, which uses its ID validation split; pass a
    held-out split, not the training data, for a calibrated T).
    ``temperature`` can also be set by hand (then no fit is needed).
    """

    name = "tempscale"
    needs_fit = True

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
        z, y = torch.cat(logits), torch.cat(labels)
        log_t = torch.zeros((), requires_grad=True)  # optimise log T so T stays positive
        opt = torch.optim.LBFGS([log_t], lr=0.01, max_iter=self.max_iter)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        self.temperature = float(log_t.detach().exp())
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
    default_grid = {"temperature": [1, 10, 100, 1000]}

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
    default_grid = {"gamma": [0.01, 0.1, 0.5, 1.0, 2.0], "M": [10, 50, 100]}

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
