"""ASCOOD training (the paper's Eq. 5) with exact resume, DDP (SyncBatchNorm) and opt-in AMP.

One step, for an ID batch (x, y); steps 1-4 are :class:`ascood.training.criterion.ASCOODCriterion`
(the same code users call in their own loops):

1. G = d z_y / d x (true-class saliency, eval mode by default, always float32);
2. x' = outlier of x by ``ood_type`` (see :mod:`ascood.training.outliers`), detached;
3. logits = net(cat[x, x']) -- ID and outliers together, so BatchNorm sees both;
4. loss = CE(z, y) + w * L_OOD(z') with L_OOD = KL(U || softmax(z')) (batchmean;
   the paper's) or an energy loss (:mod:`ascood.training.losses`; "vos" adds a
   logistic head on the energy, trained in the first parameter group as OpenOOD's
   ASCOOD trainer does and saved under the checkpoint's ``criterion`` key);
5. SGD step (momentum, nesterov, weight decay), then one step of the
   per-step cosine schedule (one LambdaLR multiplier for every parameter
   group, from 1 to min_lr / lr, as the reference's).

``ood_type="none"`` skips 1-2 and trains with plain cross-entropy (the
baseline). alpha decays linearly per epoch from alpha_max to alpha_min, epochs
counted from 1 (the last epoch uses alpha_min). With a validation loader the
ID validation accuracy is measured after every epoch and the best epoch's
checkpoint is kept as ``best.pt`` beside ``last.pt`` (the reference's model
selection).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import unpack_batch
from ..files import atomic_save, atomic_write_text, write_json
from .checkpoint import FORMAT, CheckpointError, get_rng_state, load_checkpoint, load_state_dict_checked, set_rng_state
from .criterion import ASCOODCriterion
from .distributed import DistContext, all_reduce_sum, convert_sync_batchnorm, distributed_loader, init_from_env
from .losses import ENERGY_MARGIN_IN, ENERGY_MARGIN_OUT, OUTLIER_LOSSES
from .outliers import ALPHA_MODES, OOD_TYPES, SALIENCY_MODES, SALIENCY_TARGETS, SHUFFLE_RANKS, check_alpha_range

__all__ = ["TrainConfig", "Trainer", "train", "NonFiniteLossError", "few_steps_note", "FEW_STEPS_PER_EPOCH", "CHECKPOINT_NAME", "BEST_CHECKPOINT_NAME",
           "cosine_factor", "accuracy"]

CHECKPOINT_NAME = "last.pt"
BEST_CHECKPOINT_NAME = "best.pt"


#: What a malformed (edited, crafted) checkpoint makes the resume code raise; each becomes a CheckpointError.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


def _malformed(path: str, what: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot resume {path}: its {what} is malformed ({type(err).__name__}: "
                           f"{str(err)[:200]}); was the file edited, or written by another program?")


def _check_like(saved, fresh, where: str) -> None:
    """``saved`` has the structure of ``fresh`` (a state dict this run made): dicts with fresh's keys (a missing
    flag -- a bool or None -- is allowed, torch versions add them; extra keys are left to torch), lists of the same
    length, numbers for numbers, tensors of the same shape. ValueError naming the entry otherwise."""
    def bad(expected: str):
        return ValueError(f"{where} is {type(saved).__name__} {str(saved)[:60]}, expected {expected}")

    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            raise bad("a dict")
        for key, value in fresh.items():
            if key in saved:
                _check_like(saved[key], value, f"{where}[{key!r}]")
            elif not (value is None or isinstance(value, bool)):
                raise ValueError(f"{where} lacks {key!r}")
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            raise bad(f"a list of {len(fresh)}")
        for i, (s, f) in enumerate(zip(saved, fresh)):
            _check_like(s, f, f"{where}[{i}]")
    elif torch.is_tensor(fresh):
        if not torch.is_tensor(saved) or saved.shape != fresh.shape:
            raise bad(f"a tensor of shape {tuple(fresh.shape)}")
    elif isinstance(fresh, (int, float)) and not isinstance(fresh, bool):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)):
            raise bad("a number")
    elif fresh is not None and type(saved) is not type(fresh):
        raise bad(type(fresh).__name__)


def _check_optimizer_state(saved, optimizer: torch.optim.Optimizer) -> None:
    """A saved optimizer state fits ``optimizer``: its param groups, and per-parameter entries (buffers such as
    SGD's momentum: the parameter's shape; a "step" counter: one element)."""
    fresh = optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise ValueError("optimizer state must be a dict with 'state' and 'param_groups'")
    _check_like(saved.get("param_groups"), fresh["param_groups"], "optimizer param_groups")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params) \
                or not isinstance(entry, dict):
            raise ValueError(f"optimizer state entry {index!r} does not belong to one of the {len(params)} parameters")
        for key, value in entry.items():
            if key == "step":  # a counter (Adam-style optimizers)
                ok = torch.is_tensor(value) and value.numel() == 1 or isinstance(value, (int, float))
            else:  # buffers of the parameter's shape (SGD's momentum_buffer; None until first used)
                ok = value is None or torch.is_tensor(value) and value.shape == params[index].shape
            if not ok:
                raise ValueError(f"optimizer state {index}[{key!r}] must be a tensor of shape "
                                 f"{tuple(params[index].shape)}, got {type(value).__name__}")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is left as it was."""


