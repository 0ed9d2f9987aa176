"""ascood.scoring: how a trained network's OOD detection is measured.

The post-hoc scorers and the APS sweep (:mod:`.scorers`), the OpenOOD-style
evaluator (:mod:`.evaluator`), the metrics (:mod:`.metrics`), summaries shared
by the apps (:mod:`.summary`) and the figures (:mod:`.plots`).

Layer rule: may import ``ascood.data``, ``ascood.nets`` and ``ascood.training``, never apps.
"""
from .evaluator import evaluate
from .metrics import ood_metrics

__all__ = ["evaluate", "ood_metrics"]
