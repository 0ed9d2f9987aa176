"""A fitted scorer as JSON hyperparameters + named tensors, and back (no pickle).

:func:`scorer_state` reads what a fitted scorer of :mod:`ascood.scoring.scorers`
holds (the KNN bank, the MDS means and precision, ViM's basis, ReAct's clip,
TempScale's T, ...) into ``(params, tensors)``: ``params`` is JSON (numbers,
strings, booleans, lists), ``tensors`` a dict of CPU tensors for safetensors.
:func:`restore_scorer` rebuilds the scorer from them, checking every name,
dtype and shape against the model it will score for, so a crafted or
mismatched file is refused with a message naming the entry.

Banks (KNN, NNGuide, Relation) are stored already transformed (L2-normalised,
NNGuide's rows times their energy, Relation's [feature | softmax] rows), so
scoring needs neither the training features nor the head at load time. They
are restored as a :class:`StoredBank`: rows read chunk by chunk from a
(memory-mapped) source, optionally kept in float16 (half the memory, scores
within ~1e-3 of float32; see BENCHMARKS.md).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..scoring.scorers import SCORERS, Scorer, get_scorer

__all__ = ["scorer_state", "restore_scorer", "StoredBank", "ArtifactError", "BANK_SCORERS", "BANK_DTYPES",
           "STORABLE_SCORERS", "StreamedTensor"]

BANK_SCORERS = {"knn": "bank", "nnguide": "bank_rows", "relation": "bank"}
BANK_DTYPES = ("float32", "float16")


class ArtifactError(ValueError):
    """A detector artifact (or one of its pieces) is missing, altered, malformed or does not fit its model.

    The user pointed the package at it: bad input (the CLI's exit status 2)."""

    user_facing = True


class StreamedTensor:
    """A 2-d tensor written block by block: ``block(start, stop)`` gives rows [start, stop) (any float dtype)."""

    def __init__(self, n: int, width: int, dtype: torch.dtype, block, chunk: int = 16384) -> None:
        self.shape, self.dtype, self.block, self.chunk = (int(n), int(width)), dtype, block, int(chunk)

    def blocks(self):
        for start in range(0, self.shape[0], self.chunk):
            yield self.block(start, min(self.shape[0], start + self.chunk)).to(self.dtype).contiguous()


class StoredBank:
    """A scorer bank of ``n`` rows x ``width`` columns read in ``chunk``-row blocks (the scorers' bank protocol).

    ``rows(start, stop)`` returns a (stop - start, width) CPU tensor (float32 or
    float16, e.g. a slice of a memory-mapped safetensors file). Blocks are cast
    to float32 on the scoring device one at a time, so scoring holds one block
    and its similarities (about ``chunk`` x (width + batch) floats), never the
    whole bank, unless the bank fits in ``max_device_mb`` (then one float32 copy
    is kept on the device, as the scorers' own bank does).
    """

    def __init__(self, n: int, width: int, rows: Callable[[int, int], torch.Tensor], dtype: torch.dtype,
                 max_device_mb: float = 1024, chunk: int = 16384) -> None:
        self.n, self.width, self.rows, self.dtype = int(n), int(width), rows, dtype
        self.max_bytes = max_device_mb * 2 ** 20
        self.chunk = int(chunk)
        self._device_copy: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the bank as float32 (what a device copy would take)."""
        return self.n * self.width * 4

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32 CPU (the scorers' ``_Bank.block`` signature)."""
        return self.rows(start, stop).float()

    def chunks(self, device: torch.device):
        """(start row, float32 block on ``device``) pairs covering the bank."""
        if self.nbytes <= self.max_bytes:
            if self._device_copy is None or self._device_copy.device != torch.device(device):
                full = torch.empty(self.n, self.width, dtype=torch.float32, device=device)
                for start in range(0, self.n, self.chunk):
                    stop = min(self.n, start + self.chunk)
                    full[start:stop] = self.rows(start, stop).to(device).float()
                self._device_copy = full
            yield 0, self._device_copy
            return
        for start in range(0, self.n, self.chunk):
            yield start, self.rows(start, min(self.n, start + self.chunk)).to(device).float()

    def materialize(self) -> torch.Tensor:
        """The whole bank as one float32 CPU tensor (for export as a graph constant)."""
        out = torch.empty(self.n, self.width, dtype=torch.float32)
        for start in range(0, self.n, self.chunk):
            stop = min(self.n, start + self.chunk)
            out[start:stop] = self.rows(start, stop).float()
        return out


def _bank_rows(bank, dtype: torch.dtype):
    """A fitted bank (the scorers' ``_Bank`` or a :class:`StoredBank`) as a tensor streamed block by block
    into the file (never materialised whole: a 1.28M x 2048 bank is 10 GiB in float32)."""
    return StreamedTensor(bank.n, bank.width, dtype, bank.block, chunk=getattr(bank, "chunk", 16384))


# Per scorer: the hyperparameters kept in JSON and the fitted attributes kept as tensors (name -> dtype).
_PARAMS: dict[str, tuple[str, ...]] = {
    "msp": (), "mls": (), "entropy": (),
    "ebo": ("temperature",), "gen": ("gamma", "M"),
    "tempscale": ("temperature",), "klm": (),
    "react": ("percentile", "standardize"), "ash": ("percentile", "variant", "standardize"),
    "scale": ("percentile", "standardize"), "dice": ("p", "feature_space"),
    "gradnorm": ("temperature", "feature_space"),
    "knn": ("K", "feature_space"), "nnguide": ("K", "alpha", "bank", "feature_space"),
    "relation": ("pow", "threshold", "feature_space"),
    "mds": ("feature_space", "eps", "std"), "rmds": ("feature_space",),
    "vim": ("dim", "feature_space"), "she": ("feature_space",),
    "odin": ("temperature", "eps", "std"), "iodin": ("temperature", "eps", "std", "k"),
    "mdspp": ("feature_space", "eps", "std"), "fdbd": ("distance_as_normalizer", "feature_space"),
    "nci": ("alpha", "feature_space"), "neco": ("dim", "maxlogit", "feature_space"),
    **{n: ("percentile", "k1", "k2", "lmbda", "o", "eps", "num_samples", "standardize")
       for n in ("adascale_a", "adascale_l")},
}
STORABLE_SCORERS = tuple(_PARAMS)
_TENSORS: dict[str, dict[str, torch.dtype]] = {
    "klm": {"classes": torch.int64, "dists": torch.float64},
    "dice": {"mean_act": torch.float32, "weight": torch.float32, "bias": torch.float32},
    "mds": {"classes": torch.int64, "means": torch.float64, "precision": torch.float64},
    "rmds": {"classes": torch.int64, "means": torch.float64, "precision": torch.float64,
             "whole_mean": torch.float64, "whole_precision": torch.float64},
    "vim": {"u": torch.float64, "NS": torch.float64, "W": torch.float64, "b": torch.float64},
    "she": {"patterns": torch.float64},
    "mdspp": {"classes": torch.int64, "means": torch.float64, "precision": torch.float64},
    "fdbd": {"mean": torch.float64, "W": torch.float64, "b": torch.float64, "denominators": torch.float64},
    "nci": {"mean": torch.float64, "W": torch.float64, "b": torch.float64},
    "neco": {"mean": torch.float64, "scale": torch.float64, "components": torch.float64, "explained": torch.float64},
    # AdaSCALE: the two terms of the ID statistic Q' per fit row (its ECDF is their sum for the stored lmbda).
    **{n: {"fit_c": torch.float32, "fit_q": torch.float32} for n in ("adascale_a", "adascale_l")},
}
_FLOATS = {"react": ("threshold",), "vim": ("alpha",), "relation": ("m",)}


def scorer_state(scorer: Scorer, bank_dtype: str = "float32") -> tuple[dict, dict[str, torch.Tensor]]:
    """(params, tensors) of a fitted scorer; see the module docstring. ``bank_dtype``: "float32" or "float16".

    A bank comes as a :class:`StreamedTensor` (rows read from the fitted bank block by
    block as the file is written)."""
    name = scorer.name
    if name not in _PARAMS or type(scorer) is not SCORERS.get(name):
        raise TypeError(f"cannot store scorer {type(scorer).__name__} ({name!r}): only the built-in scorers "
                        f"({', '.join(_PARAMS)}) have a known state")
    if scorer.needs_fit and not scorer.fitted:
        raise RuntimeError(f"{name}: fit the scorer before storing it")
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype must be one of {BANK_DTYPES}, got {bank_dtype!r}")
    params = {}
    for key in _PARAMS[name]:
        value = getattr(scorer, key)
        if key == "std" and value is not None and not isinstance(value, (int, float)):
            value = [float(v) for v in value]
        params[key] = value
    for key in _FLOATS.get(name, ()):
        value = getattr(scorer, key)
        params[key] = int(value) if key == "m" else float(value)
    if name == "vim" and params["dim"] is None:  # the default resolved at fit (256, or m // 2 for small m)
        params["dim"] = int(scorer.NS.shape[0] - scorer.NS.shape[1])
    tensors = {k: getattr(scorer, k).detach().cpu().to(dtype).contiguous() for k, dtype in _TENSORS.get(name, {}).items()}
    if name in BANK_SCORERS:
        tensors["bank"] = _bank_rows(getattr(scorer, BANK_SCORERS[name]), getattr(torch, bank_dtype))
    return _jsonable(params), tensors


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating,)):
            v = float(v)
        out[k] = v
    return out


