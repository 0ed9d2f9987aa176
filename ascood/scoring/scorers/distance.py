"""Feature-distance scorers: KNN, MDS, RMDS, ViM, NNGuide, Relation.

``fit`` streams the ID train loader once and keeps its statistics/banks on the
CPU; banks are copied to the scoring device once when they fit under
``max_device_bank_mb``, otherwise streamed to it in chunks per batch. No faiss:
nearest neighbours are exact, by matmul + top-k over bank chunks.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import FeatureScorer, energy

__all__ = ["KNN", "MDS", "RMDS", "ViM", "NNGuide", "Relation", "l2_normalize"]


def l2_normalize(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, (N, m) -> (N, m) (1e-10 guards zero rows)."""
    return h / torch.sqrt((h * h).sum(1, keepdim=True) + 1e-10)


class _Bank:
    """A (N, m) CPU matrix iterated in device-side chunks (cached on the device when small)."""

    def __init__(self, data: torch.Tensor, max_device_mb: float, chunk: int = 16384) -> None:
        self.cpu = data.contiguous()
        self.max_bytes = max_device_mb * 2 ** 20
        self.chunk = chunk
        self._device_copy: torch.Tensor | None = None

    def chunks(self, device: torch.device):
        if self.cpu.numel() * self.cpu.element_size() <= self.max_bytes:
            if self._device_copy is None or self._device_copy.device != device:
                self._device_copy = self.cpu.to(device)
            yield 0, self._device_copy
            return
        for start in range(0, self.cpu.shape[0], self.chunk):
            yield start, self.cpu[start:start + self.chunk].to(device, non_blocking=True)


def topk_similarity(query: torch.Tensor, bank: _Bank, k: int) -> torch.Tensor:
    """The k largest dot products of each query row with the bank rows: (B, m) -> (B, k), descending."""
    best = None
    for _, block in bank.chunks(query.device):
        sims = query @ block.T
        merged = sims if best is None else torch.cat([best, sims], 1)
        best = merged.topk(min(k, merged.shape[1]), dim=1).values
    return best


class KNN(FeatureScorer):
    """Deep nearest neighbours: -(squared L2 distance to the K-th nearest normalised ID-train feature).

    Features are L2-normalised, so ||a - b||^2 = 2 - 2 a.b (OpenOOD's score is
    minus the faiss squared distance to the K-th neighbour). K = 50 by default,
    capped at the number of ID-train features.
    """

    name = "knn"
    needs_fit = True
    default_grid = {"K": [50, 100, 200, 500, 1000]}  # benchmarks.md

    def __init__(self, K: int = 50, feature_space: str = "raw", max_device_bank_mb: float = 1024) -> None:
        super().__init__(feature_space)
        self.K = K
        self.max_device_bank_mb = max_device_bank_mb
        self._validate()

    def _validate(self) -> None:
        if not (isinstance(self.K, int) and self.K >= 1):
            raise ValueError(f"knn K must be an int >= 1, got {self.K!r}")

    def fit(self, model: nn.Module, id_train_loader) -> "KNN":
        self.bank = _Bank(l2_normalize(self.collect(model, id_train_loader)["feature"]), self.max_device_bank_mb)
        self.fitted = True
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        logits, h = self.fitted_features(model, x)
        # K is capped at the bank size (a tiny ID set), so the K-th neighbour always exists.
        kth = topk_similarity(l2_normalize(h), self.bank, min(self.K, self.bank.cpu.shape[0]))[:, -1]
        return logits.argmax(1), -(2.0 - 2.0 * kth)


