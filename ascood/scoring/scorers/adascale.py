"""AdaSCALE-A and AdaSCALE-L (Regmi et al., 2025, "AdaSCALE: Adaptive Scaling for OOD Detection").

SCALE with a per-sample percentile. For an image x with raw feature h (B, m)
and the model's logits z:

1. Perturb x where the model is least sensitive: g = d(max_c z_c(x)) / dx;
   x~ = x + eps * sign(g) on the n = int(o * numel(x_i)) elements of smallest
   |g| per sample (eps = 0.5 in the model's input units, i.e. after the input
   normalisation, as the reference; no division by std); h~ = features(x~).
2. Q'(x) = sum_{j in top-k1 of h} relu(h~)_j + lmbda * sum_{j in top-k2 of h} |h - h~|_j
   with k1 = int(m * k1% / 100), k2 = int(m * k2% / 100) (the top-k indices
   are those of the clean h).
3. F = the empirical CDF of Q' over the ID fit rows (ID validation split, as
   OpenOOD; at most ``num_samples`` of them); the sample's percentile is
   p = p_min + (1 - F(Q'(x))) * (p_max - p_min): an unusually large Q'
   (ID-like) gets a low percentile, i.e. more activations in the scale.
4. r = sum(relu(h)) / sum(top-k relu(h)), k = m - round(m * p / 100) (at least 1).
5. AdaSCALE-A: score = logsumexp(fc(h * exp(r))); AdaSCALE-L:
   score = logsumexp(fc(h) * r**2). (``standardize=True``: the model's full
   head, z-score then fc, instead of fc on the raw h, as SCALE's option.)

Reference: OpenOOD ``openood/postprocessors/adascale_postprocessor.py`` and
``openood/networks/adascale_net.py`` (Jingkang50/OpenOOD @
3c35632ee91b54b09d1f085d04f94744cece7d0b; the authors' fork
sudarshanregmi/AdaSCALE @ 4b6dd50ff7dd1f8c8567c38ae3862a89972bc11e has the
same network code). Defaults and the APS grid are OpenOOD's
``configs/postprocessors/adascale_a.yml`` / ``adascale_l.yml`` (identical):
percentile (75, 85), k1 5, k2 1, lmbda 10, o 0.05, num_samples 5000; grid:
the 36 pairs (p_min, p_max) of {60, 65, ..., 95, 99} with p_min < p_max,
k1 {5}, k2 {1}, lmbda {10}, o {0.05}. Checked per sample against that code in
``tests/scoring/test_adascale.py``. Deliberate differences (docs/DEVIATIONS.md,
"AdaSCALE"): the ECDF's subsample is seeded (the reference's randperm is not);
k >= 1 in step 4 (the reference divides by 0 when p rounds to 100); pred is
the model's argmax (the reference's AdaSCALE-A reports argmax fc(h * exp(r)),
which the bias can change).

Cached features: h~ depends on (o, eps), so it is a record extra
(:class:`PerturbedFeatures`, key ``adascale_perturbed_o<o>_eps<eps>``): a
:class:`~.features.FeatureCache` computes it once per split and (o, eps); the
fit keeps two sums per ID row (the two terms of Q'), so the percentile pair
and lmbda of the grid cost no refit, and k1 / k2 a refit from the cached
arrays (no model pass).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import FeatureScorer, check_int, energy, warn_once
from .features import LinearHead, has_feature_head

__all__ = ["AdaScaleA", "AdaScaleL", "PerturbedFeatures", "adascale_perturb", "adascale_ratio"]

_BOUNDS = [60, 65, 70, 75, 80, 85, 90, 95, 99]
#: OpenOOD's configs/postprocessors/adascale_{a,l}.yml percentile_list: every (p_min, p_max), p_min < p_max.
PERCENTILE_GRID = [[lo, hi] for i, lo in enumerate(_BOUNDS) for hi in _BOUNDS[i + 1:]]


def adascale_perturb(x: torch.Tensor, grad: torch.Tensor, o: float, eps: float) -> torch.Tensor:
    """x + eps * sign(grad) on the int(o * n) elements of smallest |grad| of each sample (n = x[0].numel()).

    x, grad (B, ...) float; returns a new tensor of x's shape and dtype.
    """
    flat = grad.reshape(grad.shape[0], -1)
    n = int(flat.shape[1] * o)
    idx = flat.abs().topk(n, dim=1, largest=False).indices
    step = torch.zeros_like(flat).scatter_(1, idx, eps) * flat.sign()
    return x + step.view_as(x).to(x.dtype)


def adascale_ratio(h: torch.Tensor, percentile: torch.Tensor) -> torch.Tensor:
    """r = sum(relu(h)) / sum of the k largest relu(h), k = m - round(m * p / 100) >= 1, per row.

    h (B, m) float; percentile (B,) float64 in (0, 100). Returns (B, 1) in h's dtype.
    """
    a = torch.relu(h)
    m = a.shape[1]
    ks = (m - torch.round(m * percentile.to(torch.float64) / 100.0)).to(torch.long).clamp_(min=1).to(a.device)
    top = a.topk(int(ks.max()), dim=1).values
    # Masked sum of the top values (one topk for the batch; each row keeps its own k).
    mask = torch.arange(top.shape[1], device=a.device)[None, :] < ks[:, None]
    return a.sum(1, keepdim=True) / (top * mask).sum(1, keepdim=True)


class PerturbedFeatures:
    """The record extra of AdaSCALE: h~ = features(x~) (B, m) float32 of the perturbed input (step 1).

    Call on (model, x): runs the model with autograd for the input gradient
    (no parameter gradients), then the perturbed forward without.
    """

    def __init__(self, o: float, eps: float) -> None:
        self.o, self.eps = float(o), float(eps)
        self.key = f"adascale_perturbed_o{self.o:.6g}_eps{self.eps:.6g}"

    def run(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, C), h (B, m), h~ (B, m)) float32 of the clean and the perturbed x."""
        if not has_feature_head(model):
            raise TypeError("adascale needs a model with features(x), head(h) and fc (e.g. ascood.ASCOODNet)")
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            h = model.features(xg)
            z = model.head(h)
            top = z.gather(1, z.detach().argmax(1, keepdim=True))
            # Only d(max logit) / dx: no parameter gradient is computed; the graph is freed here.
            (grad,) = torch.autograd.grad(top.sum(), xg)
        x_t = adascale_perturb(x.detach(), grad, self.o, self.eps)
        with torch.no_grad():
            h_t = model.features(x_t)
        return z.detach().float(), h.detach().float(), h_t.float()

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.run(model, x)[2]

    def __repr__(self) -> str:
        return f"PerturbedFeatures(o={self.o}, eps={self.eps})"


