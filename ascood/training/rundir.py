"""Claiming an output directory: one run per directory, checked before any work starts.

    with claim_output_dir("runs/mine", flag="--out"):
        ...  # train / evaluate, writing into runs/mine

:func:`claim_output_dir` creates the directory, checks it is writable and that
none of the named output files is blocked (a directory where a file goes),
then takes ``OUT/.ascood.lock`` (pid, host, start time; created atomically, so
two runs cannot both get it). A second run on the same directory stops at
once with an error naming the flag and the holder's pid. A lock left by a
process that is no longer running on this host is taken over with a message.
The lock is removed when the ``with`` block ends, also on an exception or
Ctrl-C. While holding it, the atomic writer's leftover temporaries of a killed
run are deleted (nothing else in the directory is touched).

A process that already holds a directory may claim it again (the trainer does
so inside the CLI's claim); the lock is released by the outermost claim.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from ..files import remove_stale_temporaries

__all__ = ["LOCK_NAME", "OutputDirError", "claim_output_dir", "check_output_dir", "read_lock", "claim_output_file",
           "file_lock_name"]

LOCK_NAME = ".ascood.lock"

# realpath -> how many nested claims this process holds on it.
_HELD: dict[str, int] = {}


class OutputDirError(RuntimeError):
    """The output directory cannot be used (blocked, unwritable or in use); the message names the flag."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux /proc), to tell a reused pid from the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _process_start(pid)
    return not (start and now and now != start)


def read_lock(directory: str | os.PathLike, name: str = LOCK_NAME) -> dict | None:
    """The lock record of ``directory`` ({"pid", "host", "started", ...}), {} if unreadable, None if absent.

    ``name``: the lock file's name in ``directory`` (a file claim's lock is ``.NAME.ascood.lock`` beside it)."""
    path = os.path.join(os.fspath(directory), name)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def check_output_dir(directory: str | os.PathLike, flag: str = "--out", outputs: Sequence[str] = ()) -> str:
    """Create ``directory`` and check it can take ``outputs`` (file names); returns its path.

    Raises :class:`OutputDirError` naming ``flag`` when the path is a file,
    cannot be created, is not writable, or one of the outputs is a directory.
    """
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputDirError(f"{flag} {directory} is an existing file, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"{flag} {directory}: cannot create the directory ({err.strerror or err})") from None
    try:  # a real write, so read-only mounts and ACLs are caught too, not only the mode bits
        fd, probe = tempfile.mkstemp(prefix=".ascood-write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"{flag} {directory} is not writable ({err.strerror or err})") from None
    for name in outputs:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            raise OutputDirError(f"{flag} {directory}: output {path} is a directory; remove it or choose another {flag}")
    return directory


def _create_lock(path: str, record: dict) -> bool:
    """Create ``path`` holding ``record`` atomically; False if it already exists."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".ascood-lock.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        try:
            os.link(tmp, path)  # fails if the lock exists; the lock appears with its content complete
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create instead
            try:
                out = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(out, "w", encoding="utf-8") as f:
                json.dump(record, f)
            return True
    finally:
        os.unlink(tmp)


def _acquire(directory: str, flag: str, name: str = LOCK_NAME, target: str | None = None) -> dict:
    """Take ``directory/name``; ``target`` is what the messages call locked (default: the directory)."""
    path = os.path.join(directory, name)
    target = target or directory
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "proc_start": _process_start(os.getpid()), "argv": sys.argv[:8]}
    for _ in range(3):
        if _create_lock(path, record):
            return record
        held = read_lock(directory, name)
        if held is None:
            continue  # released between our attempt and the read: try again
        pid = held.get("pid")
        if held.get("host") == host and isinstance(pid, int) and not _alive(pid, held.get("proc_start")):
            print(f"ascood: taking over the stale lock {path} (pid {pid}, started {held.get('started', '?')}, "
                  "is no longer running)", file=sys.stderr)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        if not held:
            raise OutputDirError(f"{flag} {target} is locked by {path}, which cannot be read; if no other "
                                 "ascood run uses it, delete that file")
        where = f"pid {pid} on {held.get('host')}" if held.get("host") != host else f"pid {pid}"
        raise OutputDirError(f"{flag} {target} is in use by another ascood run ({where}, started "
                             f"{held.get('started', '?')}); wait for it to finish or choose another {flag}"
                             + ("" if held.get("host") == host else f" (if it is gone, delete {path})"))
    raise OutputDirError(f"{flag} {target}: could not take the lock {path}")


def _release(directory: str, record: dict, name: str = LOCK_NAME) -> None:
    held = read_lock(directory, name)
    if held and held.get("pid") == record["pid"] and held.get("started") == record["started"]:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


@contextmanager
def claim_output_dir(directory: str | os.PathLike, flag: str = "--out",
                     outputs: Sequence[str] = ()) -> Iterator[str]:
    """Check, lock and clean ``directory`` for this run (see the module docstring); yields its path."""
    directory = check_output_dir(directory, flag, outputs)
    key = os.path.realpath(directory)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield directory
        finally:
            _HELD[key] -= 1
        return
    record = _acquire(directory, flag)
    _HELD[key] = 1
    try:
        removed = remove_stale_temporaries(directory)
        if removed:
            print(f"ascood: removed {len(removed)} temporary file(s) a killed run left in {directory}",
                  file=sys.stderr)
        yield directory
    finally:
        _HELD.pop(key, None)
        _release(directory, record)


def file_lock_name(path: str | os.PathLike) -> str:
    """The name of the lock a file claim takes beside ``path``: ``.NAME.ascood.lock``."""
    return "." + os.path.basename(os.path.abspath(os.fspath(path))) + LOCK_NAME


@contextmanager
def claim_output_file(path: str | os.PathLike, flag: str = "--out") -> Iterator[str]:
    """Claim one output file (or a directory written as one unit) by a lock *beside* it, ``.NAME.ascood.lock``.

    Two runs writing the same file stop at once, while other files of the same folder stay free (a results
    folder shared by many ``predict --out`` tables). The parent folder is created when missing (and removed
    again, when still empty, if the block fails). Raises :class:`OutputDirError` naming ``flag`` when the
    parent is a file or not writable.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), file_lock_name(path)
    created = _missing_parents(parent)
    check_output_dir(parent, flag)
    key = os.path.join(os.path.realpath(parent), name)
    ok = False
    try:
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield path
                ok = True
            finally:
                _HELD[key] -= 1
            return
        record = _acquire(parent, flag, name=name, target=path)
        _HELD[key] = 1
        try:
            remove_stale_temporaries(parent, only=os.path.basename(path))  # a killed write of this file only
            yield path
            ok = True
        finally:
            _HELD.pop(key, None)
            _release(parent, record, name=name)
    finally:
        if not ok:
            for folder in created:  # deepest first: leave no empty folders behind a failed run
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def _missing_parents(folder: str) -> list[str]:
    """The folders of ``folder``'s path that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    return missing
