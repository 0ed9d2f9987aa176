"""Evaluation under torchrun: every image through the model once, over all ranks; the same numbers as one process.

``torchrun --nproc_per_node N [--nnodes M ...] -m ascood eval|detector|reproduce ...`` runs the same
evaluation code on every rank (SPMD); two operations are shared out, and both are collective (every rank
calls them in the same order, which the identical code path guarantees):

* **extraction** (:meth:`ShardedFeatureCache.get`): a split's rows are cut into fixed shards by row index
  (whole loader batches, so each batch is the one a single process runs); rank 0 lists the shards still
  missing on disk, rank r extracts missing shards r, r + W, r + 2W, ... (each image exactly once: no
  DistributedSampler padding), every rank waits for the others, then opens the complete split. A killed
  run resumes at the missing shards. The folder must be one every rank can read (a shared file system
  across nodes).
* **image scoring** (:meth:`ShardedFeatureCache.image_scores`): scorers that need the images (ODIN,
  i-ODIN: per-batch input gradients; cached features cannot serve them) score contiguous ranges of whole
  batches, one per rank, and the scores are gathered to every rank in row order (gloo all_gather of CPU
  tensors).

Everything else (fitting, scoring from the features, APS) runs on every rank from the same files, so each
rank takes the same decisions without messages; only rank 0 writes results. Bitwise equality with one
process rests on the batches being the same: shards and score ranges are made of whole batches of the
loader's batch size (and the same thread count: torchrun sets OMP_NUM_THREADS=1 per process).

Test-only: ``ASCOOD_TEST_FAIL_AFTER_SHARDS=k`` makes a process raise after it extracted k shards (a crash
mid-extraction, for the resume test); ``ASCOOD_SHARD_ROWS`` sets the rows per shard (default
:data:`DEFAULT_SHARD_ROWS`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, Subset

from ..files import write_json
from ..training.distributed import (DistContext, PeerFailed, PeerValueError, all_gather_objects, broadcast_object, exit_status,
                                    init_from_env, object_group)
from .scorers.features import (FeatureCache, Features, LinearHead, extract_features, has_feature_head,
                               model_image_scores)

__all__ = ["Ranks", "ShardedFeatureCache", "batch_ranges", "row_loader", "shard_rows_for", "DEFAULT_SHARD_ROWS",
           "FAULT_ENV", "SHARD_ROWS_ENV"]

#: Rows per shard (rounded up to whole batches): small enough that a crash loses little, large enough that
#: an ImageNet-1K train split is ~300 files per array.
DEFAULT_SHARD_ROWS = 4096
SHARD_ROWS_ENV = "ASCOOD_SHARD_ROWS"
FAULT_ENV = "ASCOOD_TEST_FAIL_AFTER_SHARDS"


@dataclass
class Ranks:
    """This process's place in a torchrun job and a gloo group for CPU objects (``group`` None: the default
    group, or not distributed)."""

    ctx: DistContext
    group: object = None

    @classmethod
    def from_env(cls, device: str | torch.device | None = None) -> tuple["Ranks", bool]:
        """(ranks, whether this call started the process group): gloo on CPU, nccl on GPU (one GPU per
        local rank), from torchrun's environment; one process when WORLD_SIZE is 1 or unset."""
        import torch.distributed as dist

        before = dist.is_available() and dist.is_initialized()
        ctx = init_from_env(None if device is None else torch.device(device))
        return cls(ctx, object_group(ctx)), ctx.enabled and not before

    @property
    def enabled(self) -> bool:
        return self.ctx.enabled

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def broadcast(self, obj):
        return broadcast_object(obj, self.ctx, self.group)

    def all_gather(self, obj) -> list:
        return all_gather_objects(obj, self.ctx, self.group)

    def device(self, requested: str | None) -> torch.device:
        """The device this rank runs on: its local GPU under torchrun with CUDA (``requested`` "cuda" or
        None), else ``requested`` (default cuda when available)."""
        if requested is not None and torch.device(requested).type == "cpu":
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device("cuda", self.ctx.local_rank) if self.enabled else torch.device(requested or "cuda")
        return torch.device(requested or "cpu")

    def together(self, fn: Callable[[], object]):
        """Run ``fn`` on every rank; when it fails anywhere every rank raises (no rank left waiting at the
        next collective): a ValueError as a ValueError with the same message on every rank (callers that
        skip a bad grid point then skip it everywhere), any other error on rank 0 naming the failing rank,
        :class:`PeerFailed` on the others."""
        if not self.enabled:
            return fn()
        result, own, outcome = None, None, None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 -- re-raised below, on every rank
            own, outcome = err, (type(err).__name__ == "ValueError", str(err), exit_status(err))
        outcomes = self.all_gather(outcome)
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return result
        rank, (is_value_error, message, status) = failed[0]
        if self.is_main:  # rank 0 reports, once
            if own is not None:
                raise own
            raise ValueError(message) if is_value_error else RuntimeError(f"process {rank} of torchrun: {message}")
        raise PeerValueError(message, status) if is_value_error else PeerFailed(message, status)


