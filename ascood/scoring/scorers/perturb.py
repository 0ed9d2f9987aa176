"""Input-perturbation scorers: ODIN and i-ODIN (both through ``iodin_perturb``).

With temperature T and step eps: pred = argmax z(x); grad = d CE(z(x)/T,
pred) / dx; x~ = x - eps * sign(grad) / std_c on the perturbed elements
(every element for ODIN, the k of largest |grad| per sample for i-ODIN);
score = max softmax(z(x~) / T), and the reported prediction is argmax z(x~)
(the perturbed input's, as the reference). ``std`` is the per-channel std of
the input normalisation (so eps is a step in [0, 1] pixel units, as in ODIN);
by default it is read from the model (``ASCOODNet.input_std``, stored in
ascood checkpoints); a model without one gets std 1.0 with a warning.

Cost per batch (what the package owns): the input-gradient pass computes no
parameter gradients (``autograd.grad`` w.r.t. the input only runs the
backward nodes on the path to x, and those skip their weight gradients), its
graph is freed by that call, the step and the division by std are one fused
op, the std tensor is built once per device (no host-to-device copy, hence no
host synchronisation, per batch), and the second forward runs under
``torch.inference_mode``. ``benchmarks/test_bench_scorer.py`` times it against
the authors' eager code.

They need the model and the images (``needs_input``): ``score_features``
raises a TypeError saying so.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ... import _ops
from .base import Scorer, check_int, warn_once

__all__ = ["ODIN", "IODIN", "InputStd", "model_input_std"]

IODIN_EPS_GRID = [round(0.0014 * i, 4) for i in range(1, 8)]  # 0.0014 .. 0.0098 step 0.0014


def model_input_std(model: nn.Module) -> Sequence[float] | None:
    """The per-channel input std a model carries (``input_std``; also through a ``module`` wrapper), or None."""
    for m in (model, getattr(model, "module", None)):
        std = getattr(m, "input_std", None)
        if std is not None:
            return std
    return None


class InputStd:
    """The per-channel input std an input-perturbing scorer divides its step by (``self.std`` or the model's)."""

    std: float | Sequence[float] | None = None

    def _input_std(self, model: nn.Module):
        std = self.std if self.std is not None else model_input_std(model)
        if std is None:
            warn_once((self.name, "no input std"),
                      f"{self.name}: the model carries no input_std and no std= was given; using 1.0 "
                      "(eps is then in normalised-input units, not pixel units: pass std=, the input "
                      "normalisation's per-channel std)", stacklevel=4)
            return 1.0
        return std

    def _std_on(self, std, device: torch.device) -> float | torch.Tensor:
        """``std`` as iodin_perturb takes it: a float, or a (C,) float32 tensor made once per device."""
        if isinstance(std, (int, float)):
            return float(std)
        cache = self.__dict__.setdefault("_std_cache", {})
        key = (tuple(float(v) for v in std), str(device))  # another std gets a new tensor
        if key not in cache:
            cache[key] = torch.as_tensor(key[0], dtype=torch.float32, device=device)
        return cache[key]


class _Perturbation(InputStd, Scorer):
    # benchmarks.md: T {1, 10, 100, 1000} x eps {0.0014, ..., 0.0098} for ODIN and i-ODIN alike.
    default_grid = {"temperature": [1, 10, 100, 1000], "eps": IODIN_EPS_GRID}
    needs_input = True

    def __init__(self, temperature: float = 1000.0, eps: float = 0.0014,
                 std: float | Sequence[float] | None = None) -> None:
        super().__init__()
        self.temperature, self.eps, self.std = temperature, eps, std
        self._validate()

    def _validate(self) -> None:
        if not self.temperature > 0 or self.eps < 0:
            raise ValueError(f"{self.name} needs temperature > 0 and eps >= 0, got {self.temperature}, {self.eps}")

    def _k(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def score(self, model: nn.Module, x: torch.Tensor):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            z = model(xg).float()
            pred = z.argmax(1)
            loss = nn.functional.cross_entropy(z / self.temperature, pred)
            # Only d loss / d x: no parameter gradient is computed or stored, and the graph is freed here.
            (grad,) = torch.autograd.grad(loss, xg)
        x_t = _ops.iodin_perturb(xg.detach(), grad.to(x.dtype), self.eps, self._std_on(self._input_std(model), x.device),
                                 k=self._k(x))
        del grad, z, loss
        with torch.inference_mode():
            z_t = model(x_t).float()
            # Both the score and the reported prediction come from the perturbed input (the reference's).
            conf, pred_t = torch.softmax(z_t / self.temperature, 1).max(1)
        if conf.is_inference():
            conf, pred_t = conf.clone(), pred_t.clone()
        return pred_t, conf


class ODIN(_Perturbation):
    """ODIN: perturb every element (T = 1000, eps = 0.0014 by default)."""

    name = "odin"

    def _k(self, x: torch.Tensor) -> int:
        return x[0].numel()  # k >= n per sample is ODIN


class IODIN(_Perturbation):
    """i-ODIN (the paper's Sec. B): perturb only the k elements of largest |grad| per sample (k = 1)."""

    name = "iodin"

    def __init__(self, temperature: float = 1000.0, eps: float = 0.0014, std: float | Sequence[float] | None = None,
                 k: int = 1) -> None:
        self.k = k
        super().__init__(temperature, eps, std)

    def _validate(self) -> None:
        super()._validate()
        self.k = check_int(self.name, "k", self.k)

    def _k(self, x: torch.Tensor) -> int:
        return self.k
