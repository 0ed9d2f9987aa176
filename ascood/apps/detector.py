"""``ascood detector``: build a calibrated OOD detector from a trained run and save it as one artifact.

    ascood detector runs/mine --id-train data/train --id-val data/val --ood-val data/ood_val \\
        --scorer aps --tpr 0.95 --out det/
    ascood detector --model openood:resnet18_32x32 --weights best.ckpt --preprocessing cifar10 --id-val ... --out det/

Every path, the scorer name and the TPR are checked, and ``--out`` claimed,
before the model is loaded. The work is :meth:`ascood.deploy.Detector.fit`.
"""
from __future__ import annotations

import argparse

from . import checks
from .argtypes import device_name, non_negative_int, positive_int
from .common_args import (add_feature_store_args, add_openood_args, default_features_dir, feature_store_from_args,
                          openood_model_from_args)
from .torchrun import claim_on_rank0, require_store, torchrun_ranks

__all__ = ["add_parser", "run", "EXIT_STATUSES"]

EXIT_STATUSES = """exit status:
  0  the detector was written to --out
  2  bad input, found before any fitting: a missing path, a folder without images, a bad list line, a flag value
     out of range, calibration data that overlaps the fit data (--id-val vs --id-train), --ood-val equal to the
     ID data, too few calibration images for --tpr, or --out naming an existing folder that is neither empty nor
     an earlier detector (nothing is written then)
  1  any other error, among them --out in use by another ascood run (its lock held: the holder is named) and an
     --out folder that cannot be written

--out rule: a new folder, an empty one, or an earlier detector, which is replaced as one unit (written beside it,
then swapped in: readers see the old or the new detector, never a mix)."""


def _open_unit(text: str) -> float:
    """A number in the open interval (0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (exclusive), got {text}")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``ascood detector``."""
    from ..training.model_selection import CHECKPOINT_CHOICES

    p = sub.add_parser("detector", help="build a calibrated OOD detector (threshold at a target TPR, conformal "
                       "p-values) from a trained run and save it",
                       description="Fits one scorer on ID data, chooses its hyperparameters by APS with --ood-val, "
                       "and calibrates the threshold on held-out ID validation data.",
                       epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run directory of `ascood train` (best.pt when present, else last.pt) or a "
                   "checkpoint; or none, with --model openood:ARCH --weights FILE")
    p.add_argument("--which", choices=CHECKPOINT_CHOICES, help="with a run directory: best or last checkpoint")
    p.add_argument("--id-val", required=True, metavar="PATH",
                   help="ID validation data: calibrates the threshold (and, split off, tunes when needed)")
    p.add_argument("--id-train", metavar="PATH", help="ID training data, for scorers that fit on it (knn, mds, vim, ...)")
    p.add_argument("--ood-val", metavar="PATH", help="OOD validation data: APS picks hyperparameters (and, with "
                   "--scorer aps, the scorer) by AUROC on it")
    p.add_argument("--id-calibration", metavar="PATH",
                   help="a separate ID calibration set (then all of --id-val tunes)")
    p.add_argument("--scorer", default="aps",
                   help="a scorer name (msp, ebo, knn, vim, odin, ...) or aps (the best by validation AUROC; needs "
                        "--ood-val). Default aps")
    p.add_argument("--tpr", type=_open_unit, default=0.95,
                   help="target fraction of ID images kept as ID, in (0, 1) (default 0.95)")
    p.add_argument("--calibration-fraction", type=_open_unit, default=0.5,
                   help="share of --id-val kept for calibration when it must also tune (default 0.5)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the tune/calibration split")
    p.add_argument("--bank-dtype", choices=("float32", "float16"), default="float32",
                   help="KNN / NNGuide / Relation bank precision on disk (float16: half the size)")
    p.add_argument("--feature-dir", metavar="DIR", help="memory-map the extracted features from files in DIR instead "
                   "of RAM (ImageNet-size --id-train with knn / nnguide / relation); with the feature store "
                   "(--features) only for the splits it cannot key")
    add_feature_store_args(p)
    p.add_argument("--out", required=True, metavar="DET", help="folder to write the detector to: a new or empty "
                   "folder, or an earlier detector (replaced as one unit); any other existing folder is refused")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    add_openood_args(p, "RUN")
    return p


#: What the detector's messages call Detector.fit's arguments.
FLAG_NAMES = {"id_train": "--id-train", "id_val": "--id-val", "ood_val": "--ood-val",
              "id_calibration": "--id-calibration", "tpr": "--tpr"}


