"""``eval`` and ``detector`` under torchrun: the process group, one claim of ``--out`` by rank 0, quiet peers.

    torchrun --nproc_per_node N -m ascood eval RUN ... --out DIR
    torchrun --nnodes M --node-rank I --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m ascood detector RUN ... --out DET

The work itself is shared out by :mod:`ascood.scoring.distributed`; this module only starts the group
(gloo on CPU, nccl with one GPU per local rank), lets rank 0 alone take the output lock while the other
ranks learn the outcome (a refusal ends every rank with rank 0's exit status), and keeps the other ranks
from printing the same lines N times.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from contextlib import ExitStack, contextmanager
from typing import Callable, ContextManager, Iterator

from . import checks

__all__ = ["torchrun_ranks", "claim_on_rank0", "require_store"]


@contextmanager
def torchrun_ranks(device: str | None) -> Iterator:
    """The :class:`~ascood.scoring.distributed.Ranks` of this process (one rank without torchrun); the
    process group is destroyed after the block when this call started it (not after an error: the process
    ends then). Ranks other than 0 print nothing to stdout and show no warnings (rank 0 says everything
    once)."""
    from ..scoring.distributed import Ranks

    ranks, started = Ranks.from_env(device)
    if ranks.is_main:
        yield ranks
    else:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield ranks
    # Not on an error: the process ends anyway, and rank 0 should print its message before torchrun stops it
    # (torchrun ends every process once one has failed).
    if started:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def claim_on_rank0(ranks, claim: Callable[[], ContextManager]) -> Iterator[None]:
    """Rank 0 enters ``claim()`` (e.g. the --out lock) and holds it for the block; the other ranks learn
    whether it succeeded: when it failed they raise :class:`~ascood.training.distributed.PeerFailed` with the
    status rank 0 exits with (the CLI returns it silently), so no rank waits for a peer that has gone."""
    from ..training.distributed import from_rank0

    with ExitStack() as stack:
        def take() -> None:
            if ranks.is_main:
                stack.enter_context(claim())

        from_rank0(take, ranks.ctx, ranks.group)
        yield


def require_store(store, ranks) -> None:
    """Under torchrun the ranks share each split's features through the feature store (``--features DIR``,
    default the run's ``features/``): an InputError when it is switched off; its one-line notes are said by
    rank 0 only."""
    if not ranks.enabled:
        return
    if store is None:
        raise checks.InputError("under torchrun the processes share each split's features through the feature "
                                "store: drop --features none / --no-feature-store (or give --features DIR, a "
                                "folder every process can read)")
    if not ranks.is_main:
        store.log = _silent


def _silent(msg: str) -> None:
    """The other ranks' store notes: rank 0 says each once."""
