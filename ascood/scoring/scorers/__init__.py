"""Post-hoc OOD scorers; each returns ``(pred, score)`` with higher score = more ID.

=========  ============================================================
name       class
=========  ============================================================
msp        :class:`MSP` max softmax probability
tempscale  :class:`TempScale` MSP after temperature scaling (fit T)
odin       :class:`ODIN` temperature + input perturbation of all elements
iodin      :class:`IODIN` i-ODIN: perturb only the top-k |grad| elements
ebo        :class:`EBO` energy
mls        :class:`MLS` max logit
gen        :class:`GEN` generalized entropy
react      :class:`ReAct` clipped features (fit: percentile)
ash        :class:`ASH` activation shaping
scale      :class:`SCALE` feature rescaling
knn        :class:`KNN` K-th nearest-neighbour distance (fit: bank)
mds        :class:`MDS` Mahalanobis (fit: class means, precision)
rmds       :class:`RMDS` relative Mahalanobis
vim        :class:`ViM` virtual-logit matching
nnguide    :class:`NNGuide` nearest-neighbour guidance
relation   :class:`Relation` neural relation graph
=========  ============================================================
"""
from __future__ import annotations

from .base import FeatureScorer, Scorer
from .distance import KNN, MDS, RMDS, NNGuide, Relation, ViM
from .logits import EBO, GEN, MLS, MSP, TempScale
from .perturb import IODIN, ODIN
from .shaping import ASH, SCALE, ReAct
from .sweep import SweepResult, loader_scores, sweep

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (
    MSP, TempScale, ODIN, IODIN, EBO, MLS, GEN, ReAct, ASH, SCALE, KNN, MDS, RMDS, ViM, NNGuide, Relation)}


def get_scorer(name: str, **params) -> Scorer:
    """A scorer by its name (case-insensitive; "energy" = ebo, "maxlogit" = mls, "i-odin" = iodin)."""
    key = name.lower().replace("_", "").replace("-", "")
    key = {"energy": "ebo", "maxlogit": "mls", "temperature": "tempscale", "mahalanobis": "mds"}.get(key, key)
    if key not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return SCORERS[key](**params)


def scorer_for_model(name: str, input_std=None, **params) -> Scorer:
    """:func:`get_scorer` with the model's input normalisation where the scorer needs it.

    ODIN / i-ODIN take eps in [0, 1] pixel units and divide it by the per-channel
    ``input_std`` (a sequence of floats, or None to read ``model.input_std``);
    every other scorer ignores it. ``params`` go to the scorer's constructor
    (e.g. a preset's ``bank="all"`` for NNGuide).
    """
    if SCORERS.get(name.lower().replace("_", "").replace("-", "")) in (ODIN, IODIN):
        return get_scorer(name, std=input_std, **params)
    return get_scorer(name, **params)


__all__ = ["Scorer", "FeatureScorer", "SCORERS", "get_scorer", "scorer_for_model", "sweep", "SweepResult", "loader_scores",
           "MSP", "TempScale", "ODIN", "IODIN", "EBO", "MLS", "GEN", "ReAct", "ASH", "SCALE", "KNN", "MDS", "RMDS",
           "ViM", "NNGuide", "Relation"]
