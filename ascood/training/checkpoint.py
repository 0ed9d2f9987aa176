"""Checkpoints: atomic writes, weights-only loading, RNG state capture.

A checkpoint is a plain dict of tensors and Python primitives, so it loads
with ``torch.load(..., weights_only=True)`` (no pickled code runs):

    format, epoch (completed epochs), model (state dict), model_build (the
    arguments of :func:`ascood.build_model`, or None), criterion (the outlier
    loss's own trainable tensors: ``vos_head.*`` for ``outlier_loss="vos"``,
    else empty; never read by scoring or export), optimizer, scheduler,
    scaler, rng, train_config, history (per-epoch metrics), extra.

``config.json`` beside it repeats ``train_config``/``model_build`` for humans
and for ``ascood eval``.

Files are written atomically through :mod:`ascood.files` (re-exported here).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..files import atomic_save, atomic_write_text, current_umask, remove_stale_temporaries, write_json  # noqa: F401

__all__ = ["FORMAT", "CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "load_model", "get_rng_state",
           "set_rng_state", "remove_stale_temporaries", "current_umask", "describe_state_dict_mismatch",
           "load_state_dict_checked", "write_json"]

FORMAT = "ascood-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, not an ascood checkpoint, or holds malformed contents (the message names it)."""


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

    Raises FileNotFoundError / :class:`CheckpointError` (a RuntimeError) naming
    the file when it is missing, unreadable, or not an ascood checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK\3\4); the legacy format starts with a pickle header (0x80).
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a torch checkpoint file (expected last.pt written by `ascood train` "
                           "or torch.save)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        # A bare state dict is what OpenOOD (and most training code) saves: say how ascood reads those.
        bare = isinstance(ckpt, dict) and bool(ckpt) and all(torch.is_tensor(v) for v in ckpt.values())
        raise CheckpointError(f"{path} is not an ascood checkpoint (format {FORMAT!r} expected)"
                              + ("; it is a bare state dict: for an OpenOOD checkpoint give --model openood:ARCH "
                                 "--weights FILE (ascood.nets.openood)" if bare else ""))
    return ckpt


def load_model(path: str | os.PathLike, map_location="cpu"):
    """Rebuild the trained :class:`~ascood.nets.ASCOODNet` from a checkpoint.

    Returns ``(model, checkpoint)``; the model is in eval mode. Needs a model
    built with :func:`ascood.build_model` (its arguments are stored).
    """
    from ..nets.registry import build_model

    ckpt = load_checkpoint(path, map_location)
    path = os.fspath(path)
    build = ckpt.get("model_build")
    if not build:
        raise CheckpointError(f"checkpoint {path} has no model_build record (model was not made by "
                              "ascood.build_model); rebuild the model yourself and load ckpt['model']")
    if not isinstance(build, dict) or not all(isinstance(k, str) for k in build):
        raise CheckpointError(f"checkpoint {path}: model_build must be a dict of build_model arguments, got "
                              f"{type(build).__name__}")
    try:
        model = build_model(**build)
    except Exception as err:  # an edited record: unknown keys, wrong types, an unknown model name
        raise CheckpointError(f"checkpoint {path}: cannot rebuild its model from model_build ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    load_state_dict_checked(model, ckpt.get("model"), path)
    model.eval()
    return model, ckpt


def describe_state_dict_mismatch(model_state: dict, saved_state: dict, limit: int = 3) -> str:
    """One line naming what differs between a model's state dict and a saved one (shapes, missing, extra keys)."""
    parts = []
    shapes = [f"{k} {tuple(saved_state[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
              for k, v in model_state.items()
              if k in saved_state and hasattr(saved_state[k], "shape") and tuple(saved_state[k].shape) != tuple(v.shape)]
    missing = [k for k in model_state if k not in saved_state]
    extra = [k for k in saved_state if k not in model_state]

    def few(items: list[str]) -> str:
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    if shapes:
        parts.append(f"shape mismatch: {few(shapes)}")
    if missing:
        parts.append(f"missing from the checkpoint: {few(missing)}")
    if extra:
        parts.append(f"not in the model: {few(extra)}")
    return "; ".join(parts) or "state dicts differ"


def load_state_dict_checked(model: torch.nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict(state)`` with a one-line error (:class:`CheckpointError`) naming ``source`` and the
    real difference."""
    if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
        raise CheckpointError(f"checkpoint {source}: the model's weights must be a state dict (names -> tensors), "
                              f"got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = describe_state_dict_mismatch(model.state_dict(), state)
        raise CheckpointError(f"checkpoint {source} does not fit this model ({detail}): was it trained with another "
                              "--model, --width, --channels or number of classes?") from err
