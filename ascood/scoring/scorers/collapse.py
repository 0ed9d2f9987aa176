"""Neural-collapse scorers: NCI (alignment with the predicted class's weight) and NECO (principal-subspace norm ratio).

Under neural collapse ID features cluster at their class means, which align
with the classifier's rows (NCI) and span a low-dimensional subspace that
OOD features fall away from (NECO). Both fit one streamed pass over ID
train; see each class for its memory.
"""
from __future__ import annotations

import torch

from .base import FeatureScorer, check_int
from .boundary import feature_mean
from .distance import TiedGaussian, eigh
from .fastops import argmax_rows, matmul, row_dot

__all__ = ["NCI", "NECO"]


class NCI(FeatureScorer):
    """NCI (Liu & Qin, CVPR 2025, "Detecting Out-of-distribution through the Lens of Neural Collapse").

    With x the feature in ``feature_space``, mu the mean ID-train x, p the
    argmax of fc(x) = W x + b and w_p the head's row p::

        score(x) = w_p . (x - mu) / ||x - mu||_2  +  alpha * ||x||_1

    (the proximity of the centred feature to its class's weight, not divided
    by ||w_p||, as both references; plus an L1 feature-norm term). Higher = more
    ID. ``alpha`` default 1e-4 and APS grid {1e-4, 1e-3, 1e-2, 0.1}: OpenOOD's
    ``configs/postprocessors/nci.yml``.

    References: OpenOOD (Jingkang50/OpenOOD @ 3c35632ee91b54b09d1f085d04f94744cece7d0b)
    ``openood/postprocessors/nci_postprocessor.py`` and pytorch-ood 0.4.0
    ``detector/nci.py`` (its outlier score is ours negated; its alpha <= 0
    drops the norm term, alpha = 0 here); the authors' repository is
    litianliu/NCI-OOD. Checked per sample in
    ``tests/scoring/test_scorers_geometry.py``. The references read the raw
    penultimate feature and the network's own logits; here p is the argmax of
    fc in the scorer's space (on a plain network the same; on a z-score model
    ``feature_space="head"`` uses the model's prediction and its h~, ``"raw"``
    fc applied to the raw h, as the package's convention). ||x - mu|| is
    clamped at 1e-8.

    Fit (ID train, labels not read): one streamed pass, the mean (m,) float64,
    plus the head's W (C, m) and b; nothing of size N is kept. Scoring runs in
    float32, as both references.
    """

    name = "nci"
    needs_fit = True
    streams_fit = True
    default_grid = {"alpha": [0.0001, 0.001, 0.01, 0.1]}  # OpenOOD configs/postprocessors/nci.yml

    def __init__(self, alpha: float = 0.0001, feature_space: str = "raw") -> None:
        super().__init__(feature_space)
        self.alpha = alpha
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"nci alpha must be a number >= 0, got {self.alpha!r}")

    def _fit(self, feats) -> None:
        feats.require("head", self.name)
        self.mean = feature_mean(self, feats)
        self.W = feats.head.weight.detach().double().cpu()
        self.b = feats.head.bias_or_zero().detach().double().cpu()
        self.head = feats.head
        self._f32 = None

    def _score(self, logits, h, head):
        # float32, as both references (the fitted state is float64, cast once per device).
        x = self.in_space(h, head).float()
        cache = getattr(self, "_f32", None)
        if cache is None or cache[0].device != x.device:
            cache = self._f32 = tuple(t.to(device=x.device, dtype=torch.float32) for t in (self.W, self.b, self.mean))
        W, b, mean = cache
        pred = argmax_rows(matmul(x, W.T) + b)
        c = x - mean
        proximity = row_dot(W[pred], c) / torch.linalg.vector_norm(c, dim=1).clamp(min=1e-8)
        return proximity + self.alpha * x.abs().sum(1)


