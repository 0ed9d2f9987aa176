"""ASCOODCriterion: the whole ASCOOD training loss as one call, for any training loop.

One call ``loss = crit(model, x, y)`` does, for an ID batch x (B, C, H, W) with
labels y (B,):

1. G = d z_y / d x, the true-class saliency, on the *unwrapped* module (a DDP
   or ``torch.compile`` wrapper is looked through, so no DDP hooks or
   recompilations run), in eval mode (by default) and in float32 even inside
   an autocast region;
2. x' = the virtual outliers (:func:`ascood.training.outliers.synthesize_outliers`), detached;
3. logits = model(cat[x, x']) through the model *as given* (DDP's gradient
   hooks run; BatchNorm sees ID and outliers together), in the caller's
   autocast state;
4. loss = CE(logits[:B], y) + w * KL(U || softmax(logits[B:])), the fused
   :func:`ascood_kernels.ascood_loss`, evaluated in float32 (or, with
   ``outlier_loss="energy"`` / ``"vos"``, an energy loss of
   :mod:`ascood.training.losses`).

With ``outlier_loss="vos"`` the criterion owns trainable parameters, VOS's
logistic head on the energy (``crit.vos_head``): move it with
``crit.to(device)``, give ``crit.parameters()`` to the optimiser with the
model's (OpenOOD puts them in the backbone's parameter group) and keep
``crit.state_dict()`` in your checkpoints (the Trainer does all three; under
DDP it also broadcasts the head from rank 0 and averages its gradients, which a
DDP wrapper does only for the model's parameters).

The caller does ``backward()`` and the optimiser step (and AMP scaling), so
the criterion fits a plain loop, DDP, AMP and ``torch.compile`` alike.
``crit.set_epoch(epoch, epochs)`` moves alpha along its linear schedule.

Parts for logging: :meth:`ASCOODCriterion.forward_with_parts` returns a
:class:`StepParts` (loss, ce, kl, alpha, logits); ``crit(...)`` returns only
the 0-dim loss and keeps the same record in ``crit.last``. ``ce`` and ``kl``
are detached 0-dim float32 tensors (no host synchronisation: call ``.item()``
when you log).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import torch
from torch import nn

from .. import _ops
from .losses import (ENERGY_MARGIN_IN, ENERGY_MARGIN_OUT, OUTLIER_LOSSES, EnergyLogisticHead, energy_regularizer,
                     outlier_loss, vos_energy_loss)
from .outliers import (ALPHA_MODES, OOD_TYPES, SALIENCY_MODES, SALIENCY_TARGETS, SHUFFLE_RANKS, alpha_at,
                       check_alpha_range, synthesize_outliers)

__all__ = ["ASCOODCriterion", "StepParts", "unwrap_model"]


class StepParts(NamedTuple):
    """One step's loss and its parts.

    loss: 0-dim float32, differentiable (what to call ``backward()`` on).
    ce: detached 0-dim float32, mean cross-entropy of the ID batch.
    kl: detached 0-dim float32, the outlier term: batchmean KL(U || softmax(outlier
        logits)), the energy regulariser with ``outlier_loss="energy"`` or the logistic
        head's mean cross-entropy with ``"vos"`` (0 without outliers); loss = ce + w * kl.
    alpha: the outlier step size used (Python float).
    id_logits: (B, num_classes) float32 logits of the ID batch (differentiable).
    ood_logits: (B2, num_classes) float32 logits of the outliers (B2 = 0 for "none").
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    alpha: float
    id_logits: torch.Tensor
    ood_logits: torch.Tensor


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _alpha_schedule(alpha) -> tuple[float, float]:
    """(start, end) from a number (constant) or a (start, end) pair."""
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        pair = (float(alpha), float(alpha))
    elif isinstance(alpha, (tuple, list)) and len(alpha) == 2 and all(
            isinstance(a, numbers.Real) and not isinstance(a, bool) for a in alpha):
        pair = (float(alpha[0]), float(alpha[1]))
    else:
        raise TypeError(f"alpha must be a number or a (start, end) pair of numbers, got {alpha!r}")
    if not all(math.isfinite(a) for a in pair):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return pair


