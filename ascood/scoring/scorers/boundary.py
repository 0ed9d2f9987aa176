"""Scorers that read the linear head's geometry: fDBD (feature distance to the decision boundaries).

The head's weight W (C, m) and bias b define the model's decision boundaries
in the space the linear layer acts on; fDBD measures how far a feature lies
from them. The boundaries are those of ``fc`` in the scorer's
``feature_space`` (see :mod:`.base`): ``"raw"`` applies fc directly to the
raw h (the authors' code on a plain network), ``"head"`` to the vector the
linear layer sees in the model (h~ for a z-score head: there these are the
model's own boundaries and fc(h~) its logits).
"""
from __future__ import annotations

import torch

from .base import FeatureScorer
from .fastops import matmul

__all__ = ["FDBD", "feature_mean", "boundary_denominators"]


def feature_mean(scorer: FeatureScorer, feats) -> torch.Tensor:
    """Mean (m,) float64 of a record's features in ``scorer``'s feature space, one streamed pass.

    Memory: one chunk and (m,) float64."""
    total, n = None, 0
    for _, h, _ in scorer.space_chunks(feats):
        # A float32 sum per chunk (torch's cascade summation: ~1e-7 relative, as the references' float32
        # mean), accumulated over chunks in float64; 9x faster here than a float64 sum of the chunk.
        s = h.sum(0).double()
        total = s if total is None else total + s
        n += h.shape[0]
    if not n:
        raise ValueError(f"{scorer.name}: the fit set is empty (0 rows)")
    return total / n


def boundary_denominators(weight: torch.Tensor) -> torch.Tensor:
    """||w_p - w_c||_2 for every pair of head rows, (C, m) -> (C, C) float64, diagonal set to 1.

    From the float64 Gram matrix: ||w_p||^2 + ||w_c||^2 - 2 w_p.w_c (memory
    C x C, never C x C x m as a broadcast difference would take: 8 GiB at
    ImageNet's 1000 x 2048). float64 keeps the cancellation exact to ~1e-12
    relative for rows that are not near-identical; identical rows are refused
    by the caller.
    """
    w = weight.detach().double().cpu()
    sq = (w * w).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (w @ w.T)).clamp(min=0)
    d = d2.sqrt()
    d.fill_diagonal_(1.0)
    return d


class FDBD(FeatureScorer):
    """fDBD (Liu & Qin, ICML 2024, "Fast Decision Boundary based Out-of-Distribution Detector").

    With x the feature in ``feature_space``, z = W x + b (fc of x), p = argmax z
    and mu the mean ID-train x::

        score(x) = 1/(C - 1) * sum_{c != p} |z_p - z_c| / ||w_p - w_c||_2  /  N(x)
        N(x)     = ||x - mu||_2   (distance_as_normalizer=True, the paper's and the default)
                 = ||x||_2        (distance_as_normalizer=False)

    |z_p - z_c| / ||w_p - w_c|| is the closed-form distance from x to the
    boundary between classes p and c; higher = more ID. APS grid
    ``distance_as_normalizer`` in {True, False}: OpenOOD's
    ``configs/postprocessors/fdbd.yml`` (default True).

    References: OpenOOD (Jingkang50/OpenOOD @ 3c35632ee91b54b09d1f085d04f94744cece7d0b)
    ``openood/postprocessors/fdbd_postprocessor.py`` sums over the classes
    (= ours x (C - 1): the same ranking; the mean is the paper's and
    pytorch-ood 0.4.0's ``detector/fdbd.py``, whose outlier score is ours
    negated). The authors' repository is litianliu/fDBD-OOD. Checked per sample
    against both in ``tests/scoring/test_scorers_geometry.py``. As pytorch-ood,
    N(x) is clamped at 1e-8 (OpenOOD divides by 0 there). The logits are
    recomputed as fc(x) in the scorer's space, so the boundaries, the logits
    and the feature are always of one space: on a plain network (no
    standardisation) both spaces and both references agree; on OpenOOD's ASCOOD
    network its postprocessor mixes the model's logits (of h~) with the raw h
    norm, which is neither space (docs/DEVIATIONS.md). For a z-score ASCOOD
    model ``feature_space="head"`` measures the model's own boundaries.

    Fit (ID train, labels not read): one streamed pass for the mean, (m,)
    float64, plus the head's W, b and the (C, C) float64 table of
    ||w_p - w_c||; nothing of size N is kept. Scoring runs in float32 (as
    both references) on a float32 copy of that state made once per device. A head with two identical rows
    (no boundary between those classes) is refused.
    """

    name = "fdbd"
    needs_fit = True
    streams_fit = True
    default_grid = {"distance_as_normalizer": [True, False]}  # OpenOOD configs/postprocessors/fdbd.yml

    def __init__(self, distance_as_normalizer: bool = True, feature_space: str = "raw") -> None:
        super().__init__(feature_space)
        self.distance_as_normalizer = distance_as_normalizer
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.distance_as_normalizer, bool):
            raise ValueError(f"fdbd distance_as_normalizer must be True or False, got {self.distance_as_normalizer!r}")

    def _fit(self, feats) -> None:
        feats.require("head", self.name)
        W = feats.head.weight.detach().double().cpu()
        if W.shape[0] < 2:
            raise ValueError(f"fdbd needs at least 2 classes (decision boundaries), the head has {W.shape[0]}")
        denom = boundary_denominators(W)
        off = ~torch.eye(W.shape[0], dtype=torch.bool)
        if not bool((denom[off] > 0).all()):
            p, c = (torch.nonzero((denom == 0) & off)[0]).tolist()
            raise ValueError(f"fdbd: the head's rows {p} and {c} are identical: there is no decision boundary "
                             "between those classes (distance |z_p - z_c| / 0)")
        self.mean = feature_mean(self, feats)
        self.W, self.b = W, feats.head.bias_or_zero().detach().double().cpu()
        self.denominators = denom
        self.head = feats.head
        self._f32 = None

    def _float32(self, device) -> tuple[torch.Tensor, ...]:
        """(W, b, denominators, mean) in float32 on ``device``, made once per device (the fitted state is
        float64; scoring in float32, as both references, runs at pytorch-ood's rate)."""
        cache = getattr(self, "_f32", None)
        if cache is None or cache[0].device != torch.device(device):
            cache = tuple(t.to(device=device, dtype=torch.float32) for t in (self.W, self.b, self.denominators,
                                                                                self.mean))
            self._f32 = cache
        return cache

    def _score(self, logits, h, head):
        x = self.in_space(h, head).float()
        W, b, denom, mean = self._float32(x.device)
        z = matmul(x, W.T) + b  # numpy's GEMM on the CPU (fastops.matmul: faster than torch's here)
        top, pred = z.max(1)
        dist = ((top[:, None] - z) / denom[pred]).sum(1) / (z.shape[1] - 1)
        centre = x - mean if self.distance_as_normalizer else x
        return dist / torch.linalg.vector_norm(centre, dim=1).clamp(min=1e-8)
