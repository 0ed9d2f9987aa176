"""``ascood predict``: score images with a saved detector; a table, a summary and an exit status.

    ascood predict det/ photos/ more.png list.txt --out preds.csv [--fdr 0.1]

PATH arguments are image files, folders (every image below, sorted) or image
lists (one path per line). Without ``--out`` the table (CSV) goes to stdout
and the summary to stderr, so ``ascood predict det x.png > preds.csv`` works.

Exit status: 0 when no image is flagged OOD, 3 when at least one is (by
``is_ood``, or by Benjamini-Hochberg with ``--fdr``), 2 for bad input, 1 for
other errors.
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

__all__ = ["add_parser", "run", "FLAGGED_EXIT", "write_predictions"]

FLAGGED_EXIT = 3
FIELDS = ("path", "label", "label_name", "probability", "score", "p_value", "is_ood", "bh_ood")


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
                       description="Scores images with a detector written by `ascood detector`.")
    p.add_argument("detector", help="detector directory (from `ascood detector --out` or Detector.save)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders of images, or image lists")
    p.add_argument("--out", metavar="FILE", help="write the table to FILE: .csv or .jsonl (default: CSV on stdout)")
    p.add_argument("--fdr", type=_fdr, help="also decide the whole batch by Benjamini-Hochberg at this false "
                   "discovery rate (column bh_ood; the exit status then follows it)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def write_predictions(pred, path: str | None) -> str:
    """The table as CSV or JSON lines text; written atomically to ``path`` when given."""
    from ..files import atomic_write_text

    rows = pred.rows()
    if path is not None and path.lower().endswith(".jsonl"):
        text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        fields = [f for f in FIELDS if f != "bh_ood" or pred.bh_ood is not None]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in r.items()})
        text = buf.getvalue()
    if path is not None:
        atomic_write_text(text, path)
    return text


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.datasets import DataError
    from ..deploy.inputs import expand_paths

    checks.require_path(args.detector, "detector")
    for path in args.paths:
        checks.require_path(path, "PATH")
    try:  # before the detector loads: a folder without images or a bad list entry is bad input (exit 2)
        files = expand_paths(args.paths)
    except DataError as err:
        raise checks.InputError(str(err)) from None
    if args.out is not None and not args.out.lower().endswith((".csv", ".jsonl")):
        raise checks.InputError(f"--out {args.out}: expected a .csv or .jsonl file name")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    claim = checks.claim_out(out_dir, [os.path.basename(args.out)]) if args.out else checks.claim_out(None, ())
    with claim:
        from ..deploy.detector import Detector

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        det = Detector.load(args.detector, device=device)
        pred = det.predict(files, fdr=args.fdr, batch_size=args.batch_size, workers=args.workers,
                           progress=args.progress)
        text = write_predictions(pred, args.out)
    n, flagged = len(pred), int(pred.is_ood.sum())
    summary = (f"{n} image(s): {flagged} flagged OOD (p <= {det.alpha:.4g}, score < {det.threshold:.6g}; "
               f"TPR target {det.tpr})")
    decisive = flagged
    if pred.bh_ood is not None:
        decisive = int(pred.bh_ood.sum())
        summary += f"; Benjamini-Hochberg at FDR {args.fdr}: {decisive} flagged"
    if args.out:
        print(summary)
        print(f"predictions: {args.out}")
    else:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
    return FLAGGED_EXIT if decisive else 0
