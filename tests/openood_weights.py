"""Deterministic stand-in weights for an OpenOOD network, made from its state dict's key names and shapes alone.

Shared by ``tests/fixtures/openood_ckpt/make_openood_fixture.py`` (which fills OpenOOD's own networks with them
and stores what OpenOOD's code computes) and ``tests/nets/test_openood_checkpoints.py`` (which rebuilds the same
tensors from the stored key list, writes them as an OpenOOD checkpoint file and loads it through ascood). Both
sides must make bit-identical tensors, so the values come from numpy's frozen ``RandomState`` stream (seeded per
key with crc32(name) + seed), never from torch's RNG or the key order.

Rule (``RULE_VERSION``): for a key whose last part is

* ``running_var``: uniform [0.5, 1.5] (> 0, as a trained BatchNorm's);
* ``running_mean``: normal * 0.1;
* ``num_batches_tracked``: 0 (int64);
* ``weight`` of 1-D shape (a BatchNorm scale): uniform [0.7, 1.0];
* ``bias`` (1-D): normal * 0.05;
* ``weight`` of >= 2-D shape (conv, linear): normal * sqrt(1 / fan_in), fan_in = prod(shape[1:]), which keeps
  activations O(1) through a residual network with BatchNorm in eval mode;
* a 0-D float (OpenOOD ASCOODNet's ``sigma``): uniform [0.25, 1.0].

Inputs (:func:`make_inputs`): standard normal float32 from RandomState((seed + crc32(case)) % 2**32).
"""
from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["RULE_VERSION", "make_tensor", "make_state_dict", "make_inputs"]

RULE_VERSION = 1


def make_tensor(key: str, shape: Sequence[int], dtype: str, seed: int) -> torch.Tensor:
    """The rule's tensor for ``key`` of ``shape``; ``dtype`` "float32" or "int64" (as the state dict had it)."""
    shape = tuple(int(s) for s in shape)
    leaf = key.rsplit(".", 1)[-1]
    if dtype == "int64":
        if leaf != "num_batches_tracked":
            raise ValueError(f"{key}: the rule has no integer tensors other than num_batches_tracked")
        return torch.zeros(shape, dtype=torch.int64)
    if dtype != "float32":
        raise ValueError(f"{key}: dtype {dtype} is not covered by the rule")
    rng = np.random.RandomState((zlib.crc32(key.encode()) + seed) % 2 ** 32)
    n = int(np.prod(shape)) if shape else 1
    if leaf == "running_var":
        vals = rng.uniform(0.5, 1.5, n)
    elif leaf == "running_mean":
        vals = rng.standard_normal(n) * 0.1
    elif not shape:
        vals = rng.uniform(0.25, 1.0, n)
    elif leaf == "weight" and len(shape) == 1:
        vals = rng.uniform(0.7, 1.0, n)
    elif leaf == "bias" and len(shape) == 1:
        vals = rng.standard_normal(n) * 0.05
    elif leaf == "weight":
        vals = rng.standard_normal(n) * np.sqrt(1.0 / np.prod(shape[1:]))
    else:
        raise ValueError(f"{key} {shape}: not covered by the rule")
    return torch.from_numpy(vals.astype(np.float32).reshape(shape))


def make_state_dict(spec: Mapping[str, Sequence], seed: int) -> dict[str, torch.Tensor]:
    """``{key: [shape, dtype]}`` (the fixture's key list) -> the rule's state dict, in ``spec``'s order."""
    return {k: make_tensor(k, shape, dtype, seed) for k, (shape, dtype) in spec.items()}


def make_inputs(case: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """A case's inputs: float32 standard normal of ``shape`` (N, 3, H, W), seeded by ``seed`` and the case name."""
    rng = np.random.RandomState((seed + zlib.crc32(case.encode())) % 2 ** 32)
    return torch.from_numpy(rng.standard_normal(tuple(int(s) for s in shape)).astype(np.float32))
