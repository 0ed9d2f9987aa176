"""Command line: ``ascood train | eval | reproduce | demo | bench | doctor`` (also ``python -m ascood``).

    ascood train data/train --out runs/mine --epochs 30
    ascood eval runs/mine/last.pt --id data/test --ood far=data/ood_images --train data/train

Argument errors exit with status 2 and one line on stderr; runtime errors
(missing or corrupt files, a non-finite loss) exit 1 with one line
(``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import subprocess
import sys
from typing import Sequence

from . import cli_checks as checks
from ._argtypes import model_name, positive_int

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) so scripts see a single clear message."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


CLIError = checks.InputError  # a user-facing error: printed as one line, exit status 2


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return v


def _positive(text: str) -> float:
    v = _nonneg(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return v




def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return v


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _named_path(text: str) -> tuple[str, str]:
    if "=" not in text:
        return os.path.basename(os.path.normpath(text)) or text, text
    name, path = text.split("=", 1)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from .data import DATA_FORMATS

    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                   help="how to read data paths: auto-detect (default), class folders, a flat folder of images, "
                        "an OpenOOD image list ('relative/path label' lines; see --root), or CIFAR python batches")
    p.add_argument("--root", help="root directory that image-list paths are relative to (default: the list's folder)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def _add_benchmark_args(p: argparse.ArgumentParser, command: str) -> None:
    from .openood import add_tree_args
    from .presets import add_preset_args

    add_preset_args(p, command)
    add_tree_args(p)


def build_parser() -> argparse.ArgumentParser:
    from .losses import ENERGY_MARGIN_IN, ENERGY_MARGIN_OUT, OUTLIER_LOSSES
    from .model_selection import CHECKPOINT_CHOICES
    from .models import HEADS, MODEL_NAMES
    from .outliers import ALPHA_MODES, OOD_TYPES, SALIENCY_MODES, SALIENCY_TARGETS, SHUFFLE_RANKS

    parser = _Parser(prog="ascood", description="ASCOOD out-of-distribution detection: train, evaluate, demo, bench.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier with ASCOOD (or the cross-entropy baseline)",
                       description="Train with ASCOOD: virtual outliers from the true-class saliency G = dz_y/dx, "
                                   "loss CE(z, y) + w * KL(U || softmax(z(x'))) on standardised features.")
    t.add_argument("data", nargs="?", help="training data: class-per-folder directory, image list file, or CIFAR batch "
                   "directory (not needed with --data-root)")
    _add_data_args(t)
    t.add_argument("--val", metavar="PATH",
                   help="ID validation data (same formats as DATA): its accuracy is reported every epoch and the "
                        "best epoch is kept as OUT/best.pt beside last.pt (the reference's model selection)")
    _add_benchmark_args(t, "train")
    t.add_argument("--out", default="runs/ascood",
                   help="output directory: last.pt (best.pt with --val), config.json, log.jsonl, figures "
                        "(default %(default)s); locked while the run lasts")
    t.add_argument("--model", type=model_name, default="small_cnn", metavar="MODEL",
                   help=f"backbone: {', '.join(MODEL_NAMES)} (small_cnn: tiny images, resnet18_32x32: CIFAR-size, "
                        "resnet18/34/50: 224 px), or any classifier as torchvision:NAME / timm:NAME (split into "
                        "features + head by ascood.wrap; --weights then holds the whole model's state dict) "
                        "(default %(default)s)")
    t.add_argument("--width", type=positive_int, help="channel width of small_cnn / resnet18_32x32")
    t.add_argument("--weights", help="local file with backbone weights (e.g. ImageNet ResNet), a state dict "
                                     "loaded with weights_only=True; never downloaded")
    t.add_argument("--image-size", type=positive_int, default=32, help="images are resized/cropped to this size (default 32)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = greyscale, 3 = RGB (default 3)")
    t.add_argument("--mean", type=_floats,
                   help="normalisation mean per channel (default: ImageNet's with --weights, as the reference for "
                        "fine-tuning; else estimated from the training data); printed and stored in the checkpoint")
    t.add_argument("--std", type=_floats, help="normalisation std per channel (default: as --mean)")
    t.add_argument("--epochs", type=positive_int, default=100, help="training epochs (default %(default)s; paper: 100 from scratch, 30 fine-tuning)")
    t.add_argument("--ood-type", choices=OOD_TYPES, default="gradient",
                   help="outlier synthesis: gradient = x + alpha * G on the invariant (top |G|) elements (the "
                        "paper's method); shuffle = permute the most salient pixels; gaussian = alpha * N(0, 1); "
                        "none = plain cross-entropy baseline (default %(default)s)")
    t.add_argument("--p-inv", type=_fraction, default=0.1,
                   help="p_inv: fraction of input elements with the largest |G| treated as invariant features "
                        "and perturbed; in (0, 1] (default %(default)s, the paper's; CIFAR-10 shuffle 0.15)")
    t.add_argument("--alpha-max", type=_finite, default=300.0,
                   help="alpha_max: step size of x' = x + alpha * G at the start (default %(default)s, the paper's for CIFAR "
                        "and Waterbirds); negative values with --alpha-min <= 0 subtract the gradient instead "
                        "(the paper's Table 5 ablation 'gradient subtraction')")
    t.add_argument("--alpha-min", type=_finite, default=30.0,
                   help="alpha_min (default %(default)s): alpha of epoch e (1-based) of E is (max - min) * (1 - e/E) + min, "
                        "so the last epoch uses exactly alpha_min; same sign as --alpha-max, |min| <= |max|")
    t.add_argument("--alpha-mode", choices=ALPHA_MODES, default="absolute",
                   help="absolute = the paper's x + alpha * G; relative = G rescaled per sample so the perturbed "
                        "elements move by alpha on average, in normalised-input units (one alpha for any model/data) "
                        "(default %(default)s)")
    t.add_argument("--w", type=_nonneg, default=1.0,
                   help="w: weight of the outlier term KL(U || softmax(z(x'))) (default %(default)s, the paper's; "
                        "CIFAR-100 5.0)")
    t.add_argument("--sigma", type=_positive, default=0.5,
                   help="sigma: scale of the standardised feature h~ = (h - mean) / std * sigma (paper default 0.5)")
    t.add_argument("--head", choices=HEADS, default="zscore",
                   help="zscore = ASCOOD's standardised-feature head (default); linear = plain head (baseline); "
                        "l2 = L2-normalised feature h / ||h||_2 (the paper's Table 6 / Figure 5 ablation)")
    t.add_argument("--saliency-mode", choices=SALIENCY_MODES, default="eval",
                   help="network mode while computing G (default eval, the reference's)")
    t.add_argument("--saliency-target", choices=SALIENCY_TARGETS, default="logit",
                   help="logit = G = dz_y/dx, the true-class logit's gradient (default, the paper's Eq. 2); prob = "
                        "gradient of the true-class softmax probability (the paper's Sec. D.3 ablation)")
    t.add_argument("--shuffle-rank", choices=SHUFFLE_RANKS, default="exp",
                   help="pixel ranking of --ood-type shuffle: exp = sum over channels of exp(G_c), signed G (default, "
                        "the authors' code); abs = sum of |G_c| (picks a different set; not the paper's)")
    t.add_argument("--outlier-loss", choices=OUTLIER_LOSSES, default="kl",
                   help="outlier term L_OOD: kl = w * KL(U || softmax(z(x'))) (default, the paper's); energy = "
                        "w * the energy-bounded loss of Liu et al. 2020 (the paper's Table 6 ablation L_energy)")
    t.add_argument("--energy-margin-in", type=_finite, default=ENERGY_MARGIN_IN,
                   help=f"--outlier-loss energy: ID energy margin m_in (default {ENERGY_MARGIN_IN:g}, Liu et al.'s)")
    t.add_argument("--energy-margin-out", type=_finite, default=ENERGY_MARGIN_OUT,
                   help=f"--outlier-loss energy: outlier energy margin m_out (default {ENERGY_MARGIN_OUT:g}, "
                        "Liu et al.'s)")
    t.add_argument("--lr", type=_positive, default=0.1, help="SGD learning rate (default %(default)s; paper: 0.1 from scratch, 0.01 fine-tuning)")
    t.add_argument("--momentum", type=_nonneg, default=0.9, help="SGD momentum (default %(default)s)")
    t.add_argument("--weight-decay", type=_nonneg, default=5e-4, help="SGD weight decay (default %(default)s)")
    t.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov")
    t.add_argument("--fc-lr-factor", type=_positive, default=1.0,
                   help="learning-rate multiplier of the final linear layer (default %(default)s; paper: 1.0; CIFAR-100 0.05)")
    t.add_argument("--min-lr", type=_positive, default=1e-6,
                   help="absolute lr at the end of the per-step cosine schedule (default 1e-6, the reference's; "
                        "one multiplier for all layers, so the final layer ends at min_lr * fc_lr_factor)")
    t.add_argument("--amp", action="store_true",
                   help="mixed precision for the training forward/backward (CUDA only; off by default: the paper's "
                        "numbers are fp32; the saliency G is computed in fp32 either way)")
    t.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under multi-GPU torchrun keep per-GPU BatchNorm (default: SyncBatchNorm, as the reference; "
                        "CPU/gloo runs always keep BatchNorm, torch's SyncBatchNorm needs a GPU)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (both passes; Inductor)")
    t.add_argument("--channels-last", action="store_true", help="channels-last model and batches")
    t.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from a checkpoint (default: OUT/last.pt); flags not given take the checkpoint's "
                        "saved values, a flag given with another value is an error")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    t.add_argument("--no-figures", dest="figures", action="store_false", help="skip the outlier-grid figure")

    e = sub.add_parser("eval", help="evaluate OOD detection of a trained checkpoint",
                       description="Scores ID and OOD sets with post-hoc scorers; FPR@95, AUROC, AUPR-In, AUPR-Out x100.")
    e.add_argument("checkpoint",
                   help="checkpoint written by `ascood train` (a .pt file) or its run directory (then best.pt when "
                        "present, else last.pt; see --which)")
    e.add_argument("--which", choices=CHECKPOINT_CHOICES,
                   help="with a run directory: best = best ID val accuracy (the reference's model selection), "
                        "last = the final epoch")
    e.add_argument("--id", help="ID test data (folder, list, or CIFAR directory: its test batch); with --data-root: "
                   "the benchmark's ID test list")
    e.add_argument("--ood", action="append", type=_named_path, default=[], metavar="[NAME=]PATH",
                   help="an OOD set (repeatable); folder of images, class folders, list or CIFAR directory")
    e.add_argument("--near", action="append", type=_named_path, default=[], metavar="[NAME=]PATH",
                   help="a near-OOD set (repeatable; reported with a near-OOD mean)")
    e.add_argument("--far", action="append", type=_named_path, default=[], metavar="[NAME=]PATH",
                   help="a far-OOD set (repeatable; reported with a far-OOD mean)")
    e.add_argument("--train", help="ID training data, needed by scorers that fit statistics (knn, mds, vim, ...)")
    e.add_argument("--val", metavar="PATH",
                   help="ID validation data that react (clip percentile) and tempscale (T) are fitted on, as OpenOOD "
                        "(default: --aps-id)")
    e.add_argument("--scorers", default="msp,mls,ebo,odin,scale",
                   help="comma-separated scorers: msp, tempscale, odin, iodin (i-ODIN), ebo, mls, gen, react, ash, "
                        "scale, knn, mds, rmds, vim, nnguide, relation (default msp,mls,ebo,odin,scale)")
    e.add_argument("--convention", choices=("openood", "odin"), default="openood",
                   help="metric convention: openood (OOD positive, the paper's) or odin (ID positive)")
    e.add_argument("--out", help="directory for results.csv, results.json and score histograms")
    e.add_argument("--aps-id", metavar="PATH",
                   help="APS: ID validation data; with --aps-ood, each scorer's hyperparameters (e.g. i-ODIN's "
                        "temperature T and step eps) are chosen by AUROC on this validation split, never the test sets")
    e.add_argument("--aps-ood", metavar="PATH", help="APS: OOD validation data (see --aps-id)")
    _add_data_args(e)
    _add_benchmark_args(e, "eval")

    from .reproduce import add_parser as add_reproduce_parser

    add_reproduce_parser(sub, positive_int, _positive, _fraction, _nonneg)

    d = sub.add_parser("demo", help="run the bundled demo (arguments are passed to it)", add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="run the benchmark suite: pytest benchmarks/ --benchmark-only [ARGS] "
                       "(--quick, --json FILE, --md FILE, --bench-device cpu|cuda)",
                       add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    k = sub.add_parser("doctor", help="self-check: every kernel on every backend against the reference (run this "
                       "after installing on a GPU; same as python -m ascood_kernels; --help for its flags)",
                       add_help=False)
    k.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# -- commands ------------------------------------------------------------------------------------------
def _require_path(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{what} not found: {path}")


TRAIN_OUTPUTS = ("last.pt", "best.pt", "config.json", "log.jsonl", "outliers.png")
EVAL_OUTPUTS = ("results.csv", "results.json")


def _claim(out: str | None, outputs: Sequence[str]):
    """The output-directory claim (lock + checks) for rank 0; a no-op for other ranks or without --out."""
    import contextlib

    from .rundir import claim_output_dir

    if out is None or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext(out)
    return claim_output_dir(out, flag="--out", outputs=outputs)


def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint
    from .outliers import check_alpha_range
    from .resume import fill_from_checkpoint

    from .openood import tree_from_args
    from .presets import pretrained_weights_error

    err = pretrained_weights_error(args.resolved, args.weights) if getattr(args, "resolved", None) else None
    if err:
        raise CLIError(err)
    tree = tree_from_args(args, progress=args.progress)
    if tree is None:
        if args.data is None:
            raise CLIError("give the training data path, or --data-root DIR with --preset/--benchmark")
        _require_path(args.data, "data path")
    if args.val:
        _require_path(args.val, "validation data path")
    if args.weights:
        _require_path(args.weights, "weights file")
    resume = None
    if args.resume is not None:
        resume = args.resume or os.path.join(args.out, "last.pt")
        _require_path(resume, "checkpoint")
        # Flags not typed now take the checkpoint's values: `--resume` alone continues the saved run.
        filled = fill_from_checkpoint(args, getattr(args, "explicit", set()), load_checkpoint(resume))
        if filled:
            print(f"resuming {resume} with its saved settings for: {', '.join(filled)}", file=sys.stderr)
    try:
        check_alpha_range(args.alpha_min, args.alpha_max, names=("--alpha-min", "--alpha-max"))
    except ValueError as err:
        raise CLIError(str(err))
    checks.check_normalisation(args.mean, args.std, args.channels)
    with _claim(args.out, TRAIN_OUTPUTS):
        if resume is None and os.path.exists(os.path.join(args.out, "last.pt")):
            raise CLIError(f"{os.path.join(args.out, 'last.pt')} exists: pass --resume to continue it or choose "
                           "another --out")
        return _train(args, resume, tree)


def _train(args, resume: str | None, tree=None) -> int:
    import torch

    from . import data as D
    from .models import build_model
    from .normalization import choose_normalization, describe
    from .outliers import synthesize_outliers
    from .trainer import TrainConfig, Trainer

    def build(num_classes: int, weights=None, mean=None, std=None):
        return build_model(args.model, num_classes, in_channels=args.channels, head=args.head, sigma=args.sigma,
                           weights=weights, width=args.width, input_mean=mean, input_std=std)

    checks.check_image_size(lambda: build(2), args.image_size, args.channels, args.model)
    mode = "L" if args.channels == 1 else "RGB"
    if args.seed is not None:  # None only when resuming a checkpoint made through the API without a seed
        torch.manual_seed(args.seed)

    def estimate():
        from torchvision import transforms as T
        plain = T.Compose([T.Resize(args.image_size), T.CenterCrop(args.image_size), T.ToTensor()])
        return D.estimate_mean_std(tree.dataset("id_train", plain, mode) if tree else
                                   D.dataset_from_path(args.data, plain, train=True, fmt=args.data_format,
                                                       root=args.root, mode=mode))

    try:
        norm = choose_normalization(args.channels, mean=args.mean, std=args.std, pretrained=bool(args.weights),
                                    estimate=estimate)
    except ValueError as err:
        raise CLIError(str(err))
    mean, std = norm["mean"], norm["std"]
    checks.check_normalisation(mean, std, args.channels)
    train_tf = D.build_transforms(args.image_size, mean, std, train=True)
    test_tf = D.build_transforms(args.image_size, mean, std, train=False)
    val_ds = None
    if tree is not None:
        ds = tree.dataset("id_train", train_tf, mode)
        val_ds = tree.dataset("id_val", test_tf, mode)
        num_classes = tree.benchmark.num_classes
    else:
        ds = D.dataset_from_path(args.data, train_tf, train=True, fmt=args.data_format, root=args.root, mode=mode)
        num_classes = checks.training_num_classes(ds, args.data)
    if args.val:  # an explicit --val wins over the benchmark's ID val list
        val_ds = D.dataset_from_path(args.val, test_tf, train=False, fmt=args.data_format, root=args.root, mode=mode)
    loader = D.make_loader(ds, args.batch_size, train=True, workers=args.workers, seed=args.seed)
    val_loader = D.make_loader(val_ds, args.batch_size, train=False, workers=args.workers) if val_ds else None
    model = build(num_classes, args.weights, mean, std)
    config = TrainConfig(epochs=args.epochs, ood_type=args.ood_type, p_inv=args.p_inv, alpha_min=args.alpha_min,
                         alpha_max=args.alpha_max, alpha_mode=args.alpha_mode, w=args.w, lr=args.lr,
                         momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                         fc_lr_factor=args.fc_lr_factor, min_lr=args.min_lr, saliency_mode=args.saliency_mode,
                         saliency_target=args.saliency_target, shuffle_rank=args.shuffle_rank,
                         outlier_loss=args.outlier_loss, energy_margin_in=args.energy_margin_in,
                         energy_margin_out=args.energy_margin_out, amp=args.amp, sync_bn=args.sync_bn,
                         seed=args.seed, compile=args.compile, channels_last=args.channels_last)
    try:
        config.validate()
    except ValueError as err:
        raise CLIError(str(err))
    extra = {"mean": list(map(float, mean)), "std": list(map(float, std)), "normalization": norm,
             "image_size": args.image_size,
             "channels": args.channels, "classes": [str(c) for c in getattr(ds, "classes", range(num_classes))],
             "data": tree.root if tree else os.path.abspath(args.data),
             "data_format": "openood" if tree else args.data_format, "batch_size": args.batch_size,
             "val": os.path.abspath(args.val) if args.val else None}
    if tree is not None:
        extra["benchmark"] = tree.benchmark.name
    trainer = Trainer(model, loader, config, val_loader=val_loader, out_dir=args.out, resume=resume,
                      device=args.device, progress=args.progress, extra=extra)
    if trainer.dist.is_main:
        print(describe(norm), flush=True)
    model = trainer.fit()
    if trainer.dist.is_main:
        print(f"checkpoint: {trainer.checkpoint_path}")
        if val_loader is not None and trainer.best_val_acc is not None:
            print(f"best checkpoint: {trainer.best_checkpoint_path} (ID val acc {100 * trainer.best_val_acc:.2f}%)")
        if args.figures and config.ood_type != "none":
            from .plots import outlier_grid
            from .trainer import unpack_batch

            x, y = unpack_batch(next(iter(loader)))
            x, y = x[:8].to(trainer.device), y[:8].to(trainer.device)
            xo = synthesize_outliers(model, x, y, ood_type=config.ood_type, p_inv=config.p_inv,
                                     alpha=config.alpha_max, alpha_mode=config.alpha_mode,
                                     saliency_mode=config.saliency_mode, saliency_target=config.saliency_target,
                                     shuffle_rank=config.shuffle_rank, generator=trainer.generator)
            path = outlier_grid(x, xo, os.path.join(args.out, "outliers.png"), mean, std,
                                title=f"{config.ood_type} outliers, alpha={config.alpha_max:g} ({config.alpha_mode})")
            if path:
                print(f"figure: {path}")
    import torch.distributed as dist

    if trainer.dist.enabled and dist.is_initialized():  # started from torchrun's environment by the trainer
        dist.barrier()
        dist.destroy_process_group()
    return 0


def cmd_eval(args) -> int:
    from .model_selection import resolve_checkpoint
    from .scorers import get_scorer

    _require_path(args.checkpoint, "checkpoint")
    try:
        ckpt_path = resolve_checkpoint(args.checkpoint, args.which)
    except ValueError as err:
        raise CLIError(str(err))
    if args.data_root:
        return _eval_benchmark(args, ckpt_path)
    if not args.id:
        raise CLIError("give the ID test data with --id, or --data-root DIR with --preset/--benchmark")
    _require_path(args.id, "ID data path")
    for _, path in args.ood + args.near + args.far:
        _require_path(path, "OOD data path")
    for path in (args.aps_id, args.aps_ood):
        if path:
            _require_path(path, "APS validation data path")
    if args.val:
        _require_path(args.val, "ID validation data path")
    if args.train:
        _require_path(args.train, "training data path")
    if not (args.ood or args.near or args.far):
        raise CLIError("give at least one OOD set with --ood, --near or --far")
    if bool(args.aps_id) != bool(args.aps_ood):
        raise CLIError("APS needs both --aps-id and --aps-ood")
    # Built here to check names and needs before any work; rebuilt with the model's std once it is loaded.
    probes = checks.parse_scorer_names(args.scorers, get_scorer)
    checks.check_scorers_have_train(probes, bool(args.train), bool(args.val or args.aps_id))
    names = [s.name for s in probes]
    with _claim(args.out, EVAL_OUTPUTS):
        return _evaluate(args, names, ckpt_path)


def _evaluate(args, names: list[str], ckpt_path: str) -> int:
    import torch

    from . import data as D
    from .checkpoint import load_model
    from .evaluator import evaluate
    from .model_selection import describe_checkpoint
    from .scorers import get_scorer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_model(ckpt_path, map_location="cpu")
    print(describe_checkpoint(ckpt_path, ckpt), flush=True)
    model.to(device)
    extra = ckpt.get("extra") or {}
    size, mean, std = extra.get("image_size", 32), extra.get("mean", [0.5] * 3), extra.get("std", [0.5] * 3)
    if getattr(model, "input_std", None) is None and "std" in extra:
        # Checkpoints from before the model carried its normalisation: ODIN / i-ODIN read it from here.
        model.input_mean, model.input_std = [float(v) for v in mean], [float(v) for v in std]
    mode = "L" if extra.get("channels", 3) == 1 else "RGB"
    tf = D.build_transforms(size, mean, std, train=False)

    def dataset(path: str, train: bool = False):
        return D.dataset_from_path(path, tf, train=train, fmt=args.data_format, root=args.root, mode=mode)

    def loader(ds):
        return D.make_loader(ds, args.batch_size, train=False, workers=args.workers)

    ood: dict = {}
    for name, path in args.ood:
        ood[name] = loader(dataset(path))
    for group, items in (("near", args.near), ("far", args.far)):
        if items:
            ood[group] = {name: loader(dataset(path)) for name, path in items}
    # ODIN / i-ODIN read the model's input_std.
    scorers = [get_scorer(key) for key in names]
    val_path = args.val or args.aps_id
    train_loader = loader(dataset(args.train, train=True)) if args.train else None
    val_loader = loader(dataset(val_path)) if val_path else None
    if args.aps_id:
        from .scorers import sweep

        val_id, val_ood = loader(dataset(args.aps_id)), loader(dataset(args.aps_ood))
        for scorer in scorers:
            if scorer.default_grid:
                res = sweep(scorer, model, val_id, val_ood, id_train_loader=train_loader, id_val_loader=val_loader)
                print(f"APS {scorer.name}: {res.best_params} (validation AUROC {100 * res.best_auroc:.2f})")
    id_ds = dataset(args.id)
    checks.warn_unlabelled_id(id_ds, args.id)
    table = evaluate(model, loader(id_ds), ood, scorers=scorers, id_train_loader=train_loader,
                     id_val_loader=val_loader, convention=args.convention, model_name=None)
    print(table)
    if args.out:
        table.to_csv(os.path.join(args.out, "results.csv"))
        table.to_json(os.path.join(args.out, "results.json"))
        from .plots import score_histograms
        paths = score_histograms(table.scores, args.out)
        print(f"results: {os.path.join(args.out, 'results.csv')}" + (f"; figures: {len(paths)}" if paths else ""))
    return 0


def _eval_benchmark(args, ckpt_path: str) -> int:
    """``ascood eval CKPT --benchmark NAME --data-root DIR``: APS on the benchmark's val split, then its test sets."""
    from .openood import tree_from_args
    from .scorers import get_scorer

    scorers = [s.name for s in checks.parse_scorer_names(args.scorers, get_scorer)]
    tree = tree_from_args(args, progress=True)
    with _claim(args.out, EVAL_OUTPUTS + ("aps.json",)):
        return _evaluate_benchmark(args, ckpt_path, tree, scorers)