# -- row ranges ------------------------------------------------------------------------------------------------
def batch_ranges(n: int, batch_size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges [start, stop) covering rows 0..n-1 once, each made of whole batches of
    ``batch_size`` (so a loader over a range yields exactly the batches one loader over all n rows yields
    there); the batch counts differ by at most one. Ranges may be empty (start == stop) when there are
    fewer batches than parts."""
    if n < 0 or batch_size < 1 or parts < 1:
        raise ValueError(f"batch_ranges needs n >= 0, batch_size >= 1, parts >= 1; got {n}, {batch_size}, {parts}")
    batches = math.ceil(n / batch_size)
    edges = [min(n, (p * batches // parts) * batch_size) for p in range(parts + 1)]
    return [(edges[p], edges[p + 1]) for p in range(parts)]


def shard_rows_for(batch_size: int, rows: int | None = None) -> int:
    """Rows per shard: ``rows`` (default ``$ASCOOD_SHARD_ROWS`` or :data:`DEFAULT_SHARD_ROWS`) rounded up to
    whole batches, so every shard's batches are the ones a single pass over the split runs."""
    if rows is None:
        text = os.environ.get(SHARD_ROWS_ENV)
        try:
            rows = int(text) if text else DEFAULT_SHARD_ROWS
        except ValueError:
            raise ValueError(f"environment variable {SHARD_ROWS_ENV}={text!r}: expected a positive integer") from None
    if rows < 1:
        raise ValueError(f"rows per shard must be >= 1, got {rows}")
    return math.ceil(rows / batch_size) * batch_size


def _batch_size(loader) -> int:
    bs = getattr(loader, "batch_size", None)
    if not isinstance(loader, DataLoader) or bs is None:
        raise ValueError("sharded evaluation needs DataLoaders built with batch_size= (not a batch_sampler)")
    if not isinstance(loader.sampler, SequentialSampler):
        raise ValueError("sharded evaluation needs loaders that read their dataset in order (shuffle=False)")
    return int(bs)


def row_loader(loader: DataLoader, start: int, stop: int) -> DataLoader:
    """``loader`` restricted to its dataset's rows [start, stop), in order, with the same batch size, collate
    function and workers."""
    return DataLoader(Subset(loader.dataset, range(start, stop)), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn)


# -- shards on disk ----------------------------------------------------------------------------------------------
def _model_digest(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, dtypes, bytes): which weights made a shard."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _data_digest(ds) -> str:
    """What a dataset reads, hashed: its file list when it has one (paths and labels), else its type and size."""
    h = hashlib.sha256()
    items = None
    for attr in ("samples", "imgs", "files", "paths", "items"):
        items = getattr(ds, attr, None)
        if items is not None:
            break
    if isinstance(ds, Subset):
        h.update(_data_digest(ds.dataset).encode())
        h.update(repr(list(ds.indices)).encode())
    elif items is not None:
        h.update(repr(list(items)).encode())
    h.update(f"{type(ds).__name__}:{len(ds)}".encode())
    return h.hexdigest()


class _ShardDir:
    """One split's shards in a folder: ``shard<k>.*`` written by :func:`extract_features` (its JSON header
    last, so a shard is complete when its header exists) and ``key.json``, what made them (the model's
    digest, the data's, the rows and the batching); another key empties the folder (said in one line)."""

    def __init__(self, directory: str, model: nn.Module, loader: DataLoader, rows: int) -> None:
        self.directory, self.model, self.loader, self.rows = directory, model, loader, rows
        self.n = len(loader.dataset)
        self.count = math.ceil(self.n / rows)
        self.key = {"n": self.n, "rows": rows, "batch_size": loader.batch_size, "model": _model_digest(model),
                    "data": _data_digest(loader.dataset)}

    def prepare(self, say: Callable[[str], None]) -> None:
        """(rank 0) Make the folder hold shards of this key only."""
        path = os.path.join(self.directory, "key.json")
        old = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {}
        if old == self.key:
            return
        if old is not None:
            changed = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k)) \
                if isinstance(old, dict) else ["unreadable key.json"]
            say(f"features: {self.directory} was extracted with another {', '.join(changed)}: extracting again")
            shutil.rmtree(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        write_json(self.key, path)

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.count) if not os.path.isfile(os.path.join(self.directory, f"shard{k}.json"))]

    def extract(self, shard_ids) -> None:
        for k in shard_ids:
            start, stop = k * self.rows, min(self.n, (k + 1) * self.rows)
            extract_features(self.model, row_loader(self.loader, start, stop), directory=self.directory,
                             name=f"shard{k}")

    def open(self) -> Features:
        parts = [Features.load(self.directory, f"shard{k}") for k in range(self.count)]
        head = LinearHead.from_model(self.model) if has_feature_head(self.model) else None

        def cat(field, dtype):
            arrays = [getattr(p, field) for p in parts]
            if any(a is None for a in arrays):
                return None
            return torch.cat([a if torch.is_tensor(a) else torch.from_numpy(a[:].copy()) for a in arrays]).to(dtype)

        return Features(cat("logits", torch.float32), cat("features", torch.float32), cat("labels", torch.long),
                        head, self.loader.batch_size)


