"""Which checkpoint of a run to evaluate: ``best.pt`` (best ID validation accuracy) or ``last.pt``.

The reference evaluates the checkpoint with the best ID validation accuracy;
``ascood train --val`` keeps it as ``best.pt`` beside ``last.pt``.
"""
from __future__ import annotations

import os

from .trainer import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME

__all__ = ["CHECKPOINT_CHOICES", "resolve_checkpoint", "describe_checkpoint"]

CHECKPOINT_CHOICES = ("best", "last")


def resolve_checkpoint(path: str | os.PathLike, which: str | None = None) -> str:
    """The checkpoint file to load from ``path``.

    A file is used as is (``which`` must then be None). A run directory
    gives ``best.pt`` when it exists (else ``last.pt``) for ``which=None``,
    or exactly the one ``which`` ("best" / "last") names. Raises
    FileNotFoundError / ValueError with the path and what was expected.
    """
    path = os.fspath(path)
    if which is not None and which not in CHECKPOINT_CHOICES:
        raise ValueError(f"--which must be one of {', '.join(CHECKPOINT_CHOICES)}, got {which!r}")
    if os.path.isfile(path):
        if which is not None:
            raise ValueError(f"--which {which} needs a run directory, but {path} is a file (pass the directory, "
                             "or drop --which)")
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    best, last = os.path.join(path, BEST_CHECKPOINT_NAME), os.path.join(path, CHECKPOINT_NAME)
    if which is None:
        which = "best" if os.path.isfile(best) else "last"
    chosen = best if which == "best" else last
    if not os.path.isfile(chosen):
        hint = " (best.pt is written only when training with --val)" if which == "best" else ""
        raise FileNotFoundError(f"{chosen} not found{hint}")
    return chosen


def describe_checkpoint(path: str, ckpt: dict) -> str:
    """'scoring checkpoint PATH (best.pt: epoch 7 of 30, best ID val acc 93.10%)'-style line."""
    name = os.path.basename(path)
    epochs = (ckpt.get("train_config") or {}).get("epochs")
    parts = [f"epoch {ckpt.get('epoch')}" + (f" of {epochs}" if epochs else "")]
    if ckpt.get("best_val_acc") is not None:
        parts.append(f"best ID val acc {100 * ckpt['best_val_acc']:.2f}%")
    return f"scoring checkpoint {path} ({name}: {', '.join(parts)})"
