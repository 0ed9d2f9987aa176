"""``ascood predict``: score images with a saved detector; a table, a summary and an exit status.

    ascood predict det/ photos/ more.png list.txt --out preds.csv [--fdr 0.1]

PATH arguments are image files, folders (every image below, sorted) or image
lists (one path per line, absolute or relative to the list's folder). Without
``--out`` the table (CSV) goes to stdout and the summary to stderr, so
``ascood predict det x.png > preds.csv`` works. A file that cannot be read
gets a row with an ``error`` column (and no score), is named on stderr, and
the others are scored; ``--strict`` stops at the first one instead.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

from . import checks
from .argtypes import device_name, non_negative_int, positive_int

__all__ = ["add_parser", "run", "FLAGGED_EXIT", "FAILED_EXIT", "FLAGGED_AND_FAILED_EXIT", "EXIT_STATUSES",
           "exit_status", "write_predictions", "is_predictions_table", "check_table_out"]

FLAGGED_EXIT = 3
FAILED_EXIT = 4
FLAGGED_AND_FAILED_EXIT = 5
FIELDS = ("path", "label", "label_name", "probability", "score", "p_value", "is_ood", "bh_ood", "error")
EXIT_STATUSES = """exit status:
  0  every image was read and none is flagged OOD
  3  at least one image is flagged OOD (by is_ood, or by bh_ood with --fdr); every image was read
  4  some file(s) could not be read (rows with an error column, named on stderr); none of the others is flagged
  5  both: some image is flagged OOD and some file(s) could not be read
  2  bad input before any scoring: a missing path, a folder without images, a bad list line, a folder that is
     not a detector, a tampered or missing artifact file, --out naming a folder or an existing file that is not
     an ascood table; with --strict, an unreadable image
  1  any other error, among them --out FILE in use by another ascood run (its lock held: the holder is named;
     the same command works once that run ends) and an --out folder that cannot be written

