"""Launching ``python -m torch.distributed.run ... -m ascood`` from tests, and stopping it (shared by the torchrun
tests of reproduce, eval and detector); ``spawn_gloo`` for tests that start gloo processes with mp.spawn."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from clihelpers import ROOT

#: What torchrun's failure report says when a worker died of SIGABRT (see :func:`run_torchrun`).
ABORT_MARKS = ("exitcode  : -6", "Signal 6 (SIGABRT)")


def torchrun_env(extra: dict | None = None) -> dict:
    """This checkout on the path, one thread per process (the one-process runs the tests compare with use the
    same, so both run the same kernels)."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                **(extra or {}))


def torchrun_cmd(ascood_args, nproc: int = 2, launcher=("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", "-m", "ascood",
            *map(str, ascood_args)]


def start_torchrun(ascood_args, nproc: int = 2, launcher=("--standalone",), env: dict | None = None
                   ) -> subprocess.Popen:
    """torchrun in a session of its own (so a test can kill it and its workers), output merged, text."""
    return subprocess.Popen(torchrun_cmd(ascood_args, nproc, launcher), cwd=ROOT, env=torchrun_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_torchrun(ascood_args, nproc: int = 2, launcher=("--standalone",), env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Run torchrun to the end; (returncode, stdout) as a CompletedProcess.

    One retry when a worker died of SIGABRT: a gloo process group's threads occasionally abort a process at
    teardown ("terminate called without an active exception"; see tests/training/test_ascood_ddp.py's
    ``_spawn``, which retries mp.spawn the same way). The commands run here may be repeated: they replace
    their outputs and reuse finished shards. A second abort, or any other failure, is returned at once."""
    for attempt in (0, 1):
        proc = start_torchrun(ascood_args, nproc, launcher, env)
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                kill_all(proc)
        if attempt or proc.returncode == 0 or not any(m in out for m in ABORT_MARKS):
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    raise AssertionError("unreachable")


def spawn_gloo(fn, tmp_path, world: int = 2):
    """``mp.spawn(fn, args=(world, folder))`` over ``world`` processes (``fn`` starts its gloo group on a file
    store in ``folder``); returns the folder they wrote to.

    One retry, in a fresh folder (a new file store), when a process was killed by SIGABRT: a gloo process
    group's worker threads occasionally abort the process at teardown ("terminate called without an active
    exception", seen once in this project's CI runs, at 2026-12-07, never in 6 runs of that file alone). A
    second abort fails the test, and so does any other failure at once.
    """
    import torch.multiprocessing as mp

    for attempt in (0, 1):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        try:
            mp.spawn(fn, args=(world, str(folder)), nprocs=world, join=True)
            return folder
        except mp.ProcessExitedException as err:
            if attempt or err.signal_name != "SIGABRT":
                raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): torchrun starts its workers in sessions of their own, so
    killing torchrun's process group would leave them running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` has exited (gone, or a zombie): SIGKILL is delivered asynchronously, so a
    process read straight after kill() may still show as running on a loaded machine."""
    deadline = time.time() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X") or time.time() > deadline:
            return state in ("Z", "X")
        time.sleep(0.05)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker it started (a machine failure)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