def _check_param(name: str, key: str, value, where: str):
    """One stored hyperparameter: the JSON type it must have (ArtifactError naming it otherwise)."""
    def bad(expected: str):
        return ArtifactError(f"{where}: scorer {name} parameter {key!r} must be {expected}, got {value!r}")

    if key in ("standardize", "distance_as_normalizer", "maxlogit"):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif key in ("feature_space",):
        if value not in ("raw", "head"):
            raise bad("'raw' or 'head'")
    elif key in ("variant",):
        if value not in ("b", "p", "s"):
            raise bad("'b', 'p' or 's'")
    elif key in ("bank",):
        if value not in ("all", "random", "first"):
            raise bad("'all', 'random' or 'first'")
    elif key == "percentile" and name.startswith("adascale"):
        if not (isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
            raise bad("a list of two numbers [p_min, p_max]")
    elif key == "num_samples":
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise bad("null or an integer >= 1")
    elif key in ("K", "M", "k", "dim", "pow", "m", "k1", "k2"):
        if value is None and key == "dim" and name == "neco":  # resolved from the stored variance ratios
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise bad("an integer >= 1")
    elif key == "std":
        if value is None:
            return value
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                                 for v in values):
            raise bad("null, a positive number or a list of positive numbers")
    else:
        if value is None and key in ("temperature",) and name == "tempscale":
            raise bad("a positive number (the fitted T)")
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise bad("a finite number")
    return value


