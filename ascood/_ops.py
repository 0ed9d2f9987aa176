"""The one place where ``ascood`` imports the fused ops.

Every other module calls ``from ascood import _ops`` and uses the names below,
so switching the implementation (public ``ascood_kernels`` vs its
``reference`` module while the public API was being written) is a one-line
change here. ``ascood`` builds on ``ascood_kernels``, never the reverse.

Public signatures used (docs/OPS.md gives the semantics):

* ``invariant_mask(grad, p_inv) -> bool tensor``
* ``gradient_outlier(x, grad, p_inv, alpha) -> tensor`` (autograd-aware)
* ``zscore(h, sigma=0.5, eps=1e-6) -> tensor`` (autograd-aware)
* ``shuffle_outlier(x, saliency, p_inv, generator=None) -> tensor``
* ``iodin_perturb(x, grad, eps, std, k=1) -> tensor``
* ``ascood_loss(id_logits, target, ood_logits, w) -> 0-dim loss`` (autograd-aware)
"""
from __future__ import annotations

from ascood_kernels import (ascood_loss, gradient_outlier, invariant_mask,  # noqa: F401
                            iodin_perturb, shuffle_outlier, zscore)

__all__ = ["invariant_mask", "gradient_outlier", "zscore", "shuffle_outlier", "iodin_perturb", "ascood_loss"]
