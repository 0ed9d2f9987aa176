"""ascood.nets: the networks.

:class:`ASCOODNet` (backbone + z-score head, :mod:`.ascoodnet`), the built-in
backbones (:mod:`.backbones`), :func:`wrap` for torchvision/timm classifiers
(:mod:`.wrapping`), the model registry that maps a name to a builder
(:func:`build_model`, :mod:`.registry`) and OpenOOD v1.5 checkpoints read into an
ASCOODNet (:func:`load_openood_model`, :mod:`.openood`).

Layer rule: may import ``ascood.data`` (and ``ascood.files`` / ``ascood._ops``), never
training, scoring or apps.
"""
from .ascoodnet import HEADS, ASCOODNet
from .openood import OPENOOD_MODEL_NAMES, load_openood_model
from .registry import MODEL_NAMES, build_model
from .wrapping import EXTERNAL_SOURCES, split_classifier, wrap

__all__ = ["ASCOODNet", "HEADS", "MODEL_NAMES", "build_model", "wrap", "split_classifier", "EXTERNAL_SOURCES",
           "OPENOOD_MODEL_NAMES", "load_openood_model"]
