"""ascood.nets: the networks.

:class:`ASCOODNet` (backbone + z-score head, :mod:`.ascoodnet`), the built-in
backbones (:mod:`.backbones`), :func:`wrap` for torchvision/timm classifiers
(:mod:`.wrapping`) and the model registry that maps a name to a builder
(:func:`build_model`, :mod:`.registry`).

Layer rule: may import ``ascood.data`` (and ``ascood.files`` / ``ascood._ops``), never
training, scoring or apps.
"""
from .ascoodnet import HEADS, ASCOODNet
from .registry import MODEL_NAMES, build_model
from .wrapping import EXTERNAL_SOURCES, split_classifier, wrap

__all__ = ["ASCOODNet", "HEADS", "MODEL_NAMES", "build_model", "wrap", "split_classifier", "EXTERNAL_SOURCES"]
