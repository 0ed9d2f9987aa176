"""What produced one split's features: the key of a feature store entry (see :mod:`.store`).

A :class:`SplitKey` holds the checkpoint's sha256 (or the model's state dict's), the sha256 of the split's
rows (its files' real folder, relative paths, sizes, mtimes and labels; or its in-memory arrays), the
preprocessing's description, the feature layer, the features dtype, the number of rows and the store format
version; its :attr:`~SplitKey.digest` (sha256 of their canonical JSON) names the entry. Data that cannot be
described that way raises :class:`NotStorable` with the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .scorers.features import has_feature_head

__all__ = ["FORMAT_VERSION", "FEATURE_DTYPES", "PART_NAMES", "NotStorable", "SplitKey", "file_sha256",
           "state_sha256", "model_layer", "loader_dataset", "data_identity", "split_key", "digest_of",
           "shard_batches"]

FORMAT_VERSION = 1
FEATURE_DTYPES = ("float32", "float16")
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{6,}")
#: The parts of a key, in the words the "what changed" line uses.
PART_NAMES = {"checkpoint": "checkpoint", "files": "file list", "preprocessing": "preprocessing",
              "layer": "layer", "features_dtype": "features dtype", "n": "number of images",
              "version": "store format version"}


class NotStorable(ValueError):
    """This data cannot be keyed (an unknown dataset type, a shuffling loader, a transform with a lambda):
    it is extracted as before, without the store. The message says why."""


# -- hashing ------------------------------------------------------------------------------------
_FILE_SHA: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes, hashed once per process per (real path, size, mtime, inode)."""
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


