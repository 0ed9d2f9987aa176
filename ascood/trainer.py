"""ASCOOD training (the paper's Eq. 5) with exact resume, DDP and AMP.

One step, for an ID batch (x, y):

1. G = d z_y / d x (true-class saliency, eval mode by default);
2. x' = outlier of x by ``ood_type`` (see :mod:`ascood.outliers`), detached;
3. logits = net(cat[x, x']) -- ID and outliers together, so BatchNorm sees both;
4. loss = ascood_loss(logits[:B], y, logits[B:], w)
        = CE(z, y) + w * KL(U || softmax(z'))   (batchmean);
5. SGD step (momentum, nesterov, weight decay), then one step of the
   per-step cosine schedule (lr -> min_lr_ratio * lr at the end).

``ood_type="none"`` skips 1-2 and trains with plain cross-entropy (the
baseline). alpha decays linearly per epoch from alpha_max to alpha_min.
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

from . import _ops
from .checkpoint import FORMAT, atomic_save, atomic_write_text, get_rng_state, load_checkpoint, set_rng_state, write_json
from .distributed import DistContext, all_reduce_sum, distributed_loader, init_from_env
from .outliers import ALPHA_MODES, OOD_TYPES, SALIENCY_MODES, alpha_at, synthesize_outliers

__all__ = ["TrainConfig", "Trainer", "train", "NonFiniteLossError", "CHECKPOINT_NAME", "unpack_batch"]

CHECKPOINT_NAME = "last.pt"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is left as it was."""


@dataclass
class TrainConfig:
    """Hyperparameters (paper names in brackets; defaults = the reference's CIFAR setting).

    epochs: training epochs [num_epochs]. ood_type: outlier synthesis,
    "gradient" (the paper's method), "shuffle", "gaussian" or "none" (CE
    baseline). p_inv: fraction of input elements treated as invariant
    [p_inv]. alpha_min / alpha_max: outlier step size, decaying linearly per
    epoch from alpha_max to alpha_min [alpha]. alpha_mode: "absolute" (paper:
    x + alpha G) or "relative" (alpha in input units, see ascood.outliers).
    w: weight of the outlier KL term [w]. lr, momentum, nesterov,
    weight_decay: SGD. fc_lr_factor: lr multiplier of the final linear layer.
    min_lr_ratio: the cosine schedule ends at min_lr_ratio * lr.
    saliency_mode: "eval" (reference) or "train". amp: mixed precision
    (None = on for CUDA). seed: seeds the outlier generator and the
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
    min_lr_ratio: float = 1e-6
    saliency_mode: str = "eval"
    amp: bool | None = None
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
        if self.saliency_mode not in SALIENCY_MODES:
            raise ValueError(f"saliency_mode must be one of {', '.join(SALIENCY_MODES)}, got {self.saliency_mode!r}")
        for name in ("alpha_min", "alpha_max", "w", "weight_decay", "momentum"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        for name in ("lr", "fc_lr_factor", "min_lr_ratio"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must be <= alpha_max ({self.alpha_max})")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if not (isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ValueError(f"compile must be a bool or a torch.compile backend name, got {self.compile!r}")


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a (x, y, ...) tuple/list or a {"data", "label"} dict (OpenOOD style)."""
    if isinstance(batch, dict):
        return batch["data"], batch["label"]
    return batch[0], batch[1]


