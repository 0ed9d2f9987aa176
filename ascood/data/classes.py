"""Class names that travel with a model, and the mapping of every labelled split onto them by name.

A checkpoint stores its training classes as names (``extra["classes"]``): the folder
names of a class-per-folder tree, the names of an image list's class table
(``classes.txt`` beside the list), or the decimal indices ``"0".."C-1"`` for data
labelled by index only (image lists without a table, CIFAR batches).

:func:`match_classes` rewrites a split's labels to the checkpoint's indices:
folders and tables are matched **by name** (a subset of the classes is fine and is
reported; an unknown class is an error naming it), index-labelled data by index
(an index past the model's classes is an error). Unlabelled data where labels are
needed is an error naming the flag. :func:`fingerprint` is a cheap digest of a
dataset's file list and labels, stored with the checkpoint so a resumed run can
tell that it is reading other data.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .datasets import CLASS_TABLE_NAME, DataError, code_points

__all__ = ["ClassMatch", "class_names", "nfc", "is_labelled", "match_classes", "fingerprint", "check_label_span", "file_set",
           "shared_files"]


def class_names(ds) -> list[str] | None:
    """The names of ``ds``'s label indices (index i -> name), or None when its labels are bare indices."""
    names = getattr(ds, "class_names", None)  # image lists with a class table
    if names is None:
        names = getattr(ds, "classes", None)
        if names is not None and all(isinstance(c, (int, np.integer)) for c in names):
            return None  # CIFAR: indices only
    return [nfc(str(c)) for c in names] if names is not None else None


def nfc(name: str) -> str:
    """A class name in Unicode NFC: macOS writes folder names decomposed (NFD, ``e`` + U+0301), Linux and
    Windows tools composed (NFC, U+00E9); compared, stored and fingerprinted in NFC they are one class.
    An NFC name is unchanged, so fingerprints of checkpoints made from NFC names stay the same."""
    return unicodedata.normalize("NFC", name)


