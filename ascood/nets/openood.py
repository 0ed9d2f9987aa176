"""OpenOOD v1.5 checkpoints as :class:`~ascood.nets.ASCOODNet` models (``--model openood:ARCH --weights FILE``).

OpenOOD saves ``torch.save(net.state_dict(), "best.ckpt")``: a plain state dict, with ``module.`` in front of
every key when the network was trained under DataParallel / DDP. Three of its networks are read:

============================  =========================================  ==================================
``--model``                   OpenOOD network (``openood/networks/``)     ascood network it becomes
============================  =========================================  ==================================
``openood:resnet18_32x32``    ``ResNet18_32x32`` (CIFAR, 32x32)          ``build_model("resnet18_32x32")``
``openood:resnet18_224x224``  ``ResNet18_224x224`` (torchvision ResNet)   ``build_model("resnet18")``
``openood:resnet50``          ``ResNet50`` (torchvision ResNet-50)        ``build_model("resnet50")``
============================  =========================================  ==================================

Each is the same architecture as the ascood backbone (the same layers and key names; the torchvision ones are
torchvision's ResNet), so the weights are copied key for key: OpenOOD's ``KEY`` -> ascood's ``backbone.KEY``
(``backbone.net.KEY`` for the torchvision ones) and ``fc.*`` -> ``fc.*``.

**The head.** A plain (cross-entropy) OpenOOD network computes logits = fc(h); it becomes an ASCOODNet with
``head="linear"``. OpenOOD's ASCOOD wrapper (``openood/networks/ascood_net.py``: keys ``backbone.*`` plus a
``sigma`` buffer) computes logits = fc(z_std(h) * sigma) with z_std(h) = (h - mean(h)) / (std(h) + 1e-6), the
unbiased std over the m features of each sample, which is exactly ascood's z-score op
(:func:`ascood_kernels.reference.zscore`: the same unbiased std, eps added to the std, sigma after); it becomes
``head="zscore"`` with sigma read from the checkpoint's buffer. In both cases :meth:`ASCOODNet.features` gives
the raw h that OpenOOD's ``net(x, return_feature=True)`` returns (before the z-score), so the scorers see
OpenOOD's features and logits (tests/nets/test_openood_checkpoints.py checks both, and MSP / EBO / ReAct /
SCALE scores, per sample against OpenOOD's own network and postprocessor code).

**Which head.** ``openood:ARCH`` reads either format and decides from the keys: a ``sigma`` key or keys under
``backbone.`` mean the ASCOOD wrapper. ``openood:ascood_ARCH`` insists on the wrapper (a plain checkpoint is
refused naming the missing ``sigma``).

**Strict.** Every checkpoint key must map to a model key and every model key must be filled, with equal
shapes: otherwise a ValueError names the missing and unexpected keys (the first few and the count) and each
shape mismatch with both shapes. The number of classes is read from ``fc.weight`` (and checked against
``num_classes`` when given). Files are read with ``torch.load(weights_only=True)`` (no pickled code runs; a
checkpoint holding other objects is refused) or as safetensors (``.safetensors``, or the format's header).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .ascoodnet import ASCOODNet

__all__ = ["OPENOOD_ARCHS", "OPENOOD_MODEL_NAMES", "OpenOODModel", "is_openood_name", "parse_openood_name",
           "read_state_dict", "convert_openood_state_dict", "load_openood_model"]

PREFIX = "openood:"
WRAPPER = "ascood_"
#: OpenOOD architecture -> (ascood build_model name, prefix of its backbone's keys in ASCOODNet).
OPENOOD_ARCHS: dict[str, tuple[str, str]] = {
    "resnet18_32x32": ("resnet18_32x32", "backbone."),
    "resnet18_224x224": ("resnet18", "backbone.net."),
    "resnet50": ("resnet50", "backbone.net."),
}
OPENOOD_MODEL_NAMES = tuple(f"{PREFIX}{a}" for a in OPENOOD_ARCHS) + tuple(f"{PREFIX}{WRAPPER}{a}"
                                                                            for a in OPENOOD_ARCHS)
_SHOW = 5  # keys named in a message


@dataclass
class OpenOODModel:
    """What :func:`load_openood_model` gives: the model and where it came from.

    ``model``: an :class:`ASCOODNet` in eval mode (on the CPU) whose ``build_args`` are ascood's own
    (``resnet18_32x32`` / ``resnet18`` / ``resnet50``), so detectors and checkpoints made from it rebuild
    without OpenOOD. ``source``: JSON-able facts (the file, the OpenOOD architecture, wrapper or plain, sigma,
    number of classes, whether ``module.`` prefixes were removed).
    """

    model: ASCOODNet
    source: dict = field(default_factory=dict)


def is_openood_name(name: str) -> bool:
    """True for any ``openood:...`` model name (known or not)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_openood_name(name: str) -> tuple[str, bool | None]:
    """``"openood:ARCH"`` -> (ARCH, None: decided from the keys); ``"openood:ascood_ARCH"`` -> (ARCH, True).

    ValueError naming the known names for anything else.
    """
    if not is_openood_name(name):
        raise ValueError(f"not an OpenOOD model name: {name!r} (expected one of {', '.join(OPENOOD_MODEL_NAMES)})")
    arch = name[len(PREFIX):]
    wrapper: bool | None = None
    if arch.startswith(WRAPPER):
        arch, wrapper = arch[len(WRAPPER):], True
    if arch not in OPENOOD_ARCHS:
        raise ValueError(f"unknown OpenOOD model {name!r}; known: {', '.join(OPENOOD_MODEL_NAMES)}")
    return arch, wrapper


