"""ascood_loss: CE on ID logits + w * KL(uniform || softmax(outlier logits)), fused."""
from __future__ import annotations

import torch

from .. import _backend, _validate, reference
from ._common import acc_dtype, register_autograd, register_fake

__all__ = ["ascood_loss"]


def ascood_loss(id_logits: torch.Tensor, target: torch.Tensor, ood_logits: torch.Tensor, w: float = 1.0, *,
                backend: str | None = "auto") -> torch.Tensor:
    """ASCOOD's training loss (paper Eq. 5): ``CE(id) + w * KL(U || softmax(ood))``.

    Args:
        id_logits: (B, C) logits of the ID batch, float32/float16/bfloat16/float64.
        target: (B,) int64 (or int32) class labels in [0, C).
        ood_logits: (B2, C) logits of the virtual outliers, same dtype/device.
        w: weight of the uniformity term (>= 0; the paper's w, default 1).
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        0-dim tensor in the logits' dtype: mean CE plus w times the 'batchmean'
        KL divergence (``KLDivLoss(reduction='batchmean')`` of log-softmax
        against the uniform target). An empty batch contributes 0 to its term.
        Differentiable w.r.t. both logit matrices; the fused backward uses
        Proposition 1, ``(p - y)/B`` and ``w (p' - 1/C)/B2``. No host
        synchronisation on CUDA (an out-of-range target trips a device assert).
    """
    _validate.tensor("id_logits", id_logits)
    _validate.tensor("ood_logits", ood_logits)
    if id_logits.dim() != 2:
        raise ValueError(f"id_logits must be (B, C), got shape {tuple(id_logits.shape)}")
    if ood_logits.dim() != 2 or ood_logits.shape[1] != id_logits.shape[1]:
        raise ValueError(f"ood_logits must be (B2, {id_logits.shape[1]}), got shape {tuple(ood_logits.shape)}")
    _validate.like("id_logits", id_logits, "ood_logits", ood_logits, shape=False)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 class-index tensor, got {target.dtype}")
    if target.shape != id_logits.shape[:1]:
        raise ValueError(f"target must have shape ({id_logits.shape[0]},), got {tuple(target.shape)}")
    _validate.same_device("id_logits", id_logits, "target", target)
    w = _validate.non_negative("w", w)
    C = id_logits.shape[1]
    # A range check needs the values on the host: only free for CPU tensors
    # (CUDA kernels assert on the device instead of synchronising).
    if not torch.compiler.is_compiling() and target.device.type == "cpu" and target.numel():
        lo, hi = (int(v) for v in torch.aminmax(target))  # one reduction for both bounds
        if lo < 0 or hi >= C:
            raise ValueError(f"target must hold class indices in [0, {C}), got values in [{lo}, {hi}]")
    target = target.long()
    which = _backend.resolve(backend, id_logits.device, "ascood_loss", id_logits.dtype)
    if which == "reference":
        return reference.ascood_loss(id_logits, target, ood_logits, w)[0]
    return _backend.op_namespace(which).ascood_loss(id_logits, target, ood_logits, w)[0]


def _fake_loss(id_logits, target, ood_logits, w):
    acc = acc_dtype(id_logits.dtype)
    return (id_logits.new_empty(()), id_logits.new_empty(id_logits.shape[:1], dtype=acc),
            ood_logits.new_empty(ood_logits.shape[:1], dtype=acc))


def _fake_loss_backward(grad, id_logits, target, ood_logits, w, lse_id, lse_ood):
    return (torch.empty(id_logits.shape, dtype=id_logits.dtype, device=id_logits.device),
            torch.empty(ood_logits.shape, dtype=ood_logits.dtype, device=ood_logits.device))


def _setup_loss(ctx, inputs, output):
    id_logits, target, ood_logits, w = inputs
    _, lse_id, lse_ood = output
    ctx.save_for_backward(id_logits, target, ood_logits, lse_id, lse_ood)
    ctx.w = w


def _loss_backward(ns):
    def backward(ctx, grad, _g_lse_id, _g_lse_ood):
        id_logits, target, ood_logits, lse_id, lse_ood = ctx.saved_tensors
        d_id, d_ood = ns.ascood_loss_backward(grad, id_logits, target, ood_logits, ctx.w, lse_id, lse_ood)
        return d_id, None, d_ood, None
    return backward


register_fake("ascood_loss", _fake_loss)
register_fake("ascood_loss_backward", _fake_loss_backward)
register_autograd("ascood_loss", _loss_backward, _setup_loss)
