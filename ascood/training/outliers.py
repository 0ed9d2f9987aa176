"""Virtual-outlier synthesis (the paper's Sec. 3.1, Eq. 5) and the alpha schedule.

* :func:`true_class_saliency`: G = d z_y / d x, the gradient of each sample's
  true-class logit w.r.t. its input (the logits are summed over the batch
  before the backward pass; samples do not interact in eval mode, so each gets
  its own gradient).
  ``saliency_target="prob"`` uses the true-class softmax probability p_y
  instead of the logit z_y (the paper's Sec. D.3 ablation).
* :func:`shuffle_rank_key`: the per-pixel ranking of invariant pixel shuffle,
  sum over channels of exp(G_c) (signed G, the reference's) or sum |G_c|;
  ``shuffle_rank="random"`` ranks pixels by uniform noise instead, i.e. the
  shuffled pixels are chosen at random (the authors' published CIFAR-10 run,
  :func:`random_rank_key`).
* :func:`synthesize_outliers`: x' from G for ``ood_type`` "gradient" (x + alpha
  G on the top-p_inv |G| elements), "shuffle" (permute the most salient
  pixels), "gaussian" (alpha * N(0, 1)); "none" gives no outliers. A negative
  alpha subtracts the gradient (the paper's Table 5 ablation).
* :func:`alpha_at`: alpha decays linearly from alpha_max to alpha_min over the
  1-based epochs, reaching alpha_min at the last.
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

import math

import torch
from torch import nn

from .. import _ops

__all__ = ["OOD_TYPES", "ALPHA_MODES", "SALIENCY_MODES", "SALIENCY_TARGETS", "SHUFFLE_RANKS", "alpha_at",
           "check_alpha_range", "true_class_saliency", "relative_saliency", "shuffle_rank_key", "random_rank_key",
           "synthesize_outliers"]

OOD_TYPES = ("gradient", "shuffle", "gaussian", "none")
ALPHA_MODES = ("absolute", "relative")
SALIENCY_MODES = ("eval", "train")
#: What G differentiates: the true-class logit z_y (the paper's Eq. 2) or its softmax probability p_y (Sec. D.3).
SALIENCY_TARGETS = ("logit", "prob")
#: Pixel ranking of invariant pixel shuffle: "exp" = sum_c exp(G_c) (the reference's train script), "abs" =
#: sum_c |G_c|, "random" = uniform noise, so the pixels are chosen at random (the fork's published CIFAR-10 run).
SHUFFLE_RANKS = ("exp", "abs", "random")


def alpha_at(epoch: int, epochs: int, alpha_min: float, alpha_max: float) -> float:
    """alpha of 1-based ``epoch`` (1..epochs): (alpha_max - alpha_min) (1 - epoch/epochs) + alpha_min.

    Epochs count from 1, as the reference's OpenOOD pipeline loops epochs
    1..num_epochs: the first epoch uses alpha_max - (alpha_max - alpha_min) /
    epochs and the last exactly alpha_min (alpha_max itself is never used
    unless alpha_min == alpha_max, when alpha is constant).
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch is 1-based and must be in [1, {epochs}], got {epoch}")
    return (alpha_max - alpha_min) * (1.0 - epoch / epochs) + alpha_min


def check_alpha_range(alpha_min: float, alpha_max: float,
                      names: tuple[str, str] = ("alpha_min", "alpha_max")) -> None:
    """Raise ValueError unless alpha_min/alpha_max are finite, of one sign, and |alpha_min| <= |alpha_max|.

    Negative values subtract the gradient (x' = x - |alpha| G, the paper's
    Table 5 ablation "gradient subtraction"); the schedule still runs from
    alpha_max (first epoch) to alpha_min (last), so for subtraction pass e.g.
    alpha_max=-300, alpha_min=-30. ``names`` are the option names the message
    uses (the CLI passes its flags).
    """
    lo, hi = names
    for name, v in ((lo, alpha_min), (hi, alpha_max)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if alpha_min * alpha_max < 0:
        raise ValueError(f"{lo} ({alpha_min}) and {hi} ({alpha_max}) must have the same sign: both >= 0 adds the "
                         "gradient (the paper's method), both <= 0 subtracts it (Table 5 ablation)")
    if abs(alpha_min) > abs(alpha_max):
        raise ValueError(f"|{lo}| ({abs(alpha_min)}) must be <= |{hi}| ({abs(alpha_max)}): alpha decays from "
                         f"{hi} at the start to {lo} at the end")


def true_class_saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str = "eval",
                        target_kind: str = "logit") -> torch.Tensor:
    """G = d z_y / d x (or d p_y / d x) for every sample: (B, C, H, W) float -> same shape and dtype.

    ``mode="eval"`` (the reference) computes it with BatchNorm/dropout in eval
    mode so samples do not interact and running statistics are not touched;
    ``"train"`` keeps train mode (the reference's README allows it). The
    model's previous mode is restored. Parameter gradients are not touched
    (``autograd.grad`` w.r.t. the input only).

    ``target_kind="logit"`` differentiates the true-class logit z_y (the
    paper's Eq. 2); ``"prob"`` the true-class softmax probability p_y (the
    paper's Sec. D.3 ablation, which reports similar results).

    Always computed in float32 (float64 for float64 x) with autocast disabled:
    the gradient picks the outlier mask, and under mixed precision a float16
    gradient would rank elements differently (underflow, ties).
    """
    if mode not in SALIENCY_MODES:
        raise ValueError(f"saliency_mode must be one of {SALIENCY_MODES}, got {mode!r}")
    if target_kind not in SALIENCY_TARGETS:
        raise ValueError(f"saliency_target must be one of {SALIENCY_TARGETS}, got {target_kind!r}")
    was_training = model.training
    model.train(mode == "train")
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    try:
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xg = x.detach().to(work_dtype).requires_grad_(True)
            logits = model(xg).to(work_dtype)
            if target_kind == "prob":
                logits = torch.softmax(logits, dim=1)
            # Summing the true-class values over the batch gives every sample its own gradient.
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