def _check_data(args: argparse.Namespace) -> None:
    """Before the model loads: overlapping data roles, too few calibration images (Detector.fit warns, by flag
    name, about data the scorer ignores)."""
    from ..data.datasets import DataError
    from ..deploy.detector import check_fit_data

    try:
        check_fit_data(id_train=args.id_train, id_val=args.id_val, ood_val=args.ood_val,
                       id_calibration=args.id_calibration, scorer=args.scorer, tpr=args.tpr,
                       calibration_fraction=args.calibration_fraction, names=FLAG_NAMES)
    except (ValueError, DataError) as err:
        raise checks.InputError(str(err)) from None


def _claim(out: str):
    """--out: a new folder, an empty one or an earlier detector (replaced as one unit); claimed by a lock
    beside it. Anything else is refused before any work."""
    from ..deploy.saving import claim_detector_out

    try:
        return claim_detector_out(out, flag="--out")
    except ValueError as err:
        raise checks.InputError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    """Checks, the claim of --out, then Detector.fit and save."""
    from ..scoring.scorers import get_scorer
    from ..training.model_selection import resolve_checkpoint

    openood = openood_model_from_args(args, args.run, "RUN")  # an OpenOOD checkpoint: read and checked here
    if openood is None:
        checks.require_path(args.run, "run")
        try:
            ckpt = resolve_checkpoint(args.run, args.which)
        except ValueError as err:
            raise checks.InputError(str(err))
        preprocessing = None
    elif args.which:
        raise checks.InputError("--which picks a checkpoint of an ascood run directory; it does not apply to --model")
    else:
        # Detector.fit takes the model with the checkpoint's preprocessing (resize / crop, mean / std).
        ckpt, extra = openood[0], openood[1]["extra"]
        preprocessing = {k: extra[k] for k in ("image_size", "mean", "std", "channels")}
    for flag, path in (("--id-val", args.id_val), ("--id-train", args.id_train), ("--ood-val", args.ood_val),
                       ("--id-calibration", args.id_calibration)):
        if path:
            checks.require_path(path, f"{flag} data")
    # No default store beside an OpenOOD checkpoint (the user's folder, not an ascood run): --features DIR makes one.
    store = feature_store_from_args(args, default_features_dir(ckpt) if openood is None else None)
    if args.scorer.lower() == "aps":
        if not args.ood_val:
            raise checks.InputError("--scorer aps chooses the scorer by AUROC against OOD validation data: give "
                                    "--ood-val, or name a scorer")
    else:
        try:
            probe = get_scorer(args.scorer)
        except ValueError as err:
            raise checks.InputError(f"--scorer: {err} (or aps)") from None
        checks.check_scorers_have_train([probe], bool(args.id_train), True, train_flag="--id-train",
                                        val_flag="--id-val")
    with torchrun_ranks(args.device) as ranks:
        require_store(store, ranks)  # under torchrun the ranks share each split's features through the store
        with claim_on_rank0(ranks, lambda: _claim(args.out)):
            _check_data(args)
            from ..deploy.detector import Detector

            det = Detector.fit(ckpt, preprocessing=preprocessing, id_train=args.id_train, id_val=args.id_val,
                               ood_val=args.ood_val,
                               id_calibration=args.id_calibration, scorer=args.scorer, tpr=args.tpr,
                               calibration_fraction=args.calibration_fraction, seed=args.seed,
                               batch_size=args.batch_size, workers=args.workers, device=args.device,
                               feature_dir=args.feature_dir, log=print, arg_names=FLAG_NAMES, feature_store=store,
                               ranks=ranks)
            if not ranks.is_main:
                return 0  # every rank fitted the same detector; rank 0 writes it
            if openood is not None:  # the model card and provenance name the OpenOOD file, not just "a model"
                det.provenance.update({"source": "openood", "checkpoint": openood[1]["openood"]["file"],
                                       "openood": openood[1]["openood"],
                                       "preprocessing": openood[1]["extra"]["normalization"]["source"]})
            det.save(args.out, bank_dtype=args.bank_dtype)
    v = det.validation
    line = (f"detector: {det.scorer.name} {det.provenance['scorer_choice']['params']}, threshold "
            f"{det.threshold:.6g} at TPR {det.tpr}: is_ood when p <= {det.k}/{det.calibration.numel() + 1} = "
            f"{det.cutoff:.4g} ({v['n_calibration']} calibration images, in-sample TPR "
            f"{100 * v['calibration_tpr']:.2f}%)")
    if "ood_val_fpr" in v:
        line += f"; OOD val AUROC {100 * v['ood_val_auroc']:.2f}, FPR {100 * v['ood_val_fpr']:.2f}%"
    print(line)
    print(f"saved: {args.out}")
    return 0