def _class_stats(feat: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (K', m) of the classes present and the tied precision (m, m), float64.

    The covariance is the empirical (biased) one of the class-centred features,
    as sklearn's EmpiricalCovariance; its pseudo-inverse is the precision.
    """
    feat = feat.double()
    classes = torch.unique(label)
    means = torch.stack([feat[label == c].mean(0) for c in classes])
    centred = feat - means[torch.searchsorted(classes, label)]
    cov = centred.T @ centred / feat.shape[0]
    return means, torch.linalg.pinv(cov, hermitian=True)


def _mahalanobis(h: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(B, m), (K, m), (m, m) -> (B, K) squared Mahalanobis distances."""
    hp = h @ precision
    return (hp * h).sum(1, keepdim=True) - 2 * hp @ means.T + ((means @ precision) * means).sum(1)[None]


class MDS(FeatureScorer):
    """Mahalanobis: max over classes of -(h - mu_c)^T P (h - mu_c), tied precision P from ID train."""

    name = "mds"
    needs_fit = True

    def fit(self, model: nn.Module, id_train_loader) -> "MDS":
        data = self.collect(model, id_train_loader)
        if "label" not in data:
            raise ValueError(f"{self.name} needs labels in id_train_loader")
        self._fit_stats(data)
        self.fitted = True
        return self

    def _fit_stats(self, data: dict) -> None:
        """Class means and the tied precision of the collected ID-train features."""
        self.means, self.precision = _class_stats(data["feature"], data["label"])

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        logits, h = self.fitted_features(model, x)
        d = _mahalanobis(h.double(), self.means.to(h.device), self.precision.to(h.device))
        return logits.argmax(1), (-d).amax(1).float()


class RMDS(MDS):
    """Relative Mahalanobis: max_c -(MD_c(h) - MD_0(h)), MD_0 with the global mean and covariance."""

    name = "rmds"

    def _fit_stats(self, data: dict) -> None:
        super()._fit_stats(data)
        zeros = torch.zeros(data["feature"].shape[0], dtype=torch.long)
        self.whole_mean, self.whole_precision = _class_stats(data["feature"], zeros)

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        logits, h = self.fitted_features(model, x)
        h = h.double()
        d = _mahalanobis(h, self.means.to(h.device), self.precision.to(h.device))
        d0 = _mahalanobis(h, self.whole_mean.to(h.device), self.whole_precision.to(h.device))
        return logits.argmax(1), (-(d - d0)).amax(1).float()


class ViM(FeatureScorer):
    """Virtual-logit matching: energy(W h + b) - alpha * ||(h - u) projected on the residual space||.

    u = -pinv(W) b; the principal space is spanned by the ``dim`` leading
    eigenvectors of the (uncentred about u) covariance of ID-train features,
    the residual space by the rest; alpha = mean max-logit / mean residual
    norm on ID train. ``dim`` defaults to 256 (the authors' configs; grid
    {256, 1000}); features of 256 or fewer dimensions get m // 2 instead
    (256 would leave no residual space). Logits are fc(feature) in the chosen
    feature space.
    """

    name = "vim"
    needs_fit = True
    default_grid = {"dim": [256, 1000]}
    DEFAULT_DIM = 256
    refit_params = ("dim",)

    def __init__(self, dim: int | None = None, feature_space: str = "raw") -> None:
        super().__init__(feature_space)
        self.dim = dim

    def fit(self, model: nn.Module, id_train_loader) -> "ViM":
        h = self.collect(model, id_train_loader)["feature"].double()
        m = h.shape[1]
        dim = self.dim if self.dim is not None else (self.DEFAULT_DIM if m > self.DEFAULT_DIM else m // 2)
        if not 1 <= dim < m:
            raise ValueError(f"vim dim must be in [1, {m - 1}] for {m}-d features, got {dim}")
        W = model.fc.weight.detach().double().cpu()
        b = model.fc.bias.detach().double().cpu()
        self.u = -(torch.linalg.pinv(W) @ b)
        centred = h - self.u
        cov = centred.T @ centred / h.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(eigvals, descending=True)
        self.NS = eigvecs[:, order[dim:]].contiguous()
        vlogit = torch.linalg.norm(centred @ self.NS, dim=1)
        logits = h @ W.T + b
        self.alpha = float(logits.amax(1).mean() / vlogit.mean())
        self.W, self.b = W, b
        self.fitted = True
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        logits, h = self.fitted_features(model, x)
        h = h.double()
        dev = h.device
        z = h @ self.W.to(dev).T + self.b.to(dev)
        vlogit = torch.linalg.norm((h - self.u.to(dev)) @ self.NS.to(dev), dim=1) * self.alpha
        return logits.argmax(1), (torch.logsumexp(z, 1) - vlogit).float()


class NNGuide(FeatureScorer):
    """NNGuide: energy(z) * mean of the K largest similarities to a confidence-scaled ID bank.

    Bank rows: normalise(h_train) * energy(z_train) (energy = logsumexp of the
    model's logits), a random ``alpha`` fraction of the ID train set (fixed
    seed). Test: normalise(h) against the bank, mean of the top K dot
    products, times the test energy. Defaults K 100, alpha 0.01 (the authors'
    configs); not searched by APS (pass ``grid=`` to :func:`sweep` to search).
    """

    name = "nnguide"
    needs_fit = True
    param_names = ("K", "alpha")
    refit_params = ("alpha",)

    def __init__(self, K: int = 100, alpha: float = 0.01, feature_space: str = "raw",
                 max_device_bank_mb: float = 1024) -> None:
        super().__init__(feature_space)
        self.K, self.alpha = K, alpha
        self.max_device_bank_mb = max_device_bank_mb
        self._validate()

    def _validate(self) -> None:
        if not (isinstance(self.K, int) and self.K >= 1) or not 0 < self.alpha <= 1:
            raise ValueError(f"nnguide needs int K >= 1 and alpha in (0, 1], got K={self.K!r}, alpha={self.alpha}")

    def fit(self, model: nn.Module, id_train_loader) -> "NNGuide":
        data = self.collect(model, id_train_loader)
        bank = l2_normalize(data["feature"]) * energy(data["logits"])[:, None]
        n = bank.shape[0]
        keep = max(1, int(round(self.alpha * n)))
        if keep < n:
            bank = bank[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:keep]]
        self.bank = _Bank(bank, self.max_device_bank_mb)
        self.fitted = True
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        logits, h = self.fitted_features(model, x)
        guidance = topk_similarity(l2_normalize(h), self.bank, self.K).mean(1)
        return logits.argmax(1), guidance * energy(logits)


class Relation(FeatureScorer):
    """Neural relation graph: sum over ID-train j of rel_j^pow, rel_j = max(h.h_j, 0) * (p.p_j).

    h normalised, p = softmax(z); edges with |rel| <= ``threshold`` (0.03) are
    dropped; ``pow`` (default 1, grid {1, 2, 4, 6, 8} as the authors'
    configs) sharpens the kernel.
    """

    name = "relation"
    needs_fit = True
    default_grid = {"pow": [1, 2, 4, 6, 8]}

    def __init__(self, pow: int = 1, threshold: float = 0.03, feature_space: str = "raw",
                 max_device_bank_mb: float = 1024) -> None:
        super().__init__(feature_space)
        self.pow, self.threshold = pow, threshold
        self.max_device_bank_mb = max_device_bank_mb

    def fit(self, model: nn.Module, id_train_loader) -> "Relation":
        data = self.collect(model, id_train_loader)
        feat = l2_normalize(data["feature"])
        prob = torch.softmax(data["logits"], 1)
        # One bank holding [feature | prob] so both halves stream together.
        self.m = feat.shape[1]
        self.bank = _Bank(torch.cat([feat, prob], 1), self.max_device_bank_mb)
        self.fitted = True
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor):
        logits, h = self.fitted_features(model, x)
        feat, prob = l2_normalize(h), torch.softmax(logits, 1)
        total = torch.zeros(h.shape[0], device=h.device, dtype=torch.float32)
        for _, block in self.bank.chunks(h.device):
            rel = (feat @ block[:, : self.m].T).clamp(min=0) * (prob @ block[:, self.m:].T)
            rel = rel * (rel.abs() > self.threshold)
            total += (rel.sign() * rel.abs().pow(self.pow)).sum(1)
        return logits.argmax(1), total
