"""invariant_mask and gradient_outlier: per-sample top-|G| threshold + masked add.

The threshold is the exact k-th largest magnitude of each sample
(k = int(p_inv * n)), found by a radix select on the float bits in the
compiled backends; see docs/OPS.md for the full contract.
"""
from __future__ import annotations

import torch

from .. import _backend, _validate, reference
from ._common import empty_image_like, register_autograd, register_fake

__all__ = ["invariant_mask", "gradient_outlier"]


def invariant_mask(grad: torch.Tensor, p_inv: float, *, backend: str | None = "auto") -> torch.Tensor:
    """Mask of the ``int(p_inv * n)`` largest ``|grad|`` elements of each sample.

    Args:
        grad: (B, *) float32/float16/bfloat16/float64 tensor, batch first; the
            selection runs over all non-batch dims of each sample (n elements).
        p_inv: fraction in (0, 1]; ``k = int(p_inv * n)`` in double precision.
            ``k == 0`` (p_inv < 1/n) selects nothing.
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        bool tensor of grad's shape. Every element whose magnitude is >= the
        k-th largest magnitude of its sample is True, so **ties at the
        threshold are all kept** (a sample may keep more than k elements).
        Magnitudes are compared on the stored bits: +0 == -0, and NaN counts as
        larger than +inf (all NaNs tie). Not differentiable.
    """
    _validate.tensor("grad", grad)
    p_inv = _validate.fraction("p_inv", p_inv)
    which = _backend.resolve(backend, grad.device, "invariant_mask", grad.dtype)
    grad = grad.detach()
    if which == "reference":
        return reference.invariant_mask(grad, p_inv)
    return _backend.op_namespace(which).invariant_mask(grad, p_inv)


def gradient_outlier(x: torch.Tensor, grad: torch.Tensor, p_inv: float, alpha: float, *,
                     backend: str | None = "auto") -> torch.Tensor:
    """ASCOOD's gradient outlier: ``x + alpha * grad`` on the invariant mask, ``x`` elsewhere.

    One fused kernel: per-sample threshold of ``|grad|`` (as in
    :func:`invariant_mask`, ties kept) and the masked add.

    Args:
        x: (B, *) input batch, float32/float16/bfloat16/float64.
        grad: saliency ``dz_y/dx``, same shape, dtype and device as x.
        p_inv: fraction of elements per sample to move, in (0, 1].
        alpha: step size (any finite real; negative moves against the gradient).
        backend: see :func:`invariant_mask`.

    Returns:
        Tensor like x (channels-last in, channels-last out). The sum is
        computed in float32 (float64 for float64) and rounded once; other
        elements are copied exactly. NaN/inf in grad are selected first and
        propagate into the output. Autograd: d/dx = identity,
        d/dgrad = alpha * mask (the mask is treated as constant).
    """
    _validate.tensor("x", x)
    _validate.tensor("grad", grad)
    _validate.like("x", x, "grad", grad)
    p_inv = _validate.fraction("p_inv", p_inv)
    alpha = _validate.real_number("alpha", alpha)
    which = _backend.resolve(backend, x.device, "gradient_outlier", x.dtype)
    if which == "reference":
        return reference.gradient_outlier(x, grad, p_inv, alpha)
    return _backend.op_namespace(which).gradient_outlier(x, grad, p_inv, alpha)


def _fake_mask(grad, p_inv):
    return empty_image_like(grad, torch.bool)


def _fake_outlier(x, grad, p_inv, alpha):
    return empty_image_like(x)


def _setup_outlier(ctx, inputs, output):
    _, grad, p_inv, alpha = inputs
    ctx.save_for_backward(grad)
    ctx.p_inv, ctx.alpha = p_inv, alpha


def _outlier_backward(ns):
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        d_grad = None
        if ctx.needs_input_grad[1]:
            # The mask is recomputed instead of saved: backward through the
            # outlier is rare (ASCOOD detaches it), so no memory is spent on it.
            mask = ns.invariant_mask(grad, ctx.p_inv)
            d_grad = torch.where(mask, grad_out * ctx.alpha, torch.zeros_like(grad_out))
        return grad_out, d_grad, None, None
    return backward


register_fake("invariant_mask", _fake_mask)
register_fake("gradient_outlier", _fake_outlier)
register_autograd("gradient_outlier", _outlier_backward, _setup_outlier)
