"""Early checks of CLI input: each bad value stops before any work, with a message naming the flag.

The commands (:mod:`ascood.apps`) call these; they raise :class:`InputError` (a
one-line user error) or emit a warning for input that is legal but
surprising (label gaps, images ignored beside class folders).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

__all__ = ["InputError", "explicit_dests", "check_normalisation", "min_image_size", "check_image_size",
           "training_num_classes", "parse_scorer_names", "check_scorers_have_train", "warn_unlabelled_id",
           "one_line_warnings", "require_path", "claim_out",
           "check_out_outside_data", "check_ood_names", "check_distinct_data"]


class InputError(Exception):
    """A user input error (printed as one line, exit status 2)."""


def explicit_dests(make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> set[str]:
    """The ``dest`` names of the options actually typed in ``argv`` (defaults are not "typed")."""
    parser = make_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


def check_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> None:
    """--mean/--std: ``channels`` finite values each, std > 0."""
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is None:
            continue
        if len(values) != channels:
            raise InputError(f"{flag} needs {channels} comma-separated value(s) for --channels {channels}, "
                             f"got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise InputError(f"{flag} values must be finite, got {','.join(map(str, values))}")
    if std is not None and not all(v > 0 for v in std):
        raise InputError(f"--std values must be > 0 (inputs are divided by them), got {','.join(map(str, std))}")


def min_image_size(forward_ok: Callable[[int], bool], upper: int = 512) -> int | None:
    """Smallest size s in [1, upper] with ``forward_ok(s)``, assuming monotonicity; None if none works."""
    if not forward_ok(upper):
        return None
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi) // 2
        if forward_ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def check_image_size(build: Callable[[], "object"], image_size: int, channels: int, model_name: str) -> None:
    """A forward pass of a 2-class copy of the model at ``image_size``; too small -> InputError with the minimum."""
    import torch

    model = build().eval()

    def ok(size: int) -> bool:
        try:
            with torch.no_grad():
                model(torch.zeros(2, channels, size, size))
            return True
        except (RuntimeError, ValueError):
            return False

    if ok(image_size):
        return
    smallest = min_image_size(ok, upper=max(2 * image_size, 64))
    need = f"at least {smallest}" if smallest else "larger"
    raise InputError(f"--image-size {image_size} is too small for --model {model_name} (needs {need})")


def training_num_classes(ds, data_path: str) -> int:
    """Number of classes of a training set; every sample must have a label.

    The count is the class folders', the class table's (``classes.txt`` beside a list), or else the largest
    label + 1: a gap that leaves most of those classes empty is refused (:func:`~ascood.data.classes.
    check_label_span`: a typo such as 5000 among 0..9), a smaller gap is a warning.
    """
    classes = getattr(ds, "classes", None)
    if classes:
        return len(classes)
    targets = list(getattr(ds, "targets", []))
    unlabelled = [i for i, t in enumerate(targets) if t < 0]
    if unlabelled and len(unlabelled) == len(targets):
        raise InputError(f"training data {data_path} has no labels (a flat folder or a list without labels); "
                         "use class folders root/<class>/<image> or a list of 'relative/path label' lines")
    if unlabelled:
        lines = getattr(ds, "lines", None)
        where = f"{ds.list_file}:{lines[unlabelled[0]]}" if lines else f"{data_path} (sample {unlabelled[0]})"
        raise InputError(f"{where}: no label ({len(unlabelled)} unlabelled line(s)); training needs "
                         "'relative/path label' on every line")
    names = getattr(ds, "class_names", None)
    if names:  # classes.txt beside the list gives the class count (labels were checked against it)
        return len(names)
    from ..data.classes import check_label_span
    from ..data.datasets import DataError

    try:
        check_label_span(targets, ds, data_path)
    except DataError as err:
        raise InputError(str(err)) from None
    present = sorted(set(targets))
    n = present[-1] + 1
    missing = sorted(set(range(n)) - set(present))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        warnings.warn(f"{data_path}: labels are {present[0]}..{present[-1]} with no samples for {len(missing)} "
                      f"class(es) ({shown}); training {n} classes", stacklevel=2)
    return n


def parse_scorer_names(text: str, make: Callable[[str], object]) -> list:
    """``--scorers`` value -> scorer objects made by ``make(name)``; empty or unknown names name the flag."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError(f"--scorers names no scorer ({text!r}); give comma-separated names such as msp,ebo")
    scorers = []
    for name in names:
        try:
            scorers.append(make(name))
        except ValueError as err:
            raise InputError(f"--scorers: {err}") from None
    return scorers


