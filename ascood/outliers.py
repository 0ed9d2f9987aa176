"""Virtual-outlier synthesis (the paper's Sec. 3.1, Eq. 5) and the alpha schedule.

* :func:`true_class_saliency`: G = d z_y / d x, the gradient of each sample's
  true-class logit w.r.t. its input (the logits are summed over the batch
  before the backward pass; samples do not interact in eval mode, so each gets
  its own gradient).
* :func:`synthesize_outliers`: x' from G for ``ood_type`` "gradient" (x + alpha
  G on the top-p_inv |G| elements), "shuffle" (permute the most salient
  pixels), "gaussian" (alpha * N(0, 1)); "none" gives no outliers.
* :func:`alpha_at`: alpha decays linearly from alpha_max to alpha_min.
* :func:`relative_saliency`: ``alpha_mode="relative"`` (beyond the paper).

``alpha_mode="relative"`` -- definition
--------------------------------------
The paper's step ``alpha * G`` is in units of the saliency, whose scale depends
on the data, the model and the training stage (the reference uses alpha 300 on
CIFAR and 0.1 on fine-grained sets). In relative mode each sample's G is first
divided by

    s_b = mean of |G_b| over the elements that the mask selects
        = sum(|G_b| * M_b) / sum(M_b),   M_b = invariant_mask(G_b, p_inv),

and the outlier is ``gradient_outlier(x, G / s_b, p_inv, alpha)``. So the
selected elements move on average by exactly ``alpha`` in the units of the
(normalised) input: alpha = 1 moves each perturbed element by about one
standard deviation of a normalised pixel, whatever the model or dataset. The
direction of every element's step and the relative sizes within a sample are
those of G. The mask is the same as G's, because a positive per-sample factor
keeps the order of magnitudes (float rounding of the rescale can, at worst,
merge two neighbouring magnitudes at the threshold, which the tie rule then
keeps both of). A sample with G == 0 everywhere gets s_b = 0 and is left
unchanged. For "shuffle" the mode has no effect (the permutation has no step
size); for "gaussian" alpha is already in input units.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _ops

__all__ = ["OOD_TYPES", "ALPHA_MODES", "SALIENCY_MODES", "alpha_at", "true_class_saliency", "relative_saliency",
           "synthesize_outliers"]

OOD_TYPES = ("gradient", "shuffle", "gaussian", "none")
ALPHA_MODES = ("absolute", "relative")
SALIENCY_MODES = ("eval", "train")


def alpha_at(epoch: int, epochs: int, alpha_min: float, alpha_max: float) -> float:
    """alpha for 0-based ``epoch`` of ``epochs``: (alpha_max - alpha_min) (1 - epoch/epochs) + alpha_min.

    Epoch 0 uses alpha_max; the last epoch uses alpha_min + (alpha_max -
    alpha_min) / epochs (the reference's formula, which reaches alpha_min
    only at the end of training). Constant when alpha_min == alpha_max.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    return (alpha_max - alpha_min) * (1.0 - epoch / epochs) + alpha_min


def true_class_saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str = "eval") -> torch.Tensor:
    """G = d z_y / d x for every sample: (B, C, H, W) float -> same shape and dtype.

    ``mode="eval"`` (the reference) computes it with BatchNorm/dropout in eval
    mode so samples do not interact and running statistics are not touched;
    ``"train"`` keeps train mode (the reference's README allows it). The
    model's previous mode is restored. Parameter gradients are not touched
    (``autograd.grad`` w.r.t. the input only).
    """
    if mode not in SALIENCY_MODES:
        raise ValueError(f"saliency_mode must be one of {SALIENCY_MODES}, got {mode!r}")
    was_training = model.training
    model.train(mode == "train")
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
            # Summing the true-class logits over the batch gives every sample its own gradient.
            z = logits.gather(1, target.view(-1, 1).long()).sum()
            (grad,) = torch.autograd.grad(z, xg)
    finally:
        model.train(was_training)
    return grad.to(x.dtype)


def relative_saliency(grad: torch.Tensor, p_inv: float) -> torch.Tensor:
    """G / s_b per sample, s_b = mean |G| over the selected elements (module docstring)."""
    mask = _ops.invariant_mask(grad, p_inv)
    flat_abs = (grad.abs().float() * mask).flatten(1)
    count = mask.flatten(1).sum(1).clamp_min(1)
    s = flat_abs.sum(1) / count
    inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(s))
    return (grad.float() * inv.view(-1, *([1] * (grad.dim() - 1)))).to(grad.dtype)


def synthesize_outliers(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, ood_type: str, p_inv: float,
                        alpha: float, alpha_mode: str = "absolute", saliency_mode: str = "eval",
                        generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Virtual outliers x' for a batch (detached: no gradient flows back through x').

    Args:
        model: the network being trained (its raw module, not a DDP wrapper).
        x: (B, C, H, W) float ID images (normalised); target: (B,) int64 labels.
        ood_type: "gradient", "shuffle", "gaussian" or "none" (returns None).
        p_inv: fraction of elements (gradient) or pixels (shuffle) treated as invariant.
        alpha: step size (gradient) or noise scale (gaussian).
        alpha_mode: "absolute" (paper) or "relative" (see module docstring).
        saliency_mode: "eval" (reference) or "train".
        generator: RNG for the shuffle permutation and the Gaussian noise.

    Returns:
        (B, C, H, W) tensor like x, or None for "none".
    """
    if ood_type not in OOD_TYPES:
        raise ValueError(f"ood_type must be one of {OOD_TYPES}, got {ood_type!r}")
    if alpha_mode not in ALPHA_MODES:
        raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {alpha_mode!r}")
    if ood_type == "none":
        return None
    if ood_type == "gaussian":
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32)
        return (alpha * noise).to(device=x.device, dtype=x.dtype)
    grad = true_class_saliency(model, x, target, saliency_mode)
    x = x.detach()
    if ood_type == "shuffle":
        return _ops.shuffle_outlier(x, grad.abs(), p_inv, generator)
    if alpha_mode == "relative":
        grad = relative_saliency(grad, p_inv)
    return _ops.gradient_outlier(x, grad, p_inv, alpha).detach()