def cosine_factor(step: int, total: int, min_ratio: float) -> float:
    """lr multiplier at ``step`` of ``total``: min_ratio + (1 - min_ratio) * (1 + cos(pi step/total)) / 2."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


EpochCallback = Callable[["Trainer", dict], None]


class Trainer:
    """Trains ``model`` on ``train_loader`` with ASCOOD (or the CE baseline).

    Args:
        model: maps (B, C, H, W) -> logits (B, num_classes); an
            :class:`~ascood.models.ASCOODNet` gets its ``fc`` its own lr group.
        train_loader: yields (x, y) or {"data", "label"} batches.
        config: :class:`TrainConfig`.
        out_dir: where ``last.pt``, ``config.json`` and ``log.jsonl`` go
            (None: no files). Only rank 0 writes.
        resume: a checkpoint path (or ``out_dir`` holding ``last.pt``) to continue from.
        device: default CUDA (the local rank's GPU) when available, else CPU.
        progress: tqdm bars (rank 0 only).
        callbacks: called as ``cb(trainer, metrics)`` after each epoch's checkpoint.
        extra: JSON-able metadata stored in the checkpoint and config.json
            (the CLI keeps the data normalisation and image size there).
    """

    def __init__(self, model: nn.Module, train_loader: DataLoader, config: TrainConfig, *,
                 out_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, progress: bool = True,
                 callbacks: Iterable[EpochCallback] = (), extra: dict | None = None) -> None:
        config.validate()
        self.extra = dict(extra or {})
        self.config = config
        self.dist: DistContext = init_from_env(device)
        if device is None:
            device = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
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
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed = seed
        self.loader = distributed_loader(train_loader, self.dist, seed) if self.dist.enabled else train_loader
        if len(self.loader) == 0:
            raise ValueError("train_loader yields no batches")
        # A dedicated generator for the shuffle permutation and Gaussian noise: saved in
        # checkpoints so a resumed run draws the very same outliers.
        self.generator = torch.Generator(device=self.device).manual_seed(seed + self.dist.rank)
        self.amp = bool(config.amp if config.amp is not None else self.device.type == "cuda")
        if self.amp and self.device.type != "cuda":
            raise ValueError("amp=True needs a CUDA device")
        self.optimizer = self._make_optimizer()
        total = config.epochs * len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_factor(step, total, config.min_lr_ratio))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.out_dir = os.fspath(out_dir) if out_dir is not None else None
        self.progress = progress
        self.callbacks = list(callbacks)
        self.epoch = 0  # completed epochs
        self._step_in_epoch = 0
        self.history: list[dict] = []
        if resume is not None:
            self._resume(resume)

    # -- setup -------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        fc = getattr(self.raw_model, "fc", None)
        fc_params = list(fc.parameters()) if isinstance(fc, nn.Module) else []
        if not fc_params and cfg.fc_lr_factor != 1.0:
            raise ValueError("fc_lr_factor needs a model with an `fc` linear head")
        fc_ids = {id(p) for p in fc_params}
        rest = [p for p in self.raw_model.parameters() if id(p) not in fc_ids and p.requires_grad]
        groups = [{"params": rest}]
        if fc_params:
            groups.append({"params": fc_params, "lr": cfg.lr * cfg.fc_lr_factor})
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)

    def _generators(self) -> dict:
        gens = {"outlier": self.generator}
        if getattr(self.loader, "generator", None) is not None:
            gens["loader"] = self.loader.generator
        return gens

    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.out_dir, CHECKPOINT_NAME) if self.out_dir else None

    def _resume(self, resume: str | os.PathLike) -> None:
        path = os.fspath(resume)
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_NAME)
        ckpt = load_checkpoint(path, map_location=self.device)
        saved = ckpt.get("train_config", {})
        if saved.get("epochs") not in (None, self.config.epochs):
            raise ValueError(f"checkpoint {path} was made for epochs={saved['epochs']}, not {self.config.epochs}: "
                             "the lr and alpha schedules would not continue exactly")
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.history = list(ckpt.get("history", []))
        self.seed = int(ckpt.get("seed", self.seed))
        self.extra = {**ckpt.get("extra", {}), **self.extra}
        if hasattr(getattr(self.loader, "sampler", None), "seed"):
            self.loader.sampler.seed = self.seed  # DistributedSampler: same shuffles as the first run
        rng = ckpt["rng"]
        if self.dist.enabled:
            rng = ckpt.get("rng_per_rank", {}).get(str(self.dist.rank), rng)
        set_rng_state(rng, self._generators())

    # -- one step / one epoch ------------------------------------------------------------------
    def alpha(self, epoch: int) -> float:
        """alpha of 0-based ``epoch`` (linear decay alpha_max -> alpha_min)."""
        c = self.config
        return alpha_at(epoch, c.epochs, c.alpha_min, c.alpha_max)

    def make_outliers(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor | None:
        """Virtual outliers for one batch (uses the raw model: no DDP hooks on the saliency pass)."""
        c = self.config
        with torch.autocast(self.device.type, enabled=self.amp):
            xo = synthesize_outliers(self.saliency_model, x, y, ood_type=c.ood_type, p_inv=c.p_inv, alpha=alpha,
                                     alpha_mode=c.alpha_mode, saliency_mode=c.saliency_mode,
                                     generator=self.generator)
        return xo

    def train_step(self, x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns (loss, number of correct ID predictions) as detached tensors."""
        c = self.config
        x = x.to(self.device, non_blocking=True)
        if c.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # the outlier ops keep the layout
        y = y.to(self.device, non_blocking=True).long()
        xo = self.make_outliers(x, y, alpha)
        self.model.train()
        batch = x if xo is None else torch.cat([x, xo], dim=0)
        with torch.autocast(self.device.type, enabled=self.amp):
            logits = self.model(batch)
        # The loss is evaluated in float32 even under AMP (a float16 log-sum-exp loses precision).
        logits = logits.float()
        id_logits = logits[: x.shape[0]]
        ood_logits = logits[x.shape[0]:]
        loss = _ops.ascood_loss(id_logits, y, ood_logits, c.w if xo is not None else 0.0)
        # All ranks see the same (summed) loss, so they all stop together on a non-finite value
        # instead of some ranks waiting forever in the gradient all-reduce.
        checked = all_reduce_sum(loss.detach(), self.dist)
        if not torch.isfinite(checked):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at epoch {self.epoch + 1}, step {self._step_in_epoch + 1}: "
                f"training stopped; the last good checkpoint ({self.checkpoint_path or 'none written'}) is intact. "
                "Lower lr or alpha, or check the data for NaN/inf.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        correct = (id_logits.detach().argmax(1) == y).sum()
        return loss.detach(), correct

    def train_epoch(self) -> dict:
        """Run epoch ``self.epoch`` (0-based); returns its metrics (averaged over ranks)."""
        from tqdm.auto import tqdm

        epoch = self.epoch
        alpha = self.alpha(epoch)
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
        return {"epoch": epoch + 1, "loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item(),
                "alpha": alpha, "lr": self.optimizer.param_groups[0]["lr"], "time_s": round(time.time() - t0, 3)}

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (weights_only-loadable)."""
        rng = get_rng_state(self._generators())
        state = {
            "format": FORMAT,
            "epoch": self.epoch,
            "model": self.raw_model.state_dict(),
            "model_build": getattr(self.raw_model, "build_args", None),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else None,
            "rng": rng,
            "seed": self.seed,
            "train_config": dataclasses.asdict(self.config),
            "history": self.history,
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

    def save(self) -> None:
        """Write last.pt, config.json and log.jsonl atomically (rank 0 only)."""
        per_rank = self._gather_rng()  # collective: every rank takes part
        if not (self.out_dir and self.dist.is_main):
            return
        state = self.state_dict()
        if per_rank is not None:
            state["rng_per_rank"] = per_rank
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
        """Train the remaining epochs; returns the (raw, unwrapped) model."""
        self._step_in_epoch = 0
        while self.epoch < self.config.epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            self.history.append(metrics)
            self.save()
            if self.progress and self.dist.is_main:
                print(f"epoch {metrics['epoch']}/{self.config.epochs}  loss {metrics['loss']:.4f}  "
                      f"acc {metrics['acc']:.4f}  alpha {metrics['alpha']:.4g}  lr {metrics['lr']:.3g}", flush=True)
            for cb in self.callbacks:
                cb(self, metrics)
        self.raw_model.eval()
        return self.raw_model


def train(model: nn.Module, train_loader: DataLoader, *, epochs: int = 100, ood_type: str = "gradient",
          p_inv: float = 0.1, alpha_min: float = 30.0, alpha_max: float = 300.0, w: float = 1.0, lr: float = 0.1,
          out_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          device: str | torch.device | None = None, progress: bool = True,
          callbacks: Iterable[EpochCallback] = (), **kwargs) -> nn.Module:
    """Train ``model`` with ASCOOD; returns it (eval mode).

    Keyword arguments are :class:`TrainConfig` fields (``alpha_mode``,
    ``momentum``, ``nesterov``, ``weight_decay``, ``fc_lr_factor``,
    ``saliency_mode``, ``amp``, ``seed``, ``min_lr_ratio``) plus the
    :class:`Trainer` options (``out_dir``, ``resume``, ``device``,
    ``progress``, ``callbacks``).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"train() got unknown arguments: {', '.join(sorted(unknown))}")
    config = TrainConfig(epochs=epochs, ood_type=ood_type, p_inv=p_inv, alpha_min=alpha_min, alpha_max=alpha_max,
                         w=w, lr=lr, **kwargs)
    return Trainer(model, train_loader, config, out_dir=out_dir, resume=resume, device=device, progress=progress,
                   callbacks=callbacks).fit()
