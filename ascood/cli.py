"""Command line: ``ascood train | eval | demo | bench`` (also ``python -m ascood``).

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
from ._argtypes import positive_int

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) so scripts see a single clear message."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


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


def build_parser() -> argparse.ArgumentParser:
    from .models import MODEL_NAMES
    from .outliers import ALPHA_MODES, OOD_TYPES, SALIENCY_MODES

    parser = _Parser(prog="ascood", description="ASCOOD out-of-distribution detection: train, evaluate, demo, bench.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier with ASCOOD (or the cross-entropy baseline)",
                       description="Train with ASCOOD: virtual outliers from the true-class saliency G = dz_y/dx, "
                                   "loss CE(z, y) + w * KL(U || softmax(z(x'))) on standardised features.")
    t.add_argument("data", help="training data: class-per-folder directory, image list file, or CIFAR batch directory")
    _add_data_args(t)
    t.add_argument("--out", default="runs/ascood", help="output directory: last.pt, config.json, log.jsonl, figures")
    t.add_argument("--model", choices=MODEL_NAMES, default="small_cnn",
                   help="backbone: small_cnn (tiny images), resnet18_32x32 (CIFAR-size), resnet18/34/50 (224 px)")
    t.add_argument("--width", type=positive_int, help="channel width of small_cnn / resnet18_32x32")
    t.add_argument("--weights", help="local file with backbone weights (e.g. ImageNet ResNet); never downloaded")
    t.add_argument("--image-size", type=positive_int, default=32, help="images are resized/cropped to this size (default 32)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = greyscale, 3 = RGB (default 3)")
    t.add_argument("--mean", type=_floats, help="normalisation mean per channel (default: estimated from the data)")
    t.add_argument("--std", type=_floats, help="normalisation std per channel (default: estimated from the data)")
    t.add_argument("--epochs", type=positive_int, default=100, help="training epochs (paper: 100 from scratch, 30 fine-tuning)")
    t.add_argument("--ood-type", choices=OOD_TYPES, default="gradient",
                   help="outlier synthesis: gradient = x + alpha * G on the invariant (top |G|) elements (the "
                        "paper's method); shuffle = permute the most salient pixels; gaussian = alpha * N(0, 1); "
                        "none = plain cross-entropy baseline")
    t.add_argument("--p-inv", type=_fraction, default=0.1,
                   help="p_inv: fraction of input elements with the largest |G| treated as invariant features "
                        "and perturbed (paper default 0.1; CIFAR-10 shuffle 0.15); in (0, 1]")
    t.add_argument("--alpha-max", type=_nonneg, default=300.0,
                   help="alpha at the first epoch: step size of x' = x + alpha * G (paper: 300 for CIFAR, Waterbirds)")
    t.add_argument("--alpha-min", type=_nonneg, default=30.0,
                   help="alpha decays linearly per epoch from alpha_max towards alpha_min (paper: 30)")
    t.add_argument("--alpha-mode", choices=ALPHA_MODES, default="absolute",
                   help="absolute = the paper's x + alpha * G; relative = G rescaled per sample so the perturbed "
                        "elements move by alpha on average, in normalised-input units (one alpha for any model/data)")
    t.add_argument("--w", type=_nonneg, default=1.0,
                   help="w: weight of the outlier term KL(U || softmax(z(x'))) (paper default 1.0; CIFAR-100 5.0)")
    t.add_argument("--sigma", type=_positive, default=0.5,
                   help="sigma: scale of the standardised feature h~ = (h - mean) / std * sigma (paper default 0.5)")
    t.add_argument("--head", choices=("zscore", "linear"), default="zscore",
                   help="zscore = ASCOOD's standardised-feature head; linear = plain head (baseline)")
    t.add_argument("--saliency-mode", choices=SALIENCY_MODES, default="eval",
                   help="network mode while computing G (the reference uses eval)")
    t.add_argument("--lr", type=_positive, default=0.1, help="SGD learning rate (paper: 0.1 from scratch, 0.01 fine-tuning)")
    t.add_argument("--momentum", type=_nonneg, default=0.9, help="SGD momentum (0.9)")
    t.add_argument("--weight-decay", type=_nonneg, default=5e-4, help="SGD weight decay (5e-4)")
    t.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov")
    t.add_argument("--fc-lr-factor", type=_positive, default=1.0,
                   help="learning-rate multiplier of the final linear layer (paper: 1.0; CIFAR-100 0.05)")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on with CUDA)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (both passes; Inductor)")
    t.add_argument("--channels-last", action="store_true", help="channels-last model and batches")
    t.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from a checkpoint (default: OUT/last.pt)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    t.add_argument("--no-figures", dest="figures", action="store_false", help="skip the outlier-grid figure")

    e = sub.add_parser("eval", help="evaluate OOD detection of a trained checkpoint",
                       description="Scores ID and OOD sets with post-hoc scorers; FPR@95, AUROC, AUPR-In, AUPR-Out x100.")
    e.add_argument("checkpoint", help="checkpoint written by `ascood train` (last.pt)")
    e.add_argument("--id", required=True, help="ID test data (folder, list, or CIFAR directory: its test batch)")
    e.add_argument("--ood", action="append", type=_named_path, default=[], metavar="[NAME=]PATH",
                   help="an OOD set (repeatable); folder of images, class folders, list or CIFAR directory")
    e.add_argument("--near", action="append", type=_named_path, default=[], metavar="[NAME=]PATH",
                   help="a near-OOD set (repeatable; reported with a near-OOD mean)")
    e.add_argument("--far", action="append", type=_named_path, default=[], metavar="[NAME=]PATH",
                   help="a far-OOD set (repeatable; reported with a far-OOD mean)")
    e.add_argument("--train", help="ID training data, needed by scorers that fit statistics (knn, mds, react, ...)")
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

    d = sub.add_parser("demo", help="run the bundled demo (arguments are passed to it)", add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="run the benchmark suite: pytest benchmarks/ --benchmark-only [ARGS] "
                       "(--quick, --json FILE, --md FILE, --bench-device cpu|cuda)",
                       add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# -- commands ------------------------------------------------------------------------------------------
def _require_path(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{what} not found: {path}")


def _num_classes(ds) -> int:
    classes = getattr(ds, "classes", None)
    if classes:
        return len(classes)
    targets = [t for t in getattr(ds, "targets", []) if t >= 0]
    if not targets:
        raise CLIError("training data has no labels")
    return max(targets) + 1


def cmd_train(args) -> int:
    import torch

    from . import data as D
    from .models import build_model
    from .outliers import synthesize_outliers
    from .trainer import TrainConfig, Trainer

    _require_path(args.data, "data path")
    if args.weights:
        _require_path(args.weights, "weights file")
    if args.alpha_min > args.alpha_max:
        raise CLIError(f"--alpha-min ({args.alpha_min}) must be <= --alpha-max ({args.alpha_max})")
    resume = None
    if args.resume is not None:
        resume = args.resume or os.path.join(args.out, "last.pt")
        _require_path(resume, "checkpoint")
    elif os.path.exists(os.path.join(args.out, "last.pt")):
        raise CLIError(f"{os.path.join(args.out, 'last.pt')} exists: pass --resume to continue it or choose "
                       "another --out")
    mode = "L" if args.channels == 1 else "RGB"
    torch.manual_seed(args.seed)
    if args.mean is None or args.std is None:
        from torchvision import transforms as T
        plain = T.Compose([T.Resize(args.image_size), T.CenterCrop(args.image_size), T.ToTensor()])
        est = D.estimate_mean_std(D.dataset_from_path(args.data, plain, train=True, fmt=args.data_format,
                                                      root=args.root, mode=mode))
    mean = args.mean or est[0]
    std = args.std or est[1]
    if len(mean) != args.channels or len(std) != args.channels:
        raise CLIError(f"--mean/--std need {args.channels} values")
    ds = D.dataset_from_path(args.data, D.build_transforms(args.image_size, mean, std, train=True), train=True,
                             fmt=args.data_format, root=args.root, mode=mode)
    num_classes = _num_classes(ds)
    loader = D.make_loader(ds, args.batch_size, train=True, workers=args.workers, seed=args.seed)
    model = build_model(args.model, num_classes, in_channels=args.channels, head=args.head, sigma=args.sigma,
                        weights=args.weights, width=args.width)
    config = TrainConfig(epochs=args.epochs, ood_type=args.ood_type, p_inv=args.p_inv, alpha_min=args.alpha_min,
                         alpha_max=args.alpha_max, alpha_mode=args.alpha_mode, w=args.w, lr=args.lr,
                         momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                         fc_lr_factor=args.fc_lr_factor, saliency_mode=args.saliency_mode, amp=args.amp,
                         seed=args.seed, compile=args.compile, channels_last=args.channels_last)
    extra = {"mean": list(map(float, mean)), "std": list(map(float, std)), "image_size": args.image_size,
             "channels": args.channels, "classes": [str(c) for c in getattr(ds, "classes", range(num_classes))],
             "data": os.path.abspath(args.data), "data_format": args.data_format}
    trainer = Trainer(model, loader, config, out_dir=args.out, resume=resume, device=args.device,
                      progress=args.progress, extra=extra)
    model = trainer.fit()
    if trainer.dist.is_main:
        print(f"checkpoint: {trainer.checkpoint_path}")
        if args.figures and config.ood_type != "none":
            from .plots import outlier_grid
            from .trainer import unpack_batch

            x, y = unpack_batch(next(iter(loader)))
            x, y = x[:8].to(trainer.device), y[:8].to(trainer.device)
            xo = synthesize_outliers(model, x, y, ood_type=config.ood_type, p_inv=config.p_inv,
                                     alpha=config.alpha_max, alpha_mode=config.alpha_mode,
                                     saliency_mode=config.saliency_mode, generator=trainer.generator)
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
    import torch

    from . import data as D
    from .checkpoint import load_model
    from .evaluator import evaluate
    from .scorers import get_scorer

    _require_path(args.checkpoint, "checkpoint")
    _require_path(args.id, "ID data path")
    for _, path in args.ood + args.near + args.far:
        _require_path(path, "OOD data path")
    for path in (args.aps_id, args.aps_ood):
        if path:
            _require_path(path, "APS validation data path")
    if args.train:
        _require_path(args.train, "training data path")
    if not (args.ood or args.near or args.far):
        raise CLIError("give at least one OOD set with --ood, --near or --far")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_model(args.checkpoint, map_location="cpu")
    model.to(device)
    extra = ckpt.get("extra") or {}
    size, mean, std = extra.get("image_size", 32), extra.get("mean", [0.5] * 3), extra.get("std", [0.5] * 3)
    mode = "L" if extra.get("channels", 3) == 1 else "RGB"
    tf = D.build_transforms(size, mean, std, train=False)

    def loader(path: str, train: bool = False):
        ds = D.dataset_from_path(path, tf, train=train, fmt=args.data_format, root=args.root, mode=mode)
        return D.make_loader(ds, args.batch_size, train=False, workers=args.workers)

    ood: dict = {}
    for name, path in args.ood:
        ood[name] = loader(path)
    for group, items in (("near", args.near), ("far", args.far)):
        if items:
            ood[group] = {name: loader(path) for name, path in items}
    scorers = []
    for name in [s for s in args.scorers.split(",") if s.strip()]:
        key = name.strip().lower()
        kw = {"std": std} if key in ("odin", "iodin", "i-odin") else {}
        try:
            scorers.append(get_scorer(key, **kw))
        except ValueError as err:
            raise CLIError(str(err))
    train_loader = loader(args.train, train=True) if args.train else None
    if args.aps_id or args.aps_ood:
        if not (args.aps_id and args.aps_ood):
            raise CLIError("APS needs both --aps-id and --aps-ood")
        from .scorers import sweep

        val_id, val_ood = loader(args.aps_id), loader(args.aps_ood)
        for scorer in scorers:
            if scorer.default_grid:
                if scorer.needs_fit and train_loader is None:
                    raise CLIError(f"scorer {scorer.name} needs --train to fit")
                res = sweep(scorer, model, val_id, val_ood, id_train_loader=train_loader)
                print(f"APS {scorer.name}: {res.best_params} (validation AUROC {100 * res.best_auroc:.2f})")
    table = evaluate(model, loader(args.id), ood, scorers=scorers, id_train_loader=train_loader,
                     convention=args.convention, model_name=None)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        table.to_csv(os.path.join(args.out, "results.csv"))
        table.to_json(os.path.join(args.out, "results.json"))
        from .plots import score_histograms
        paths = score_histograms(table.scores, args.out)
        print(f"results: {os.path.join(args.out, 'results.csv')}" + (f"; figures: {len(paths)}" if paths else ""))
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ascood`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    head = 1 if argv[:1] == ["--debug"] else 0
    if len(argv) > head and argv[head] in ("demo", "bench"):
        # Everything after demo/bench is passed through untouched (argparse would eat "-k", "--help", ...).
        args = argparse.Namespace(command=argv[head], args=argv[head + 1:], debug=bool(head))
    else:
        args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
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
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"ascood {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