@dataclass
class TrainConfig:
    """Hyperparameters (paper names in brackets; defaults = the reference's CIFAR setting).

    epochs: training epochs [num_epochs]. ood_type: outlier synthesis,
    "gradient" (the paper's method), "shuffle", "gaussian" or "none" (CE
    baseline). p_inv: fraction of input elements treated as invariant
    [p_inv]. alpha_min / alpha_max: outlier step size, decaying linearly per
    1-based epoch from alpha_max towards alpha_min (reached at the last epoch)
    [alpha]; both <= 0 subtracts the gradient (Table 5 ablation).
    alpha_mode: "absolute" (paper: x + alpha G) or "relative" (alpha in input
    units, see ascood.training.outliers). w: weight of the outlier term [w].
    lr, momentum, nesterov, weight_decay: SGD. fc_lr_factor: lr multiplier
    of the final linear layer. min_lr: absolute lr at the end of the per-step
    cosine schedule (reference 1e-6; the multiplier, shared by all groups,
    runs from 1 to min_lr / lr). saliency_mode: "eval" (reference) or
    "train". saliency_target: "logit" (paper, G = dz_y/dx) or "prob"
    (Sec. D.3, G = dp_y/dx). shuffle_rank: pixel ranking of ood_type
    "shuffle", "exp" (reference: sum_c exp(G_c)), "abs" (sum_c |G_c|) or
    "random" (pixels chosen at random, the authors' published CIFAR-10 run).
    outlier_loss: "kl" (paper), "energy" (Liu et al.'s squared hinges, margins
    energy_margin_in / energy_margin_out) or "vos" (VOS's learned logistic head
    on the energy, OpenOOD's ASCOOD form; see ascood.training.losses). amp: mixed
    precision for the training forward/backward (opt-in, CUDA only; the
    paper's numbers are fp32; the saliency is float32 either way). sync_bn:
    convert BatchNorm to SyncBatchNorm under multi-GPU DDP (as the
    reference's pipeline). seed: seeds the outlier generator and the
    distributed sampler (None = drawn from torch's global RNG). compile:
    torch.compile the model for both passes (True = Inductor, or a backend
    name). channels_last: model and input batches in channels-last layout.
    """

    epochs: int = 100
    ood_type: str = "gradient"
    p_inv: float = 0.1
    alpha_min: float = 30.0
    alpha_max: float = 300.0
    alpha_mode: str = "absolute"
    w: float = 1.0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    fc_lr_factor: float = 1.0
    min_lr: float = 1e-6
    saliency_mode: str = "eval"
    saliency_target: str = "logit"
    shuffle_rank: str = "exp"
    outlier_loss: str = "kl"
    energy_margin_in: float = ENERGY_MARGIN_IN
    energy_margin_out: float = ENERGY_MARGIN_OUT
    amp: bool = False
    sync_bn: bool = True
    seed: int | None = None
    compile: bool | str = False
    channels_last: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not (isinstance(self.epochs, int) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if self.ood_type not in OOD_TYPES:
            raise ValueError(f"ood_type must be one of {', '.join(OOD_TYPES)}, got {self.ood_type!r}")
        if self.ood_type in ("gradient", "shuffle") and not (0.0 < self.p_inv <= 1.0):
            raise ValueError(f"p_inv must be in (0, 1], got {self.p_inv}")
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {', '.join(ALPHA_MODES)}, got {self.alpha_mode!r}")
        for name, value, choices in (("saliency_mode", self.saliency_mode, SALIENCY_MODES),
                                     ("saliency_target", self.saliency_target, SALIENCY_TARGETS),
                                     ("shuffle_rank", self.shuffle_rank, SHUFFLE_RANKS),
                                     ("outlier_loss", self.outlier_loss, OUTLIER_LOSSES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("w", "weight_decay", "momentum"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        for name in ("lr", "fc_lr_factor", "min_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr}): the cosine schedule decays to it")
        check_alpha_range(self.alpha_min, self.alpha_max)
        if not (math.isfinite(self.energy_margin_in) and math.isfinite(self.energy_margin_out)
                and self.energy_margin_in < self.energy_margin_out):
            raise ValueError(f"energy_margin_in ({self.energy_margin_in}) must be finite and < energy_margin_out "
                             f"({self.energy_margin_out})")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if not (isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ValueError(f"compile must be a bool or a torch.compile backend name, got {self.compile!r}")


def accuracy(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy (fraction) of ``model`` (eval mode, no grad) over a (x, y) loader; the mode is restored."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = unpack_batch(batch)
                pred = model(x.to(device, non_blocking=True)).argmax(1).cpu()
                correct += int((pred == torch.as_tensor(y).long().cpu()).sum())
                seen += int(pred.numel())
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("val_loader yields no samples")
    return correct / seen


#: Fewer optimiser steps than this per epoch is "very few": with the default batch of 128, a few hundred
#: images give 3 steps an epoch, and 5 epochs (15 steps) of SGD leave a chance-level model.
FEW_STEPS_PER_EPOCH = 20


def few_steps_note(num_images: int, batch_size: int, steps_per_epoch: int) -> str | None:
    """A sentence when an epoch makes fewer than :data:`FEW_STEPS_PER_EPOCH` optimiser steps (None otherwise),
    with a batch size that gives at least that many (a power of two, as batch sizes usually are)."""
    if steps_per_epoch >= FEW_STEPS_PER_EPOCH:
        return None
    text = (f"an epoch makes only {steps_per_epoch} optimiser step(s) ({num_images} images, batch size "
            f"{batch_size}; fewer than {FEW_STEPS_PER_EPOCH} steps per epoch): few epochs of so few steps can "
            "leave a chance-level model")
    suggested = 1 << max(0, (num_images // FEW_STEPS_PER_EPOCH).bit_length() - 1)
    if suggested < batch_size and num_images >= FEW_STEPS_PER_EPOCH:
        steps = -(-num_images // suggested)
        return text + f"; try --batch-size {suggested} ({steps} steps per epoch) or more --epochs"
    return text + "; use more images or more --epochs"


def cosine_factor(step: int, total: int, min_ratio: float) -> float:
    """lr multiplier at ``step`` of ``total``: min_ratio + (1 - min_ratio) * (1 + cos(pi step/total)) / 2."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


EpochCallback = Callable[["Trainer", dict], None]


class Trainer:
    """Trains ``model`` on ``train_loader`` with ASCOOD (or the CE baseline).

    Args:
        model: maps (B, C, H, W) -> logits (B, num_classes); an
            :class:`~ascood.nets.ASCOODNet` gets its ``fc`` its own lr group.
        train_loader: yields (x, y) or {"data", "label"} batches.
        config: :class:`TrainConfig`.
        val_loader: optional ID validation (x, y) loader: after every epoch
            its accuracy is logged as ``val_acc`` and the checkpoint of the
            best val accuracy so far (the latest epoch on ties, as the authors' recorder) is written to
            ``out_dir/best.pt`` (same format as last.pt). Every rank evaluates
            the whole loader with the same weights (no sharding, no collective).
        out_dir: where ``last.pt`` (``best.pt``), ``config.json`` and
            ``log.jsonl`` go (None: no files). Only rank 0 writes.
        resume: a checkpoint path (or ``out_dir`` holding ``last.pt``) to continue from.
        device: default CUDA (the local rank's GPU) when available, else CPU.
        progress: tqdm bars (rank 0 only).
        epoch_lines: print one summary line per epoch (rank 0 only); default: as ``progress``, so
            ``progress=False`` alone stays silent (``ascood train --no-progress`` passes True: bars off,
            epoch lines kept).
        callbacks: called as ``cb(trainer, metrics)`` after each epoch's checkpoint.
        extra: JSON-able metadata stored in the checkpoint and config.json
            (the CLI keeps the data normalisation and image size there).
    """

    def __init__(self, model: nn.Module, train_loader: DataLoader, config: TrainConfig, *,
                 val_loader: Iterable | None = None, out_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, progress: bool = True,
                 callbacks: Iterable[EpochCallback] = (), extra: dict | None = None,
                 epoch_lines: bool | None = None) -> None:
        config.validate()
        self.extra = dict(extra or {})
        self.config = config
        self.dist: DistContext = init_from_env(device)
        if device is None:
            device = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._place_model(model)
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed = seed
        self.loader = distributed_loader(train_loader, self.dist, seed) if self.dist.enabled else train_loader
        if len(self.loader) == 0:
            raise ValueError("train_loader yields no batches")
        # A dedicated generator for the shuffle permutation and Gaussian noise: saved in
        # checkpoints so a resumed run draws the very same outliers.
        self.generator = torch.Generator(device=self.device).manual_seed(seed + self.dist.rank)
        self.criterion = self._make_criterion().to(self.device)
        self._sync_criterion_state()
        self.amp = bool(config.amp)
        if self.amp and self.device.type != "cuda":
            raise ValueError("amp=True needs a CUDA device")
        self.optimizer = self._make_optimizer()
        total = config.epochs * len(self.loader)
        # One multiplier for every parameter group, from 1 to min_lr / lr, as the reference's
        # LambdaLR: the fc group (lr * fc_lr_factor) ends at min_lr * fc_lr_factor.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_factor(step, total, config.min_lr / config.lr))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.val_loader = val_loader
        self.best_val_acc: float | None = None
        self.out_dir = os.fspath(out_dir) if out_dir is not None else None
        self.progress = progress
        self.epoch_lines = progress if epoch_lines is None else epoch_lines
        self.callbacks = list(callbacks)
        self.epoch = 0  # completed epochs
        self._step_in_epoch = 0
        self.history: list[dict] = []
        if resume is not None:
            self._resume(resume)

    # -- setup -------------------------------------------------------------------------------
    def _place_model(self, model: nn.Module) -> None:
        """Device, SyncBN, channels-last, DDP and torch.compile: sets raw_model, model and saliency_model."""
        config = self.config
        if self.dist.enabled:
            # The reference's multi-GPU pipeline trains with SyncBatchNorm. torch's SyncBatchNorm
            # only runs on GPU-like devices, so on CPU (gloo) BatchNorm stays per process.
            model = convert_sync_batchnorm(model, config.sync_bn and self.device.type != "cpu")
        self.raw_model = model.to(self.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model: nn.Module = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # The saliency pass runs the raw module (no DDP hooks); with `compile` both passes run compiled
        # wrappers of it, while raw_model stays the plain module for checkpoints and the optimiser.
        self.saliency_model: nn.Module = model
        if config.compile:
            backend = "inductor" if config.compile is True else config.compile
            self.model = torch.compile(self.model, backend=backend)
            self.saliency_model = torch.compile(model, backend=backend)

    def _make_criterion(self) -> ASCOODCriterion:
        """The one implementation of the loss of a step (also usable in users' own loops)."""
        c = self.config
        return ASCOODCriterion(c.ood_type, c.p_inv, (c.alpha_max, c.alpha_min), c.w, alpha_mode=c.alpha_mode,
                               saliency_mode=c.saliency_mode, saliency_target=c.saliency_target,
                               shuffle_rank=c.shuffle_rank, outlier_loss=c.outlier_loss,
                               energy_margin_in=c.energy_margin_in, energy_margin_out=c.energy_margin_out,
                               generator=self.generator)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        fc = getattr(self.raw_model, "fc", None)
        fc_params = list(fc.parameters()) if isinstance(fc, nn.Module) else []
        if not fc_params and cfg.fc_lr_factor != 1.0:
            raise ValueError("fc_lr_factor needs a model with an `fc` linear head")
        fc_ids = {id(p) for p in fc_params}
        rest = [p for p in self.raw_model.parameters() if id(p) not in fc_ids and p.requires_grad]
        # The "vos" loss's logistic head joins the first group (base lr, same weight decay), as OpenOOD's
        # ASCOOD trainer appends it to its backbone group.
        rest += self.criterion.parameters()
        groups = [{"params": rest}]
        if fc_params:
            groups.append({"params": fc_params, "lr": cfg.lr * cfg.fc_lr_factor})
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)

    def _sync_criterion_state(self) -> None:
        """Under DDP every rank starts from rank 0's VOS head (DDP broadcasts only the model's weights)."""
        if self.dist.enabled:
            import torch.distributed as dist

            for p in self.criterion.parameters():
                dist.broadcast(p.data, src=0)

    def _reduce_criterion_grads(self) -> None:
        """Average the VOS head's gradients over the ranks (DDP's hooks cover only the model), so the head
        stays the same on every rank."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        for p in self.criterion.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.dist.world_size)

    def _generators(self) -> dict:
        gens = {"outlier": self.generator}
        if getattr(self.loader, "generator", None) is not None:
            gens["loader"] = self.loader.generator
        return gens

    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.out_dir, CHECKPOINT_NAME) if self.out_dir else None

    @property
    def best_checkpoint_path(self) -> str | None:
        """``out_dir/best.pt`` (written only with a val_loader)."""
        return os.path.join(self.out_dir, BEST_CHECKPOINT_NAME) if self.out_dir else None

    def _resume(self, resume: str | os.PathLike) -> None:
        path = os.fspath(resume)
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_NAME)
        ckpt = load_checkpoint(path, map_location=self.device)
        # Every setting the saved optimizer, schedules and outlier stream depend on must match,
        # otherwise "resume" would silently train something config.json does not describe.
        from .resume import format_differences, resume_differences

        try:
            diffs = resume_differences(ckpt, self.config, amp=self.amp, steps_per_epoch=len(self.loader),
                                       model_build=getattr(self.raw_model, "build_args", None), extra=self.extra)
        except _MALFORMED as err:  # an edited record (a list where a dict goes, ...): not a settings change
            raise _malformed(path, "recorded settings (train_config, model_build, extra)", err) from None
        if diffs:
            raise ValueError(format_differences(path, diffs))
        load_state_dict_checked(self.raw_model, ckpt.get("model"), path)
        try:
            self.criterion.load_state_dict(ckpt.get("criterion", {}))
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path}: its 'criterion' entry (the outlier loss's trainable state) "
                                  f"does not fit: {err}") from None
        self._sync_criterion_state()
        # torch / numpy / random are process-wide: a state that fails half-way is undone, not left half-applied.
        rng_before = get_rng_state()
        try:
            self._restore_training_state(ckpt)
        except _MALFORMED + (RuntimeError,) as err:
            set_rng_state(rng_before)
            raise _malformed(path, "training state (optimizer, scheduler, scaler, epoch, history, RNG states)",
                             err) from None

    def _restore_training_state(self, ckpt: dict) -> None:
        """Optimizer, schedule, scaler, counters and RNGs from a checkpoint (errors are the caller's to name)."""
        # torch accepts a malformed optimizer / scheduler state and fails steps later (a broadcast error, a
        # KeyError in step()): compare with this run's own fresh state first.
        _check_optimizer_state(ckpt["optimizer"], self.optimizer)
        _check_like(ckpt["scheduler"], self.scheduler.state_dict(), "scheduler")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        epoch = ckpt["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= self.config.epochs:
            raise ValueError(f"epoch {epoch!r} is not a count of completed epochs in 0..{self.config.epochs}")
        history = ckpt.get("history", [])
        if not isinstance(history, list):
            raise TypeError(f"history must be a list, got {type(history).__name__}")
        extra = ckpt.get("extra", {})
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        self.epoch, self.history = epoch, list(history)
        self.best_val_acc = ckpt.get("best_val_acc")
        self.seed = int(ckpt.get("seed", self.seed))
        self.extra = {**extra, **self.extra}
        if hasattr(getattr(self.loader, "sampler", None), "seed"):
            self.loader.sampler.seed = self.seed  # DistributedSampler: same shuffles as the first run
        rng = ckpt["rng"]
        if self.dist.enabled:
            rng = ckpt.get("rng_per_rank", {}).get(str(self.dist.rank), rng)
        set_rng_state(rng, self._generators())

    # -- one step / one epoch ------------------------------------------------------------------
    def alpha(self, epoch: int) -> float:
        """alpha of 1-based ``epoch`` (linear decay towards alpha_min, reached at the last epoch); also sets
        the criterion's."""
        return self.criterion.set_epoch(epoch, self.config.epochs)

    def make_outliers(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor | None:
        """Virtual outliers for one batch (the criterion's saliency pass: raw model, float32)."""
        return self.criterion.outliers(self.model, x, y, alpha, self.saliency_model)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns (loss, number of correct ID predictions) as detached tensors.

        The loss is :class:`~ascood.training.criterion.ASCOODCriterion`'s (the same code a user's own
        loop calls); the Trainer adds AMP, the non-finite check, the optimiser and the schedule.
        """
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # the outlier ops keep the layout
        y = y.to(self.device, non_blocking=True).long()
        self.model.train()
        with torch.autocast(self.device.type, enabled=self.amp):
            parts = self.criterion.forward_with_parts(self.model, x, y, alpha, self.saliency_model)
        loss = parts.loss
        # All ranks see the same (summed) loss, so they all stop together on a non-finite value
        # instead of some ranks waiting forever in the gradient all-reduce.
        checked = all_reduce_sum(loss.detach(), self.dist)
        if not torch.isfinite(checked):
            raise self._non_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._reduce_criterion_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        correct = (parts.id_logits.detach().argmax(1) == y).sum()
        return loss.detach(), correct

    def _non_finite(self, loss: torch.Tensor) -> NonFiniteLossError:
        """The error for a non-finite loss: where it happened and what is still safe on disk."""
        saved = self.checkpoint_path if self.checkpoint_path and os.path.isfile(self.checkpoint_path) else None
        kept = (f"the last good checkpoint ({saved}, epoch {self.epoch}) is intact" if saved
                else "no checkpoint was written yet (they are saved at the end of each epoch)")
        return NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at epoch {self.epoch + 1}, step {self._step_in_epoch + 1}: "
            f"training stopped; {kept}. Lower lr or alpha, or check the data for NaN/inf.")

    def train_epoch(self) -> dict:
        """Run the next epoch (``self.epoch`` completed so far); returns its metrics (averaged over ranks)."""
        from tqdm.auto import tqdm

        epoch = self.epoch
        alpha = self.alpha(epoch + 1)  # the schedule counts epochs from 1
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.model.train()
        t0 = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = torch.zeros((), dtype=torch.float64, device=self.device)
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False,
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True)
        for self._step_in_epoch, batch in enumerate(bar):
            x, y = unpack_batch(batch)
            loss, ok = self.train_step(x, y, alpha)
            n = x.shape[0]
            loss_sum += loss.double() * n
            correct += ok.double()
            seen += n
            if self.progress and self.dist.is_main and self._step_in_epoch % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{(correct / seen).item():.3f}", alpha=f"{alpha:.4g}")
        bar.close()
        totals = all_reduce_sum(torch.stack([loss_sum, correct, seen]), self.dist)
        metrics = {"epoch": epoch + 1, "loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item(),
                   "alpha": alpha, "lr": self.optimizer.param_groups[0]["lr"]}
        if self.val_loader is not None:
            metrics["val_acc"] = accuracy(self.raw_model, self.val_loader, self.device)
        metrics["time_s"] = round(time.time() - t0, 3)
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (weights_only-loadable)."""
        rng = get_rng_state(self._generators())
        state = {
            "format": FORMAT,
            "epoch": self.epoch,
            "model": self.raw_model.state_dict(),
            # The outlier loss's own trainable tensors ("vos": keys vos_head.*; {} otherwise): kept apart from
            # "model", which is all that scoring, `ascood detector` and export read.
            "criterion": self.criterion.state_dict(),
            "model_build": getattr(self.raw_model, "build_args", None),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else None,
            "rng": rng,
            "seed": self.seed,
            "train_config": dataclasses.asdict(self.config),
            "steps_per_epoch": len(self.loader),  # the per-step cosine schedule depends on it
            "history": self.history,
            "best_val_acc": self.best_val_acc,
            "world_size": self.dist.world_size,
            "extra": self.extra,
        }
        return state

    def _gather_rng(self) -> dict | None:
        """Every rank's RNG state (so a distributed resume restores each rank's own)."""
        if not self.dist.enabled:
            return None
        import torch.distributed as dist

        states: list = [None] * self.dist.world_size
        dist.all_gather_object(states, get_rng_state(self._generators()))
        return {str(r): s for r, s in enumerate(states)}

    def save(self, is_best: bool = False) -> None:
        """Write last.pt (and best.pt when ``is_best``), config.json and log.jsonl atomically (rank 0 only).

        best.pt is written first: after a crash between the two writes the
        resumed run repeats the epoch from the older last.pt, finds the same
        val accuracy, at least its recorded best, and writes best.pt again.
        """
        per_rank = self._gather_rng()  # collective: every rank takes part
        if not (self.out_dir and self.dist.is_main):
            return
        state = self.state_dict()
        if per_rank is not None:
            state["rng_per_rank"] = per_rank
        if is_best:
            atomic_save(state, self.best_checkpoint_path)
        atomic_save(state, self.checkpoint_path)
        write_json({"train_config": state["train_config"], "model_build": state["model_build"],
                    "epoch": self.epoch, "seed": self.seed, "format": FORMAT, "extra": self.extra},
                   os.path.join(self.out_dir, "config.json"))
        # The log is rewritten from the checkpoint's history, so it never disagrees with it
        # (no duplicated or missing lines after a kill between two writes).
        atomic_write_text("".join(json.dumps(h) + "\n" for h in self.history),
                          os.path.join(self.out_dir, "log.jsonl"))

    # -- driver ------------------------------------------------------------------------------------
    def fit(self) -> nn.Module:
        """Train the remaining epochs; returns the (raw, unwrapped) model.

        With ``out_dir``, rank 0 holds the directory's lock while training (a
        second run on it fails at once; see :mod:`ascood.training.rundir`).
        """
        if not (self.out_dir and self.dist.is_main):
            return self._fit_epochs()
        from .rundir import claim_output_dir

        with claim_output_dir(self.out_dir, flag="out_dir", outputs=(CHECKPOINT_NAME, BEST_CHECKPOINT_NAME, "config.json", "log.jsonl")):
            return self._fit_epochs()

    def _fit_epochs(self) -> nn.Module:
        self._step_in_epoch = 0
        while self.epoch < self.config.epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            self.history.append(metrics)
            val = metrics.get("val_acc")
            # ">=": on a tie the LATER epoch becomes best.pt, as the authors' recorder keeps it (ties are
            # common on small val sets such as Waterbirds', Cars' and Aircraft's).
            is_best = val is not None and (self.best_val_acc is None or val >= self.best_val_acc)
            if is_best:
                self.best_val_acc = val
            self.save(is_best)
            if self.epoch_lines and self.dist.is_main:
                extra = f"  val_acc {val:.4f}{' (best)' if is_best else ''}" if val is not None else ""
                print(f"epoch {metrics['epoch']}/{self.config.epochs}  loss {metrics['loss']:.4f}  "
                      f"acc {metrics['acc']:.4f}{extra}  alpha {metrics['alpha']:.4g}  lr {metrics['lr']:.3g}",
                      flush=True)
            for cb in self.callbacks:
                cb(self, metrics)
        self.raw_model.eval()
        return self.raw_model


def train(model: nn.Module, train_loader: DataLoader, *, epochs: int = 100, ood_type: str = "gradient",
          p_inv: float = 0.1, alpha_min: float = 30.0, alpha_max: float = 300.0, w: float = 1.0, lr: float = 0.1,
          val_loader: Iterable | None = None, out_dir: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, device: str | torch.device | None = None, progress: bool = True,
          callbacks: Iterable[EpochCallback] = (), **kwargs) -> nn.Module:
    """Train ``model`` with ASCOOD; returns it (eval mode).

    Keyword arguments are :class:`TrainConfig` fields (``alpha_mode``,
    ``momentum``, ``nesterov``, ``weight_decay``, ``fc_lr_factor``,
    ``min_lr``, ``saliency_mode``, ``saliency_target``, ``shuffle_rank``,
    ``outlier_loss``, ``energy_margin_in``, ``energy_margin_out``, ``amp``,
    ``sync_bn``, ``seed``) plus the :class:`Trainer` options
    (``val_loader``, ``out_dir``, ``resume``, ``device``, ``progress``,
    ``callbacks``).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"train() got unknown arguments: {', '.join(sorted(unknown))}")
    config = TrainConfig(epochs=epochs, ood_type=ood_type, p_inv=p_inv, alpha_min=alpha_min, alpha_max=alpha_max,
                         w=w, lr=lr, **kwargs)
    return Trainer(model, train_loader, config, val_loader=val_loader, out_dir=out_dir, resume=resume, device=device,
                   progress=progress, callbacks=callbacks).fit()