# -- the cache ---------------------------------------------------------------------------------------------------
class ShardedFeatureCache(FeatureCache):
    """A :class:`FeatureCache` whose extraction and image scoring are shared over torchrun's ranks (see the
    module docstring). Every rank must make the same calls in the same order.

    ``directory``: where each split's shards go (``split<i>/``), readable by every rank; ``rows``: rows per
    shard (default :func:`shard_rows_for`); ``say``: where rank 0's one-line notes go. ``extracted`` counts
    the shards this process extracted, ``reused`` those found complete on disk.
    """

    def __init__(self, model: nn.Module, directory: str | os.PathLike, ranks: Ranks, rows: int | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        super().__init__(model, os.fspath(directory))
        self.ranks, self.rows = ranks, rows
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.extracted = 0
        self.reused = 0

    def get(self, loader) -> Features:
        if isinstance(loader, Features):
            return loader
        if loader is None:
            raise ValueError("no data given (loader is None)")
        hit = self._data.get(id(loader))
        if hit is not None and hit[0] is loader:
            return hit[1]
        rows = shard_rows_for(_batch_size(loader), self.rows)
        if len(loader.dataset) == 0:
            raise ValueError("loader is empty")
        shards = _ShardDir(os.path.join(self.directory, f"split{len(self._data)}"), self.model, loader, rows)
        ranks = self.ranks

        def plan() -> list[int]:
            if ranks.is_main:
                shards.prepare(self.say)
                return shards.missing_shards()
            return []

        missing = ranks.broadcast(ranks.together(plan))  # rank 0 lists: a shard finished meanwhile is not lost
        mine = missing[ranks.rank::ranks.world_size]
        self.reused += shards.count - len(missing)
        if ranks.is_main and len(missing) < shards.count:
            self.say(f"features: {shards.directory}: {shards.count - len(missing)} of {shards.count} shard(s) "
                     "already extracted, reused")

        def work() -> None:
            for k in mine:
                shards.extract([k])
                self.extracted += 1
                _fault_hook(self.extracted)

        ranks.together(work)  # also the barrier: every shard is on disk after it
        feats = ranks.together(shards.open)
        self.extractions += 1
        self._data[id(loader)] = (loader, feats)
        return feats

    def summary(self) -> str:
        """One line on what was extracted where (collective: every rank calls it)."""
        counts = self.ranks.all_gather((self.extracted, self.reused))
        done = [c[0] for c in counts]
        return (f"features: {len(self._data)} split(s) in {self.directory}: {sum(done)} shard(s) extracted over "
                f"{self.ranks.world_size} process(es) ({', '.join(map(str, done))}), {counts[0][1]} reused")

    def image_scores(self, scorer, model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pred (N,) int64, score (N,) float32, labels (N,) or None) of a scorer that needs the images: rank r
        scores the r-th contiguous range of whole batches; every rank gets all N rows in order."""
        ranks = self.ranks
        n = len(loader.dataset)
        start, stop = batch_ranges(n, _batch_size(loader), ranks.world_size)[ranks.rank]

        def part():
            if stop <= start:
                return None
            return model_image_scores(scorer, model, row_loader(loader, start, stop))

        parts = [p for p in ranks.all_gather(ranks.together(part)) if p is not None]
        if not parts:
            raise ValueError("loader is empty")
        labels = [p[2] for p in parts]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                None if any(y is None for y in labels) else torch.cat(labels))


def _fault_hook(done: int) -> None:
    """Test-only (``ASCOOD_TEST_FAIL_AFTER_SHARDS=k``): fail once this process extracted k shards."""
    text = os.environ.get(FAULT_ENV)
    if text and done >= int(text):
        raise RuntimeError(f"{FAULT_ENV}={text}: stopping after {done} extracted shard(s) (test-only fault)")