def state_sha256(model: nn.Module) -> str:
    """The sha256 (hex) of a model's state dict: each entry's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not torch.is_tensor(t):
            h.update(f"{name}={t!r}\n".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_layer(model: nn.Module) -> str:
    """What the store records of ``model``: its raw ``features(x)`` and ``head`` logits, or logits only."""
    name = type(model).__name__
    if has_feature_head(model):
        body = type(getattr(model, "backbone", None) or model).__name__
        return f"{name}.features raw (backbone {body}) + logits of head"
    return f"{name} logits only"


def loader_dataset(data) -> tuple[object, int | None, dict]:
    """(dataset, batch size or None, the DataLoader arguments to read it the same way) of a DataLoader or a
    Dataset."""
    if isinstance(data, torch.utils.data.DataLoader):
        if not isinstance(data.sampler, torch.utils.data.SequentialSampler) or data.batch_size is None \
                or getattr(data.batch_sampler, "drop_last", False):
            raise NotStorable("the loader does not read its dataset in order, every row once (a shuffling or "
                              "custom sampler, or drop_last)")
        kw = {"num_workers": data.num_workers, "collate_fn": data.collate_fn, "pin_memory": data.pin_memory,
              "worker_init_fn": data.worker_init_fn}
        if data.num_workers:
            kw["multiprocessing_context"] = data.multiprocessing_context
        return data.dataset, data.batch_size, kw
    if isinstance(data, torch.utils.data.Dataset):
        return data, None, {}
    raise NotStorable(f"a {type(data).__name__} is neither a DataLoader nor a Dataset")


def _unwrap(ds) -> tuple[object, list[str], list[np.ndarray]]:
    """(innermost keyable dataset, wrapper tags, Subset index arrays outermost first)."""
    tags, subsets = [], []
    for _ in range(32):
        if isinstance(ds, torch.utils.data.Subset):
            subsets.append(np.asarray(ds.indices, dtype=np.int64))
            ds = ds.dataset
        elif hasattr(ds, "feature_store_source"):
            tag, ds = ds.feature_store_source()
            tags.append(str(tag))
        else:
            return ds, tags, subsets
    raise NotStorable("datasets nested more than 32 deep")


def _rows_hash(ds, h) -> tuple[str, int]:
    """Feed what ``ds``'s rows are into ``h``; (a human label of the data, number of rows)."""
    samples = getattr(ds, "samples", None)
    paths = getattr(ds, "paths", None)
    if samples or paths:
        rows = [(s[0], int(s[1])) for s in samples] if samples else [(p, -1) for p in paths]
        folders: dict[str, str] = {}  # realpath once per folder (ImageNet: 1000 folders, 1.28M files)

        def real(p: str) -> str:
            head, tail = os.path.split(os.fspath(p))
            if head not in folders:
                folders[head] = os.path.realpath(head)
            return os.path.join(folders[head], tail)

        full = [real(p) for p, _ in rows]
        root = os.path.commonpath(list({os.path.dirname(p) for p in full}))
        cut = len(root.rstrip(os.sep)) + 1  # the path below root (os.path.relpath is 10 us a file: 13 s on ImageNet)
        h.update(f"files under {root}\n".encode("utf-8", "surrogateescape"))
        for p, (_, label) in zip(full, rows):
            try:
                st = os.stat(p)
            except OSError as err:
                raise NotStorable(f"cannot stat {p} ({err.strerror or err})") from None
            h.update(f"{p[cut:]}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode("utf-8", "surrogateescape"))
        label = getattr(ds, "list_file", None) or getattr(ds, "root", None) or root
        return os.path.realpath(os.fspath(label)), len(rows)
    if isinstance(getattr(ds, "images", None), np.ndarray):
        images = ds.images
        labels = np.asarray(getattr(ds, "labels", np.full(len(images), -1)), dtype=np.int64)
        h.update(f"arrays {images.dtype.str} {images.shape}\n".encode())
        h.update(np.ascontiguousarray(images).data)
        h.update(np.ascontiguousarray(labels).data)
        where = getattr(ds, "root", None)
        return (os.path.realpath(os.fspath(where)) if where else
                f"{type(ds).__name__} {hashlib.sha256(h.copy().digest()).hexdigest()[:8]}"), len(images)
    if isinstance(ds, torch.utils.data.TensorDataset):
        for t in ds.tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return f"TensorDataset {hashlib.sha256(h.copy().digest()).hexdigest()[:8]}", len(ds)
    raise NotStorable(f"a {type(ds).__name__} lists no files or arrays the store can key")


def _preprocessing(ds) -> str:
    tf = getattr(ds, "transform", None)
    text = "none" if tf is None else repr(tf)
    if _ADDRESS_RE.search(text):
        raise NotStorable("its transform cannot be described (it holds a function or object without a stable "
                          f"description: {_ADDRESS_RE.search(text).group(0)})")
    return f"{text}\nmode={getattr(ds, 'mode', None)}"


def data_identity(data) -> tuple[str, str, str, int]:
    """(files sha256, preprocessing description, label, n rows) of a DataLoader / Dataset; raises
    :class:`NotStorable` when it cannot be keyed. ``label`` names the data for messages (its list file or
    folder, plus which rows of it for a Subset)."""
    ds, _, _ = loader_dataset(data)
    outer = ds
    inner, tags, subsets = _unwrap(ds)
    h = hashlib.sha256()
    label, n = _rows_hash(inner, h)
    for tag in tags:
        h.update(f"wrapped by {tag}\n".encode())
    for idx in reversed(subsets):  # innermost first
        h.update(f"subset {idx.size}\n".encode())
        h.update(np.ascontiguousarray(idx).data)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise NotStorable("a Subset index is out of range")
        n = int(idx.size)
    if subsets:
        label += f" (rows {hashlib.sha256(b''.join(s.tobytes() for s in subsets)).hexdigest()[:8]}: {n} of them)"
    if len(outer) != n:
        raise NotStorable(f"the dataset says it has {len(outer)} rows, its files / arrays give {n}")
    return h.hexdigest(), _preprocessing(inner), label, n


@dataclass(frozen=True)
class SplitKey:
    """What produced one split's features (see the module docstring); ``digest`` names its entry."""

    checkpoint: str
    files: str
    preprocessing: str
    layer: str
    features_dtype: str
    n: int
    version: int = FORMAT_VERSION
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.features_dtype not in FEATURE_DTYPES:
            raise ValueError(f"features_dtype must be one of {FEATURE_DTYPES}, got {self.features_dtype!r}")
        if type(self.n) is not int or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")

    def parts(self) -> dict:
        """The keyed parts as a JSON-ready dict (``label`` is not keyed)."""
        return {"checkpoint": self.checkpoint, "files": self.files, "preprocessing": self.preprocessing,
                "layer": self.layer, "features_dtype": self.features_dtype, "n": self.n, "version": self.version}

    @property
    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`parts`."""
        return digest_of(self.parts())

    def changes(self, other: Mapping) -> list[str]:
        """The names (as messages say them) of the parts where ``other`` (an earlier key's parts) differs."""
        return [PART_NAMES[k] for k, v in self.parts().items() if other.get(k) != v]


def digest_of(parts: Mapping) -> str:
    """sha256 (hex) of ``parts`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def split_key(model: nn.Module, data, *, checkpoint: str | os.PathLike | None = None,
              features_dtype: str = "float32") -> SplitKey:
    """The :class:`SplitKey` of ``model`` (its checkpoint file when given, else its state dict) on ``data``
    (a DataLoader reading its dataset in order, or a Dataset). Raises :class:`NotStorable` saying why a
    split cannot be keyed."""
    files, prep, label, n = data_identity(data)
    if n < 1:
        raise ValueError("loader is empty")
    who = f"sha256:{file_sha256(checkpoint)}" if checkpoint is not None else f"state:{state_sha256(model)}"
    return SplitKey(who, files, prep, model_layer(model), features_dtype, n, label=label)


def shard_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """The batches (row index lists) of rows [start, stop): [start, start + B), ... (the last may be short)."""
    return [list(range(s, min(stop, s + batch_size))) for s in range(start, stop, batch_size)]
