"""The feature store's shard files: safetensors written atomically, read back as untrusted input.

A shard is one safetensors file holding rows [start, stop) of a split's
arrays (``logits`` float32 (r, C), ``features`` float32 or float16 (r, m),
``labels`` int64 (r,), and any extra named array of the record). Its
``__metadata__`` (strings only, as the format wants) names the store format,
the split's key digest, the shard's index and rows, the first non-finite row
of each float array, and ``data_sha256``: the sha256 of the file's data
section (everything after the header). The checksum lives inside the file, so
a shard and its checksum appear together with one rename: several processes
(torchrun ranks) may write different shards of one split at once, with no
shared file to race on.

Reading never unpickles and never trusts a byte: the header's length, JSON
(no duplicate keys), dtypes, shapes and offsets are checked against the file
size and against what the caller expects before any array is mapped, and
:func:`verify_shard` hashes the data section. Arrays are then memory-mapped
(``np.memmap`` at the tensor's offset: the safetensors data section is raw
little-endian), and :class:`ShardedArray` presents many shards as one (N, ...)
array without reading it: a row range touches only the shards it overlaps.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..files import atomic_write

__all__ = ["SHARD_FORMAT", "SHARD_VERSION", "ARRAY_DTYPES", "ShardError", "ShardHeader", "encode_shard",
           "write_shard_file", "read_shard_header", "verify_shard", "ShardedArray", "open_maps", "clear_maps",
           "first_nonfinite_rows"]

SHARD_FORMAT = "ascood-feature-shard"
SHARD_VERSION = "1"
#: numpy dtype name -> safetensors dtype name (the only dtypes a shard may hold).
ARRAY_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64"}
_FROM_ST = {v: k for k, v in ARRAY_DTYPES.items()}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_HEADER = 1 << 20  # a shard's header lists a handful of arrays: 1 MiB is far above any real one
_PLACEHOLDER = "0" * 64
_BLOCK = 8 << 20


class ShardError(ValueError):
    """A shard file is not what the store wrote (damaged, truncated, of another key or rows)."""


@dataclass(frozen=True)
class ShardHeader:
    """A parsed, checked shard header: ``arrays`` name -> (numpy dtype name, shape, absolute byte offset);
    ``identity`` (inode, mtime ns) of the file read, so a map never reads a file replaced since."""

    path: str
    size: int
    data_start: int
    metadata: dict
    arrays: dict
    identity: tuple = ()


def first_nonfinite_rows(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """{name: first row holding NaN or inf} of the float arrays that have one (row index within the arrays)."""
    out = {}
    for name, a in arrays.items():
        if a.dtype.kind != "f" or not a.size:
            continue
        bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(1)
        if bad.any():
            out[name] = int(np.argmax(bad))
    return out


def encode_shard(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> tuple[bytearray, str]:
    """(safetensors bytes, data_sha256) of ``arrays`` (C-contiguous little-endian float32 / float16 / int64,
    names [a-z][a-z0-9_]*) with ``metadata`` plus ``data_sha256`` in the header's ``__metadata__``.

    The file is built by the safetensors library with a fixed-width placeholder for the checksum, which is
    then written in place (same length, so the offsets do not move)."""
    from safetensors.numpy import save

    clean = {}
    for name, a in arrays.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"shard array name {name!r} must match {_NAME_RE.pattern}")
        a = np.asarray(a)
        if a.dtype.name not in ARRAY_DTYPES:
            raise ValueError(f"shard array {name!r} has dtype {a.dtype}, expected one of {sorted(ARRAY_DTYPES)}")
        clean[name] = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["data_sha256"] = _PLACEHOLDER
    blob = bytearray(save(clean, metadata=meta))
    (n,) = struct.unpack("<Q", blob[:8])
    digest = hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()
    header = bytes(blob[8:8 + n])
    at = header.find(('"data_sha256":"' + _PLACEHOLDER + '"').encode())
    if at < 0 or header.find(_PLACEHOLDER.encode(), at + 80) >= 0:
        raise RuntimeError("safetensors wrote the checksum placeholder in an unexpected form")
    start = 8 + at + len('"data_sha256":"')
    blob[start:start + 64] = digest.encode()
    return blob, digest


def write_shard_file(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """Write a shard atomically (temporary file, fsync, rename); returns its data_sha256."""
    blob, digest = encode_shard(arrays, metadata)
    atomic_write(path, lambda f: f.write(blob))
    return digest


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
    return dict(pairs)


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check a shard's safetensors header (no array is read). Raises :class:`ShardError` saying why.

    Checked: the 8-byte length fits the file and 1 MiB, the header is a JSON object without duplicate keys,
    ``__metadata__`` maps strings to strings, every array has a known dtype, a non-negative integer shape and
    offsets whose length matches dtype x shape, and the arrays tile the data section exactly (no gap, no
    overlap, no trailing bytes).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise ShardError(f"{path}: {size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise ShardError(f"{path}: header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
    except OSError as err:
        raise ShardError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"constant {c}")))
    except (UnicodeDecodeError, ValueError) as err:
        raise ShardError(f"{path}: the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ShardError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    spans, arrays = [], {}
    for name, spec in header.items():
        if not _NAME_RE.match(name) or not isinstance(spec, dict):
            raise ShardError(f"{path}: unexpected entry {name!r}")
        dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in _FROM_ST:
            raise ShardError(f"{path}: array {name!r} has dtype {dtype!r}, expected one of {sorted(_FROM_ST)}")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
                or not all(type(s) is int and s >= 0 for s in shape)):
            raise ShardError(f"{path}: array {name!r} has shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise ShardError(f"{path}: array {name!r} has offsets {offs!r}")
        np_dtype = _FROM_ST[dtype]
        if offs[1] - offs[0] != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
            raise ShardError(f"{path}: array {name!r} spans {offs[1] - offs[0]} bytes, its shape {shape} "
                             f"{np_dtype} needs {int(np.prod(shape)) * np.dtype(np_dtype).itemsize}")
        spans.append((offs[0], offs[1], name))
        arrays[name] = (np_dtype, tuple(shape), data_start + offs[0])
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ShardError(f"{path}: array {name!r} starts at {begin}, expected {pos} (gap or overlap)")
        pos = end
    if data_start + pos != size:
        raise ShardError(f"{path}: the arrays end at byte {data_start + pos}, the file has {size} "
                         "(truncated or trailing bytes)")
    return ShardHeader(path, size, data_start, meta, arrays, (st.st_ino, st.st_mtime_ns))


# (realpath, size, mtime_ns, inode, data_sha256) of shards hashed by this process: each is hashed once.
_VERIFIED: set[tuple] = set()


def _stat_key(path: str, digest: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, digest)


def mark_verified(path: str, digest: str) -> None:
    """Record that this process wrote ``path`` with ``digest`` (it need not hash it again)."""
    _VERIFIED.add(_stat_key(path, digest))


def verify_shard(path: str | os.PathLike, *, key: str, index: int, start: int, stop: int,
                 dtypes: Mapping[str, str], expected_sha256: str | None = None) -> ShardHeader:
    """The checked header of a shard that is what the store wrote for ``key``'s shard ``index``, rows
    [start, stop): format, key, index and rows in its metadata, each array's dtype as ``dtypes`` says (name ->
    numpy dtype name; arrays not named there are refused), ``stop - start`` rows in every array, ``logits``
    present, and its data section's sha256 equal to the one in its header (and to ``expected_sha256`` when
    the manifest lists one). Raises :class:`ShardError` saying what is wrong. A file this process already
    hashed (same path, size, mtime and inode) is not hashed again.
    """
    h = read_shard_header(path)
    m = h.metadata
    want = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "key": key, "shard": str(index),
            "start": str(start), "stop": str(stop)}
    for k, v in want.items():
        if m.get(k) != v:
            raise ShardError(f"{h.path}: metadata {k} is {m.get(k)!r}, expected {v!r}")
    # Exactly the keys the store writes: the header is not under the data's checksum, so a damaged key name
    # (an unknown key, or a known one missing) must be refused here, not read as a default.
    keys = set(want) | {"nonfinite", "data_sha256"}
    if set(m) != keys:
        odd = sorted(set(m) ^ keys)
        raise ShardError(f"{h.path}: metadata keys {odd} unexpected or missing (expected {sorted(keys)})")
    digest = m.get("data_sha256", "")
    if not _HEX64.match(digest):
        raise ShardError(f"{h.path}: no valid data_sha256 in its metadata")
    if expected_sha256 is not None and digest != expected_sha256:
        raise ShardError(f"{h.path}: data_sha256 {digest[:12]}... differs from the manifest's "
                         f"{expected_sha256[:12]}...")
    if "logits" not in h.arrays:
        raise ShardError(f"{h.path}: no logits array")
    for name, (dtype, shape, _) in h.arrays.items():
        if name not in dtypes:
            raise ShardError(f"{h.path}: unexpected array {name!r}")
        if dtype != dtypes[name]:
            raise ShardError(f"{h.path}: array {name!r} is {dtype}, expected {dtypes[name]}")
        if not shape or shape[0] != stop - start:
            raise ShardError(f"{h.path}: array {name!r} has shape {shape}, expected {stop - start} rows")
    try:
        nonfinite = json.loads(m["nonfinite"])
    except ValueError:
        nonfinite = None
    if not (isinstance(nonfinite, dict) and all(k in h.arrays and type(v) is int and 0 <= v < stop - start
                                                for k, v in nonfinite.items())):
        raise ShardError(f"{h.path}: metadata nonfinite is not a map of array -> row")
    if _stat_key(h.path, digest) in _VERIFIED:
        return h
    sha = hashlib.sha256()
    with open(h.path, "rb") as f:
        f.seek(h.data_start)
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            sha.update(block)
    if sha.hexdigest() != digest:
        raise ShardError(f"{h.path}: checksum mismatch (the data's sha256 is {sha.hexdigest()[:12]}..., its header "
                         f"says {digest[:12]}...)")
    _VERIFIED.add(_stat_key(h.path, digest))
    return h


# -- memory-mapped reading ---------------------------------------------------------------------------------
class _Maps:
    """Open ``np.memmap`` s of shard arrays, least recently used dropped beyond ``limit`` (each map holds a file
    descriptor: an ImageNet bank has hundreds of shards)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.open: collections.OrderedDict = collections.OrderedDict()

    def get(self, path: str, offset: int, dtype: str, shape: tuple, identity: tuple) -> np.memmap:
        key = (path, offset, identity)
        m = self.open.get(key)
        if m is None:
            with open(path, "rb") as f:  # the file verified, not one put in its place since
                st = os.fstat(f.fileno())
                if identity and (st.st_ino, st.st_mtime_ns) != identity:
                    raise ShardError(f"{path} was replaced after it was verified (another process re-made it?); "
                                     "open the split again")
                m = np.memmap(f, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=offset, shape=shape)
            self.open[key] = m
            while len(self.open) > self.limit:
                self.open.popitem(last=False)
        else:
            self.open.move_to_end(key)
        return m