class NECO(FeatureScorer):
    """NECO (Ben Ammar et al., ICLR 2024, "NECO: NEural Collapse Based Out-of-distribution detection").

    With s = (x - mean) / std the ID-train-standardised feature (sklearn's
    StandardScaler: population std, a constant column scaled by 1) and P_d the
    d leading principal directions of the standardised ID-train features::

        score(x) = ||P_d^T s||_2 / ||s||_2                        (maxlogit=False: ResNets)
        score(x) = ||P_d^T s||_2 / ||s||_2 * max_c z_c            (maxlogit=True: ViT, DeiT, Swin)

    z the model's logits (as given, or the model's on the model path). Higher =
    more ID. ``dim`` = d: an integer in [1, m), or None (default) for the
    smallest d whose components explain >= 90 % of the variance (the
    Mahalanobis++ authors' NECO, which the paper's authors leave to a per-model
    choice; their script's default is 100). Not searched by APS (the paper
    publishes no grid; pass ``grid={"dim": [...]}`` to :func:`sweep`: ``dim``
    needs no refit, the full eigendecomposition is kept).

    References: the authors' ``neco()`` (repository MouinBenAmmar/NECO, not
    retrievable here; checked against its verbatim copy in sgchr273/PSOD @
    3a8ea6f36721a0a70cc0bfac7fb3cb9ada706432, ``ood_methods.py``) and the
    Mahalanobis++ authors' ``evaluate_neco`` (mueller-mp/maha-norm @
    53de550be7f88acad959f5fdd8f2430fb9a8b6ea, ``NINCO/detection_methods.py``),
    per sample, in ``tests/scoring/test_scorers_geometry.py``. Both apply
    sklearn's StandardScaler and PCA to raw penultimate features; the PCA here
    is the float64 eigendecomposition of the standardised features'
    covariance (the correlation matrix: the same directions as sklearn's SVD,
    whose centring of the already-centred data differs by rounding only).
    The authors' DeiT / Swin branch divides by the norm of the *unscaled*
    feature while projecting the scaled one; it is not offered
    (docs/DEVIATIONS.md). On a z-score ASCOOD model ``feature_space="head"``
    standardises h~ instead of the raw h (a different score).

    Fit (ID train, labels not read): one streamed pass of Chan et al.'s
    running mean and scatter, (m, m) float64, then one (m, m) eigendecomposition;
    kept: mean, scale (m,), eigenvectors (m, m) and explained-variance ratios.
    A fit whose features do not vary is refused.
    """

    name = "neco"
    needs_fit = True
    streams_fit = True
    param_names = ("dim", "maxlogit")
    VARIANCE = 0.90  # the Mahalanobis++ authors' rule for dim=None

    def __init__(self, dim: int | None = None, maxlogit: bool = False, feature_space: str = "raw") -> None:
        super().__init__(feature_space)
        self.dim, self.maxlogit = dim, maxlogit
        self._validate()

    def _validate(self) -> None:
        self.dim = check_int(self.name, "dim", self.dim, allow_none=True)
        if not isinstance(self.maxlogit, bool):
            raise ValueError(f"neco maxlogit must be True or False, got {self.maxlogit!r}")
        m = getattr(self, "components", None)
        if self.dim is not None and m is not None and self.dim >= m.shape[0]:
            raise ValueError(f"neco dim must be in [1, {m.shape[0] - 1}] for {m.shape[0]}-d features, got {self.dim} "
                             "(the whole space: every ratio would be 1)")

    def _fit(self, feats) -> None:
        acc = TiedGaussian()
        for _, h, _ in self.space_chunks(feats):
            acc.update(h, torch.zeros(h.shape[0], dtype=torch.long))
        _, mean, cov = acc.result()
        m = cov.shape[0]
        if self.dim is not None and self.dim >= m:
            raise ValueError(f"neco dim must be in [1, {m - 1}] for {m}-d features, got {self.dim} "
                             "(the whole space: every ratio would be 1)")
        var = cov.diagonal().clone()
        if not bool(var.max() > 0):
            raise ValueError("neco: the features do not vary over the fit set (every score would be equal): the "
                             "model's features are constant on this data")
        # sklearn's StandardScaler: a (near-)constant column keeps scale 1 (_handle_zeros_in_scale).
        scale = var.sqrt()
        scale = torch.where(scale < 10 * torch.finfo(torch.float64).eps, torch.ones_like(scale), scale)
        corr = cov / scale[:, None] / scale[None, :]
        w, v = eigh((corr + corr.T) / 2)
        order = torch.argsort(w, descending=True)
        w = w[order].clamp(min=0)
        self.mean, self.scale = mean[0], scale
        self.components = v[:, order].contiguous()
        self.explained = w / w.sum()

    def resolved_dim(self) -> int:
        """d: ``dim``, or the smallest d explaining >= 90 % of the ID-train variance (``dim=None``)."""
        if self.dim is not None:
            return self.dim
        cum = torch.cumsum(self.explained, 0)
        return int(torch.nonzero(cum >= self.VARIANCE - 1e-12)[0]) + 1

    def _score(self, logits, h, head):
        s = (self.in_space(h, head).double() - self.mean.to(h.device)) / self.scale.to(h.device)
        P = self.components[:, : self.resolved_dim()].to(h.device)
        ratio = torch.linalg.vector_norm(s @ P, dim=1) / torch.linalg.vector_norm(s, dim=1).clamp(min=1e-12)
        if self.maxlogit:
            ratio = ratio * logits.double().amax(1)
        return ratio.float()
