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
           "current_umask", "TMP_TAG", "TMP_SUFFIX", "atomic_write_dir", "remove_stale_dir_temporaries"]

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


def remove_stale_temporaries(directory: str | os.PathLike, only: str | None = None) -> list[str]:
    """Delete the atomic writer's leftover temporaries (``*.ascood.XXXXXXXX.tmp``) in ``directory``.

    Only call this while holding the directory's lock (:mod:`ascood.training.rundir`):
    then no live writer owns them. ``only``: just the temporaries of that one file name (under a file's
    own lock, other files' writers may be alive). Returns the removed paths.
    """
    directory = os.fspath(directory)
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if only is not None and not name.startswith(only + TMP_TAG):
            continue
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


#: Sibling folders of a directory written as one unit: ``.NAME.ascood-new.XXXXXXXX`` (being written) and
#: ``.NAME.ascood-old.XXXXXXXX`` (the replaced one, being deleted).
_DIR_TMP_KINDS = ("new", "old")


def _dir_tmp_prefix(path: str, kind: str) -> str:
    return "." + os.path.basename(path) + ".ascood-" + kind + "."


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def atomic_write_dir(path: str | os.PathLike, write) -> None:
    """Write the directory ``path`` as one unit: ``write(tmp)`` fills a sibling temporary folder, which then
    takes ``path``'s place.

    A new or empty ``path`` is replaced by one rename; an existing directory is swapped with the new one
    atomically where the system can (Linux), else by two renames a moment apart, and then deleted. Readers
    see the old complete directory or the new complete one; a failure leaves ``path`` as it was. The
    caller decides whether ``path`` may be replaced (and holds its lock).
    """
    import shutil

    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        path = os.path.realpath(path)  # replace what the link points at, not the link
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_dir_tmp_prefix(path, "new"), dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a folder gets the umask's mode
        write(tmp)
        if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
            os.replace(tmp, path)  # rename(2) replaces an empty directory
            return
        if _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
            return
        old = tempfile.mkdtemp(prefix=_dir_tmp_prefix(path, "old"), dir=parent)
        os.rmdir(old)
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _no_space_error(err) if isinstance(err, Exception) else None
        if full is not None:
            raise OSError(full.errno, f"no space left writing {path} ({os.strerror(full.errno)})") from err
        raise


def remove_stale_dir_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the sibling folders a killed :func:`atomic_write_dir` of ``path`` left; only under its lock."""
    import shutil

    path = os.path.abspath(os.fspath(path))
    parent, removed = os.path.dirname(path), []
    if not os.path.isdir(parent):
        return removed
    prefixes = tuple(_dir_tmp_prefix(path, kind) for kind in _DIR_TMP_KINDS)
    for name in sorted(os.listdir(parent)):
        full = os.path.join(parent, name)
        tail = next((name[len(p):] for p in prefixes if name.startswith(p)), "")
        if re.fullmatch(r"[a-z0-9_]{8}", tail) and os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
    return removed
