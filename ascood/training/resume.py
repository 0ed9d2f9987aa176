"""Resume safety: a resumed run trains exactly what its checkpoint records.

* :func:`resume_differences` lists every setting the saved optimizer, lr and
  alpha schedules and outlier generator depend on that differs between a
  checkpoint and the new run (all :class:`~ascood.training.trainer.TrainConfig`
  fields, the number of batches per epoch -- the per-step cosine schedule
  depends on it -- and the model's build record); the trainer refuses to
  resume when the list is not empty.
* :func:`fill_from_checkpoint` is the CLI side: ``ascood train DATA --out X
  --resume`` takes every flag the user did not type from the checkpoint, so
  an interrupted run continues without repeating its flags; a flag typed
  with a different value is reported by the trainer's check.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Iterable

__all__ = ["resume_differences", "format_differences", "fill_from_checkpoint", "CLI_CONFIG_FLAGS",
           "CLI_BUILD_FLAGS", "CLI_EXTRA_FLAGS", "DATA_KEYS"]

#: CLI dest -> TrainConfig field, for flags that go into the TrainConfig.
CLI_CONFIG_FLAGS = {name: name for name in (
    "epochs", "ood_type", "p_inv", "alpha_min", "alpha_max", "alpha_mode", "w", "lr", "momentum", "nesterov",
    "weight_decay", "fc_lr_factor", "min_lr", "saliency_mode", "saliency_target", "shuffle_rank", "outlier_loss",
    "energy_margin_in", "energy_margin_out", "amp", "sync_bn", "seed")}
#: CLI dest -> build_model argument (the checkpoint's model_build record).
CLI_BUILD_FLAGS = {"model": "name", "width": "width", "head": "head", "sigma": "sigma", "channels": "in_channels"}
#: CLI dest -> key of the checkpoint's ``extra`` record (data pipeline settings).
CLI_EXTRA_FLAGS = {"image_size": "image_size", "mean": "mean", "std": "std", "batch_size": "batch_size",
                   "data_format": "data_format"}

# TrainConfig fields that change how fast a step runs, not what it computes: a resumed run may switch them.
_SPEED_ONLY = {"compile", "channels_last"}

# build_model arguments that do not change what trains after the first epoch (weights come from the checkpoint).
_BUILD_IGNORED = {"weights"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


#: ``extra`` keys that describe the data and the model's input: a resumed run must read the same data the same
#: way (keys missing on either side, e.g. in checkpoints from before they were recorded, are not compared).
DATA_KEYS = {"image_size": "--image-size", "mean": "--mean", "std": "--std", "classes": "class names", "num_images": "number of training images",
             "data_fingerprint": "training data (file list and labels)"}


def resume_differences(ckpt: dict, config, *, amp: bool, steps_per_epoch: int,
                       model_build: dict | None, extra: dict | None = None) -> list[tuple[str, Any, Any]]:
    """[(name, saved, given), ...] for every setting that differs between ``ckpt`` and the new run.

    ``config``: the new run's TrainConfig; ``amp``: its resolved AMP flag;
    ``steps_per_epoch``: len(train loader); ``model_build``: the new model's
    build record (None for a model not made by build_model); ``extra``: the new
    run's metadata (the CLI records the data and input pipeline there, :data:`DATA_KEYS`).
    """
    saved = ckpt.get("train_config") or {}
    diffs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(config):
        given = getattr(config, f.name)
        if f.name in _SPEED_ONLY:
            continue
        if f.name == "amp":
            was = bool(ckpt.get("scaler")) if saved.get("amp") is None else bool(saved["amp"])
            if was != amp:
                diffs.append(("amp", was, amp))
            continue
        if f.name == "seed" and given is None:
            continue  # drawn: the checkpoint's own seed is restored
        if f.name not in saved:
            default = f.default if f.default is not dataclasses.MISSING else None
            if not _same(default, given):
                diffs.append((f.name, "(not recorded)", given))
            continue
        if not _same(saved[f.name], given):
            diffs.append((f.name, saved[f.name], given))
    steps = ckpt.get("steps_per_epoch")
    if steps is not None and int(steps) != int(steps_per_epoch):
        diffs.append(("batches per epoch (data size, --batch-size or world size)", int(steps), int(steps_per_epoch)))
    saved_extra = ckpt.get("extra") or {}
    for key, label in DATA_KEYS.items():
        if extra and key in extra and key in saved_extra and not _same(saved_extra[key], extra[key]):
            diffs.append((label, saved_extra[key], extra[key]))
    built = ckpt.get("model_build")
    if built and model_build:
        for key in sorted(set(built) | set(model_build)):
            if key not in _BUILD_IGNORED and not _same(built.get(key), model_build.get(key)):
                diffs.append((f"model {key}", built.get(key), model_build.get(key)))
    return diffs


def format_differences(path: str, diffs: Iterable[tuple[str, Any, Any]]) -> str:
    """One line: what differs and how to start a new run instead."""
    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    listed = ", ".join(f"{name}: {short(saved)} -> {short(given)}" for name, saved, given in diffs)
    return (f"cannot resume {path}: the new run differs from the one saved there ({listed}); the optimizer, lr "
            "and alpha schedules and outlier generator would not continue what was trained. To continue, drop "
            "these flags (the CLI then uses the saved values) or pass the saved settings; to train with the "
            "new ones, start a new run in another output directory (--out)")


def fill_from_checkpoint(args: argparse.Namespace, explicit: set[str], ckpt: dict) -> list[str]:
    """Set every resume-relevant flag the user did not type to the checkpoint's value; returns those names."""
    filled = []
    sources = ((CLI_CONFIG_FLAGS, ckpt.get("train_config") or {}), (CLI_BUILD_FLAGS, ckpt.get("model_build") or {}),
               (CLI_EXTRA_FLAGS, ckpt.get("extra") or {}))
    for mapping, record in sources:
        for dest, key in mapping.items():
            if dest in explicit or key not in record or not hasattr(args, dest):
                continue
            setattr(args, dest, record[key])  # amp None stays None ("auto"); its resolved value is checked
            filled.append(dest)
    return filled
