"""A persistent, checksummed feature store: each split's model outputs, extracted once, reused by every later
``eval``, APS sweep and ``Detector.fit``.

    store = FeatureStore("runs/mine/features")                 # --features DIR
    cache = StoreFeatureCache(model, store, checkpoint="runs/mine/best.pt")
    ascood.evaluate(model, id_loader, ood, scorers=[...], id_train_loader=train, features=cache)

**What a split is keyed by** (:class:`~.storekeys.SplitKey`; its sha256 over canonical JSON is the entry's name):

* ``checkpoint``: the checkpoint file's sha256 (``sha256:<hex>``, hashed once per file per process: cached by
  real path, size, mtime and inode), or, for a model given without its file, the sha256 of its state dict
  (``state:<hex>``: names, dtypes, shapes and bytes of every tensor);
* ``files``: the sha256 of the split's rows, in order: for image files the real path of their common folder,
  then per file its path relative to it, its size, its modification time (ns) and its label; for in-memory
  data (CIFAR batches, arrays, tensors) their bytes and labels; a ``Subset`` adds its indices. The absolute
  folder and the mtime go beyond "relative paths and sizes" on purpose: two folders with the same layout and
  file sizes (generated test sets, re-encoded images) must never share features; moving or touching the data
  re-extracts it;
* ``preprocessing``: the dataset's transform as torchvision describes it (resize, crop, normalisation mean and
  std) and the image mode. A transform whose description holds a memory address (a lambda) cannot be keyed:
  such a split is extracted as before, in RAM, with one line saying why;
* ``layer``: what is recorded (``<Model>.features`` raw features with the logits of ``head``, or logits only
  for a plain classifier);
* ``features_dtype`` (float32, or float16: half the size, ~1e-3 relative error), ``n`` (rows) and the
  store format version.

The batch size, the device and the number of loader workers are not keyed: they do not change what a split
is (features computed on a GPU are reused on the CPU). The batches are always cut inside shards (rows
[start, start + B) of each shard), so any set of processes extracting any set of shards computes every row
in the same batch as one process does.

**Layout**: ``ROOT/<first 32 hex of the key>/manifest.json`` (format, the key's digest and parts in clear,
a human ``label``, ``n``, ``shard_rows``, ``n_shards``; once complete also each array's dtype and shape, the
first non-finite row of each float array and, per shard, its rows, bytes and data sha256) and
``shard-00000.safetensors`` ... (:mod:`.shardfiles`): shard ``i`` holds rows [i*S, min((i+1)*S, n)) of
``logits`` float32 (r, C), ``features`` (r, m) in ``features_dtype``, ``labels`` int64 (r,) when the data
has labels, and any other named array of the record. S (``shard_rows``, default 4096) is fixed when an
entry is created; a later store with another S reuses the entry with its own.

**Concurrency** (torchrun ranks): the shards of one split can be extracted by several processes at once,
each any subset (:meth:`SplitEntry.extract` with ``shard_ids``, e.g. ``missing[rank::world]``). Each shard
carries its own checksum inside its file and appears by one atomic rename, so no two writers share a file;
the manifest is written when the entry is created (every creator writes the same bytes) and again, complete,
by :meth:`SplitEntry.finalize`, which whoever sees every shard present calls (after a barrier: rank 0).

**Resume and trust**: :meth:`SplitEntry.missing_shards` verifies every present shard (header, key, rows,
dtypes, the data's sha256); a shard that fails is deleted (only the store's own file names, in its own key
folders) and made again, said in one line, never used. A killed extraction thus resumes at the first missing
shard. A manifest that is not valid JSON of this format, or whose key, parts, n or shards disagree with the
key asked for, is rebuilt from that key (said in one line): the shards are then checked one by one against
the key, so nothing a tampered manifest says is used. A key folder holding a file the store did not write is
refused (:class:`StoreError`); the root may hold anything else. When a split is extracted under a new key
while an entry with the same ``label`` (the data's folder or list) exists, one line names what changed
(checkpoint, file list, preprocessing, layer, features dtype). Earlier entries are left in place (delete
their folders to reclaim the space).

**Reading** (:meth:`SplitEntry.open`): a :class:`~.scorers.features.Features` whose logits and features are
:class:`~.shardfiles.ShardedArray` s (memory-mapped shard by shard; a row chunk reads only the shards it
overlaps) and whose labels (int64, 8 bytes a row) are in RAM. Every shard is verified before the record is
returned (once per process per file). ODIN and i-ODIN perturb the images: they run the model as before.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..files import write_json
from .scorers.features import Features, FeatureCache, LinearHead, has_feature_head, iterate_loader, \
    model_device, model_features
from .shardfiles import ShardedArray, ShardError, first_nonfinite_rows, mark_verified, verify_shard, \
    write_shard_file
from .storekeys import (FEATURE_DTYPES, FORMAT_VERSION, NotStorable, SplitKey, data_identity,
                        digest_of, file_sha256, loader_dataset, model_layer, shard_batches, split_key, state_sha256)

__all__ = ["FORMAT", "FORMAT_VERSION", "DEFAULT_SHARD_ROWS", "FEATURE_DTYPES", "StoreError", "NotStorable",
           "SplitKey", "FeatureStore", "SplitEntry", "StoreFeatureCache", "file_sha256", "state_sha256",
           "model_layer", "data_identity", "split_key", "shard_batches"]

FORMAT = "ascood-feature-store"
DEFAULT_SHARD_ROWS = 4096
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_TMP_RE = re.compile(r"^(manifest\.json|shard-\d{5,}\.safetensors)\.ascood\.[a-z0-9_]{8}\.tmp$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreError(ValueError):
    """The feature store cannot be used as asked (a key folder with foreign files, a root that is a file)."""

    user_facing = True  # the CLI prints it as one line with exit status 2 (bad input)


def _say(msg: str) -> None:
    print(f"ascood: {msg}", file=sys.stderr, flush=True)


# -- the store -----------------------------------------------------------------------------------------------
class FeatureStore:
    """A folder of split entries (see the module docstring).

    Args:
        root: the store's folder (created when missing; may hold other files).
        shard_rows: rows per shard of new entries (S, >= 1).
        features_dtype: "float32" or "float16" for the raw features of new keys (logits stay float32).
        log: a callable taking one line (default: ``ascood: <line>`` on stderr).
    """

    def __init__(self, root: str | os.PathLike, *, shard_rows: int = DEFAULT_SHARD_ROWS,
                 features_dtype: str = "float32", log: Callable[[str], None] | None = None) -> None:
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an int >= 1, got {shard_rows!r}")
        if features_dtype not in FEATURE_DTYPES:
            raise ValueError(f"features_dtype must be one of {FEATURE_DTYPES}, got {features_dtype!r}")
        self.root = os.fspath(root)
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"feature store {self.root} is a file, not a folder")
        self.shard_rows, self.features_dtype = shard_rows, features_dtype
        self.log = log or _say

    def key(self, model: nn.Module, data, *, checkpoint: str | os.PathLike | None = None) -> SplitKey:
        """:func:`split_key` with this store's features dtype."""
        return split_key(model, data, checkpoint=checkpoint, features_dtype=self.features_dtype)

    def path_of(self, key: SplitKey | str) -> str:
        """The folder of a key's entry: ROOT/<first 32 hex of its digest>."""
        digest = key.digest if isinstance(key, SplitKey) else key
        return os.path.join(self.root, digest[:32])

    def split(self, key: SplitKey) -> "SplitEntry":
        """The entry of ``key``: opened (its manifest checked, rebuilt when invalid) or created (its manifest
        written, and one line naming what changed when an entry of the same label exists). Raises
        :class:`StoreError` when its folder holds files the store did not write."""
        path = self.path_of(key)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as err:
            raise StoreError(f"feature store {self.root}: cannot create it ({err.strerror or err})") from None
        if os.path.lexists(path) and not os.path.isdir(path) or os.path.islink(path):
            raise StoreError(f"feature store {self.root}: {path} is not a folder the store made; remove it or use "
                             "another store folder")
        existed = os.path.isdir(path)
        if not existed:
            previous = self._same_label(key)
            os.makedirs(path, exist_ok=True)
            entry = SplitEntry(self, key, path, self.shard_rows)
            entry.write_manifest()
            what = f"{key.label}: " if key.label else ""
            if previous is not None:
                changed = key.changes(previous.get("parts", {}))
                self.log(f"feature store: {what}{', '.join(changed) or 'key'} changed since "
                         f"{os.path.basename(previous['_path'])}: extracting again into {os.path.basename(path)}")
            return entry
        _check_own_files(path)
        _remove_stale_temporaries(path)
        manifest, why = _read_manifest(path, key)
        if manifest is None:
            entry = SplitEntry(self, key, path, _shard_rows_on_disk(path, key) or self.shard_rows)
            if why == "is missing" and not any(_SHARD_RE.match(n) for n in os.listdir(path)):
                entry.write_manifest()  # another process is creating this entry right now: nothing to say
                return entry
            self.log(f"feature store: {path}/{MANIFEST} {why}: rebuilding it from the key (the shards are "
                     "checked one by one)")
            entry.write_manifest()
            return entry
        return SplitEntry(self, key, path, manifest["shard_rows"], manifest)

    def _same_label(self, key: SplitKey) -> dict | None:
        """The readable manifest in the root with ``key``'s label (another key) that differs from it in the
        fewest parts (the newest of those), or None."""
        if not key.label:
            return None
        best = None
        for name in os.listdir(self.root):
            mpath = os.path.join(self.root, name, MANIFEST)
            try:
                if os.path.getsize(mpath) > (1 << 20):
                    continue
                with open(mpath, encoding="utf-8") as f:
                    m = json.load(f)
                mtime = os.path.getmtime(mpath)
            except (OSError, ValueError):
                continue
            if isinstance(m, dict) and m.get("format") == FORMAT and m.get("label") == key.label \
                    and isinstance(m.get("parts"), dict):
                rank = (-len(key.changes(m["parts"])), mtime)
                if best is None or rank > best[0]:
                    best = (rank, {**m, "_path": os.path.join(self.root, name)})
        return None if best is None else best[1]