class _AdaScale(FeatureScorer):
    needs_fit = True
    fit_split = "val"  # OpenOOD's setup reads id_loader_dict['val']
    # o first: the sweep varies the last key fastest, so the percentile pairs share one fit.
    default_grid = {"o": [0.05], "k1": [5], "k2": [1], "lmbda": [10], "percentile": PERCENTILE_GRID}
    param_names = ("percentile", "k1", "k2", "lmbda", "o", "eps", "num_samples")
    refit_params = ("k1", "k2", "o", "eps", "num_samples")
    logit_scaling = False

    def __init__(self, percentile=(75, 85), k1: int = 5, k2: int = 1, lmbda: float = 10.0, o: float = 0.05,
                 eps: float = 0.5, num_samples: int | None = 5000, standardize: bool = False) -> None:
        super().__init__("raw")
        self.percentile, self.k1, self.k2, self.lmbda, self.o, self.eps = percentile, k1, k2, lmbda, o, eps
        self.num_samples, self.standardize = num_samples, standardize
        self._validate()
        #: The fit rows' two terms of Q' (N,) float32 each (top-k1 relu(h~), top-k2 |h - h~|).
        self.fit_c: torch.Tensor | None = None
        self.fit_q: torch.Tensor | None = None
        self._sorted: dict[float, torch.Tensor] = {}

    def _validate(self) -> None:
        p = self.percentile
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) != 2:
            raise ValueError(f"{self.name} percentile must be a pair (p_min, p_max), got {p!r}")
        lo, hi = (float(v) for v in p)
        if not 0 < lo <= hi < 100:
            raise ValueError(f"{self.name} percentile must satisfy 0 < p_min <= p_max < 100, got {tuple(p)}")
        self.percentile = (p[0], p[1])
        self.k1 = check_int(self.name, "k1", self.k1)
        self.k2 = check_int(self.name, "k2", self.k2)
        for what, v in (("k1", self.k1), ("k2", self.k2)):
            if v > 100:
                raise ValueError(f"{self.name} {what} is a percentage of the features, at most 100, got {v}")
        if not isinstance(self.lmbda, (int, float)) or isinstance(self.lmbda, bool) or \
                not (math.isfinite(self.lmbda) and self.lmbda >= 0):
            raise ValueError(f"{self.name} lmbda must be a finite number >= 0, got {self.lmbda!r}")
        if not isinstance(self.o, (int, float)) or isinstance(self.o, bool) or not 0 < self.o <= 1:
            raise ValueError(f"{self.name} o (the fraction of input elements perturbed) must be in (0, 1], "
                             f"got {self.o!r}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or \
                not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"{self.name} eps must be a finite number >= 0, got {self.eps!r}")
        self.num_samples = check_int(self.name, "num_samples", self.num_samples, allow_none=True)

    def record_extras(self) -> tuple:
        return (self._extra(),)

    def _extra(self) -> PerturbedFeatures:
        return PerturbedFeatures(self.o, self.eps)

    # statistics -------------------------------------------------------------------------------------
    def _counts(self, m: int) -> tuple[int, int]:
        k1, k2 = int(m * self.k1 / 100), int(m * self.k2 / 100)
        for what, k, pct in (("k1", k1, self.k1), ("k2", k2, self.k2)):
            if k == 0:
                warn_once((self.name, what, m, pct), f"{self.name}: {what} = {pct}% of m = {m} features is 0 "
                          f"activations (as the reference, its term of Q' is 0); raise {what}")
        return k1, k2

    def _terms(self, h: torch.Tensor, h_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two sums of Q' per row, (B,) each: top-k1 relu(h~) and top-k2 |h - h~| (indices from h)."""
        k1, k2 = self._counts(h.shape[1])
        c = torch.relu(h_t).gather(1, h.topk(k1, dim=1).indices).sum(1)
        q = (h - h_t).abs().gather(1, h.topk(k2, dim=1).indices).sum(1)
        return c, q

    def _fit(self, feats) -> None:
        feats.require("features", self.name)
        key = self._extra().key
        feats.require_extras([key], self.name)
        cs, qs, start = [], [], 0
        for _, h, _, ex in feats.chunks(self.chunk_rows, extras=[key]):
            h_t = ex[key]
            if h_t.shape != h.shape:
                raise ValueError(f"{self.name}: the perturbed features are {tuple(h_t.shape)}, the features "
                                 f"{tuple(h.shape)}")
            bad = ~torch.isfinite(h_t).all(1)
            if bool(bad.any()):
                self._refuse_nonfinite("perturbed features", start + int(bad.nonzero()[0]))
            c, q = self._terms(h, h_t)
            cs.append(c)
            qs.append(q)
            start += h.shape[0]
        c, q = torch.cat(cs), torch.cat(qs)
        if self.num_samples is not None and c.numel() > self.num_samples:
            keep = torch.randperm(c.numel(), generator=torch.Generator().manual_seed(0))[:self.num_samples]
            c, q = c[keep], q[keep]
        self.fit_c, self.fit_q = c, q
        self._sorted = {}

    def _fit_values(self) -> torch.Tensor:
        """Sorted Q' of the fit rows (N,) float32 for the current lmbda (cached per lmbda)."""
        key = float(self.lmbda)
        if key not in self._sorted:
            self._sorted[key] = (self.fit_c + self.lmbda * self.fit_q).sort().values
        return self._sorted[key]

    def sample_percentile(self, h: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        """p per row (B,) float64: p_min + (1 - F(Q')) * (p_max - p_min), F the fit rows' empirical CDF."""
        c, q = self._terms(h, h_t)
        fit = self._fit_values()
        below = torch.searchsorted(fit, (c + self.lmbda * q).to(fit.device), right=True)  # #{fit <= Q'}
        frac = 1.0 - below.to(torch.float64) / fit.numel()
        lo, hi = self.percentile
        return lo + frac * (hi - lo)

    # scoring ----------------------------------------------------------------------------------------
    def _score(self, logits, h, head, extras=None):
        head = self._need_head(head)
        h_t = extras[self._extra().key].to(h.device)
        if h_t.shape != h.shape:
            raise ValueError(f"{self.name}: the perturbed features are {tuple(h_t.shape)}, the features "
                             f"{tuple(h.shape)}")
        r = adascale_ratio(h, self.sample_percentile(h, h_t))
        fc = head.logits if self.standardize else head.fc
        if self.logit_scaling:
            return energy(fc(h) * r ** 2)
        return energy(fc(h * torch.exp(r)))

    def score(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (B,) int64, score (B,) float32) of images x: one forward with autograd for the input
        gradient (giving h and the logits), one forward of the perturbed x."""
        self._check_fitted()
        extra = self._extra()
        z, h, h_t = extra.run(model, x)
        return z.argmax(1), self.score_features(z, h, head=LinearHead.from_model(model), extras={extra.key: h_t})


class AdaScaleA(_AdaScale):
    """AdaSCALE-A: energy of fc(h * exp(r)), r from the per-sample percentile (see the module docstring)."""

    name = "adascale_a"


class AdaScaleL(_AdaScale):
    """AdaSCALE-L: energy of fc(h) * r**2, r from the per-sample percentile (see the module docstring)."""

    name = "adascale_l"
    logit_scaling = True
