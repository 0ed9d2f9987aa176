"""Training losses: ID cross-entropy plus the outlier (uncertainty) term L_OOD of the paper's Eq. 1.

* ``"kl"`` (the paper's method): L = CE(z, y) + w * KL(U || softmax(z')),
  batch-mean, through the fused ``ascood_loss`` op (Proposition 1's gradient).
* ``"energy"`` (the paper's Table 6 ablation, "L_energy, used in prior works"):
  the energy-bounded regulariser of Liu et al. (NeurIPS 2020, the paper's
  ref. [48]) with squared hinges on the free energy E(x) = -logsumexp(z):

      L = CE(z, y) + w * ( mean_ID  relu(E(x)  - m_in )^2
                         + mean_OOD relu(m_out - E(x'))^2 )

  The paper gives neither the form's details nor margins; this package uses
  Liu et al.'s form and their CIFAR margins m_in = -25, m_out = -7 as the
  defaults (``energy_margin_in`` / ``energy_margin_out``). VOS/Dream-OOD
  (refs. [17, 18]) use a learned logistic head on the energy instead, which
  would add parameters to the model; see docs/DEVIATIONS.md.

:func:`outlier_loss` is the one entry point the trainer (and a drop-in
criterion) calls; every function returns a 0-dim float32 tensor with autograd.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _ops

__all__ = ["OUTLIER_LOSSES", "ENERGY_MARGIN_IN", "ENERGY_MARGIN_OUT", "free_energy", "energy_regularizer",
           "outlier_loss"]

OUTLIER_LOSSES = ("kl", "energy")
#: Liu et al.'s (2020) CIFAR margins for the energy-bounded loss.
ENERGY_MARGIN_IN = -25.0
ENERGY_MARGIN_OUT = -7.0


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


def outlier_loss(id_logits: torch.Tensor, target: torch.Tensor, ood_logits: torch.Tensor, w: float, *,
                 kind: str = "kl", energy_margin_in: float = ENERGY_MARGIN_IN,
                 energy_margin_out: float = ENERGY_MARGIN_OUT) -> torch.Tensor:
    """CE(id_logits, target) + w * L_OOD(ood_logits), L_OOD by ``kind`` ("kl" or "energy").

    id_logits (B, K) float, target (B,) int64, ood_logits (B', K) (B' = 0
    allowed: then only CE). The KL form is the fused op (float32 math for any
    input dtype); the energy form is computed in float32 from plain torch ops.
    """
    if kind not in OUTLIER_LOSSES:
        raise ValueError(f"outlier_loss must be one of {OUTLIER_LOSSES}, got {kind!r}")
    if kind == "kl" or ood_logits.shape[0] == 0 or w == 0:
        return _ops.ascood_loss(id_logits, target, ood_logits, w if ood_logits.shape[0] else 0.0)
    ce = nn.functional.cross_entropy(id_logits.float(), target.long())
    return ce + w * energy_regularizer(id_logits, ood_logits, energy_margin_in, energy_margin_out)