def _check_own_files(path: str) -> None:
    foreign = [n for n in sorted(os.listdir(path)) if n != MANIFEST and not _SHARD_RE.match(n)
               and not _TMP_RE.match(n)]
    if foreign:
        raise StoreError(f"feature store entry {path} holds {os.path.join(path, foreign[0])}"
                         + (f" and {len(foreign) - 1} more file(s)" if len(foreign) > 1 else "")
                         + ", which the store did not write: refusing to use or change that folder; move those "
                         "files out or use another store folder")


#: A temporary of the atomic writer older than this was left by a killed writer (a shard is written in seconds).
STALE_TEMPORARY_S = 3600


def _remove_stale_temporaries(path: str) -> None:
    """Delete this key folder's own temporaries (``shard-*.safetensors.ascood.XXXXXXXX.tmp``) that no writer has
    touched for :data:`STALE_TEMPORARY_S`: a killed extraction's partial shard. Live writers' are kept."""
    now = time.time()
    for name in os.listdir(path):
        if _TMP_RE.match(name):
            full = os.path.join(path, name)
            try:
                if now - os.path.getmtime(full) > STALE_TEMPORARY_S:
                    os.unlink(full)
            except OSError:
                pass


def _shard_rows_on_disk(path: str, key: SplitKey) -> int | None:
    """S as shard 0 of this key says it (its metadata's stop), to rebuild a lost manifest with the layout its
    shards have; None when there is no such shard."""
    from .shardfiles import read_shard_header

    try:
        m = read_shard_header(os.path.join(path, _shard_name(0))).metadata
        stop = int(m.get("stop", ""))
    except (ShardError, ValueError):
        return None
    return stop if m.get("key") == key.digest and m.get("start") == "0" and 1 <= stop <= key.n else None


