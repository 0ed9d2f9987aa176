"""ascood.data: where images come from.

Image folders, flat folders and image lists, the safe CIFAR reader
(:mod:`.datasets`), the OpenOOD v1.5 data tree (:mod:`.openood`), the bundled
demo data (:mod:`.bundled`) and normalisation statistics (:mod:`.normalization`).

Layer rule: imports only ``ascood.files`` / ``ascood._ops`` from the package;
every other layer may import this one.
"""
from .datasets import *  # noqa: F401,F403  (``ascood.data.dataset_from_path`` etc., the names of ascood < 0.2)
from .datasets import __all__ as _datasets_all

__all__ = list(_datasets_all)