def _evaluate_benchmark(args, ckpt_path: str, tree, scorers: list[str]) -> int:
    import torch

    from .checkpoint import load_model
    from .model_selection import describe_checkpoint
    from .reproduce import evaluate_on_benchmark

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_model(ckpt_path, map_location="cpu")
    print(describe_checkpoint(ckpt_path, ckpt), flush=True)
    model.to(device)
    table, aps = evaluate_on_benchmark(model, ckpt.get("extra") or {}, tree, scorers, batch_size=args.batch_size,
                                       workers=args.workers, out_dir=args.out)
    for name, res in aps.items():
        print(f"APS {name}: {res['params']} (validation AUROC {res['val_auroc']:.2f})")
    print(table)
    if tree.skipped:
        print("skipped (missing): " + ", ".join(tree.skipped_names()))
    return 0


def cmd_demo(args) -> int:
    # The demo lives in its own module (a separate piece of work); this is only the hook.
    if importlib.util.find_spec("ascood.demo") is None:
        print("ascood demo: error: the demo is not available in this install (module ascood.demo is missing)",
              file=sys.stderr)
        return 2
    rc = importlib.import_module("ascood.demo").main(args.args)
    return int(rc or 0)


def cmd_bench(args) -> int:
    bench_dir = "benchmarks"
    if not os.path.isdir(bench_dir):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
        if not os.path.isdir(here):
            raise CLIError("benchmarks/ not found (run from the repository root)")
        bench_dir = here
    cmd = [sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", *_bench_args(args.args)]
    return subprocess.call(cmd)


def _bench_args(args: list[str]) -> list[str]:
    """``--json FILE`` / ``--md FILE`` are short for pytest-benchmark's ``--benchmark-json`` and the suite's
    ``--bench-md``; everything else (``--quick``, ``--bench-device``, ``-k ...``) goes to pytest unchanged."""
    aliases = {"--json": "--benchmark-json", "--md": "--bench-md"}
    out = []
    for a in args:
        name, sep, value = a.partition("=")
        out.append(aliases[name] + sep + value if name in aliases else a)
    return out


def cmd_doctor(args) -> int:
    # The self-check lives in ascood_kernels.doctor (also `python -m ascood_kernels`); this is only the hook.
    from ascood_kernels.doctor import main as doctor_main

    return doctor_main(args.args)


def cmd_reproduce(args) -> int:
    from .reproduce import cmd

    return cmd(args, args.argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "reproduce": cmd_reproduce, "demo": cmd_demo, "bench": cmd_bench,
            "doctor": cmd_doctor}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ascood`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    head = 1 if argv[:1] == ["--debug"] else 0
    if len(argv) > head and argv[head] in ("demo", "bench", "doctor"):
        # Everything after demo/bench/doctor is passed through untouched (argparse would eat "-k", "--help", ...).
        args = argparse.Namespace(command=argv[head], args=argv[head + 1:], debug=bool(head))
    else:
        args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    args.argv = argv
    if args.command == "train":  # which flags were typed: on --resume the others come from the checkpoint
        args.explicit = checks.explicit_dests(build_parser, argv)
    try:
        with checks.one_line_warnings(args.command):
            if args.command in ("train", "eval") and (args.preset or getattr(args, "print_config", False)):
                from .presets import apply_cli_preset, print_config

                apply_cli_preset(args, argv, build_parser)
                if getattr(args, "print_config", False):
                    print_config(args)
                    return 0
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("ascood: interrupted", file=sys.stderr)
        return 130
    except CLIError as err:
        print(f"ascood {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one clear line for users; --debug for the traceback
        if args.debug:
            raise
        if getattr(err, "user_facing", False):  # e.g. every missing piece of a data tree: the whole message
            print(f"ascood {args.command}: error: {err}", file=sys.stderr)
            return 2
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ascood {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
