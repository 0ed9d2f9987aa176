"""Model outputs extracted once per split and reused by every scorer and every APS grid point.

A :class:`Features` record holds what post-hoc scorers read from a model:

* ``logits``   (N, C) float32 (a CPU tensor, or a numpy array / ``np.memmap``);
* ``features`` (N, m) float32, the backbone's *raw* feature h (the
  ``"raw"`` feature space; the ``"head"`` space, the vector the linear layer
  sees, is ``head.standardize(h)`` and is derived chunk by chunk, never stored);
* ``labels``   (N,) int64 or None (OOD sets carry -1);
* ``head``     a :class:`LinearHead` (the model's linear layer and its
  standardisation) or None, for the scorers that reshape features (ReAct, ASH,
  SCALE, DICE), need the weights (ViM) or the ``"head"`` space;
* ``batch_size`` the loader's batch size when extracted from one (NNGuide's
  ``bank="first"`` follows OpenOOD's first loader batches);
* ``extras``   {key: (N, ...) float32} or None: further per-row arrays that a
  scorer declares (:meth:`Scorer.record_extras
  <ascood.scoring.scorers.base.Scorer.record_extras>`, e.g. AdaSCALE's
  features of a perturbed input), each made by a :class:`RecordExtra` from
  (model, x) batch by batch and only when a scorer asks for it.

:func:`extract_features` runs the model once over a loader (eval mode,
no autograd) into RAM, or, with ``directory=``, streams the arrays to raw
little-endian files beside a JSON header and returns them memory-mapped
(:meth:`Features.load`; nothing is pickled). Scorers iterate a record in row
chunks (:meth:`Features.chunks`), so a fit reads a memory-mapped file without
holding it in RAM. :class:`FeatureCache` maps each loader to its record so an
evaluation extracts every split once (and each extra once per split: a later
scorer's new extra costs one pass for that extra alone); :func:`features_scores` scores a whole
record chunk by chunk.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from ...data.datasets import unpack_batch
from ...files import write_json
from .fastops import argmax_rows, logsumexp_rows

__all__ = ["Features", "LinearHead", "StreamedFeatures", "FeatureCache", "RecordExtra", "extract_features",
           "features_scores", "score_rows", "add_extras", "model_features", "iterate_loader", "model_device",
           "energy", "as_features", "model_image_scores"]

_FORMAT = "ascood-features-v1"
_FILES = {"logits": ("logits", np.float32), "features": ("features", np.float32), "labels": ("labels", np.int64)}
#: An extra's key is part of its file name (``<name>.extra.<key>.bin``): letters, digits and ``_ . = + -``.
_EXTRA_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,99}")


@runtime_checkable
class RecordExtra(Protocol):
    """One extra per-row array of a :class:`Features` record, computed from the model and a batch.

    ``key`` names it in the record and its files (it must change with every
    parameter the array depends on, e.g. a perturbation's step); calling it
    on (model, x) (model in eval mode, x on the model's device) returns a
    (B, ...) float tensor, one row per image. It may enable autograd itself.
    """

    key: str

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


def check_extra_key(key) -> str:
    """``key`` when it is a valid extra name (see ``_EXTRA_KEY``), else ValueError."""
    if not isinstance(key, str) or not _EXTRA_KEY.fullmatch(key):
        raise ValueError(f"Features extras key must be 1-100 letters, digits or '_.=+-' (starting with a letter or "
                         f"digit), got {key!r}")
    return key


def iterate_loader(loader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x on device, y on CPU or None) per batch of a (x, y) / {"data", "label"} / x-only loader."""
    for batch in loader:
        x, y = unpack_batch(batch) if isinstance(batch, (dict, list, tuple)) else (batch, None)
        yield x.to(device), (_label_tensor(y, "the loader's labels") if y is not None else None)


def _label_tensor(y, what: str) -> torch.Tensor:
    """Labels as a tensor; strings (class names) are refused by ``what`` instead of torch's conversion error."""
    if torch.is_tensor(y):
        return y
    a = np.asarray(y)
    if a.dtype.kind in "USO":
        first = a.reshape(-1)[0].item() if a.size else None
        raise ValueError(f"{what} must be integer class indices, got {type(first).__name__} values such as "
                         f"{first!r} (map class names to indices first)")
    return torch.as_tensor(a)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T * logsumexp(z / T) per row, (B, C) -> (B,) float32 (negative free energy; higher = more ID).

    T = 1 skips the two scalings (each a pass over (B, C)); the logsumexp is
    :func:`~.fastops.logsumexp_rows` (the plain formula's value, fewer passes on the CPU)."""
    z = logits.float()
    if temperature == 1:
        return logsumexp_rows(z)
    return temperature * logsumexp_rows(z / temperature)


def has_feature_head(model: nn.Module) -> bool:
    """Whether ``model`` exposes ``features(x)``, ``head(h)`` and ``fc`` (an :class:`~ascood.nets.ASCOODNet`)."""
    return hasattr(model, "features") and hasattr(model, "head") and hasattr(model, "fc")


def model_features(model: nn.Module, x: torch.Tensor, space: str = "raw") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K), feature (B, m)) of ``model`` on x, float32; feature per ``space`` ("raw" or "head").

    Needs a model with ``features(x)`` and ``head(h)`` (an
    :class:`~ascood.nets.ASCOODNet`); ``standardize`` is used for "head".
    """
    if not has_feature_head(model):
        raise TypeError("feature-based scorers need a model with features(x), head(h) and fc "
                        "(e.g. ascood.ASCOODNet)")
    h = model.features(x)
    logits = model.head(h)
    if space == "head":
        h = model.standardize(h) if hasattr(model, "standardize") else h
    elif space != "raw":
        raise ValueError(f"feature_space must be 'raw' or 'head', got {space!r}")
    return logits.float(), h.float()


@dataclass
class LinearHead:
    """The model's last layer: logits = ``weight`` @ standardize(h) + ``bias``.

    weight (C, m) and bias (C,) float tensors (references, not copies, when made
    by :meth:`from_model`); ``standardize`` maps the raw feature h (B, m) to the
    linear layer's input (the z-score of an ASCOOD head; None = identity, a
    plain linear head). ``zero_mean_rows``: every standardised row has mean 0
    over its m features (the z-score head), so head-space features lie in a
    hyperplane and their covariance is singular along the all-ones vector by
    construction (covariance scorers drop that direction: see MDS). Build one
    by hand for features cached from another model: ``LinearHead(fc.weight, fc.bias)``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    standardize: Callable[[torch.Tensor], torch.Tensor] | None = None
    zero_mean_rows: bool = False

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.weight) or self.weight.dim() != 2:
            got = getattr(self.weight, "shape", self.weight)
            raise ValueError(f"LinearHead weight must be a (C, m) tensor, got {got!r}")
        if self.bias is not None and (not torch.is_tensor(self.bias) or self.bias.shape != self.weight.shape[:1]):
            raise ValueError(f"LinearHead bias must be a ({self.weight.shape[0]},) tensor, "
                             f"got {getattr(self.bias, 'shape', self.bias)!r}")

    @classmethod
    def from_model(cls, model: nn.Module) -> "LinearHead":
        """The head of an :class:`~ascood.nets.ASCOODNet` (``fc`` and ``standardize``)."""
        if not has_feature_head(model):
            raise TypeError("LinearHead.from_model needs a model with features(x), head(h) and fc (an ASCOODNet)")
        fc = model.fc
        return cls(fc.weight.detach(), None if fc.bias is None else fc.bias.detach(),
                   getattr(model, "standardize", None), zero_mean_rows=getattr(model, "head_type", None) == "zscore")

    def bias_or_zero(self) -> torch.Tensor:
        return self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], dtype=self.weight.dtype,
                                                                   device=self.weight.device)

    def fc(self, h: torch.Tensor) -> torch.Tensor:
        """The linear layer alone on h: (B, m) -> (B, C), in h's dtype and device."""
        w = self.weight.to(device=h.device, dtype=h.dtype)
        b = None if self.bias is None else self.bias.to(device=h.device, dtype=h.dtype)
        return nn.functional.linear(h, w, b)

    def to_space(self, h: torch.Tensor, space: str) -> torch.Tensor:
        """Raw h -> the feature in ``space`` ("raw": h; "head": standardize(h))."""
        if space == "raw":
            return h
        if space != "head":
            raise ValueError(f"feature_space must be 'raw' or 'head', got {space!r}")
        return self.standardize(h) if self.standardize is not None else h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's logits of a raw h: fc(standardize(h))."""
        return self.fc(self.to_space(h, "head"))