PATH rules: an image file, a folder (every image below it, sorted; hidden files skipped), or an image list
(one path per line, absolute or relative to the list's folder; a trailing integer label is ignored), so
`find $PWD -name '*.png' > list.txt; ascood predict DET list.txt` works. --out FILE is claimed alone (a lock
beside it); other files of its folder stay free. An existing FILE is replaced only if it is empty or an earlier
ascood table (its first line is ascood's CSV header, or for .jsonl a record with exactly ascood's keys)."""


def exit_status(flagged: int, failed: int) -> int:
    """The documented exit status (:data:`EXIT_STATUSES`) of a run with ``flagged`` flagged and ``failed``
    unreadable images."""
    if failed:
        return FLAGGED_AND_FAILED_EXIT if flagged else FAILED_EXIT
    return FLAGGED_EXIT if flagged else 0


def _fdr(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (a false discovery rate such as 0.1), got {text}")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``ascood predict``."""
    p = sub.add_parser("predict", help="flag OOD images with a saved detector (exit status 3 when any is flagged)",
                       description="Scores images with a detector written by `ascood detector`.",
                       epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("detector", help="detector directory (from `ascood detector --out` or Detector.save)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders of images, or image lists")
    p.add_argument("--out", metavar="FILE", help="write the table to FILE: .csv or .jsonl (default: CSV on stdout)")
    p.add_argument("--fdr", type=_fdr, help="also decide the whole batch by Benjamini-Hochberg at this false "
                   "discovery rate (column bh_ood; the exit status then follows it)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="stop at the first file that cannot be read (exit status "
                   "2) instead of giving it an error row and going on")
    return p


#: The columns every table has; bh_ood (with --fdr) and error (with unreadable files) follow in FIELDS' order.
_BASE_FIELDS = FIELDS[:7]


def _is_our_header(fields: list) -> bool:
    """Whether ``fields`` are the columns (or JSON keys) a table of :func:`write_predictions` has."""
    return list(fields[:len(_BASE_FIELDS)]) == list(_BASE_FIELDS) and list(fields) == [f for f in FIELDS if f in fields]


def is_predictions_table(path: str) -> bool:
    """Whether the existing file ``path`` was written by :func:`write_predictions`: its first line is exactly
    ascood's CSV header, or (.jsonl) a JSON object with exactly ascood's keys. An empty file counts as ours
    (nothing to lose, e.g. a name from ``mktemp``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2 ** 16)
    except OSError:
        return False
    if not head:
        return True
    first = head.split(b"\n", 1)[0]
    try:
        text = first.decode("utf-8")
        if path.lower().endswith(".jsonl"):
            record = json.loads(text)
            return isinstance(record, dict) and _is_our_header(list(record))
    except ValueError:
        return False
    return _is_our_header(text.split(","))


def check_table_out(path: str, flag: str = "path") -> None:
    """ValueError naming ``flag`` when ``path`` is an existing file that is not an ascood predictions table:
    a table replaces only an earlier table."""
    if os.path.lexists(path) and not os.path.isdir(path) and not is_predictions_table(path):
        first_line = ("a JSON record with exactly ascood's keys" if path.lower().endswith(".jsonl")
                      else "ascood's CSV header (" + ",".join(_BASE_FIELDS) + ",...)")
        raise ValueError(f"{flag} {path} is an existing file that ascood did not write (its first line is not "
                         f"{first_line}), so nothing was written: remove it or choose another file name")


def write_predictions(pred, path: str | None, flag: str = "path") -> str:
    """The table as CSV or JSON lines text; written atomically to ``path`` when given. An existing ``path``
    is replaced only if it is an earlier table (:func:`check_table_out`; ValueError naming ``flag``)."""
    from ..files import atomic_write_text

    rows = pred.rows()
    if path is not None and path.lower().endswith(".jsonl"):
        text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        fields = [f for f in FIELDS if (f != "bh_ood" or pred.bh_ood is not None)
                  and (f != "error" or pred.error is not None)]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else f"{v:.8g}" if isinstance(v, float) else v) for k, v in r.items()})
        text = buf.getvalue()
    if path is not None:
        check_table_out(path, flag)  # just before the write: the file may have appeared since the run began
        atomic_write_text(text, path)
    return text


def _claim_out_file(out: str | None):
    """Check and claim --out FILE (a lock beside the file; the folder stays free for other tables)."""
    import contextlib

    from ..training.rundir import claim_output_file

    if out is None:
        return contextlib.nullcontext()
    if not out.lower().endswith((".csv", ".jsonl")):
        raise checks.InputError(f"--out {out}: expected a .csv or .jsonl file name")
    if os.path.isdir(out):
        raise checks.InputError(f"--out {out} is a folder: name the table file, e.g. {os.path.join(out, 'preds.csv')}")
    try:
        check_table_out(out, "--out")
    except ValueError as err:
        raise checks.InputError(str(err)) from None
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise checks.InputError(f"--out {out}: {parent} is a file, not a folder")
    return claim_output_file(out, flag="--out")  # in use by another run: exit status 1 (not bad input), holder named


def run(args: argparse.Namespace) -> int:
    from ..data.datasets import DataError, ImageReadError
    from ..deploy.inputs import expand_paths, resolve_device

    checks.require_path(args.detector, "detector")
    for path in args.paths:
        checks.require_path(path, "PATH")
    try:  # before the detector loads: a folder without images or a bad list entry is bad input (exit 2)
        files = expand_paths(args.paths)
    except DataError as err:
        raise checks.InputError(str(err)) from None
    with _claim_out_file(args.out):
        from ..deploy.detector import Detector

        det = Detector.load(args.detector, device=resolve_device(args.device))
        try:
            pred = det.predict(files, fdr=args.fdr, batch_size=args.batch_size, workers=args.workers,
                               progress=args.progress, on_error="raise" if args.strict else "skip")
        except ImageReadError as err:  # --strict: an unreadable image is bad input
            raise checks.InputError(f"{err} (--strict stops at the first unreadable file)") from None
        try:
            text = write_predictions(pred, args.out, flag="--out")
        except ValueError as err:  # a file that appeared at --out while the images were scored
            raise checks.InputError(str(err)) from None
    for i in pred.failed:
        print(f"ascood predict: cannot read {pred.source[i]}: {pred.error[i]}", file=sys.stderr)
    failed = len(pred.failed)
    n, flagged = len(pred) - failed, int(pred.is_ood.sum())
    summary = (f"{n} image(s): {flagged} flagged OOD (p <= {det.k}/{det.calibration.numel() + 1} = "
               f"{det.cutoff:.4g}, score < {det.threshold:.6g}; TPR target {det.tpr})")
    decisive = flagged
    if pred.bh_ood is not None:
        decisive = int(pred.bh_ood.sum())
        summary += f"; Benjamini-Hochberg at FDR {args.fdr}: {decisive} flagged"
    if failed:
        summary += f"; {failed} file(s) could not be read (rows with an error, no score)"
    if args.out:
        print(summary)
        print(f"predictions: {args.out}")
    else:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
    return exit_status(decisive, failed)
