"""random_permutations: the per-sample permutations of the shuffle outlier, drawn from seeds."""
from __future__ import annotations

import torch

from .. import _backend, _validate, reference

__all__ = ["random_permutations", "draw_permutations"]


def random_permutations(seeds: torch.Tensor, n: int, *, backend: str | None = "auto") -> torch.Tensor:
    """One uniform random permutation of ``0..n-1`` per seed (Fisher-Yates on a counter-based hash).

    Args:
        seeds: (R,) int64, values in [0, 2^32).
        n: permutation length, >= 0.
        backend: "auto" (the C++ kernel for CPU seeds when built, else the
            reference), "cpu" or "reference". Both give identical output.

    Returns:
        (R, n) int64 on seeds' device; row r depends on seeds[r] only
        (docs/OPS.md, ``random_permutations``).
    """
    _validate.random_permutation_args("seeds", seeds, n)
    if backend not in (None, "auto", "cpu", "reference"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'reference' for random_permutations, got {backend!r}")
    if backend == "cpu" and not (seeds.device.type == "cpu" and _backend.extension_loaded()):
        raise RuntimeError("backend='cpu' needs CPU seeds and the C++ extension "
                           f"(seeds on {seeds.device}, extension loaded: {_backend.extension_loaded()})")
    if backend != "reference" and seeds.device.type == "cpu" and _backend.extension_loaded():
        return torch.ops.ascood.random_permutations(seeds, n)
    return reference.random_permutations(seeds, n)


def draw_permutations(batch: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(batch, n) int64 on ``device``, each row a uniform random permutation of 0..n-1.

    Drawn once, from the caller's generator (on the generator's device, else
    on ``device``), so every backend applies the very same permutation for one
    generator state:

    * CPU generator: one 32-bit seed per row, ``torch.randint(0, 2**32)``,
      then :func:`random_permutations` (no sort: a comparison sort of B rows
      of random keys was 40% of the shuffle call at 64x3x224x224);
    * CUDA generator: ``argsort`` of ``torch.rand`` keys on the GPU (a
      device-wide sort is what a GPU does fast; no host synchronisation).
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    if gen_device.type == "cpu":
        seeds = torch.randint(0, 2**32, (batch,), generator=generator, dtype=torch.int64)
        perm = random_permutations(seeds, n)
    else:
        perm = torch.rand(batch, n, generator=generator, device=gen_device).argsort(dim=1)
    return perm.to(device)


def _fake_random_permutations(seeds, n):
    return seeds.new_empty((seeds.shape[0], n))


if _backend.extension_loaded():
    torch.library.register_fake("ascood::random_permutations", _fake_random_permutations)