def shuffle_rank_key(grad: torch.Tensor, rank: str = "exp") -> torch.Tensor:
    """Per-pixel ranking key of invariant pixel shuffle: (B, C, H, W) -> (B, H, W) float32/float64.

    ``rank="exp"`` (the reference's): pixels ranked by s = sum_c exp(G_c) of the
    *signed* gradient. The key returned is logsumexp_c(G_c) = log(s): log is
    increasing, so the top-n set is the same, and it cannot overflow for the
    large G of early training (exp(G) is inf in float32 for G > 88).
    ``rank="abs"``: sum_c |G_c| (this package's former ranking, kept as an
    option; it picks a different set, about 1/3 overlap on a CIFAR ResNet-18).
    """
    if rank == "random":
        raise ValueError("shuffle_rank 'random' does not rank by the saliency: use random_rank_key")
    if rank not in SHUFFLE_RANKS:
        raise ValueError(f"shuffle_rank must be one of {SHUFFLE_RANKS}, got {rank!r}")
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    if rank == "exp":
        return torch.logsumexp(g, dim=1)
    return g.abs().sum(dim=1)


def random_rank_key(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (B, *spatial) float32 key of independent uniform [0, 1) values: the top-n pixels under it are a
    uniformly random set of n pixels per sample.

    This is the authors' ``random`` run (their shuffle with the saliency map
    replaced by ``torch.rand`` of one value per pixel). The values are drawn
    from ``generator`` (on its device), so a resumed run draws the same ones.
    """
    gen_device = generator.device if generator is not None else x.device
    key = torch.rand((x.shape[0], *x.shape[2:]), generator=generator, device=gen_device, dtype=torch.float32)
    return key.to(x.device)


def synthesize_outliers(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, ood_type: str, p_inv: float,
                        alpha: float, alpha_mode: str = "absolute", saliency_mode: str = "eval",
                        saliency_target: str = "logit", shuffle_rank: str = "exp",
                        generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Virtual outliers x' for a batch (detached: no gradient flows back through x').

    Args:
        model: the network being trained (its raw module, not a DDP wrapper).
        x: (B, C, H, W) float ID images (normalised); target: (B,) int64 labels.
        ood_type: "gradient", "shuffle", "gaussian" or "none" (returns None).
        p_inv: fraction of elements (gradient) or pixels (shuffle) treated as invariant.
        alpha: step size (gradient; negative = gradient subtraction, Table 5) or noise scale (gaussian).
        alpha_mode: "absolute" (paper) or "relative" (see module docstring).
        saliency_mode: "eval" (reference) or "train".
        saliency_target: "logit" (paper, Eq. 2) or "prob" (Sec. D.3): what G differentiates.
        shuffle_rank: "exp" (reference: sum_c exp(G_c)), "abs" (sum_c |G_c|) or "random" (pixels chosen
            at random; no saliency pass); shuffle only.
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
    if ood_type == "shuffle" and shuffle_rank == "random":
        # The key and then the permutation are drawn from the one generator: a fixed order, so resume is exact.
        return _ops.shuffle_outlier(x.detach(), random_rank_key(x, generator), p_inv, generator)
    if shuffle_rank not in SHUFFLE_RANKS:
        raise ValueError(f"shuffle_rank must be one of {SHUFFLE_RANKS}, got {shuffle_rank!r}")
    grad = true_class_saliency(model, x, target, saliency_mode, saliency_target)
    x = x.detach()
    if ood_type == "shuffle":
        return _ops.shuffle_outlier(x, shuffle_rank_key(grad, shuffle_rank), p_inv, generator)
    if alpha_mode == "relative":
        grad = relative_saliency(grad, p_inv)
    return _ops.gradient_outlier(x, grad, p_inv, alpha).detach()
