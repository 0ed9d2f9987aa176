"""zscore: the standardised feature of ASCOOD's head, fused forward and backward."""
from __future__ import annotations

import torch

from .. import _backend, _validate, reference
from ._common import acc_dtype, register_autograd, register_fake

__all__ = ["zscore"]


def zscore(h: torch.Tensor, sigma: float = 0.5, eps: float = 1e-6, *,
           backend: str | None = "auto") -> torch.Tensor:
    """``(h - mean) / (std + eps) * sigma`` over the last dim (unbiased std).

    Args:
        h: (..., m) features, m >= 2, float32/float16/bfloat16/float64; every
            leading index is one row.
        sigma: output scale > 0 (the paper's sigma, default 0.5); each output
            row has norm ~ ``sigma * sqrt(m - 1)``.
        eps: >= 0, added to the std (not the variance), as in the paper.
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        Tensor of h's shape and dtype. Statistics are accumulated in float32
        (float64 for float64). Differentiable; the fused backward reuses the
        saved per-row mean and 1/(std+eps). For a constant row the output is
        0 and the gradient term through the std is taken as 0.
    """
    _validate.tensor("h", h, min_rank=1)
    sigma = _validate.positive("sigma", sigma)
    eps = _validate.non_negative("eps", eps)
    if h.shape[-1] < 2:
        raise ValueError(f"h must have >= 2 features in its last dim (unbiased std), got shape {tuple(h.shape)}")
    which = _backend.resolve(backend, h.device, "zscore", h.dtype)
    if which == "reference":
        return _ReferenceZScore.apply(h, sigma, eps)
    return _backend.op_namespace(which).zscore(h, sigma, eps)[0]


class _ReferenceZScore(torch.autograd.Function):
    """The reference backend with the documented backward (constant rows get a finite gradient)."""

    @staticmethod
    def forward(ctx, h, sigma, eps):
        out, mean, rstd = reference.zscore(h, sigma, eps)
        ctx.save_for_backward(h, mean, rstd)
        ctx.sigma = sigma
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, mean, rstd = ctx.saved_tensors
        return reference.zscore_backward(grad_out, h, mean, rstd, ctx.sigma), None, None


def _fake_zscore(h, sigma, eps):
    stats = h.new_empty(h.shape[:-1], dtype=acc_dtype(h.dtype))
    return torch.empty(h.shape, dtype=h.dtype, device=h.device), stats, torch.empty_like(stats)


def _fake_zscore_backward(grad_out, h, mean, rstd, sigma):
    return torch.empty(h.shape, dtype=h.dtype, device=h.device)


def _setup_zscore(ctx, inputs, output):
    h, sigma, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(h, mean, rstd)
    ctx.sigma = sigma


def _zscore_backward(ns):
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        h, mean, rstd = ctx.saved_tensors
        return ns.zscore_backward(grad_out.contiguous(), h, mean, rstd, ctx.sigma), None, None
    return backward


register_fake("zscore", _fake_zscore)
register_fake("zscore_backward", _fake_zscore_backward)
register_autograd("zscore", _zscore_backward, _setup_zscore)
