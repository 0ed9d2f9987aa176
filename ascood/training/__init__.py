"""ascood.training: how a network is trained with ASCOOD.

Outlier synthesis (:mod:`.outliers`), the loss terms (:mod:`.losses`), the one
training step :class:`ASCOODCriterion` (:mod:`.criterion`), the
:class:`Trainer` (:mod:`.trainer`), checkpoints and the checks on resume
(:mod:`.checkpoint`, :mod:`.resume`, :mod:`.model_selection`), DDP helpers
(:mod:`.distributed`) and the locked run directory (:mod:`.rundir`).

Layer rule: may import ``ascood.data`` and ``ascood.nets``, never scoring or apps.
"""
from .criterion import ASCOODCriterion
from .trainer import NonFiniteLossError, TrainConfig, Trainer, train

__all__ = ["ASCOODCriterion", "Trainer", "TrainConfig", "train", "NonFiniteLossError"]