def restore_scorer(name: str, params: dict, tensors: dict[str, torch.Tensor], *, num_classes: int,
                   feature_dim: int | None, bank: StoredBank | None = None, where: str = "detector") -> Scorer:
    """Rebuild a fitted scorer from :func:`scorer_state`'s output, validated against the model's sizes.

    ``num_classes`` C and ``feature_dim`` m (None for a model without a feature
    head) are the model's; every stored tensor's dtype and shape is checked
    against them. ``bank``: the KNN / NNGuide / Relation bank (a
    :class:`StoredBank`, e.g. over a memory-mapped file). ``where`` names the
    artifact in messages. Raises :class:`ArtifactError`.
    """
    if name not in _PARAMS:
        raise ArtifactError(f"{where}: unknown scorer {name!r} (known: {', '.join(_PARAMS)})")
    if not isinstance(params, dict):
        raise ArtifactError(f"{where}: scorer parameters must be a JSON object, got {type(params).__name__}")
    expected_keys = set(_PARAMS[name]) | set(_FLOATS.get(name, ()))
    if set(params) != expected_keys:
        raise ArtifactError(f"{where}: scorer {name} parameters must be exactly {sorted(expected_keys)}, "
                            f"got {sorted(params)}")
    params = {k: _check_param(name, k, v, where) for k, v in params.items()}
    wanted = dict(_TENSORS.get(name, {}))
    got = set(tensors)
    if got != set(wanted):
        raise ArtifactError(f"{where}: scorer {name} tensors must be exactly {sorted(wanted) or 'none'}, "
                            f"got {sorted(got) or 'none'}")
    for key, dtype in wanted.items():
        if tensors[key].dtype != dtype:
            raise ArtifactError(f"{where}: scorer tensor {key!r} must be {dtype}, got {tensors[key].dtype}")
        if dtype.is_floating_point and not bool(torch.isfinite(tensors[key]).all()):
            raise ArtifactError(f"{where}: scorer tensor {key!r} holds NaN or inf values")
    _check_shapes(name, params, tensors, num_classes, feature_dim, bank, where)

    ctor = {k: v for k, v in params.items() if k not in _FLOATS.get(name, ())}
    fitted = dict(tensors)
    try:
        scorer = get_scorer(name, **ctor)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: scorer {name} parameters are invalid: {err}") from None
    for key, value in fitted.items():
        setattr(scorer, key, value)
    if name == "react":
        # The clip value is stored, not the activations it came from: the scorer's threshold cache answers
        # for the stored percentile, and an empty activation array keeps its "fitted" check satisfied.
        scorer._activations = np.empty(0, dtype=np.float32)
        scorer._thresholds = {float(scorer.percentile): params["threshold"]}
    elif name == "vim":
        scorer.alpha = params["alpha"]
    elif name == "dice":
        scorer._masks = {}
    elif name in ("adascale_a", "adascale_l"):
        scorer._sorted = {}
    elif name in BANK_SCORERS:
        if name == "relation":
            scorer.m = params["m"]
        setattr(scorer, BANK_SCORERS[name], bank)
    scorer.fitted = True
    return scorer


