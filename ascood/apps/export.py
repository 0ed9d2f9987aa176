"""``ascood export``: write a saved detector as one graph (ONNX, torch.export or TorchScript).

    ascood export det/ --format onnx                 # det/detector.onnx
    ascood export det/ --format torch-export --out served/det.pt2

The graph maps images (B, C, S, S) float32 in [0, 1] to logits, score,
is_ood and p_value, with the threshold, preprocessing and class names in the
file's metadata (:mod:`ascood.deploy.export`).
"""
from __future__ import annotations

import argparse
import os

from . import checks

__all__ = ["add_parser", "run", "EXIT_STATUSES"]

EXIT_STATUSES = """exit status:
  0  the file was written (and, without --no-check, run once against the detector: results agree)
  2  bad input before any work: a folder that is not a detector, a tampered, missing or symlinked artifact file,
     a scorer the format cannot express (ODIN / i-ODIN to ONNX), --out naming a folder, a file name ending in
     another format's suffix, or an existing file that is not an ascood export
  1  any other error, among them --out in use by another ascood run (its lock held) and a parity check that
     failed

--out rule: an existing FILE is replaced only if it is empty or an earlier ascood export (found from its header
or its ascood.json member, without loading it); the lock is on FILE alone, not its folder."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``ascood export``."""
    from ..deploy.export import FORMATS

    p = sub.add_parser("export", help="export a saved detector as one graph (images -> logits, score, is_ood, "
                       "p_value) to ONNX, torch.export or TorchScript", epilog=EXIT_STATUSES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("detector", help="detector directory (from `ascood detector --out`)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (onnxruntime), torch-export (.pt2) or "
                   "torchscript")
    p.add_argument("--out", metavar="FILE", help="output file (default DET/detector.onnx, .pt2 or .ts); an "
                   "existing file is replaced only if an ascood export wrote it (or it is empty)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the written file once against the detector")
    return p


def _check_target(out: str, fmt: str) -> None:
    """--out is not a folder, nor an existing file that an ascood export did not write (exit status 2)."""
    from ..deploy.export import check_export_target

    try:
        check_export_target(out, fmt, flag="--out")
    except ValueError as err:
        raise checks.InputError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from ..deploy.export import check_export_path, default_path
    from ..training.rundir import claim_output_file

    checks.require_path(args.detector, "detector")
    out = args.out or default_path(args.detector, args.format)
    try:
        check_export_path(out, args.format)
    except ValueError as err:
        raise checks.InputError(f"--out: {err}") from None
    _check_target(out, args.format)
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise checks.InputError(f"--out {out}: {parent} is a file, not a folder")
    with claim_output_file(out, flag="--out"):  # a lock beside the file: its folder stays free
        _check_target(out, args.format)  # again under the lock: the file may have appeared meanwhile
        from ..deploy.detector import Detector
        from ..deploy.export import export, needs_gradient

        det = Detector.load(args.detector, device="cpu")
        if args.format == "onnx" and needs_gradient(det):
            raise checks.InputError(f"--format onnx: scorer {det.scorer.name} needs an input gradient, which ONNX "
                                    "graphs cannot compute; use --format torch-export or torchscript, or build the "
                                    "detector with a forward-only scorer (e.g. ebo, msp, gen, scale, knn, vim)")
        export(det, out, args.format, check=args.check)
    print(f"exported: {out} ({args.format}; scorer {det.scorer.name}, threshold {det.threshold:.6g}, "
          f"TPR {det.tpr})")
    return 0
