"""ascood: ASCOOD out-of-distribution detection on top of the ``ascood_kernels`` fused ops.

Train (:func:`train`), score (:mod:`ascood.scorers`) and evaluate
(:func:`evaluate`) with OpenOOD's metric conventions; ``python -m ascood``
runs the same from the command line.
"""
from __future__ import annotations

from .criterion import ASCOODCriterion  # noqa: F401
from .models import ASCOODNet, build_model  # noqa: F401
# The module is `wrapping`, not `wrap`: a submodule named like the function would
# replace `ascood.wrap` by the module as soon as it is imported.
from .wrapping import wrap  # noqa: F401,E402
from .trainer import NonFiniteLossError, TrainConfig, Trainer, train  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier modules load on first use so `import ascood` stays quick.
    if name == "evaluate":
        from .evaluator import evaluate
        return evaluate
    if name in ("scorers", "metrics", "data", "evaluator", "checkpoint", "outliers", "plots", "losses",
                "normalization", "model_selection", "presets", "openood", "reproduce"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ascood' has no attribute {name!r}")


__all__ = ["ASCOODNet", "ASCOODCriterion", "build_model", "wrap", "train", "Trainer", "TrainConfig",
           "NonFiniteLossError", "evaluate", "__version__"]