def _check_shapes(name, params, t, C: int, m: int | None, bank, where: str) -> None:
    def need(cond: bool, what: str):
        if not cond:
            raise ArtifactError(f"{where}: scorer {name}: {what}")

    def shape(key):
        return tuple(t[key].shape)

    feature_scorer = SCORERS[name].uses_features if name in SCORERS else False
    if feature_scorer:
        need(m is not None, "it reads the model's features, but the model has no feature head")
    if name == "klm":
        need(len(shape("classes")) == 1 and shape("dists") == (shape("classes")[0], C) and shape("classes")[0] >= 1,
             f"classes (K,) and dists (K, {C}) expected, got {shape('classes')} and {shape('dists')}")
        need(bool(((t["classes"] >= 0) & (t["classes"] < C)).all()), f"classes must be in [0, {C})")
    elif name == "dice":
        need(shape("mean_act") == (m,) and shape("weight") == (C, m) and shape("bias") == (C,),
             f"mean_act ({m},), weight ({C}, {m}), bias ({C},) expected, got {shape('mean_act')}, "
             f"{shape('weight')}, {shape('bias')}")
    elif name in ("mds", "rmds", "mdspp"):
        k = shape("classes")[0] if len(shape("classes")) == 1 else -1
        need(k >= 1 and shape("means") == (k, m) and shape("precision") == (m, m),
             f"classes (K,), means (K, {m}), precision ({m}, {m}) expected, got {shape('classes')}, "
             f"{shape('means')}, {shape('precision')}")
        need(bool(((t["classes"] >= 0) & (t["classes"] < C)).all()), f"classes must be in [0, {C})")
        if name == "rmds":
            need(shape("whole_mean") == (1, m) and shape("whole_precision") == (m, m),
                 f"whole_mean (1, {m}) and whole_precision ({m}, {m}) expected")
    elif name == "vim":
        d = params["dim"] if params["dim"] is not None else None
        need(shape("u") == (m,) and len(shape("NS")) == 2 and shape("NS")[0] == m and 1 <= shape("NS")[1] < m
             and shape("W") == (C, m) and shape("b") == (C,),
             f"u ({m},), NS ({m}, r), W ({C}, {m}), b ({C},) expected, got {shape('u')}, {shape('NS')}, "
             f"{shape('W')}, {shape('b')}")
        need(d is None or shape("NS")[1] == m - d, f"NS has {shape('NS')[1]} columns, dim {d} needs {m - (d or 0)}")
    elif name == "she":
        need(shape("patterns") == (C, m), f"patterns ({C}, {m}) expected, got {shape('patterns')}")
    elif name in ("fdbd", "nci"):
        need(shape("mean") == (m,) and shape("W") == (C, m) and shape("b") == (C,),
             f"mean ({m},), W ({C}, {m}), b ({C},) expected, got {shape('mean')}, {shape('W')}, {shape('b')}")
        if name == "fdbd":
            need(shape("denominators") == (C, C) and bool((t["denominators"] > 0).all()),
                 f"denominators ({C}, {C}) of positive values expected, got {shape('denominators')}")
    elif name == "neco":
        need(shape("mean") == (m,) and shape("scale") == (m,) and shape("components") == (m, m)
             and shape("explained") == (m,), f"mean ({m},), scale ({m},), components ({m}, {m}), explained ({m},) "
             f"expected, got {shape('mean')}, {shape('scale')}, {shape('components')}, {shape('explained')}")
        need(bool((t["scale"] > 0).all()) and bool((t["explained"] >= 0).all())
             and abs(float(t["explained"].sum()) - 1) < 1e-6, "scale must be > 0, explained >= 0 and sum to 1")
        need(params["dim"] is None or params["dim"] < m, f"dim {params['dim']} must be below the feature size {m}")
    elif name in ("adascale_a", "adascale_l"):
        need(len(shape("fit_c")) == 1 and shape("fit_c") == shape("fit_q") and shape("fit_c")[0] >= 1,
             f"fit_c (N,) and fit_q (N,), N >= 1, expected, got {shape('fit_c')} and {shape('fit_q')}")
    if name in BANK_SCORERS:
        width = m + C if name == "relation" else m
        need(bank is not None, "its bank is missing")
        need(bank.width == width and bank.n >= 1, f"bank (N, {width}) expected, got ({bank.n}, {bank.width})")
        if name == "relation":
            need(params["m"] == m, f"m = {params['m']} but the model's feature has {m} dimensions")
