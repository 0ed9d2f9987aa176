"""Training losses: ID cross-entropy plus the outlier (uncertainty) term L_OOD of the paper's Eq. 1.

* ``"kl"`` (the paper's method): L = CE(z, y) + w * KL(U || softmax(z')),
  batch-mean, through the fused ``ascood_loss`` op (Proposition 1's gradient).
* ``"energy"``: the energy-bounded regulariser of Liu et al. (NeurIPS 2020,
  the paper's ref. [48], which the paper cites for the EBO score, not for its
  L_energy) with squared hinges on the free energy E(x) = -logsumexp(z):

      L = CE(z, y) + w * ( mean_ID  relu(E(x)  - m_in )^2
                         + mean_OOD relu(m_out - E(x'))^2 )

  with Liu et al.'s CIFAR margins m_in = -25, m_out = -7 as the defaults
  (``energy_margin_in`` / ``energy_margin_out``); no extra parameters.
* ``"vos"``: the paper's Table 6 ablation L_energy ("used in prior works
  [17, 18]", VOS and Dream-OOD) in their form, as OpenOOD's ASCOOD trainer has
  it (``kl_div: False``): a learned
  logistic head g = Linear(1, 512) -> ReLU -> Linear(512, 2)
  (:class:`EnergyLogisticHead`) reads the negative free energy
  s = logsumexp(z) of every ID and outlier row, and

      L = CE(z, y) + w * CE_mean(g(s), t),   t = 1 for ID rows, 0 for outliers,

  the second CE averaged over all B + B' rows. The head is trained with the
  network (same optimiser) but is not part of it: it is saved beside the model
  in checkpoints and never used for scoring. See docs/DEVIATIONS.md.

:func:`outlier_loss` is the one entry point the trainer (and a drop-in
criterion) calls; every function returns a 0-dim float32 tensor with autograd
(:func:`vos_energy_loss` in its head's dtype).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _ops

__all__ = ["OUTLIER_LOSSES", "ENERGY_MARGIN_IN", "ENERGY_MARGIN_OUT", "VOS_HIDDEN", "EnergyLogisticHead", "free_energy",
           "energy_regularizer", "vos_energy_loss", "outlier_loss"]

OUTLIER_LOSSES = ("kl", "energy", "vos")
#: Liu et al.'s (2020) CIFAR margins for the energy-bounded loss.
ENERGY_MARGIN_IN = -25.0
ENERGY_MARGIN_OUT = -7.0
#: Hidden width of the VOS logistic head (OpenOOD's ASCOOD trainer and VOS use 512).
VOS_HIDDEN = 512


class EnergyLogisticHead(nn.Sequential):
    """VOS's logistic head on the energy: (N, 1) float32 -> (N, 2) logits, class 1 = ID, class 0 = outlier.

    Linear(1, hidden) -> ReLU -> Linear(hidden, 2), an ``nn.Sequential`` as
    OpenOOD's (state dict keys ``0.weight``, ``0.bias``, ``2.weight``,
    ``2.bias``), with torch's default Linear initialisation (OpenOOD creates
    it the same way, after the network, from the global RNG).
    """

    def __init__(self, hidden: int = VOS_HIDDEN) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        super().__init__(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def free_energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp_k z_k per row: (B, K) -> (B,) float32 (lower = more ID)."""
    return -torch.logsumexp(logits.float(), dim=1)


def energy_regularizer(id_logits: torch.Tensor, ood_logits: torch.Tensor, m_in: float = ENERGY_MARGIN_IN,
                       m_out: float = ENERGY_MARGIN_OUT) -> torch.Tensor:
    """mean relu(E_id - m_in)^2 + mean relu(m_out - E_ood)^2 (Liu et al. 2020), 0-dim float32.

    id_logits (B, K), ood_logits (B', K). Pushes ID energy below m_in and
    outlier energy above m_out; an empty batch contributes 0.
    """
    if m_in >= m_out:
        raise ValueError(f"energy margins need energy_margin_in < energy_margin_out, got {m_in} and {m_out}")

    def mean_sq(t: torch.Tensor) -> torch.Tensor:
        return t.pow(2).mean() if t.numel() else t.sum()

    e_in, e_out = free_energy(id_logits), free_energy(ood_logits)
    return mean_sq(torch.relu(e_in - m_in)) + mean_sq(torch.relu(m_out - e_out))


def vos_energy_loss(id_logits: torch.Tensor, ood_logits: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """VOS's logistic energy loss, 0-dim float32: mean CE(head(logsumexp z), t) over the B + B' rows.

    id_logits (B, K), ood_logits (B', K) float; t = 1 for the ID rows, 0 for
    the outliers; ``head`` maps (N, 1) -> (N, 2) (:class:`EnergyLogisticHead`).
    Computed with autocast off in the head's dtype (float32 in training; a
    float64 head and float64 logits give float64, for gradient checks).
    """
    if not isinstance(head, nn.Module):
        raise TypeError(f"the vos outlier loss needs its logistic head (an nn.Module), got {type(head).__name__}")
    if id_logits.dim() != 2 or ood_logits.dim() != 2 or id_logits.shape[1] != ood_logits.shape[1]:
        raise ValueError(f"id_logits and ood_logits must be (B, K) and (B', K), got {tuple(id_logits.shape)} and "
                         f"{tuple(ood_logits.shape)}")
    first = next(head.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    with torch.autocast(id_logits.device.type, enabled=False):
        s = torch.logsumexp(torch.cat([id_logits, ood_logits]).to(dtype), dim=1)
        out = head(s[:, None])
        t = torch.cat([torch.ones(id_logits.shape[0], dtype=torch.long, device=s.device),
                       torch.zeros(ood_logits.shape[0], dtype=torch.long, device=s.device)])
        return nn.functional.cross_entropy(out, t)


def outlier_loss(id_logits: torch.Tensor, target: torch.Tensor, ood_logits: torch.Tensor, w: float, *,
                 kind: str = "kl", energy_margin_in: float = ENERGY_MARGIN_IN,
                 energy_margin_out: float = ENERGY_MARGIN_OUT, vos_head: nn.Module | None = None) -> torch.Tensor:
    """CE(id_logits, target) + w * L_OOD(ood_logits), L_OOD by ``kind`` ("kl", "energy" or "vos").

    id_logits (B, K) float, target (B,) int64, ood_logits (B', K) (B' = 0
    allowed: then only CE). The KL form is the fused op (float32 math for any
    input dtype); the energy and vos forms are computed in float32 from plain
    torch ops; "vos" needs ``vos_head`` (:class:`EnergyLogisticHead`).
    """
    if kind not in OUTLIER_LOSSES:
        raise ValueError(f"outlier_loss must be one of {OUTLIER_LOSSES}, got {kind!r}")
    if kind == "vos" and vos_head is None:
        raise ValueError("outlier_loss 'vos' needs vos_head, the logistic head on the energy (EnergyLogisticHead)")
    if kind == "kl" or ood_logits.shape[0] == 0 or w == 0:
        return _ops.ascood_loss(id_logits, target, ood_logits, w if ood_logits.shape[0] else 0.0)
    ce = nn.functional.cross_entropy(id_logits.float(), target.long())
    if kind == "vos":
        return ce + w * vos_energy_loss(id_logits, ood_logits, vos_head)
    return ce + w * energy_regularizer(id_logits, ood_logits, energy_margin_in, energy_margin_out)