class ASCOODCriterion:
    """ASCOOD's training loss for any model and loop (module docstring gives the steps).

    Args:
        ood_type: "gradient" (the paper), "shuffle", "gaussian" or "none"
            (plain cross-entropy: no saliency pass, no outliers).
        p_inv: fraction of input elements (gradient) or pixels (shuffle)
            treated as invariant, in (0, 1].
        alpha: step size of the outliers: a number (constant) or a
            ``(start, end)`` pair decaying linearly over the epochs given to
            :meth:`set_epoch` (the reference's CIFAR setting is (300, 30)).
            Before the first ``set_epoch`` call alpha is ``start``.
        w: weight of the outlier KL term (>= 0).
        alpha_mode: "absolute" (paper: x + alpha G) or "relative" (see ascood.training.outliers).
        saliency_mode: "eval" (reference: BatchNorm/dropout in eval mode for
            the saliency pass) or "train".
        saliency_target: "logit" (the paper's G = dz_y/dx) or "prob" (the
            true-class softmax probability, the paper's Sec. D.3 ablation).
        shuffle_rank: pixel ranking of "shuffle": "exp" (sum_c exp(G_c), the
            authors' train script), "abs" (sum_c |G_c|) or "random" (the shuffled
            pixels chosen at random, the authors' published CIFAR-10 run).
        outlier_loss: "kl" (the paper's), "energy" (Liu et al.'s squared hinges, with
            ``energy_margin_in`` / ``energy_margin_out``) or "vos" (VOS's learned
            logistic head on the energy, OpenOOD's ASCOOD ``kl_div: False``; the head
            is made here from torch's global RNG, see :attr:`vos_head`).
        generator: ``torch.Generator`` for the shuffle permutation and the
            Gaussian noise (None: torch's global RNG).

    Example (plain loop)::

        crit = ascood.ASCOODCriterion(ood_type="gradient", p_inv=0.1, alpha=(300, 30), w=1.0)
        for epoch in range(1, epochs + 1):
            crit.set_epoch(epoch, epochs)
            for x, y in loader:
                loss = crit(model, x, y)
                opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(self, ood_type: str = "gradient", p_inv: float = 0.1, alpha=(300.0, 30.0), w: float = 1.0, *,
                 alpha_mode: str = "absolute", saliency_mode: str = "eval", saliency_target: str = "logit",
                 shuffle_rank: str = "exp", outlier_loss: str = "kl", energy_margin_in: float = ENERGY_MARGIN_IN,
                 energy_margin_out: float = ENERGY_MARGIN_OUT,
                 generator: torch.Generator | None = None) -> None:
        if ood_type not in OOD_TYPES:
            raise ValueError(f"ood_type must be one of {', '.join(OOD_TYPES)}, got {ood_type!r}")
        if ood_type in ("gradient", "shuffle") and not (isinstance(p_inv, numbers.Real) and 0.0 < p_inv <= 1.0):
            raise ValueError(f"p_inv must be in (0, 1], got {p_inv!r}")
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {', '.join(ALPHA_MODES)}, got {alpha_mode!r}")
        if saliency_mode not in SALIENCY_MODES:
            raise ValueError(f"saliency_mode must be one of {', '.join(SALIENCY_MODES)}, got {saliency_mode!r}")
        if saliency_target not in SALIENCY_TARGETS:
            raise ValueError(f"saliency_target must be one of {', '.join(SALIENCY_TARGETS)}, got {saliency_target!r}")
        if shuffle_rank not in SHUFFLE_RANKS:
            raise ValueError(f"shuffle_rank must be one of {', '.join(SHUFFLE_RANKS)}, got {shuffle_rank!r}")
        if outlier_loss not in OUTLIER_LOSSES:
            raise ValueError(f"outlier_loss must be one of {', '.join(OUTLIER_LOSSES)}, got {outlier_loss!r}")
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"w must be a finite number >= 0, got {w!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.ood_type = ood_type
        self.p_inv = float(p_inv)
        self.alpha_start, self.alpha_end = _alpha_schedule(alpha)
        check_alpha_range(self.alpha_end, self.alpha_start, names=("alpha end", "alpha start"))
        self.w = float(w)
        self.alpha_mode = alpha_mode
        self.saliency_mode = saliency_mode
        self.saliency_target = saliency_target
        self.shuffle_rank = shuffle_rank
        self.outlier_loss = outlier_loss
        self.energy_margins = (float(energy_margin_in), float(energy_margin_out))
        #: VOS's logistic head (``outlier_loss="vos"``), else None; trained with the model, never used to score.
        self.vos_head: EnergyLogisticHead | None = EnergyLogisticHead() if outlier_loss == "vos" else None
        self.generator = generator
        self.alpha = self.alpha_start
        self.last: StepParts | None = None
        self._head_checked: set[int] = set()

    def set_epoch(self, epoch: int, epochs: int) -> float:
        """Set alpha for the 1-based ``epoch`` (1..epochs) of ``epochs``; returns it.

        Follows the reference: alpha = (start - end) * (1 - epoch / epochs) + end,
        so the last epoch uses exactly ``end`` (:func:`ascood.training.outliers.alpha_at`).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or not 1 <= epoch <= epochs:
            raise ValueError(f"epoch must be an int in [1, {epochs}] (1-based), got {epoch!r}")
        self.alpha = alpha_at(int(epoch), int(epochs), self.alpha_end, self.alpha_start)
        return self.alpha

    def outliers(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 alpha: float | None = None, saliency_model: nn.Module | None = None) -> torch.Tensor | None:
        """Virtual outliers x' (detached, like x) for the batch, or None for ``ood_type="none"``.

        The saliency pass runs on ``saliency_model`` (default ``unwrap_model(model)``; the Trainer
        passes a compiled copy of the raw module under ``compile``) with autocast off (float32).
        """
        alpha = self.alpha if alpha is None else float(alpha)
        if self.ood_type == "none":
            return None
        raw = unwrap_model(model) if saliency_model is None else saliency_model
        with torch.autocast(x.device.type, enabled=False):
            return synthesize_outliers(raw, x, y, ood_type=self.ood_type, p_inv=self.p_inv, alpha=alpha,
                                       alpha_mode=self.alpha_mode, saliency_mode=self.saliency_mode,
                                       saliency_target=self.saliency_target, shuffle_rank=self.shuffle_rank,
                                       generator=self.generator)

    def forward_with_parts(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           alpha: float | None = None, saliency_model: nn.Module | None = None) -> StepParts:
        """One step's loss and parts (:class:`StepParts`); ``alpha`` overrides the schedule's value,
        ``saliency_model`` the module of the saliency pass (see :meth:`outliers`).

        x: (B, C, H, W) float on the model's device; y: (B,) integer labels on the same device.
        """
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        y = y.long()
        self._check_head(model)
        alpha = self.alpha if alpha is None else float(alpha)
        xo = self.outliers(model, x, y, alpha, saliency_model)
        batch = x if xo is None else torch.cat([x, xo.to(x.dtype)], dim=0)
        logits = model(batch)
        # The loss is evaluated in float32 even under AMP (a float16 log-sum-exp loses precision).
        logits = logits.float()
        B = x.shape[0]
        id_logits, ood_logits = logits[:B], logits[B:]
        w = self.w if xo is not None else 0.0
        m_in, m_out = self.energy_margins
        if self.vos_head is not None:
            self._check_head_device(logits.device)
        loss = outlier_loss(id_logits, y, ood_logits, w, kind=self.outlier_loss, energy_margin_in=m_in,
                            energy_margin_out=m_out, vos_head=self.vos_head)
        with torch.no_grad():
            # The fused op with an empty side gives each term alone (an empty batch contributes 0).
            ce = _ops.ascood_loss(id_logits.detach(), y, ood_logits.detach()[:0], 0.0)
            if self.outlier_loss == "energy" and ood_logits.shape[0]:
                kl = energy_regularizer(id_logits.detach(), ood_logits.detach(), m_in, m_out)
            elif self.outlier_loss == "vos" and ood_logits.shape[0]:
                kl = vos_energy_loss(id_logits.detach(), ood_logits.detach(), self.vos_head)
            else:
                kl = _ops.ascood_loss(id_logits.detach()[:0], y[:0], ood_logits.detach(), 1.0)
        self.last = StepParts(loss, ce, kl, alpha, id_logits, ood_logits)
        return self.last

    # -- the trainable state of the "vos" loss ---------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The criterion's trainable parameters: the VOS head's four tensors, or [] (other losses)."""
        return [] if self.vos_head is None else list(self.vos_head.parameters())

    def to(self, device: torch.device | str) -> "ASCOODCriterion":
        """Move the trainable state (the VOS head) to ``device``, in place (optimisers keep their references)."""
        if self.vos_head is not None:
            self.vos_head.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable state, keys prefixed ``vos_head.`` (``{}`` for "kl" / "energy"); tensors, not copies."""
        if self.vos_head is None:
            return {}
        return {f"vos_head.{k}": v for k, v in self.vos_head.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; ValueError naming the missing, extra or misshapen keys."""
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise ValueError(f"criterion state must be a dict of name -> tensor, got {type(state).__name__}")
        mine = self.state_dict()
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in mine.items()
                  if k in state and state[k].shape != v.shape]
        if missing or extra or shapes:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected {', '.join(extra)}"] if extra else []) + \
                    ([f"shape of {', '.join(shapes)}"] if shapes else [])
            raise ValueError(f"criterion state does not fit outlier_loss={self.outlier_loss!r}: {'; '.join(parts)}")
        if self.vos_head is not None:
            self.vos_head.load_state_dict({k[len("vos_head."):]: v for k, v in state.items()})

    def _check_head_device(self, device: torch.device) -> None:
        where = self.vos_head[0].weight.device
        if where != device:
            raise ValueError(f"outlier_loss='vos': the criterion's logistic head is on {where}, the logits on "
                             f"{device}; call crit.to({str(device)!r}) before the optimiser is built")

    def _check_head(self, model: nn.Module) -> None:
        """Warn once per model when it has no z-score head: ASCOOD's loss then trains a plain classifier's
        features, which is not the paper's method (wrap the model with ``ascood.wrap`` first)."""
        raw = unwrap_model(model)
        if id(raw) in self._head_checked:
            return
        self._head_checked.add(id(raw))
        from ..nets.ascoodnet import ASCOODNet

        # An ASCOODNet with head "linear" / "l2" is a deliberate baseline or ablation; a bare classifier is a slip.
        if self.ood_type != "none" and not isinstance(raw, ASCOODNet):
            warnings.warn(f"ASCOODCriterion: the model is a {type(raw).__name__}, not an ASCOODNet; ASCOOD feeds the "
                          "classifier the standardised feature (ascood.wrap(model, num_classes) or "
                          "ascood.build_model(...) make one). Training continues as asked.", stacklevel=3)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The 0-dim float32 loss of one step (parts in ``self.last``)."""
        return self.forward_with_parts(model, x, y).loss

    def __repr__(self) -> str:
        return (f"ASCOODCriterion(ood_type={self.ood_type!r}, p_inv={self.p_inv}, "
                f"alpha=({self.alpha_start}, {self.alpha_end}), w={self.w}, alpha_mode={self.alpha_mode!r}, "
                f"saliency_mode={self.saliency_mode!r}, saliency_target={self.saliency_target!r}, "
                f"shuffle_rank={self.shuffle_rank!r}, outlier_loss={self.outlier_loss!r})")
