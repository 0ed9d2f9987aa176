"""ascood: ASCOOD out-of-distribution detection on top of the ``ascood_kernels`` fused ops.

Train (:func:`train`), score (:mod:`ascood.scorers`) and evaluate
(:func:`evaluate`) with OpenOOD's metric conventions; ``python -m ascood``
runs the same from the command line.

The package is six layers, each a folder, imports pointing one way
(docs/ARCHITECTURE.md): ``data`` -> ``nets`` -> ``training`` -> ``scoring`` ->
``deploy`` -> ``apps`` (a layer imports only the ones before it), with
``files`` (atomic writes) and ``_ops`` (the fused ops) below them all.
:class:`Detector` (``ascood.deploy``) turns a trained run into a calibrated
OOD detector that saves, loads, predicts and exports.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: The public names, loaded on first use: ``import ascood`` (and the ``ascood`` command's start-up) stays light.
PUBLIC = {"ASCOODNet": "ascood.nets", "build_model": "ascood.nets", "wrap": "ascood.nets",
          "ASCOODCriterion": "ascood.training", "NonFiniteLossError": "ascood.training",
          "TrainConfig": "ascood.training", "Trainer": "ascood.training", "train": "ascood.training",
          "evaluate": "ascood.scoring.evaluator", "Detector": "ascood.deploy.detector"}

__version__ = "0.1.0"

#: Where the modules of the flat layout (ascood <= 0.1 before the layers) live now. ``import ascood.scorers``,
#: ``from ascood.checkpoint import load_model``, ``ascood.presets.PRESETS`` ... keep working.
MOVED_MODULES = {
    "scorers": "ascood.scoring.scorers", "metrics": "ascood.scoring.metrics",
    "evaluator": "ascood.scoring.evaluator", "plots": "ascood.scoring.plots",
    "checkpoint": "ascood.training.checkpoint", "outliers": "ascood.training.outliers",
    "losses": "ascood.training.losses", "criterion": "ascood.training.criterion",
    "trainer": "ascood.training.trainer", "resume": "ascood.training.resume",
    "distributed": "ascood.training.distributed", "rundir": "ascood.training.rundir",
    "model_selection": "ascood.training.model_selection",
    "models": "ascood.nets", "backbones": "ascood.nets.backbones", "wrapping": "ascood.nets.wrapping",
    "openood": "ascood.data.openood", "bundled": "ascood.data.bundled",
    "normalization": "ascood.data.normalization",
    "presets": "ascood.apps.presets", "reproduce": "ascood.apps.reproduce", "demo": "ascood.apps.demo",
    "cli": "ascood.apps.main",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import ascood.<old name>`` with the module at its new place (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, rest = fullname.partition(".")
        if head != "ascood" or not rest:
            return None
        first, _, tail = rest.partition(".")
        if first not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        first, _, tail = spec.name.partition(".")[2].partition(".")
        return importlib.import_module(MOVED_MODULES[first] + ("." + tail if tail else ""))

    def exec_module(self, module):  # the target module is already executed
        pass


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # first: the old parent's __path__ must not find the file


def __getattr__(name: str):
    # Everything loads on first use so `import ascood` stays quick (and a Ctrl-C at start-up stays one line).
    if name in PUBLIC:
        return getattr(importlib.import_module(PUBLIC[name]), name)
    if name in MOVED_MODULES:
        return importlib.import_module(MOVED_MODULES[name])
    if name in ("data", "nets", "training", "scoring", "deploy", "apps", "files"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ascood' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC) | set(MOVED_MODULES))


__all__ = ["ASCOODNet", "ASCOODCriterion", "build_model", "wrap", "train", "Trainer", "TrainConfig",
           "NonFiniteLossError", "evaluate", "Detector", "__version__"]
