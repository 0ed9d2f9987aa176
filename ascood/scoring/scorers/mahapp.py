"""Mahalanobis++: MDS on L2-normalised features (its own scorer, built on :class:`~.distance.MDS`)."""
from __future__ import annotations

import torch

from .distance import MDS
from .features import LinearHead

__all__ = ["MahalanobisPP", "unit_rows"]


def unit_rows(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float64, (N, m) -> (N, m) float64; a zero row stays zero.

    No epsilon is added to the norm (the authors divide by the plain norm); the
    norm is clamped at 1e-300 so an all-zero feature (every unit inactive) gives
    a zero row instead of NaN.
    """
    h = h.double()
    return h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp(min=1e-300)


class MahalanobisPP(MDS):
    """Mahalanobis++ (Mueller & Hein, ICML 2025, "Mahalanobis++: Improving OOD Detection via Feature
    Normalization"): :class:`MDS` on u = x / ||x||_2.

    With x the feature in ``feature_space``, mu_c the mean of the normalised
    ID-train features of class c and P the pseudo-inverse of their tied
    (class-centred, biased) covariance::

        score(x) = max_c -(u - mu_c)^T P (u - mu_c),   u = x / ||x||_2

    Normalising removes the feature norm, which varies far more across and
    within classes than the shared-covariance Gaussian model of MDS allows.
    Not searched by APS (no hyperparameter, as MDS). ``eps > 0`` adds Lee et
    al.'s input preprocessing on this distance, as :class:`MDS`.

    Reference: the authors' ``evaluate_Mahalanobis_norm`` (mueller-mp/maha-norm
    @ 53de550be7f88acad959f5fdd8f2430fb9a8b6ea, ``NINCO/detection_methods.py``;
    also its README's "Method"): the normalised train features, class means,
    sklearn's ``EmpiricalCovariance(assume_centered=True)`` of the centred rows
    (float64; its precision is ``pinvh``, as here), the test feature
    normalised, minus the smallest squared distance; checked per sample in
    ``tests/scoring/test_scorers_geometry.py``. The reference reads the raw
    penultimate feature (``feature_space="raw"``, the default). In the
    ``"head"`` space of a z-score head every h~ already has the norm
    sigma * sqrt(m - 1), so there Mahalanobis++ is MDS of that space up to a
    constant factor (the same ranking); on the raw h the two differ. As for
    MDS, the head space of a z-score head is singular along the all-ones
    direction (every h~ sums to 0): the pseudo-inverse there depends on float
    rounding, and two chunkings of one fit can differ by several percent; use
    the default ``"raw"``.

    Fit: as :class:`MDS` (one streamed pass; class means (C, m) and one (m, m)
    scatter, float64, plus one chunk, normalised in float64).
    """

    name = "mdspp"

    def in_space(self, h: torch.Tensor, head: LinearHead | None) -> torch.Tensor:
        """Raw features (B, m) -> the unit-norm feature of the scorer's space, float64."""
        return unit_rows(super().in_space(h, head))