def _rows(a, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of a tensor or numpy/memmap array as a CPU tensor of ``dtype`` (a copy for arrays)."""
    if torch.is_tensor(a):
        return a[start:stop].to(dtype)
    return torch.from_numpy(np.array(a[start:stop], dtype=torch.empty((), dtype=dtype).numpy().dtype))


def _check_array(name: str, a, ndim: int | None):
    """``a`` as a CPU tensor or numpy array of ``ndim`` dimensions (None: at least one, an extra's (N, ...))."""
    if a is None:
        return None
    if isinstance(a, np.ndarray) and not isinstance(a, np.memmap):
        a = torch.from_numpy(a)
    # A row source (the feature store's ShardedArray: shards memory-mapped on first read) is used as a memmap is.
    if not (torch.is_tensor(a) or isinstance(a, np.ndarray) or getattr(a, "is_row_array", False)):
        raise TypeError(f"Features {name} must be a tensor or numpy array, got {type(a).__name__}")
    if (a.ndim != ndim) if ndim is not None else a.ndim < 1:
        want = "(N, ...)" if ndim is None else "(N,)" if ndim == 1 else "(N, C)" if name == "logits" else "(N, m)"
        raise ValueError(f"Features {name} must be {want}, got shape {tuple(a.shape)}")
    if torch.is_tensor(a) and a.device.type != "cpu":
        a = a.cpu()
    return a


@dataclass
class Features:
    """Cached model outputs of one split (see the module docstring for the fields' shapes and dtypes)."""

    logits: torch.Tensor | np.ndarray | None = None
    features: torch.Tensor | np.ndarray | None = None
    labels: torch.Tensor | None = None
    head: LinearHead | None = None
    batch_size: int | None = None
    #: For memory-mapped arrays: {field: first row holding NaN or inf}, recorded while the file was written
    #: (fits refuse such rows without reading the file again); None for in-RAM records (checked directly).
    nonfinite: dict | None = None
    #: {key: (N, ...) float32 array} made by :class:`RecordExtra` s (see the module docstring), or None.
    extras: dict | None = None

    def __post_init__(self) -> None:
        self.logits = _check_array("logits", self.logits, 2)
        self.features = _check_array("features", self.features, 2)
        if self.extras is not None:
            if not isinstance(self.extras, dict):
                raise TypeError(f"Features extras must be a dict {{key: (N, ...) array}}, got "
                                f"{type(self.extras).__name__}")
            self.extras = {check_extra_key(k): _check_array(f"extras[{k!r}]", v, None) for k, v in self.extras.items()}
        if self.labels is not None:
            self.labels = _label_tensor(self.labels, "Features labels")
            if self.labels.dim() != 1:
                raise ValueError(f"Features labels must be (N,), got shape {tuple(self.labels.shape)}")
            if self.labels.is_floating_point() and not bool((self.labels == self.labels.round()).all()):
                bad = self.labels[self.labels != self.labels.round()][0].item()
                raise ValueError(f"Features labels must be integer class indices, got {bad!r} (a float that "
                                 "int64 would truncate)")
            self.labels = self.labels.long().cpu()
        sizes = {k: v.shape[0] for k, v in (("logits", self.logits), ("features", self.features),
                                              ("labels", self.labels), *self._extra_items()) if v is not None}
        if not sizes:
            raise ValueError("Features needs logits or features (both None)")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Features arrays disagree on the number of rows N: {sizes}")
        if self.features is not None and self.head is not None and self.head.weight.shape[1] != self.features.shape[1]:
            raise ValueError(f"Features head weight is {tuple(self.head.weight.shape)}, features have "
                             f"m = {self.features.shape[1]} columns")
        if self.logits is not None and self.head is not None and self.head.weight.shape[0] != self.logits.shape[1]:
            raise ValueError(f"Features head weight is {tuple(self.head.weight.shape)} ({self.head.weight.shape[0]} "
                             f"classes), the logits have C = {self.logits.shape[1]} columns (the head of another "
                             "model?)")

    def _extra_items(self) -> list[tuple[str, object]]:
        return [(f"extras[{k!r}]", v) for k, v in (self.extras or {}).items()]

    def __len__(self) -> int:
        for a in (self.logits, self.features, self.labels):
            if a is not None:
                return int(a.shape[0])
        return 0

    def require_extras(self, keys: Sequence[str], scorer: str) -> None:
        """Raise ValueError naming ``scorer`` and the key when an extra in ``keys`` is missing."""
        missing = [k for k in keys if k not in (self.extras or {})]
        if missing:
            raise ValueError(f"{scorer} needs the extra per-row arrays {missing} in the Features record (extract "
                             "them with extract_features(model, loader, extras=scorer.record_extras()) or a "
                             "FeatureCache)")

    def extra_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the extra ``key`` as a float32 CPU tensor."""
        return _rows(self.extras[key], start, stop, torch.float32)

    def require(self, what: str, scorer: str) -> None:
        """Raise ValueError naming ``scorer`` when the field ``what`` (logits, features, labels, head) is None."""
        if getattr(self, what) is None:
            hint = {"head": "pass head=LinearHead(fc.weight, fc.bias) or use extract_features(model, loader)",
                    "labels": "pass labels (the ID class of each row)",
                    "logits": "pass logits (N, C)", "features": "pass features (N, m) (the model's raw feature)"}[what]
            raise ValueError(f"{scorer} needs {what}: {hint}")

    def chunks(self, rows: int, extras: Sequence[str] | None = None) -> Iterator[tuple]:
        """(logits, features, labels) CPU tensors (float32, float32, int64; None where absent) per ``rows`` rows;
        with ``extras`` (keys) a fourth item, {key: (rows, ...) float32} of those extras."""
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if extras is not None:
            self.require_extras(extras, "chunks")
        n = len(self)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            out = (None if self.logits is None else _rows(self.logits, start, stop, torch.float32),
                   None if self.features is None else _rows(self.features, start, stop, torch.float32),
                   None if self.labels is None else self.labels[start:stop])
            yield out if extras is None else (*out, {k: self.extra_rows(k, start, stop) for k in extras})

    def feature_rows(self, start: int, stop: int) -> torch.Tensor:
        """Raw features of rows [start, stop) as a float32 CPU tensor (a view for float32 tensors)."""
        return _rows(self.features, start, stop, torch.float32)

    def logit_rows(self, start: int, stop: int) -> torch.Tensor:
        """Logits of rows [start, stop) as a float32 CPU tensor."""
        return _rows(self.logits, start, stop, torch.float32)

    def take(self, index: torch.Tensor) -> "Features":
        """The rows ``index`` (int64 (k,)) as an in-RAM record (memory-mapped rows are read in index order)."""
        index = torch.as_tensor(index, dtype=torch.long)
        order = torch.argsort(index)  # ascending reads of a memory-mapped file
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())

        def pick(a, dtype):
            if a is None:
                return None
            if torch.is_tensor(a):
                return a.index_select(0, index).to(dtype)
            return torch.from_numpy(np.asarray(a[index[order].numpy()])).to(dtype)[inv]

        return Features(pick(self.logits, torch.float32), pick(self.features, torch.float32),
                        None if self.labels is None else self.labels[index], self.head, self.batch_size,
                        extras=None if self.extras is None else {k: pick(v, torch.float32)
                                                                 for k, v in self.extras.items()})

    def slice(self, stop: int) -> "Features":
        """The first ``stop`` rows (views, no copy)."""
        return Features(None if self.logits is None else self.logits[:stop],
                        None if self.features is None else self.features[:stop],
                        None if self.labels is None else self.labels[:stop], self.head, self.batch_size,
                        extras=None if self.extras is None else {k: v[:stop] for k, v in self.extras.items()})

    # files ---------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, name: str) -> None:
        """Write ``<name>.<field>.bin`` raw little-endian arrays and ``<name>.json`` (the header, written last)."""
        os.makedirs(directory, exist_ok=True)
        header = {"format": _FORMAT, "n": len(self), "batch_size": self.batch_size, "arrays": {}}
        nonfinite = _NonFinite()
        fields = [(f, f, suffix, dtype, getattr(self, f)) for f, (suffix, dtype) in _FILES.items()]
        fields += [(_extra_field(k), k, f"extra.{k}", np.float32, v) for k, v in (self.extras or {}).items()]
        for field, key, suffix, dtype, a in fields:
            if a is None:
                continue
            path = os.path.join(directory, f"{name}.{suffix}.bin")
            with open(path, "wb") as f:
                for start in range(0, a.shape[0], 65536):
                    block = a[start:start + 65536]
                    block = block.numpy() if torch.is_tensor(block) else np.asarray(block)
                    block = np.ascontiguousarray(block, dtype=np.dtype(dtype).newbyteorder("<"))
                    nonfinite.add(field, start, block)
                    f.write(block.tobytes())
            spec = {"file": os.path.basename(path), "shape": list(a.shape), "dtype": np.dtype(dtype).str}
            if field == key:
                header["arrays"][field] = spec
            else:  # a separate table: readers that predate extras see a v1 record without them
                header.setdefault("extras", {})[key] = spec
        header["first_nonfinite_row"] = nonfinite.rows
        write_json(header, os.path.join(directory, f"{name}.json"))

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str, head: LinearHead | None = None,
             mmap: bool = True) -> "Features":
        """A record written by :meth:`save` / :func:`extract_features`; arrays memory-mapped (read-only) by default."""
        path = os.path.join(directory, f"{name}.json")
        with open(path, encoding="utf-8") as f:
            header = json.load(f)
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an ascood feature file (format {header.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        out, extras = {}, {}
        tables = [(f, spec, _FILES.get(f, (None, None))[1]) for f, spec in header["arrays"].items()]
        tables += [(_extra_field(check_extra_key(k)), spec, np.float32) for k, spec in header.get("extras", {}).items()]
        for field, spec, want in tables:
            if want is None or np.dtype(spec["dtype"]) != np.dtype(want).newbyteorder("<"):
                raise ValueError(f"{path}: unexpected array {field!r} of dtype {spec.get('dtype')!r}")
            file = os.path.join(directory, os.path.basename(spec["file"]))
            shape = tuple(int(s) for s in spec["shape"])
            expected = int(np.prod(shape)) * np.dtype(spec["dtype"]).itemsize
            if os.path.getsize(file) != expected:
                raise ValueError(f"{file} holds {os.path.getsize(file)} bytes, its header says {shape} "
                                 f"{spec['dtype']} ({expected} bytes): truncated or not this file's data")
            arr = np.memmap(file, dtype=spec["dtype"], mode="r", shape=shape) if mmap and expected else \
                np.fromfile(file, dtype=spec["dtype"]).reshape(shape)
            if field in _FILES:
                out[field] = torch.from_numpy(np.array(arr)) if field == "labels" else arr
            else:
                extras[field[len("extras."):]] = arr
        nonfinite = {k: int(v) for k, v in (header.get("first_nonfinite_row") or {}).items()
                     if k in out or k[len("extras."):] in extras}
        return cls(out.get("logits"), out.get("features"), out.get("labels"), head, header.get("batch_size"),
                   nonfinite, extras or None)


def _extra_field(key: str) -> str:
    """The name an extra goes by in a header's ``first_nonfinite_row`` (apart from the three fields)."""
    return f"extras.{key}"


class _NonFinite:
    """The first row holding NaN or inf of each float array, found block by block while the array is
    written (the block is in memory then: one isfinite each)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def add(self, field: str, start: int, block: np.ndarray) -> None:
        if field in self.rows or block.dtype.kind != "f":
            return
        bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(1)
        if bad.any():
            self.rows[field] = start + int(np.argmax(bad))


def as_features(data=None, labels=None, *, logits=None, head: LinearHead | None = None) -> Features:
    """A :class:`Features` record from a record (returned as is) or from (features, labels, logits, head)."""
    if isinstance(data, (Features, StreamedFeatures)):
        if labels is not None or logits is not None or head is not None:
            raise ValueError("pass either a Features record or features/labels/logits/head, not both")
        return data
    return Features(logits=logits, features=data, labels=labels, head=head)


@torch.no_grad()
def _forward(model: nn.Module, x: torch.Tensor, with_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if with_features:
        return model_features(model, x, "raw")
    return model(x).float(), None


class _EvalMode:
    """Run the model in eval mode inside the block and restore its previous mode after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def extract_features(model: nn.Module, loader, *, directory: str | os.PathLike | None = None,
                     name: str = "features", with_features: bool | None = None,
                     extras: Sequence[RecordExtra] = ()) -> Features:
    """One pass of ``model`` (eval mode, no autograd) over ``loader``: its :class:`Features` record.

    Args:
        model: an :class:`~ascood.nets.ASCOODNet` (logits, raw features and the
            head are recorded) or any classifier (logits only).
        loader: (x, y) / {"data", "label"} / x batches.
        directory: when given, the arrays are streamed to ``<name>.*.bin`` files
            there (RAM holds one batch) and returned memory-mapped; else in RAM.
        with_features: record the features (default: when the model has them).
        extras: :class:`RecordExtra` s whose arrays are recorded too (in
            ``Features.extras`` under their keys), computed in the same pass
            (each may run the model again, with autograd, on the batch).
    """
    with_features = has_feature_head(model) if with_features is None else with_features
    head = LinearHead.from_model(model) if has_feature_head(model) else None
    batch_size = getattr(loader, "batch_size", None)
    extras = _check_extras(extras)
    with _EvalMode(model):
        outputs = _outputs(model, loader, with_features, extras)
        first = next(outputs, None)  # an empty loader is refused before any file is created
        if first is None:
            raise ValueError("loader is empty")
        batches = (_named(*out) for out in itertools.chain([first], outputs))
        if directory is None:
            cols = _concat(batches)
            return Features(cols.get("logits"), cols.get("features"), cols.get("labels"), head, batch_size,
                            extras=_unprefixed(cols) or None)
        shapes, nonfinite = _write_arrays(batches, directory, name)
    header = {"format": _FORMAT, "n": shapes["logits"][0], "batch_size": batch_size, "arrays": {},
              "first_nonfinite_row": nonfinite.rows}
    _add_specs(header, shapes, name)
    write_json(header, os.path.join(directory, f"{name}.json"))  # last: its presence marks a complete set
    return Features.load(directory, name, head=head)


def add_extras(feats: Features, model: nn.Module, loader, extras: Sequence[RecordExtra], *,
               directory: str | os.PathLike | None = None, name: str = "features") -> Features:
    """``feats`` (the record of ``loader``) with the arrays of ``extras`` added: one pass computing them alone.

    With ``directory``/``name`` (where :func:`extract_features` wrote ``feats``) they are written beside its
    files, its header is rewritten with them and the record is returned memory-mapped; else in RAM.
    """
    extras = _check_extras(extras)
    with _EvalMode(model):
        batches = ({_extra_field(k): v for k, v in out[3].items()}
                   for out in _outputs(model, loader, None, extras))
        if directory is None:
            new = _unprefixed(_concat(batches))
            return _with_extras(feats, {**(feats.extras or {}), **new})
        shapes, nonfinite = _write_arrays(batches, directory, name)
    path = os.path.join(directory, f"{name}.json")
    with open(path, encoding="utf-8") as f:
        header = json.load(f)
    rows = next(iter(shapes.values()))[0] if shapes else 0
    if rows != header["n"]:
        raise ValueError(f"the loader gave {rows} rows for the extras, its record {path} holds {header['n']} "
                         "(not the loader the record was extracted from?)")
    _add_specs(header, shapes, name)
    header["first_nonfinite_row"] = {**header.get("first_nonfinite_row", {}), **nonfinite.rows}
    write_json(header, path)
    return Features.load(directory, name, head=feats.head)


def _with_extras(feats: Features, extras: dict) -> Features:
    """A copy of the record (same arrays) with ``extras`` as its extras (the row counts are checked)."""
    return Features(feats.logits, feats.features, feats.labels, feats.head, feats.batch_size, feats.nonfinite,
                    extras or None)


def _check_extras(extras) -> tuple:
    extras = tuple(extras or ())
    for e in extras:
        if not callable(e):
            raise TypeError(f"extras must be RecordExtra objects (a key and a call (model, x) -> (B, ...)), got "
                            f"{type(e).__name__}")
        check_extra_key(getattr(e, "key", None))
    return extras


def _run_extra(extra: RecordExtra, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = extra(model, x)
    if not torch.is_tensor(out) or out.dim() < 1 or out.shape[0] != x.shape[0]:
        raise ValueError(f"extra {extra.key!r} must return a (B, ...) tensor with the batch's B = {x.shape[0]} rows, "
                         f"got {getattr(out, 'shape', type(out).__name__)}")
    return out.detach().float().cpu()


def _outputs(model: nn.Module, loader, with_features: bool | None, extras: tuple = ()):
    """(logits, features or None, int64 labels or None, {extra key: array}) CPU tensors per loader batch;
    ``with_features`` None: the extras alone (no logits, features or labels)."""
    for x, y in iterate_loader(loader, model_device(model)):
        ex = {e.key: _run_extra(e, model, x) for e in extras}
        if with_features is None:
            yield None, None, None, ex
            continue
        z, h = _forward(model, x, with_features)
        yield z.cpu(), None if h is None else h.cpu(), None if y is None else y.long().cpu(), ex


def _named(z, h, y, ex) -> dict[str, torch.Tensor]:
    """One batch as {field: tensor} (extras under ``extras.<key>``), absent fields left out."""
    out = {k: t for k, t in (("logits", z), ("features", h), ("labels", y)) if t is not None}
    out.update({_extra_field(k): v for k, v in ex.items()})
    return out


def _concat(batches) -> dict[str, torch.Tensor]:
    cols: dict[str, list] = {}
    for batch in batches:
        for k, t in batch.items():
            cols.setdefault(k, []).append(t)
    return {k: torch.cat(v) for k, v in cols.items()}


def _unprefixed(cols: dict) -> dict:
    """The extras of a {field: array} dict, by their own keys."""
    return {k[len("extras."):]: v for k, v in cols.items() if k.startswith("extras.")}


def _suffix(field: str) -> str:
    return _FILES[field][0] if field in _FILES else f"extra.{field[len('extras.'):]}"


def _add_specs(header: dict, shapes: dict[str, list[int]], name: str) -> None:
    """The written arrays' entries in a header: the three fields in ``arrays``, the extras in ``extras``."""
    for field, shape in shapes.items():
        dtype = _FILES[field][1] if field in _FILES else np.float32
        spec = {"file": f"{name}.{_suffix(field)}.bin", "shape": shape, "dtype": np.dtype(dtype).newbyteorder("<").str}
        if field in _FILES:
            header["arrays"][field] = spec
        else:
            header.setdefault("extras", {})[field[len("extras."):]] = spec


def _write_arrays(batches, directory, name: str) -> tuple[dict[str, list[int]], "_NonFinite"]:
    """Stream {field: tensor} batches to ``<name>.<suffix>.bin`` files: their shapes and first non-finite rows."""
    os.makedirs(directory, exist_ok=True)
    files: dict[str, object] = {}
    shapes: dict[str, list[int]] = {}
    nonfinite = _NonFinite()
    try:
        for batch in batches:
            for key, t in batch.items():
                dtype = _FILES[key][1] if key in _FILES else np.float32
                a = np.ascontiguousarray(t.numpy(), dtype=np.dtype(dtype).newbyteorder("<"))
                nonfinite.add(key, shapes.get(key, [0])[0], a)
                if key not in files:
                    files[key] = open(os.path.join(directory, f"{name}.{_suffix(key)}.bin"), "wb")
                files[key].write(a.tobytes())
                shapes.setdefault(key, [0, *a.shape[1:]])[0] += a.shape[0]
    finally:
        for f in files.values():
            f.close()
    return shapes, nonfinite


class StreamedFeatures:
    """A loader seen as a :class:`Features`-like source: each :meth:`chunks` pass runs the model again.

    For fits that need one pass of running statistics (MDS, RMDS, SHE, DICE,
    KL-Matching): their memory is then the statistics, never the features.
    """

    def __init__(self, model: nn.Module, loader, with_features: bool | None = None) -> None:
        self.model, self.loader = model, loader
        self.with_features = has_feature_head(model) if with_features is None else with_features
        self.head = LinearHead.from_model(model) if has_feature_head(model) else None
        self.batch_size = getattr(loader, "batch_size", None)
        self.labels = None  # only per chunk
        self._owner: str | None = None
        self._check: Callable | None = None

    def checked(self, owner: str, check: Callable) -> "StreamedFeatures":
        """This stream with ``check(start row, logits, features, labels, head)`` run on every batch as it
        arrives (``start``: the batch's first row over the whole stream); ``owner`` (a scorer's name) is
        named when the loader is empty. A copy: the original stays unchecked."""
        out = copy.copy(self)
        out._owner, out._check = owner, check
        return out

    def require(self, what: str, scorer: str) -> None:
        if what == "features" and not self.with_features:
            raise ValueError(f"{scorer} needs features: the model has no features(x)/head(h)/fc")
        if what == "head" and self.head is None:
            raise ValueError(f"{scorer} needs the model's linear head (an ASCOODNet)")

    def chunks(self, rows: int):
        """(logits, features, labels) per loader batch (``rows`` is ignored: a batch is a chunk)."""
        start = 0
        with _EvalMode(self.model):
            for z, h, y, _ in _outputs(self.model, self.loader, self.with_features):
                if self._check is not None:
                    self._check(start, z, h, y, self.head)
                start += z.shape[0]
                yield z, h, y
        if not start:
            raise ValueError(f"{self._owner}: the fit set is empty (the loader yields no batches)" if self._owner
                             else "loader is empty")


class FeatureCache:
    """Loader -> its :class:`Features`, extracted once (``extractions`` counts the passes run).

    Share one cache between :func:`~ascood.scoring.scorers.sweep` and
    :func:`~ascood.evaluate` so every split is run through the model once for
    all scorers and grid points. ``directory``: memory-map each split's arrays
    from files there (``split<i>.*.bin``) instead of holding them in RAM. A
    :class:`Features` record passed where a loader goes is used as it is.
    ``get(loader, extras)`` adds a scorer's extra arrays (:class:`RecordExtra`)
    once per split and key.
    :class:`ascood.scoring.store.StoreFeatureCache` keeps them across runs (the feature store).
    """

    def __init__(self, model: nn.Module | None, directory: str | os.PathLike | None = None) -> None:
        self.model, self.directory = model, directory
        self._data: dict[int, tuple[object, Features]] = {}
        self.extractions = 0

    def get(self, loader, extras: Sequence[RecordExtra] = ()) -> Features:
        """The record of ``loader`` holding (at least) the arrays of ``extras`` (a scorer's
        :meth:`~ascood.scoring.scorers.base.Scorer.record_extras`): extracted on first use; an extra the
        cached record lacks is added by one pass computing it alone (both count in ``extractions``)."""
        keys = [e.key for e in _check_extras(extras)]
        if isinstance(loader, Features):
            loader.require_extras(keys, "this scorer")
            return loader
        if loader is None:
            raise ValueError("no data given (loader is None)")
        hit = self._data.get(id(loader))
        if hit is not None and hit[0] is loader:
            feats = hit[1]
            missing = [e for e in extras if e.key not in (feats.extras or {})]
            if missing:
                feats = add_extras(feats, self.model, loader, missing, **hit[2])
                self.extractions += 1
                self._data[id(loader)] = (loader, feats, hit[2])
            return feats
        if self.model is None:
            raise ValueError("FeatureCache has no model: pass Features records instead of loaders")
        kw = {} if self.directory is None else {"directory": self.directory, "name": f"split{len(self._data)}"}
        feats = extract_features(self.model, loader, extras=extras, **kw)
        self.extractions += 1
        self._data[id(loader)] = (loader, feats, kw)  # the loader is kept so its id is not reused
        return feats

    def record_scores(self, scorer, feats: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:func:`features_scores` of a split's record (a sharded cache shares the rows over ranks)."""
        return features_scores(scorer, feats)

    def image_scores(self, scorer, model: nn.Module, loader
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pred, score, labels) of a scorer that needs the images (ODIN, i-ODIN), run batch by batch; a
        sharded cache (:class:`ascood.scoring.distributed.ShardedFeatureCache`) shares the batches over ranks."""
        return model_image_scores(scorer, model, loader)

    def __len__(self) -> int:
        return len(self._data)


#: Rows per :func:`features_scores` chunk for scorers that read features (their chunk holds (rows, m)
#: features and, for KNN / NNGuide / Relation, (rows, bank) similarities).
SCORE_ROWS = 1024
#: Logits per chunk for the logit-only scorers: (rows, C) blocks of 4 MiB float32 (C = 100: 10,485 rows),
#: so a few thousand queries are one call, not several (a call costs ~20 us of Python and checks).
SCORE_LOGITS = 2 ** 20


def score_rows(scorer, feats: Features) -> int:
    """The rows per chunk :func:`features_scores` uses by default: :data:`SCORE_ROWS` (1024) for scorers that
    read features, else as many rows as hold :data:`SCORE_LOGITS` logits (at least 1024). A sharded cache
    cuts the ranks' ranges at multiples of it, so every rank scores the chunks one process would."""
    if not getattr(scorer, "uses_features", True):
        return max(SCORE_ROWS, SCORE_LOGITS // max(1, int(feats.logits.shape[1])))
    return SCORE_ROWS


def model_image_scores(scorer, model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pred (N,) int64, score (N,) float32, labels (N,) int64 or None) CPU tensors of
    ``scorer.score(model, x)`` over every batch of a loader (eval mode inside, the model's mode restored)."""
    device = model_device(model)
    preds, scores, labels = [], [], []
    with _EvalMode(model):
        for x, y in iterate_loader(loader, device):
            pred, score = scorer.score(model, x)
            preds.append(pred.detach().cpu())
            scores.append(score.detach().float().cpu())
            if y is not None:
                labels.append(y.long().cpu())
    if not scores:
        raise ValueError("loader is empty")
    return torch.cat(preds), torch.cat(scores), (torch.cat(labels) if labels else None)


def features_scores(scorer, feats: Features, rows: int | None = None, start: int = 0, stop: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pred (N,) int64, score (N,) float32, labels (N,) or None) of a record, ``rows`` rows at a time.

    pred is the scorer's :meth:`~.base.Scorer.predict_features`: the argmax of the record's logits (the model's
    prediction; :func:`~.fastops.argmax_rows`) for every scorer but DICE with ``pred="masked"``. A scorer with
    :meth:`~ascood.scoring.scorers.base.Scorer.record_extras` gets them from the record's extras.
    ``rows`` default: :func:`score_rows`; the scores do not depend on it. ``start`` / ``stop``: only the rows
    [start, stop) (N = stop - start), read in chunks of ``rows`` from ``start`` (a range starting at a
    multiple of ``rows`` is cut into the chunks a whole-record call makes there).
    """
    feats.require("logits", scorer.name)
    keys = [e.key for e in getattr(scorer, "record_extras", tuple)()]
    feats.require_extras(keys, scorer.name)
    stop = len(feats) if stop is None else stop
    rows = score_rows(scorer, feats) if rows is None else rows
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    preds, scores = [], []
    for a in range(start, stop, rows):
        b = min(stop, a + rows)
        z = feats.logit_rows(a, b)
        h = None if feats.features is None else feats.feature_rows(a, b)
        preds.append(scorer.predict_features(z, h, feats.head))
        kw = {"extras": {k: feats.extra_rows(k, a, b) for k in keys}} if keys else {}  # others: (z, h, head)
        scores.append(scorer.score_features(z, h, head=feats.head, **kw).detach().float().cpu())
    if not scores:
        raise ValueError("loader is empty")
    labels = feats.labels if feats.labels is None or (start, stop) == (0, len(feats)) else feats.labels[start:stop]
    return torch.cat(preds), torch.cat(scores), labels
