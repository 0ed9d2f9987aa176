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

__all__ = ["DistContext", "init_from_env", "distributed_loader", "all_reduce_sum", "convert_sync_batchnorm"]


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