def check_scorers_have_train(scorers: Sequence, has_train: bool, has_val: bool = False, *,
                             train_flag: str = "--train", val_flag: str = "--val (or --aps-id)") -> None:
    """Scorers that fit ID statistics need ID training data (KNN, MDS, ...) or ID validation data (ReAct,
    TempScale); the message names the command's flag (``train_flag`` / ``val_flag``)."""
    fitted = [s for s in scorers if getattr(s, "needs_fit", False)]
    on_train = [s.name for s in fitted if getattr(s, "fit_split", "train") == "train"]
    on_val = [s.name for s in fitted if getattr(s, "fit_split", "train") == "val"]
    if on_train and not has_train:
        raise InputError(f"scorer(s) {', '.join(on_train)} fit ID statistics: pass the ID training data with "
                         f"{train_flag}")
    if on_val and not has_val:
        raise InputError(f"scorer(s) {', '.join(on_val)} are fitted on ID validation data (as OpenOOD): "
                         f"pass {val_flag}")


def warn_unlabelled_id(ds, path: str) -> None:
    """Unlabelled ID data: the table's ID accuracy is n/a, say so instead of printing 0.00."""
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) and all(t < 0 for t in targets):
        warnings.warn(f"--id {path} has no labels: ID accuracy is reported as n/a", stacklevel=2)


@contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Within the block, show warnings as ``ascood COMMAND: warning: ...`` (one line, no source line)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"ascood {command}: warning: {message}", file=file or sys.stderr)

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def require_path(path: str, what: str) -> None:
    """``path`` exists, else an :class:`InputError` naming ``what`` (e.g. "checkpoint") and the path."""
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")


def claim_out(out: str | None, outputs: Sequence[str]):
    """The output-directory claim (lock + checks) for rank 0; a no-op for other ranks or without --out."""
    from ..training.rundir import claim_output_dir

    if out is None or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext(out)
    return claim_output_dir(out, flag="--out", outputs=outputs)


def check_out_outside_data(out: str | None, data: Sequence[tuple[str, str | None]]) -> None:
    """--out may not be a data folder or inside one: the next run would read its files as data.

    ``data``: (flag, path) pairs; only folders count (an image list or the OpenOOD tree reads the files it
    lists, so a run folder beside them is never read as data).
    """
    if not out:
        return
    target = os.path.realpath(out)
    for flag, path in data:
        if not path or not os.path.isdir(path):
            continue
        folder = os.path.realpath(path)
        if target == folder or target.startswith(folder.rstrip(os.sep) + os.sep):
            raise InputError(f"--out {out} is inside the data folder of {flag} ({folder}): the run's files "
                             "(checkpoints, figures) would be read as data next time; choose --out outside it")


def check_ood_names(ood: Sequence[tuple[str, str]], near: Sequence[tuple[str, str]],
                    far: Sequence[tuple[str, str]]) -> None:
    """Every OOD set has its own name (two sets of one name would silently keep one)."""
    seen: dict[str, str] = {}
    groups = {g for g, items in (("near", near), ("far", far)) if items}
    for flag, items in (("--ood", ood), ("--near", near), ("--far", far)):
        for name, path in items:
            where = f"{flag} {name}={path}"
            if flag == "--ood" and name in groups:
                raise InputError(f"{where}: the name {name!r} is taken by the --{name} group; name the set "
                                 "with --ood OTHER=PATH")
            if name in seen:
                raise InputError(f"two OOD sets are named {name!r}: {seen[name]} and {where}; name them "
                                 "apart with NAME=PATH")
            seen[name] = where


def check_distinct_data(first, first_name: str, second, second_name: str, why: str,
                        same_path: bool = False) -> None:
    """Two splits that must be different data: the same images (same folder, a symlink to it, or a list
    naming the same files) is an :class:`InputError` naming both; a partial overlap is a warning with the
    count. ``first_name`` / ``second_name``: the flags with their paths ("DATA data/train", "--val x");
    ``why``: what the overlap would make wrong. ``same_path``: both were read from one path the same way
    (what decides for in-memory data such as CIFAR batches, whose files are not compared)."""
    from ..data.classes import shared_files

    counts = shared_files(first, second)
    if counts is None and same_path:
        raise InputError(f"{second_name} is the same data as {first_name}: {why}; give separate data")
    if counts is None or counts[0] == 0:
        return
    shared, n_first, n_second = counts
    if shared == n_first == n_second:
        raise InputError(f"{second_name} reads the same {shared} images as {first_name} (the same files, "
                         f"compared after following symlinks): {why}; give separate data")
    warnings.warn(f"{shared} of the {n_second} images of {second_name} are also in {first_name}: {why}",
                  stacklevel=2)
