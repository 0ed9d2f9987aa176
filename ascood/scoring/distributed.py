"""Evaluation under torchrun: every image through the model once, over all ranks; the same numbers as one process.

``torchrun --nproc_per_node N [--nnodes M ...] -m ascood eval|detector|reproduce ...`` runs the same
evaluation code on every rank (SPMD); two operations are shared out, and both are collective (every rank
calls them in the same order, which the identical code path guarantees):

* **extraction** (:meth:`ShardedFeatureCache.fill`, on the feature store :mod:`ascood.scoring.store`): a
  split's rows are cut into fixed shards by row index; rank 0 lists the shards still missing (verifying the
  ones present), rank r extracts missing shards r, r + W, r + 2W, ... (each image exactly once: no
  DistributedSampler padding), every rank waits for the others, rank 0 finalizes the entry, then every
  rank opens the complete split (memory-mapped). A killed run resumes at the missing shards, and a later
  ``eval`` / ``detector`` on the same checkpoint and data reads them without running the model. The store
  must be a folder every rank can read (one file system, or one shared across the nodes).
* **image scoring** (:meth:`ShardedFeatureCache.image_scores`): scorers that need the images (ODIN,
  i-ODIN: per-batch input gradients; cached features cannot serve them) score contiguous ranges of whole
  batches, one per rank, and the scores are gathered to every rank in row order (gloo all_gather of CPU
  tensors);
* **scoring from features** (:meth:`ShardedFeatureCache.record_scores`): each rank scores a contiguous
  range of whole 1024-row chunks of the record (a KNN search over an ImageNet bank is the costly part),
  gathered the same way.

Fits (KNN's bank, MDS's class statistics, ViM's subspace, ...) run on every rank from the same
memory-mapped files, so each rank holds the same fitted scorer and takes the same decisions (APS's best
grid point, the detector's threshold) without messages; only rank 0 writes results. Bitwise equality with one
process rests on every image being computed in the same batch: the store cuts batches inside shards (a
one-process run through the store makes the same ones; a plain in-RAM pass makes them too when the shard
rows are a multiple of the batch size), score ranges are whole batches, and the thread count is the same
(torchrun sets OMP_NUM_THREADS=1 per process).

Test-only: ``ASCOOD_TEST_FAIL_AFTER_SHARDS=k`` makes a process raise after it extracted k shards (a crash
mid-extraction, for the resume test).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, Subset

from ..training.distributed import (DistContext, PeerFailed, PeerValueError, all_gather_objects,
                                    broadcast_object, exit_status, init_from_env, object_group)
from .scorers.features import Features, features_scores, model_image_scores, score_rows
from .store import FeatureStore, SplitEntry, StoreError, StoreFeatureCache

__all__ = ["Ranks", "ShardedFeatureCache", "batch_ranges", "row_loader", "FAULT_ENV"]

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
        """Run ``fn`` on every rank (a collective); when it fails anywhere every rank raises, so no rank is
        left waiting at the next collective. The first failing rank decides the kind: for a ValueError rank 0
        raises its own error (or a ValueError with the failing rank's message) and the others
        :class:`PeerValueError`, so ``except ValueError`` branches (an APS grid point skipped) are taken on
        every rank alike; for any other error rank 0 raises its own (or one naming the failing rank) and the
        others :class:`PeerFailed`. The CLI prints nothing for the Peer errors: rank 0 reports, once."""
        if not self.enabled:
            return fn()
        result, own, outcome = None, None, None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 -- re-raised below, on every rank
            own, outcome = err, (isinstance(err, ValueError), str(err), exit_status(err))
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


# -- the cache ---------------------------------------------------------------------------------------------------
class ShardedFeatureCache(StoreFeatureCache):
    """A :class:`~ascood.scoring.store.StoreFeatureCache` whose extraction and image scoring are shared over
    torchrun's ranks (see the module docstring). Every rank must make the same calls in the same order.

    ``store``: the :class:`~ascood.scoring.store.FeatureStore` every rank reads (one folder, seen by all);
    ``checkpoint``: the file the model came from (the store keys splits by its sha256). ``extracted``
    counts the shards this process extracted, ``reused`` the shards found stored.
    """

    def __init__(self, model: nn.Module, store: FeatureStore, ranks: Ranks, *,
                 checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__(model, store, checkpoint=checkpoint)
        self.ranks = ranks
        self.extracted = 0
        self.reused = 0

    def fill(self, entry: SplitEntry, loader) -> list[int]:
        """Rank 0 lists the missing shards (verifying those present); rank r extracts missing[r::W]; after
        every rank is done, rank 0 finalizes the entry; returns the shards all ranks extracted."""
        ranks = self.ranks
        missing = ranks.broadcast(ranks.together(lambda: entry.missing_shards() if ranks.is_main else None))
        self.reused += entry.n_shards - len(missing)
        mine = missing[ranks.rank::ranks.world_size]

        def work() -> None:
            if not os.environ.get(FAULT_ENV):
                # One pass over this rank's shards (one loader, its workers started once); each shard is written
                # as soon as it is complete, so a crash loses at most the shard being made.
                self.extracted += len(entry.extract(self.model, loader, mine))
                return
            for i in mine:  # the test-only fault: shard by shard, to stop after k of them
                entry.extract(self.model, loader, [i])
                self.extracted += 1
                _fault_hook(self.extracted)

        ranks.together(work)  # also the barrier: every shard is on disk after it

        def finalize() -> None:
            if ranks.is_main and not entry.finalize():
                raise StoreError(f"feature store entry {entry.path}: shard(s) {entry.missing_shards()[:5]} still "
                                 "missing after extraction (removed by another process?)")

        ranks.together(finalize)  # the others open the entry only once its manifest is complete
        return missing

    def summary(self) -> str:
        """One line on what was extracted where (collective: every rank calls it)."""
        counts = self.ranks.all_gather((self.extracted, self.reused))
        done = [c[0] for c in counts]
        return (f"features: {len(self._data)} split(s) in {self.store.root}: {sum(done)} shard(s) extracted over "
                f"{self.ranks.world_size} process(es) ({', '.join(map(str, done))}), {counts[0][1]} reused")

    def record_scores(self, scorer, feats: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pred (N,) int64, score (N,) float32, labels) of a split's record, the rows shared over the ranks:
        rank r scores the r-th contiguous range of whole :func:`score_rows`-row chunks (the chunks one process
        scores, so the same numbers), and every rank gets all N rows in order."""
        ranks = self.ranks
        n = len(feats)
        rows = score_rows(scorer, feats)
        start, stop = batch_ranges(n, rows, ranks.world_size)[ranks.rank]

        def part():
            if stop <= start:
                return None
            pred, score, _ = features_scores(scorer, feats, rows=rows, start=start, stop=stop)
            return pred, score

        parts = [p for p in ranks.all_gather(ranks.together(part)) if p is not None]
        if not parts:
            raise ValueError("loader is empty")
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), feats.labels

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
