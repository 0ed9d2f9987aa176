"""ascood_kernels: fused ops for ASCOOD out-of-distribution detection.

Public ops (batch-first tensors; semantics in docs/OPS.md, executable form in
:mod:`ascood_kernels.reference`):

* :func:`invariant_mask` / :func:`gradient_outlier`: per-sample top-p |G|
  threshold and the masked step that makes a virtual outlier;
* :func:`zscore`: the standardised feature fed to the classifier head;
* :func:`shuffle_outlier`: the invariant pixel shuffle;
* :func:`iodin_perturb`: ODIN / i-ODIN input perturbation;
* :func:`ascood_loss`: CE + w * KL(U || p(outlier)).

Each takes ``backend="auto"|"reference"|"cpu"|"cuda"|"triton"`` (default from
``ASCOOD_BACKEND``); :func:`available_backends` reports what loaded.
"""
from __future__ import annotations

from . import _backend

# Load the compiled ops before the op modules register fake/autograd kernels on them.
_backend.extension_loaded()
_backend.triton_loaded()

from ._backend import BACKENDS, available_backends  # noqa: E402
from .ops import (ascood_loss, gradient_outlier, invariant_mask, iodin_perturb,  # noqa: E402
                  shuffle_outlier, zscore)

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "available_backends",
    "invariant_mask",
    "gradient_outlier",
    "zscore",
    "shuffle_outlier",
    "iodin_perturb",
    "ascood_loss",
    "__version__",
]
