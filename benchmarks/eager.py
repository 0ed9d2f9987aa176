"""What users write without this package: the eager PyTorch baselines.

``gradient_outlier_eager`` / ``invariant_mask_eager`` follow the authors'
reference code (``topk`` of |G| per sample, ``scatter`` into a mask, add);
``zscore_eager`` is the mean/std formula; the others are the straightforward
batched PyTorch a user would write. ``torch.compile`` of these same functions is
the "compile" provider of the suite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def invariant_mask_eager(g: torch.Tensor, p_inv: float) -> torch.Tensor:
    B = g.shape[0]
    flat = g.abs().reshape(B, -1)
    k = int(p_inv * flat.shape[1])
    idx = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).reshape(g.shape)


def gradient_outlier_eager(x: torch.Tensor, g: torch.Tensor, p_inv: float, alpha: float) -> torch.Tensor:
    B = g.shape[0]
    flat = g.abs().reshape(B, -1)
    k = int(p_inv * flat.shape[1])
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat).scatter_(1, idx, 1.0).reshape(g.shape)
    return x + alpha * g * mask


def zscore_eager(h: torch.Tensor, sigma: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    return (h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + eps) * sigma


def shuffle_outlier_eager(x: torch.Tensor, saliency: torch.Tensor, p_inv: float) -> torch.Tensor:
    B, C = x.shape[:2]
    flat_x = x.reshape(B, C, -1)
    P = flat_x.shape[2]
    n = int(p_inv * P)
    sel = saliency.sum(1).reshape(B, P).topk(n, dim=1).indices
    perm = torch.rand(B, n, device=x.device).argsort(dim=1)
    src = torch.gather(sel, 1, perm)
    moved = torch.gather(flat_x, 2, src[:, None].expand(B, C, n))
    return flat_x.clone().scatter_(2, sel[:, None].expand(B, C, n), moved).reshape(x.shape)


def iodin_perturb_eager(x: torch.Tensor, g: torch.Tensor, eps: float, std: torch.Tensor, k: int = 1) -> torch.Tensor:
    B, C = x.shape[:2]
    flat_g = g.reshape(B, -1)
    idx = flat_g.abs().topk(k, dim=1).indices
    sign = torch.where(torch.gather(flat_g, 1, idx) >= 0, 1.0, -1.0).to(x.dtype)
    channel = idx // (flat_g.shape[1] // C)
    step = -eps * sign / std[channel]
    return x.reshape(B, -1).scatter_add(1, idx, step).reshape(x.shape)


def ascood_loss_eager(id_logits: torch.Tensor, target: torch.Tensor, ood_logits: torch.Tensor, w: float) -> torch.Tensor:
    C = ood_logits.shape[1]
    uniform = torch.full_like(ood_logits, 1.0 / C)
    kl = F.kl_div(F.log_softmax(ood_logits, dim=1), uniform, reduction="batchmean")
    return F.cross_entropy(id_logits, target) + w * kl


def perturbation_score_eager(model, x: torch.Tensor, temperature: float, eps: float, std: torch.Tensor,
                             k: int | None = 1):
    """ODIN / i-ODIN as the authors' (OpenOOD-style) post-processor writes it, per batch.

    Forward with ``x.requires_grad``, CE(logits / T, argmax) and ``loss.backward()``
    (which also fills every parameter's ``.grad``), the sign of ``x.grad`` on every
    element (ODIN, ``k=None``) or on the top-k |grad| per sample (i-ODIN), divided by
    the channel std, ``x - eps * step``, a second forward (with autograd on, as there),
    then the max softmax of the logits / T. Returns (pred, score); pred is the argmax on the perturbed
    input, as the reference reports it.
    """
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    labels = out.detach().argmax(1)
    loss = F.cross_entropy(out / temperature, labels)
    loss.backward()
    if k is None:
        gradient = (torch.ge(x.grad.detach(), 0).float() - 0.5) * 2
        gradient = gradient / std.view(1, -1, *([1] * (x.dim() - 2)))
        x_t = torch.add(x.detach(), gradient, alpha=-eps)
    else:
        x_t = iodin_perturb_eager(x.detach(), x.grad.detach(), eps, std, k)
    logits = model(x_t) / temperature
    score, pred = logits.detach().softmax(1).max(1)
    return pred, score