def _skeleton(name: str) -> str:
    """What a name looks like: NFKC, case-folded, invisible format characters and outer spaces removed."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return " ".join("".join(c for c in folded if unicodedata.category(c) != "Cf").split())


def _look_alike_note(unknown: str, model_classes: Sequence[str]) -> str:
    """"; it looks like model class X: code points ... vs ..." when ``unknown`` looks like one of the model's
    classes (same letters after NFKC / case folding / invisible characters removed, or non-ASCII and close)."""
    import difflib

    key = _skeleton(unknown)
    twins = [c for c in model_classes if _skeleton(c) == key]
    if not twins and not unknown.isascii():
        twins = difflib.get_close_matches(unknown, list(model_classes), n=1, cutoff=0.6)
    if not twins:
        return ""
    twin = twins[0]
    return (f"; it looks like the model's class {twin!r} but differs in its characters: {unknown!r} is "
            f"{code_points(unknown)}, {twin!r} is {code_points(twin)}")


def is_labelled(ds) -> bool:
    targets = getattr(ds, "targets", None)
    return targets is not None and len(targets) > 0 and any(int(t) >= 0 for t in targets)


@dataclass
class ClassMatch:
    """How a split's classes map onto the model's: ``present`` and ``missing`` are model class names."""

    present: list[str]
    missing: list[str]

    def describe(self, what: str) -> str | None:
        """A one-line note when the split holds only some of the classes (None when it holds all)."""
        if not self.missing:
            return None
        shown = ", ".join(self.missing[:8]) + (" ..." if len(self.missing) > 8 else "")
        return (f"{what} holds {len(self.present)} of the model's {len(self.present) + len(self.missing)} classes "
                f"(missing: {shown}); accuracy is over the classes present")


def _set_targets(ds, new_targets: list[int]) -> None:
    """Write remapped labels into the dataset types this package builds."""
    if hasattr(ds, "samples"):  # ImageFolder-like and image lists: (path, label) pairs
        ds.samples = [(p, t) for (p, _), t in zip(ds.samples, new_targets)]
        if hasattr(ds, "imgs"):
            ds.imgs = ds.samples
    elif hasattr(ds, "labels"):  # ArrayDataset / CIFAR
        ds.labels = np.asarray(new_targets, dtype=np.int64)
    else:
        raise DataError(f"cannot relabel a {type(ds).__name__}")
    ds.targets = list(new_targets)


def match_classes(ds, model_classes: Sequence[str], *, what: str) -> ClassMatch:
    """Relabel ``ds`` in place onto ``model_classes`` (the checkpoint's names); see the module docstring.

    ``what`` names the split in messages, e.g. "--id data/test". Raises
    :class:`DataError` for unlabelled data, an unknown class name or an index out of range.
    """
    model_classes = [nfc(str(c)) for c in model_classes]  # checkpoints from NFD folder names match NFC data
    if not is_labelled(ds):
        raise DataError(f"{what} has no labels (a flat folder or a list without labels), but labels are needed "
                        f"here: give class folders named like the model's classes ({', '.join(model_classes[:5])}"
                        f"{', ...' if len(model_classes) > 5 else ''})")
    targets = [int(t) for t in ds.targets]
    names = class_names(ds)
    if names is None:  # bare indices: matched by index
        bad = sorted({t for t in targets if t >= len(model_classes)})
        if bad:
            raise DataError(f"{what}: label {bad[0]} is not a class of the model (it has {len(model_classes)} "
                            f"classes, 0..{len(model_classes) - 1})")
        present_idx = sorted({t for t in targets if t >= 0})
        present = [model_classes[i] for i in present_idx]
        missing = [c for i, c in enumerate(model_classes) if i not in set(present_idx)]
        return ClassMatch(present, missing)
    index = {name: i for i, name in enumerate(model_classes)}
    used = sorted({names[t] for t in targets if t >= 0})
    unknown = [n for n in used if n not in index]
    if unknown:
        raise DataError(f"{what}: class {unknown[0]!r} is not one of the model's classes "
                        f"({', '.join(model_classes[:10])}{', ...' if len(model_classes) > 10 else ''})"
                        + _look_alike_note(unknown[0], model_classes)
                        + (f"; also unknown: {', '.join(unknown[1:6])}" if len(unknown) > 1 else ""))
    _set_targets(ds, [index[names[t]] if t >= 0 else -1 for t in targets])
    return ClassMatch(used, [c for c in model_classes if c not in set(used)])


def fingerprint(ds) -> str:
    """A short digest of what ``ds`` reads: its files (relative to their root) and labels, or its arrays.

    Cheap (names, not image bytes, for file datasets); two datasets with the same
    fingerprint list the same files with the same labels.
    """
    h = hashlib.sha256()
    samples = getattr(ds, "samples", None) or [(p, -1) for p in getattr(ds, "paths", [])]
    if samples:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p, _ in samples])
        for path, label in samples:
            h.update(f"{os.path.relpath(os.path.abspath(path), root)}\t{int(label)}\n".encode("utf-8", "replace"))
    elif hasattr(ds, "images"):
        h.update(np.ascontiguousarray(ds.images).tobytes())
        h.update(np.asarray(getattr(ds, "labels", []), dtype=np.int64).tobytes())
    else:
        raise DataError(f"cannot fingerprint a {type(ds).__name__}")
    names = class_names(ds)
    h.update(("\n".join(names) if names else "").encode())
    return h.hexdigest()[:16]


def check_label_span(targets: Sequence[int], ds=None, what: str = "the data") -> None:
    """Refuse labels whose largest value leaves most classes empty when the class count comes from it.

    Without class folders or a class table, a dataset's class count is its largest label + 1. One stray
    label (5000 among 0..9) would then make a 5001-class model with 4991 empty classes, train without a
    word and score against the wrong class count. The rule: when more than half of the classes
    0..max have no sample, it is an error naming the line of the largest label (``ds.list_file`` /
    ``ds.lines`` when the dataset has them) and the numbers. A smaller gap is left to the caller (a warning).
    """
    labels = [int(t) for t in targets if int(t) >= 0]
    if not labels:
        return
    present = set(labels)
    top = max(present)
    n = top + 1
    empty = n - len(present)
    if 2 * empty <= n:
        return
    where = what
    lines, list_file = getattr(ds, "lines", None), getattr(ds, "list_file", None)
    if lines and list_file:
        where = f"{list_file}:{lines[[int(t) for t in targets].index(top)]}"
    below = sorted(present - {top})
    others = f"the other labels are {below[0]}..{below[-1]} ({len(below)} distinct)" if below else "no other label"
    raise DataError(f"{where}: label {top} is far beyond the others ({others}): {empty} of the {n} classes "
                    f"0..{top} would have no images. Fix the label, or give the class count with a class table "
                    f"({CLASS_TABLE_NAME} beside the list, line i naming label i)")


def file_set(ds) -> set[str] | None:
    """The resolved paths of the image files ``ds`` reads (symlinks followed), or None for in-memory data."""
    samples = getattr(ds, "samples", None)
    paths = [p for p, _ in samples] if samples else getattr(ds, "paths", None)
    if not paths:
        return None
    folders: dict[str, str] = {}  # one realpath per folder, one lstat per file: cheap on ImageNet-size lists
    out = set()
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        real = folders.get(folder)
        if real is None:
            real = folders[folder] = os.path.realpath(folder)
        target = os.path.join(real, name)
        out.add(os.path.realpath(target) if os.path.islink(target) else target)
    return out


def shared_files(a, b) -> tuple[int, int, int] | None:
    """(images of ``b`` that ``a`` reads too, images of ``a``, images of ``b``), files compared after
    resolving symlinks (two paths to one folder, or a list naming the same images, count as the same);
    None when either is in-memory data (CIFAR batches: their train and test batches are different data)."""
    fa, fb = file_set(a), file_set(b)
    if fa is None or fb is None:
        return None
    return len(fa & fb), len(fa), len(fb)
