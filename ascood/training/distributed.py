"""torchrun / DistributedDataParallel plumbing used by the trainer.

Under ``torchrun --nproc_per_node N`` the environment holds RANK, WORLD_SIZE
and LOCAL_RANK; :func:`init_from_env` then starts a process group (nccl when
CUDA is available, gloo on CPU). A group the caller already started (e.g. a
test with ``torch.multiprocessing.spawn``) is used as is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["DistContext", "init_from_env", "distributed_loader", "all_reduce_sum", "convert_sync_batchnorm", "PeerFailed",
           "PeerValueError",
           "exit_status", "object_group", "broadcast_object", "all_gather_objects", "from_rank0", "on_every_rank"]


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank; ``enabled`` when world_size > 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, logs and progress bars."""
        return self.rank == 0


def init_from_env(device: torch.device | None = None) -> DistContext:
    """Join (or start, from torchrun's environment) the default process group."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistContext()
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def distributed_loader(loader: DataLoader, ctx: DistContext, seed: int) -> DataLoader:
    """The same loader over a :class:`DistributedSampler` shard (shuffled, ``set_epoch`` per epoch)."""
    if loader.batch_size is None:
        raise ValueError("distributed training needs a DataLoader built with batch_size= (not a batch_sampler)")
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed)."""
    if ctx.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def convert_sync_batchnorm(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Every BatchNorm layer of ``model`` as a ``torch.nn.SyncBatchNorm`` (statistics over all ranks).

    The reference's multi-GPU pipeline trains this way, so a batch split over
    N GPUs normalises like one batch. ``enabled=False`` returns ``model``
    unchanged. torch's SyncBatchNorm runs only on CUDA-like devices (its
    forward raises on CPU tensors), so the trainer converts only when training
    on such a device. Weights, buffers and ``build_args`` are kept: the
    converted model's state dict loads into the unconverted one and back.
    """
    if not enabled:
        return model
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if hasattr(model, "build_args") and converted is not model:
        converted.build_args = model.build_args
    return converted


# -- collectives on Python objects (a refusal on rank 0 ends every rank with its status, never a hang) ----------
class PeerFailed(RuntimeError):
    """Another rank failed; that rank (rank 0, or rank 0 on its behalf) reports the error, this one only exits
    with ``status`` (the CLI returns it without printing)."""

    peer_failed = True  # what the CLI looks for (it does not import torch.distributed to catch the class)

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class PeerValueError(ValueError):
    """A ValueError another rank raised, raised here too so that every rank takes the same ``except ValueError``
    branch (e.g. an APS grid point skipped everywhere); quiet in the CLI like :class:`PeerFailed`."""

    peer_failed = True

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def exit_status(err: BaseException) -> int:
    """The CLI's exit status for ``err``: 2 for a user-facing error (bad input), else 1."""
    return 2 if getattr(err, "user_facing", False) or type(err).__name__ == "InputError" else 1


def object_group(ctx: DistContext):
    """A gloo group over every rank for CPU objects (the default group itself when it is gloo), so object
    collectives never touch GPU memory or depend on nccl; None when not distributed. Collective: every
    rank calls it once, in the same order."""
    if not ctx.enabled:
        return None
    if dist.get_backend() == "gloo":
        return None  # the default group
    return dist.new_group(backend="gloo")


def broadcast_object(obj, ctx: DistContext, group=None):
    """Rank 0's ``obj`` on every rank (identity in one process)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather_objects(obj, ctx: DistContext, group=None) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank ([obj] in one process)."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def from_rank0(fn, ctx: DistContext, group=None):
    """Run ``fn`` on rank 0 and give its result to every rank. When it fails, rank 0 raises the error and
    the other ranks raise :class:`PeerFailed` with the status rank 0 exits with (they print nothing)."""
    if not ctx.enabled:
        return fn()
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as err:
            broadcast_object(("error", str(err), exit_status(err)), ctx, group)
            raise
        broadcast_object(("ok", result, 0), ctx, group)
        return result
    kind, payload, status = broadcast_object(None, ctx, group)
    if kind == "error":
        raise PeerFailed(payload, status)
    return payload


def on_every_rank(fn, ctx: DistContext, group=None, wrap=RuntimeError):
    """Run ``fn`` on every rank; when it fails on any, every rank raises, so none waits for the others at a
    later collective: the failing rank its own error, rank 0 ``wrap`` naming the failing rank (when it did
    not fail itself), the others :class:`PeerFailed` quietly (rank 0 reports, once)."""
    if not ctx.enabled:
        return fn()
    result, own, outcome = None, None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 -- re-raised below, on every rank
        own, outcome = err, (str(err), exit_status(err), type(err).__name__)
    outcomes = all_gather_objects(outcome, ctx, group)
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return result
    if own is not None and (ctx.is_main or failed[0][0] == ctx.rank):
        raise own
    rank, (message, status, kind) = failed[0]
    if ctx.is_main:
        raise wrap(f"process {rank} of torchrun: {message}")
    raise PeerFailed(message, status)