_MAPS = _Maps()


def open_maps() -> list[str]:
    """The shard files this process holds mapped now (most recent last): what reading has touched."""
    return [key[0] for key in _MAPS.open]


def clear_maps() -> None:
    """Drop every open map (they reopen on the next read)."""
    _MAPS.open.clear()


@dataclass(frozen=True)
class _Part:
    path: str
    offset: int
    rows: int
    identity: tuple = ()


class ShardedArray:
    """A read-only (N, ...) array made of row blocks in shard files, each memory-mapped when first read.

    Behaves as the feature code needs a memory-mapped array to: ``shape``, ``ndim``, ``dtype``, ``len``;
    ``a[i:j]`` (step 1) is a lazy view; ``np.asarray(a)`` / ``np.array(a, dtype)`` read its rows (only the
    shards they overlap); ``a[int]`` and ``a[index array]`` read those rows. Nothing is read at construction.
    """

    is_row_array = True  # recognised by Features as a memory-mapped row source

    def __init__(self, parts: Sequence[tuple], dtype: str, trailing: tuple[int, ...],
                 start: int = 0, stop: int | None = None) -> None:
        self._parts = [_Part(*p) for p in parts]
        self._bounds = np.cumsum([0] + [p.rows for p in self._parts])
        total = int(self._bounds[-1])
        self._start, self._stop = start, total if stop is None else stop
        self.dtype = np.dtype(dtype)
        self._trailing = tuple(trailing)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._stop - self._start, *self._trailing)

    @property
    def ndim(self) -> int:
        return 1 + len(self._trailing)

    def __len__(self) -> int:
        return self._stop - self._start

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self._parts)})"

    def _map(self, k: int) -> np.memmap:
        p = self._parts[k]
        return _MAPS.get(p.path, p.offset, self.dtype.name, (p.rows, *self._trailing), p.identity)

    def _read(self, lo: int, hi: int) -> np.ndarray:
        """Absolute rows [lo, hi) as one array (a copy)."""
        out = np.empty((max(0, hi - lo), *self._trailing), dtype=self.dtype)
        if hi <= lo:
            return out
        k = int(np.searchsorted(self._bounds, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            b0, b1 = int(self._bounds[k]), int(self._bounds[k + 1])
            take = min(hi, b1) - pos
            out[pos - lo:pos - lo + take] = self._map(k)[pos - b0:pos - b0 + take]
            pos += take
            k += 1
        return out

    def __array__(self, dtype=None, copy=None):
        a = self._read(self._start, self._stop)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows, rest = key[0], key[1:]
            return np.asarray(self[rows])[(slice(None), *rest)] if not isinstance(rows, (int, np.integer)) \
                else np.asarray(self[rows])[rest]
        n = len(self)
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                return np.asarray(self)[key]
            hi = max(lo, hi)
            view = ShardedArray.__new__(ShardedArray)
            view.__dict__.update(self.__dict__)
            view._start, view._stop = self._start + lo, self._start + hi
            return view
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} out of range for {n} rows")
            return self._read(self._start + i, self._start + i + 1)[0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"ShardedArray rows must be a slice, an int or an integer array, got {idx.dtype}")
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = np.empty((idx.size, *self._trailing), dtype=self.dtype)
        order = np.argsort(idx, kind="stable")  # ascending reads, shard by shard
        sidx = idx[order] + self._start
        shard_of = np.searchsorted(self._bounds, sidx, side="right") - 1
        for k in np.unique(shard_of):
            sel = shard_of == k
            out[order[sel]] = self._map(int(k))[sidx[sel] - int(self._bounds[k])]
        return out
