"""Post-hoc OOD scorers; higher score = more ID. Each works on a model or on cached features.

name       class
=========  ============================================================
msp        :class:`MSP` max softmax probability
tempscale  :class:`TempScale` MSP after temperature scaling (fit T)
odin       :class:`ODIN` temperature + input perturbation of all elements
iodin      :class:`IODIN` i-ODIN: perturb only the top-k |grad| elements
ebo        :class:`EBO` energy
mls        :class:`MLS` max logit
gen        :class:`GEN` generalized entropy
entropy    :class:`Entropy` negative softmax entropy
klm        :class:`KLM` KL-Matching (fit: typical posteriors on ID val)
react      :class:`ReAct` clipped features (fit: percentile)
ash        :class:`ASH` activation shaping
scale      :class:`SCALE` feature rescaling
dice       :class:`DICE` sparsified last layer (fit: mean activation)
gradnorm   :class:`GradNorm` last-layer gradient norm (closed form)
knn        :class:`KNN` K-th nearest-neighbour distance (fit: bank)
mds        :class:`MDS` Mahalanobis (fit: class means, precision; optional input preprocessing)
rmds       :class:`RMDS` relative Mahalanobis
vim        :class:`ViM` virtual-logit matching
nnguide    :class:`NNGuide` nearest-neighbour guidance (bank: random / all / first)
relation   :class:`Relation` neural relation graph
she        :class:`SHE` simplified Hopfield energy (fit: class patterns)
mdspp      :class:`MahalanobisPP` Mahalanobis++: MDS on L2-normalised features
fdbd       :class:`FDBD` feature distance to the head's decision boundaries (fit: mean)
nci        :class:`NCI` neural-collapse alignment with the predicted class's weight (fit: mean)
neco       :class:`NECO` neural-collapse principal-subspace norm ratio (fit: PCA)
=========  ============================================================
=======
==========  ============================================================
name        class
==========  ============================================================
msp         :class:`MSP` max softmax probability
tempscale   :class:`TempScale` MSP after temperature scaling (fit T)
odin        :class:`ODIN` temperature + input perturbation of all elements
iodin       :class:`IODIN` i-ODIN: perturb only the top-k |grad| elements
ebo         :class:`EBO` energy
mls         :class:`MLS` max logit
gen         :class:`GEN` generalized entropy
entropy     :class:`Entropy` negative softmax entropy
klm         :class:`KLM` KL-Matching (fit: typical posteriors on ID val)
react       :class:`ReAct` clipped features (fit: percentile)
ash         :class:`ASH` activation shaping
scale       :class:`SCALE` feature rescaling
adascale_a  :class:`AdaScaleA` AdaSCALE-A: SCALE with a per-sample percentile, features scaled (fit: ECDF)
adascale_l  :class:`AdaScaleL` AdaSCALE-L: the same percentile, logits scaled (fit: ECDF)
dice        :class:`DICE` sparsified last layer (fit: mean activation)
gradnorm    :class:`GradNorm` last-layer gradient norm (closed form)
knn         :class:`KNN` K-th nearest-neighbour distance (fit: bank)
mds         :class:`MDS` Mahalanobis (fit: class means, precision; optional input preprocessing)
rmds        :class:`RMDS` relative Mahalanobis
vim         :class:`ViM` virtual-logit matching
nnguide     :class:`NNGuide` nearest-neighbour guidance (bank: random / all / first)
relation    :class:`Relation` neural relation graph
she         :class:`SHE` simplified Hopfield energy (fit: class patterns)
mdspp       :class:`MahalanobisPP` Mahalanobis++: MDS on L2-normalised features
fdbd        :class:`FDBD` feature distance to the head's decision boundaries (fit: mean)
nci         :class:`NCI` neural-collapse alignment with the predicted class's weight (fit: mean)
neco        :class:`NECO` neural-collapse principal-subspace norm ratio (fit: PCA)
==========  ============================================================

On a model: ``scorer.fit(model, loader)``, ``scorer.score(model, x) -> (pred,
score)``. On cached features: ``feats = extract_features(model, loader)`` once
per split, then ``scorer.fit_features(feats)`` and
``scorer.score_features(logits, features)`` (or :func:`features_scores`).
ODIN and i-ODIN (and MDS with ``eps > 0``) need the images. AdaSCALE reads the
features of a perturbed input too: a record extra (``extract_features(model,
loader, extras=scorer.record_extras())``; :class:`FeatureCache` adds it).
"""
from __future__ import annotations

