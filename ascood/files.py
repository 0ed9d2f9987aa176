"""Atomic file writes shared by every layer (checkpoints, tables, figures, run locks).

Atomic writes go through ``<name>.ascood.XXXXXXXX.tmp`` in the target's
directory; the temporary is removed on any failure, and a run that holds its
output directory's lock removes the ones a killed run left behind
(:func:`remove_stale_temporaries`). Files get the process umask's mode
(``0o666 & ~umask``), like ``open()``, not mkstemp's 0600.

This module imports nothing from ``ascood``: it sits below all five layers.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_write_text", "write_json", "remove_stale_temporaries",
           "current_umask", "TMP_TAG", "TMP_SUFFIX"]

TMP_TAG = ".ascood."
TMP_SUFFIX = ".tmp"
# mkstemp's random part: 8 characters of [a-z0-9_].
_TMP_RE = re.compile(r"^.+" + re.escape(TMP_TAG) + r"[a-z0-9_]{8}" + re.escape(TMP_SUFFIX) + r"$")
# What versions before the ".ascood." tag left behind for the files a run writes.
_LEGACY_TMP_RE = re.compile(r"^(last\.pt|best\.pt|config\.json|log\.jsonl|results\.csv|results\.json)"
                            r"\.[a-z0-9_]{8}\.tmp$")
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def current_umask() -> int:
    """The process umask (read from /proc on Linux, so it is not changed even for an instant)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _no_space_error(err: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``err`` (torch.save wraps the file's error in a RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through a temp file in the same directory, fsync, then os.replace.

    os.replace is atomic on POSIX and Windows, so a reader (or a resumed run
    after a crash) sees either the old complete file or the new complete one.
    The temp file is removed on any failure (also KeyboardInterrupt); a full
    disk is reported as "no space left writing <path>".
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + TMP_TAG, suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; honour the umask like open() does
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = _no_space_error(err) if isinstance(err, Exception) else None
        if full is not None:
            raise OSError(full.errno, f"no space left writing {path} ({os.strerror(full.errno)})") from err
        raise


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the atomic writer's leftover temporaries (``*.ascood.XXXXXXXX.tmp``) in ``directory``.

    Only call this while holding the directory's lock (:mod:`ascood.training.rundir`):
    then no live writer owns them. Returns the removed paths.
    """
    directory = os.fspath(directory)
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if (_TMP_RE.match(name) or _LEGACY_TMP_RE.match(name)) and os.path.isfile(full):
            try:
                os.unlink(full)
                removed.append(full)
            except FileNotFoundError:
                pass
    return removed


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(obj, path: str | os.PathLike) -> None:
    """Atomic, human-readable JSON."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)
