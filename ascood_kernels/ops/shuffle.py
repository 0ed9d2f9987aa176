"""shuffle_outlier: ASCOOD's invariant pixel shuffle (the "shuffle" outlier type)."""
from __future__ import annotations

import math

import torch

from .. import _backend, _validate, reference
from ._common import empty_image_like, register_fake
from .permutations import draw_permutations

__all__ = ["shuffle_outlier"]


def shuffle_outlier(x: torch.Tensor, saliency: torch.Tensor, p_inv: float,
                    generator: torch.Generator | None = None, *, backend: str | None = "auto") -> torch.Tensor:
    """Permute the most salient pixels of each sample among themselves.

    Per sample, the ``int(p_inv * P)`` pixels (P = number of spatial positions)
    with the largest channel-summed saliency are randomly permuted, all
    channels of a pixel moving together; every other pixel stays. The
    permutation comes from :func:`~ascood_kernels.ops.permutations.draw_permutations`
    (one draw from ``generator``, the same for every backend).

    Args:
        x: (B, C, *spatial) images, float32/float16/bfloat16/float64.
        saliency: x-shaped (summed over channels in float64) or per-pixel
            (B, *spatial); ascood passes logsumexp_c(G_c) (the reference ranks by
            sum_c exp(G_c), the same order). Ties go to the lower pixel index,
            NaN ranks highest.
        p_inv: fraction of pixels to shuffle, in (0, 1].
        generator: ``torch.Generator`` for reproducible permutations (on any
            device; the permutation is drawn on its device).
        backend: "auto", "reference", "cpu", "cuda" or "triton" (on CUDA
            tensors "cuda" runs the Triton kernel: this op has no CUDA C++ kernel;
            without Triton, "auto" falls back to the reference with a warning).

    Returns:
        Tensor like x, not differentiable.
    """
    _validate.tensor("x", x, min_rank=3)
    _validate.tensor("saliency", saliency, min_rank=2)
    _validate.same_device("x", x, "saliency", saliency)
    spatial = tuple(x.shape[2:])
    if saliency.shape != x.shape and (saliency.shape[0], *saliency.shape[1:]) != (x.shape[0], *spatial):
        raise ValueError(f"saliency must have x's shape {tuple(x.shape)} or (B, *spatial) "
                         f"{(x.shape[0], *spatial)}, got {tuple(saliency.shape)}")
    p_inv = _validate.fraction("p_inv", p_inv)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    which = _backend.resolve_without_cuda_kernel(backend, x.device, "shuffle_outlier")
    npix = reference.count_from_fraction(p_inv, math.prod(spatial))
    perm = draw_permutations(x.shape[0], npix, generator, x.device)
    x, saliency = x.detach(), saliency.detach()
    if which == "reference":
        return reference.shuffle_outlier(x, saliency, p_inv, perm)
    return _backend.op_namespace(which).shuffle_outlier(x, saliency, p_inv, perm)


def _fake_shuffle(x, saliency, p_inv, perm):
    return empty_image_like(x)


register_fake("shuffle_outlier", _fake_shuffle)
