"""Checkpoints: atomic writes, weights-only loading, RNG state capture.

A checkpoint is a plain dict of tensors and Python primitives, so it loads
with ``torch.load(..., weights_only=True)`` (no pickled code runs):

    format, epoch (completed epochs), model (state dict), model_build (the
    arguments of :func:`ascood.build_model`, or None), optimizer, scheduler,
    scaler, rng, train_config, history (per-epoch metrics), extra.

``config.json`` beside it repeats ``train_config``/``model_build`` for humans
and for ``ascood eval``.
"""
from __future__ import annotations

import json
import os
import random
import tempfile

import numpy as np
import torch

__all__ = ["FORMAT", "atomic_save", "atomic_write_text", "load_checkpoint", "load_model", "get_rng_state",
           "set_rng_state"]

FORMAT = "ascood-checkpoint-v1"


def _atomic(path: str, write) -> None:
    """Write through a temp file in the same directory, fsync, then os.replace.

    os.replace is atomic on POSIX and Windows, so a reader (or a resumed run
    after a crash) sees either the old complete file or the new complete one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a UTF-8 text file atomically."""
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def get_rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG a training run draws from: torch (CPU and all CUDA devices), numpy, random, named generators."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray; stored as primitives so weights_only loading accepts it.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items() if g is not None},
    }
    return state


def _to_lists(obj):
    if isinstance(obj, tuple):
        return [_to_lists(o) for o in obj]
    return obj


def _to_tuples(obj):
    if isinstance(obj, list):
        return tuple(_to_tuples(o) for o in obj)
    return obj


def set_rng_state(state: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`get_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    for key, gen in (extra_generators or {}).items():
        if gen is not None and key in state.get("generators", {}):
            gen.set_state(state["generators"][key])


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load an ascood checkpoint with ``weights_only=True``.

    Raises FileNotFoundError / RuntimeError naming the file when it is
    missing, unreadable, or not an ascood checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RuntimeError(f"{path} is not an ascood checkpoint (format {FORMAT!r} expected)")
    return ckpt


def load_model(path: str | os.PathLike, map_location="cpu"):
    """Rebuild the trained :class:`~ascood.models.ASCOODNet` from a checkpoint.

    Returns ``(model, checkpoint)``; the model is in eval mode. Needs a model
    built with :func:`ascood.build_model` (its arguments are stored).
    """
    from .models import build_model

    ckpt = load_checkpoint(path, map_location)
    build = ckpt.get("model_build")
    if not build:
        raise RuntimeError(f"checkpoint {os.fspath(path)} has no model_build record (model was not made by "
                           "ascood.build_model); rebuild the model yourself and load ckpt['model']")
    model = build_model(**build)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def write_json(obj, path: str | os.PathLike) -> None:
    """Atomic, human-readable JSON."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)