def _is_safetensors(path: str, head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then the JSON header starting with '{'.
    return path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an OpenOOD checkpoint file (CPU), without running any code from it.

    A torch file (zip or legacy format) is read with ``torch.load(weights_only=True)`` and must be a dict of
    names -> tensors (OpenOOD's ``best.ckpt``); a safetensors file is read with ``safetensors.torch.load_file``.
    FileNotFoundError naming the file when it does not exist; ValueError naming it when it is neither format,
    is unreadable, holds pickled objects other than tensors, or is not a flat state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save: zip archive, or the legacy pickle format
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt, truncated, or pickled objects refused by weights_only
            raise ValueError(f"cannot read weights file {path} with weights_only=True (a torch.save'd state dict "
                             f"of tensors is expected; pickled objects are refused): {_first_line(err)}") from None
    elif _is_safetensors(path, head):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading safetensors needs the safetensors package "
                             "(pip install 'ascood[deploy]')") from None
        try:
            state = load_file(path, device="cpu")
        except Exception as err:
            raise ValueError(f"cannot read safetensors file {path}: {_first_line(err)}") from None
    else:
        raise ValueError(f"{path} is neither a torch checkpoint (torch.save) nor a safetensors file")
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (OpenOOD saves "
                         "torch.save(net.state_dict(), 'best.ckpt'))")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ValueError(f"{path} is not a flat state dict of tensors: {len(bad)} entr(y/ies) are not "
                         f"name -> tensor, e.g. {bad[0]!r} ({type(state[bad[0]]).__name__}); a training "
                         "checkpoint that wraps the weights (e.g. under 'state_dict') is not an OpenOOD best.ckpt")
    return dict(state)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _few(keys: Sequence[str]) -> str:
    keys = list(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > _SHOW else f" ({len(keys)})"
    return ", ".join(keys[:_SHOW]) + more


def _strip_module(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """DataParallel / DDP's ``module.`` prefixes removed (``module.module.`` too); a name clash is an error."""
    out: dict[str, torch.Tensor] = {}
    stripped = False
    for key, value in state.items():
        bare = key
        while bare.startswith("module."):
            bare, stripped = bare[len("module."):], True
        if bare in out:
            raise ValueError(f"{source}: key {key!r} and another key both become {bare!r} without 'module.'")
        out[bare] = value
    return out, stripped


def _sigma_of(state: Mapping[str, torch.Tensor], source: str) -> float:
    sigma = state["sigma"]
    if sigma.numel() != 1 or not sigma.is_floating_point():
        raise ValueError(f"{source}: 'sigma' must be one float (OpenOOD ASCOODNet's buffer), got shape "
                         f"{tuple(sigma.shape)} {sigma.dtype}")
    value = float(sigma.reshape(()))
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source}: 'sigma' must be finite and > 0, got {value}")
    return value


def convert_openood_state_dict(arch: str, state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                               *, wrapper: bool | None = None, source: str = "checkpoint"
                               ) -> tuple[dict[str, torch.Tensor], bool]:
    """Map an OpenOOD state dict onto an ASCOODNet's keys, strictly.

    Args:
        arch: a key of :data:`OPENOOD_ARCHS`.
        state: the checkpoint's state dict, ``module.`` prefixes already removed.
        model_state: the target ASCOODNet's ``state_dict()`` (its keys and shapes are what must be filled).
        wrapper: True = OpenOOD's ASCOOD wrapper is required, False = a plain network is required, None =
            decided from the keys (``sigma`` or ``backbone.`` keys = the wrapper).
        source: the file, for messages.

    Returns:
        (the ASCOODNet state dict, whether the checkpoint was the ASCOOD wrapper). ``sigma`` is not part of it
        (ASCOODNet keeps sigma as a constructor argument).

    Raises:
        ValueError naming the missing keys (model keys no checkpoint key fills), the unexpected keys
        (checkpoint keys that map to nothing) and every shape mismatch with both shapes.
    """
    if arch not in OPENOOD_ARCHS:
        raise ValueError(f"unknown OpenOOD architecture {arch!r}; known: {', '.join(OPENOOD_ARCHS)}")
    looks_wrapped = "sigma" in state or any(k.startswith("backbone.") for k in state)
    is_wrapper = looks_wrapped if wrapper is None else wrapper
    prefix = OPENOOD_ARCHS[arch][1]
    # The OpenOOD key each ASCOODNet key must come from.
    want: dict[str, str] = {}
    for key in model_state:
        theirs = key if key.startswith("fc.") else key[len(prefix):] if key.startswith(prefix) else None
        if theirs is None:
            raise ValueError(f"internal: ASCOODNet key {key!r} has no OpenOOD counterpart")
        want[key] = ("backbone." + theirs) if is_wrapper else theirs
    expected = set(want.values()) | ({"sigma"} if is_wrapper else set())
    missing = (["sigma"] if is_wrapper and "sigma" not in state else []) + [v for v in want.values() if v not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{theirs}: {tuple(state[theirs].shape)} in the checkpoint vs {tuple(model_state[ours].shape)} "
              "in the model" for ours, theirs in want.items()
              if theirs in state and tuple(state[theirs].shape) != tuple(model_state[ours].shape)]
    if missing or unexpected or shapes:
        kind = "OpenOOD's ASCOODNet wrapper (backbone.* + sigma)" if is_wrapper else "a plain OpenOOD network"
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_few(shapes)}")
        hint = ""
        if wrapper is not None and looks_wrapped != is_wrapper:
            hint = (" (the file looks like " + ("the ASCOOD wrapper: use openood:" + arch if looks_wrapped
                                                 else "a plain network: use openood:" + arch) + ")")
        raise ValueError(f"{source} does not fit openood:{WRAPPER if wrapper else ''}{arch} as {kind}: "
                         + "; ".join(parts) + hint)
    return {ours: state[theirs] for ours, theirs in want.items()}, is_wrapper


def load_openood_model(name: str, path: str | os.PathLike, *, num_classes: int | None = None,
                       input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None
                       ) -> OpenOODModel:
    """Read an OpenOOD v1.5 checkpoint into an :class:`ASCOODNet` (see the module docstring).

    Args:
        name: ``openood:ARCH`` or ``openood:ascood_ARCH`` (:data:`OPENOOD_MODEL_NAMES`).
        path: OpenOOD's ``best.ckpt`` (or ``last_*.ckpt``, or a safetensors file of the same state dict).
        num_classes: when given, must equal the rows of the checkpoint's ``fc.weight`` (C, m).
        input_mean, input_std: the normalisation the network was trained with (OpenOOD's per-benchmark
            values: :func:`ascood.data.normalization.openood_preprocessing`), stored on the model for ODIN /
            i-ODIN and in detectors.

    Returns:
        :class:`OpenOODModel`; ``model(x)`` (x (B, 3, H, W) float32, normalised) gives the logits (B, C) of
        OpenOOD's ``net(x)`` and ``model.features(x)`` the (B, m) feature of ``net(x, return_feature=True)``.

    Raises:
        ValueError (unknown name, unreadable / pickle-bearing file, key or shape mismatch, class count),
        FileNotFoundError (no such file).
    """
    from .registry import build_model

    arch, wrapper = parse_openood_name(name)
    source = os.fspath(path)
    state, stripped = _strip_module(read_state_dict(source), source)
    fc_key = "backbone.fc.weight" if "backbone.fc.weight" in state else "fc.weight"
    fc = state.get(fc_key)
    if fc is None or fc.dim() != 2:
        raise ValueError(f"{source} does not fit {name}: no 2-D {fc_key!r} (C, m) to read the number of classes "
                         f"from" + ("" if fc is None else f" (it has shape {tuple(fc.shape)})")
                         + f"; its keys start {_few(list(state))}")
    classes = int(fc.shape[0])
    if num_classes is not None and int(num_classes) != classes:
        raise ValueError(f"{source}: its classifier {fc_key} has {classes} classes, not the {num_classes} given "
                         "(num_classes)")
    if classes < 2:
        raise ValueError(f"{source}: {fc_key} has {classes} class(es); an OOD detector needs at least 2")
    is_wrapper = wrapper if wrapper is not None else ("sigma" in state or any(k.startswith("backbone.")
                                                                               for k in state))
    sigma = _sigma_of(state, source) if is_wrapper and "sigma" in state else 0.5
    model = build_model(OPENOOD_ARCHS[arch][0], classes, head="zscore" if is_wrapper else "linear", sigma=sigma,
                        input_mean=input_mean, input_std=input_std)
    mapped, is_wrapper = convert_openood_state_dict(arch, state, model.state_dict(), wrapper=wrapper, source=source)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    info = {"format": "openood", "file": os.path.abspath(source), "model": name, "openood_arch": arch,
            "ascood_wrapper": is_wrapper, "sigma": sigma if is_wrapper else None, "num_classes": classes,
            "module_prefix_removed": stripped}
    return OpenOODModel(model, info)