def _read_manifest(path: str, key: SplitKey) -> tuple[dict | None, str]:
    """(the checked manifest of ``key``'s entry, "") or (None, why it cannot be used)."""
    mpath = os.path.join(path, MANIFEST)
    try:
        if os.path.getsize(mpath) > (16 << 20):
            return None, "is larger than any manifest"
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f, object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return None, f"is not valid JSON ({type(err).__name__})"
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        return None, "is not a manifest of this store format"
    if m.get("key") != key.digest or m.get("parts") != key.parts() or digest_of(m["parts"]) != key.digest:
        return None, "names another key"
    if m.get("n") != key.n:
        return None, f"says n = {m.get('n')!r}, the key {key.n}"
    s = m.get("shard_rows")
    if type(s) is not int or s < 1 or m.get("n_shards") != -(-key.n // s):
        return None, "has an invalid shard_rows / n_shards"
    if type(m.get("complete")) is not bool or not isinstance(m.get("label", ""), str):
        return None, "has an invalid complete flag or label"
    if m["complete"]:
        why = _check_complete_manifest(m, key)
        if why:
            return None, why
    return m, ""


def _check_complete_manifest(m: dict, key: SplitKey) -> str:
    n, s = key.n, m["shard_rows"]
    arrays, shards, nonfinite = m.get("arrays"), m.get("shards"), m.get("nonfinite")
    if not isinstance(arrays, dict) or "logits" not in arrays:
        return "lists no arrays"
    for name, spec in arrays.items():
        if not (isinstance(spec, dict) and spec.get("dtype") in _allowed_dtypes(name, key.features_dtype)
                and isinstance(spec.get("shape"), list) and 1 <= len(spec["shape"]) <= 4
                and all(type(v) is int and v >= 0 for v in spec["shape"]) and spec["shape"][0] == n):
            return f"has an invalid array entry {name!r}"
    if not isinstance(shards, list) or len(shards) != m["n_shards"]:
        return "lists a wrong number of shards"
    for i, e in enumerate(shards):
        if not (isinstance(e, dict) and e.get("file") == _shard_name(i) and e.get("start") == i * s
                and e.get("stop") == min(n, (i + 1) * s) and type(e.get("bytes")) is int
                and isinstance(e.get("sha256"), str) and _KEY_RE.match(e["sha256"])):
            return f"has an invalid entry for shard {i}"
    if not (isinstance(nonfinite, dict) and all(k in arrays and type(v) is int and 0 <= v < n
                                                for k, v in nonfinite.items())):
        return "has an invalid nonfinite map"
    return ""


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _allowed_dtypes(name: str, features_dtype: str) -> tuple[str, ...]:
    return {"logits": ("float32",), "features": (features_dtype,), "labels": ("int64",)}.get(
        name, ("float32", "float16", "int64"))


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class SplitEntry:
    """One split's entry in a :class:`FeatureStore` (made by :meth:`FeatureStore.split`).

    Attributes: ``key`` (:class:`SplitKey`), ``path`` (its folder), ``n`` rows, ``shard_rows`` (S),
    ``n_shards`` (ceil(n / S)).
    """

    def __init__(self, store: FeatureStore, key: SplitKey, path: str, shard_rows: int,
                 manifest: dict | None = None) -> None:
        self.store, self.key, self.path = store, key, path
        self.n, self.shard_rows = key.n, shard_rows
        self.n_shards = -(-self.n // shard_rows)
        self.manifest = manifest
        self._checked: dict[int, object] = {}  # shard -> its verified header, this object's lifetime

    def rows(self, i: int) -> tuple[int, int]:
        """Shard ``i``'s rows [start, stop)."""
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard {i} out of range: this split has {self.n_shards} shard(s)")
        return i * self.shard_rows, min(self.n, (i + 1) * self.shard_rows)

    def shard_path(self, i: int) -> str:
        return os.path.join(self.path, _shard_name(i))

    def _dtypes(self, header_arrays: Mapping | None = None) -> dict[str, str]:
        """name -> dtype a shard may hold: the manifest's when complete, else the key's (extras any allowed)."""
        if self.manifest and self.manifest.get("complete"):
            return {k: v["dtype"] for k, v in self.manifest["arrays"].items()}
        out = {"logits": "float32", "features": self.key.features_dtype, "labels": "int64"}
        for name, spec in (header_arrays or {}).items():
            if name not in out and spec[0] in ("float32", "float16", "int64"):
                out[name] = spec[0]
        return out

    def _verify(self, i: int, say: bool = True):
        """Shard i's checked header, or None when absent or bad (a bad one is deleted, said in one line)."""
        if i in self._checked:
            return self._checked[i]
        path = self.shard_path(i)
        if not os.path.exists(path):
            return None
        start, stop = self.rows(i)
        expected = None
        if self.manifest and self.manifest.get("complete"):
            expected = self.manifest["shards"][i]["sha256"]
        try:
            from .shardfiles import read_shard_header

            dtypes = self._dtypes(read_shard_header(path).arrays)
            h = verify_shard(path, key=self.key.digest, index=i, start=start, stop=stop, dtypes=dtypes,
                             expected_sha256=expected)
            if expected is not None:  # a complete manifest: every array it lists, with its row shape
                want = {k: tuple(v["shape"][1:]) for k, v in self.manifest["arrays"].items()}
                got = {k: tuple(v[1][1:]) for k, v in h.arrays.items()}
                if got != want:
                    raise ShardError(f"{path}: arrays {got} differ from the manifest's {want}")
        except ShardError as err:
            if say:
                self.store.log(f"feature store: shard {i} of {self.key.label or self.path} is not usable ({err}): "
                               "making it again")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            if self.manifest and self.manifest.get("complete"):
                self.manifest = None  # the shard list changes: finalize writes it again
                self.write_manifest()
            return None
        self._checked[i] = h
        return h

    def missing_shards(self) -> list[int]:
        """Indices of the shards to extract: absent, or present but failing their check (deleted, said)."""
        return [i for i in range(self.n_shards) if self._verify(i) is None]

    def is_complete(self) -> bool:
        """Whether every shard is present and verified."""
        return not self.missing_shards()

    def write_manifest(self) -> None:
        """Write the manifest (atomically): the key and layout; with the shard list once complete."""
        base = {"format": FORMAT, "version": FORMAT_VERSION, "key": self.key.digest, "parts": self.key.parts(),
                "label": self.key.label, "n": self.n, "shard_rows": self.shard_rows, "n_shards": self.n_shards,
                "complete": False}
        if self.manifest and self.manifest.get("complete"):
            base.update({k: self.manifest[k] for k in ("complete", "arrays", "shards", "nonfinite")})
        self.manifest = base
        write_json(base, os.path.join(self.path, MANIFEST))

    def finalize(self) -> bool:
        """When every shard verifies and they agree on their arrays, write the complete manifest (each array's
        dtype and shape, each shard's rows, bytes and data sha256, the first non-finite rows); True then.
        False while shards are missing. Safe to call from several processes (same bytes written)."""
        if self.manifest and self.manifest.get("complete") and len(self._checked) == self.n_shards:
            return True
        headers = []
        for i in range(self.n_shards):
            h = self._verify(i)
            if h is None:
                return False
            headers.append(h)
        first = headers[0].arrays
        arrays = {name: {"dtype": dt, "shape": [self.n, *shape[1:]]} for name, (dt, shape, _) in first.items()}
        nonfinite: dict[str, int] = {}
        shards = []
        for i, h in enumerate(headers):
            if {k: (v[0], v[1][1:]) for k, v in h.arrays.items()} != {k: (v[0], v[1][1:]) for k, v in first.items()}:
                self.store.log(f"feature store: shard {i} of {self.key.label or self.path} holds other arrays than "
                               "shard 0: making it again")
                os.unlink(h.path)
                self._checked.pop(i, None)
                return False
            start, stop = self.rows(i)
            for name, row in json.loads(h.metadata.get("nonfinite", "{}")).items():
                nonfinite.setdefault(name, start + row)
            shards.append({"file": _shard_name(i), "start": start, "stop": stop, "bytes": h.size,
                           "sha256": h.metadata["data_sha256"]})
        self.manifest = {"complete": True, "arrays": arrays, "shards": shards, "nonfinite": nonfinite}
        self.write_manifest()
        return True

    def write_shard(self, i: int, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> str:
        """Write shard ``i`` (atomically) from its rows of each array: ``logits`` float32 (r, C) required,
        ``features`` (r, m) (cast to the key's features dtype), ``labels`` int64 (r,), extra named arrays
        (float32 / float16 / int64); r = the shard's row count. Returns its data sha256."""
        start, stop = self.rows(i)
        out = {}
        for name, a in arrays.items():
            if a is None:
                continue
            a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
            want = {"logits": "float32", "features": self.key.features_dtype, "labels": "int64"}.get(name)
            if want is not None:
                with np.errstate(over="ignore"):  # an overflow is refused just below, naming the fix
                    cast = a.astype(want, copy=False)
                if cast.dtype == np.float16 and a.dtype != np.float16 and np.isfinite(a).all() \
                        and not np.isfinite(cast).all():
                    raise ValueError(f"array {name!r} of shard {i} exceeds float16's range (max |value| "
                                     f"{float(np.abs(a).max()):.6g} > 65504): store these features in float32")
                a = cast
            if a.shape[:1] != (stop - start,):
                raise ValueError(f"shard {i} holds rows [{start}, {stop}) ({stop - start} rows), array {name!r} has "
                                 f"shape {a.shape}")
            out[name] = a
        if "logits" not in out:
            raise ValueError("a shard needs its logits")
        meta = {"format": "ascood-feature-shard", "version": "1", "key": self.key.digest, "shard": str(i),
                "start": str(start), "stop": str(stop), "nonfinite": json.dumps(first_nonfinite_rows(out))}
        path = self.shard_path(i)
        digest = write_shard_file(path, out, meta)
        mark_verified(path, digest)
        self._checked.pop(i, None)
        return digest

    @torch.no_grad()
    def extract(self, model: nn.Module, data, shard_ids: Iterable[int] | None = None, *,
                batch_size: int | None = None, workers: int | None = None) -> list[int]:
        """Run ``model`` (eval mode, no autograd) over the rows of ``shard_ids`` (default: the missing ones) of
        ``data`` and write those shards; returns the indices written.

        ``data``: the DataLoader or Dataset the key was made from (a loader's batch size, workers and collate
        function are used unless ``batch_size`` / ``workers`` are given; a Dataset defaults to 128 and 0), or
        a callable taking a list of batches (row index lists) and returning an iterable of batches
        ((x, y) / {"data", "label"} / x). Batches never cross a shard boundary: every row is computed in the
        same batch whichever process extracts which shards.
        """
        todo = self.missing_shards() if shard_ids is None else sorted(set(int(i) for i in shard_ids))
        for i in todo:
            self.rows(i)  # range check
        if not todo:
            return []
        if callable(data) and not isinstance(data, (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
            bs = batch_size or 128
            plan = [b for i in todo for b in shard_batches(*self.rows(i), bs)]
            batches = data(plan)
        else:
            ds, lbs, kw = loader_dataset(data)
            bs = batch_size or lbs or 128
            plan = [b for i in todo for b in shard_batches(*self.rows(i), bs)]
            if workers is not None:
                kw = {**kw, "num_workers": workers}
                if not workers:
                    kw.pop("multiprocessing_context", None)
            batches = torch.utils.data.DataLoader(ds, batch_sampler=plan, **kw)
        with_features = has_feature_head(model)
        was_training = model.training
        model.eval()
        try:
            it = iter(iterate_loader(batches, model_device(model)))
            for i in todo:
                start, stop = self.rows(i)
                parts: dict[str, list] = {"logits": [], "features": [], "labels": []}
                got = 0
                while got < stop - start:
                    try:
                        x, y = next(it)
                    except StopIteration:
                        raise ValueError(f"the data ended after {start + got} rows; the key says {self.n}") from None
                    if with_features:
                        z, h = model_features(model, x, "raw")
                        parts["features"].append(h.cpu())
                    else:
                        z = model(x).float()
                    parts["logits"].append(z.cpu())
                    if y is not None:
                        parts["labels"].append(y.long().cpu())
                    got += z.shape[0]
                if got != stop - start:
                    raise ValueError(f"the batches of shard {i} gave {got} rows, expected {stop - start}")
                self.write_shard(i, {k: torch.cat(v) for k, v in parts.items() if v})
        finally:
            model.train(was_training)
        return todo

    def arrays(self) -> dict[str, ShardedArray]:
        """Each array of a complete entry as a :class:`~.shardfiles.ShardedArray` over its shards (verified)."""
        if not self.finalize():
            raise StoreError(f"feature store entry {self.path} is not complete: shard(s) "
                             f"{self.missing_shards()[:5]} missing")
        out = {}
        for name, spec in self.manifest["arrays"].items():
            parts = []
            for i in range(self.n_shards):
                h = self._checked[i]
                dt, shape, offset = h.arrays[name]
                parts.append((self.shard_path(i), offset, shape[0], h.identity))
            out[name] = ShardedArray(parts, spec["dtype"], tuple(spec["shape"][1:]))
        return out

    def open(self, head: LinearHead | None = None, batch_size: int | None = None) -> Features:
        """The complete split as a :class:`~.scorers.features.Features`: logits and features memory-mapped
        (:class:`~.shardfiles.ShardedArray`), labels int64 in RAM, ``nonfinite`` from the manifest; ``head``
        and ``batch_size`` as the caller's model and loader give them."""
        a = self.arrays()
        labels = torch.from_numpy(np.asarray(a["labels"])) if "labels" in a else None
        return Features(a["logits"], a.get("features"), labels, head, batch_size,
                        dict(self.manifest.get("nonfinite") or {}))


class StoreFeatureCache(FeatureCache):
    """A :class:`~.scorers.features.FeatureCache` backed by a :class:`FeatureStore`: each split is read from
    the store when its key is stored, else extracted into it (only its missing shards) and then read.

    ``checkpoint``: the file the model was loaded from (keys use its sha256; default the model's state
    dict). Data the store cannot key (:class:`NotStorable`) is extracted as the plain cache does, with one
    line saying why. Counters: ``extractions`` (splits that ran the model), ``shards_extracted``,
    ``store_hits`` (splits read without running the model).
    """

    def __init__(self, model: nn.Module | None, store: FeatureStore, *, checkpoint: str | os.PathLike | None = None,
                 directory: str | os.PathLike | None = None) -> None:
        super().__init__(model, directory)
        self.store, self.checkpoint = store, checkpoint
        self.shards_extracted = 0
        self.store_hits = 0

    def get(self, loader) -> Features:
        if isinstance(loader, Features) or loader is None:
            return super().get(loader)
        hit = self._data.get(id(loader))
        if hit is not None and hit[0] is loader:
            return hit[1]
        if self.model is None:
            return super().get(loader)
        try:
            key = self.store.key(self.model, loader, checkpoint=self.checkpoint)
        except NotStorable as err:
            self.store.log(f"feature store: not used for this split ({err}); extracting it in "
                           f"{'RAM' if self.directory is None else self.directory}")
            return super().get(loader)
        entry = self.store.split(key)
        t0 = time.perf_counter()
        done = self.fill(entry, loader)
        if done:
            self.extractions += 1
            self.shards_extracted += len(done)
            rows = sum(entry.rows(i)[1] - entry.rows(i)[0] for i in done)
            self.store.log(f"feature store: {key.label}: extracted {rows} of {entry.n} images "
                           f"({len(done)} of {entry.n_shards} shards) in {time.perf_counter() - t0:.1f} s")
        else:
            self.store_hits += 1
        head = LinearHead.from_model(self.model) if has_feature_head(self.model) else None
        feats = entry.open(head=head, batch_size=getattr(loader, "batch_size", None))
        self._data[id(loader)] = (loader, feats)
        return feats

    def fill(self, entry: SplitEntry, loader) -> list[int]:
        """Make ``entry`` complete: extract its missing shards from ``loader`` and finalize it; returns the
        shards this process extracted (empty when the split was stored).

        The hook for distributed extraction: a subclass may extract only its rank's part (e.g.
        ``missing[rank::world]``, with ``missing`` computed after a barrier so every rank sees the same list,
        or by rank 0 and broadcast), wait at a barrier, and let one rank call :meth:`SplitEntry.finalize`
        before the others read; every shard is then computed in the batches one process would use.
        """
        todo = entry.missing_shards()
        done = entry.extract(self.model, loader, todo) if todo else []
        if not entry.finalize():
            raise StoreError(f"feature store entry {entry.path}: shard(s) {entry.missing_shards()[:5]} still "
                             "missing after extraction (removed by another process?)")
        return done