from .adascale import AdaScaleA, AdaScaleL
from .base import FeatureScorer, Scorer
from .boundary import FDBD
from .collapse import NCI, NECO
from .distance import KNN, MDS, RMDS, SHE, NNGuide, Relation, ViM
from .features import FeatureCache, Features, LinearHead, RecordExtra, extract_features, features_scores
from .gradnorm import GradNorm
from .logits import EBO, GEN, KLM, MLS, MSP, Entropy, TempScale
from .mahapp import MahalanobisPP
from .perturb import IODIN, ODIN
from .shaping import ASH, DICE, SCALE, ReAct
from .sweep import SweepResult, fit_scorer, loader_scores, sweep

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (
    MSP, TempScale, ODIN, IODIN, EBO, MLS, GEN, Entropy, KLM, ReAct, ASH, SCALE, DICE, GradNorm, KNN, MDS, RMDS,
    ViM, NNGuide, Relation, SHE, AdaScaleA, AdaScaleL, MahalanobisPP, FDBD, NCI, NECO)}

_ALIASES = {"energy": "ebo", "maxlogit": "mls", "temperature": "tempscale", "mahalanobis": "mds",
            "klmatching": "klm", "kl": "klm", "adascalea": "adascale_a", "adascalel": "adascale_l",
            "mahalanobis++": "mdspp", "maha++": "mdspp", "mds++": "mdspp"}


def _key(name: str) -> str:
    key = name.lower().replace("_", "").replace("-", "")
    return _ALIASES.get(key, key)


def get_scorer(name: str, **params) -> Scorer:
    """A scorer by its name (case-insensitive; "energy" = ebo, "maxlogit" = mls, "i-odin" = iodin,
    "kl-matching" = klm, "adascale-a" = "AdaSCALE_A" = adascale_a, "mahalanobis++" / "maha++" = mdspp)."""
    key = _key(name)
    if key not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return SCORERS[key](**params)


def scorer_for_model(name: str, input_std=None, **params) -> Scorer:
    """:func:`get_scorer` with the model's input normalisation where the scorer needs it.

    ODIN / i-ODIN (and MDS's optional input preprocessing) take eps in [0, 1]
    pixel units and divide it by the per-channel ``input_std`` (a sequence of
    floats, or None to read ``model.input_std``); every other scorer ignores it.
    ``params`` go to the scorer's constructor (e.g. a preset's ``bank="all"``
    for NNGuide).
    """
    if SCORERS.get(_key(name)) in (ODIN, IODIN, MDS, MahalanobisPP):
        return get_scorer(name, std=input_std, **params)
    return get_scorer(name, **params)


__all__ = ["Scorer", "FeatureScorer", "SCORERS", "get_scorer", "scorer_for_model", "sweep", "SweepResult", "loader_scores",
           "fit_scorer",
           "Features", "LinearHead", "FeatureCache", "RecordExtra", "extract_features", "features_scores",
           "MSP", "TempScale", "ODIN", "IODIN", "EBO", "MLS", "GEN", "Entropy", "KLM", "ReAct", "ASH", "SCALE", "DICE",
           "GradNorm", "KNN", "MDS", "RMDS", "ViM", "NNGuide", "Relation", "SHE", "AdaScaleA", "AdaScaleL",
           "MahalanobisPP", "FDBD", "NCI", "NECO"]
