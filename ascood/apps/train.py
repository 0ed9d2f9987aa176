"""``ascood train``: train a classifier with ASCOOD (or the cross-entropy baseline) on a folder, list or tree.

    ascood train data/train --out runs/mine --epochs 30 --val data/val

The parser lives next to the code it feeds: :func:`add_parser` registers the
flags, :func:`run` checks them before any work and trains inside the claimed
``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import checks
from .argtypes import finite, floats, fraction, model_name, non_negative, positive, positive_int
from .common_args import add_data_args, link_roots, tree_from_args
from .presets import add_benchmark_args

__all__ = ["add_parser", "run", "TRAIN_OUTPUTS"]

#: What a training run writes into --out (checked and claimed before work starts).
TRAIN_OUTPUTS = ("last.pt", "best.pt", "config.json", "log.jsonl", "outliers.png")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``ascood train`` on the top-level parser's subcommands."""
    t = sub.add_parser("train", help="train a classifier with ASCOOD (or the cross-entropy baseline)",
                       description="Train with ASCOOD: virtual outliers from the true-class saliency G = dz_y/dx, "
                                   "loss CE(z, y) + w * KL(U || softmax(z(x'))) on standardised features.")
    t.add_argument("data", nargs="?", help="training data: class-per-folder directory, image list file, or CIFAR batch "
                   "directory (not needed with --data-root)")
    add_data_args(t)
    t.add_argument("--val", metavar="PATH",
                   help="ID validation data (same formats as DATA): its accuracy is reported every epoch and the "
                        "best epoch is kept as OUT/best.pt beside last.pt (the reference's model selection)")
    add_benchmark_args(t, "train")
    t.add_argument("--out", default="runs/ascood",
                   help="output directory: last.pt (best.pt with --val), config.json, log.jsonl, figures "
                        "(default %(default)s); locked while the run lasts")
    _add_model_args(t)
    t.add_argument("--epochs", type=positive_int, default=100, help="training epochs (default %(default)s; paper: 100 from scratch, 30 fine-tuning)")
    _add_method_args(t)
    _add_optimizer_args(t)
    t.add_argument("--compile", action="store_true", help="torch.compile the model (both passes; Inductor)")
    t.add_argument("--channels-last", action="store_true", help="channels-last model and batches")
    t.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from a checkpoint (default: OUT/last.pt); flags not given take the checkpoint's "
                        "saved values, a flag given with another value is an error")
    t.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (the one summary line per epoch is still printed)")
    t.add_argument("--no-figures", dest="figures", action="store_false", help="skip the outlier-grid figure")
    return t


def _add_model_args(t: argparse.ArgumentParser) -> None:
    from ..nets.registry import MODEL_NAMES

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
    t.add_argument("--mean", type=floats,
                   help="normalisation mean per channel (default: ImageNet's with --weights, as the reference for "
                        "fine-tuning; else estimated from the training data); printed and stored in the checkpoint")
    t.add_argument("--std", type=floats, help="normalisation std per channel (default: as --mean)")

def _add_method_args(t: argparse.ArgumentParser) -> None:
    from ..nets.ascoodnet import HEADS
    from ..training.losses import ENERGY_MARGIN_IN, ENERGY_MARGIN_OUT, OUTLIER_LOSSES
    from ..training.outliers import ALPHA_MODES, OOD_TYPES, SALIENCY_MODES, SALIENCY_TARGETS, SHUFFLE_RANKS

    t.add_argument("--ood-type", choices=OOD_TYPES, default="gradient",
                   help="outlier synthesis: gradient = x + alpha * G on the invariant (top |G|) elements (the "
                        "paper's method); shuffle = permute the most salient pixels; gaussian = alpha * N(0, 1); "
                        "none = plain cross-entropy baseline (default %(default)s)")
    t.add_argument("--p-inv", type=fraction, default=0.1,
                   help="p_inv: fraction of input elements with the largest |G| treated as invariant features "
                        "and perturbed; in (0, 1] (default %(default)s, the paper's; CIFAR-10 shuffle 0.15)")
    t.add_argument("--alpha-max", type=finite, default=300.0,
                   help="alpha_max: step size of x' = x + alpha * G at the start (default %(default)s, the paper's for CIFAR "
                        "and Waterbirds); negative values with --alpha-min <= 0 subtract the gradient instead "
                        "(the paper's Table 5 ablation 'gradient subtraction')")
    t.add_argument("--alpha-min", type=finite, default=30.0,
                   help="alpha_min (default %(default)s): alpha of epoch e (1-based) of E is (max - min) * (1 - e/E) + min, "
                        "so the last epoch uses exactly alpha_min; same sign as --alpha-max, |min| <= |max|")
    t.add_argument("--alpha-mode", choices=ALPHA_MODES, default="absolute",
                   help="absolute = the paper's x + alpha * G; relative = G rescaled per sample so the perturbed "
                        "elements move by alpha on average, in normalised-input units (one alpha for any model/data) "
                        "(default %(default)s)")
    t.add_argument("--w", type=non_negative, default=1.0,
                   help="w: weight of the outlier term KL(U || softmax(z(x'))) (default %(default)s, the paper's; "
                        "CIFAR-100 5.0)")
    t.add_argument("--sigma", type=positive, default=0.5,
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
                        "the authors' train script); abs = sum of |G_c| (picks a different set; not the paper's); "
                        "random = the shuffled pixels chosen at random, no saliency (the authors' published "
                        "CIFAR-10 run, p_inv 0.2)")
    t.add_argument("--outlier-loss", choices=OUTLIER_LOSSES, default="kl",
                   help="outlier term L_OOD: kl = w * KL(U || softmax(z(x'))) (default, the paper's); vos = w * "
                        "the VOS / Dream-OOD energy loss, a learned logistic head Linear(1,512)-ReLU-Linear(512,2) on "
                        "logsumexp(z) telling ID from outliers (the paper's Table 6 L_energy, OpenOOD's ASCOOD "
                        "kl_div: False; the head is trained with the network and saved in last.pt/best.pt, never "
                        "used to score); energy = w * Liu et al. 2020's squared-hinge energy loss (margins below)")
    t.add_argument("--energy-margin-in", type=finite, default=ENERGY_MARGIN_IN,
                   help=f"--outlier-loss energy: ID energy margin m_in (default {ENERGY_MARGIN_IN:g}, Liu et al.'s)")
    t.add_argument("--energy-margin-out", type=finite, default=ENERGY_MARGIN_OUT,
                   help=f"--outlier-loss energy: outlier energy margin m_out (default {ENERGY_MARGIN_OUT:g}, "
                        "Liu et al.'s)")

def _add_optimizer_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--lr", type=positive, default=0.1, help="SGD learning rate (default %(default)s; paper: 0.1 from scratch, 0.01 fine-tuning)")
    t.add_argument("--momentum", type=non_negative, default=0.9, help="SGD momentum (default %(default)s)")
    t.add_argument("--weight-decay", type=non_negative, default=5e-4, help="SGD weight decay (default %(default)s)")
    t.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov")
    t.add_argument("--fc-lr-factor", type=positive, default=1.0,
                   help="learning-rate multiplier of the final linear layer (default %(default)s; paper: 1.0; CIFAR-100 0.05)")
    t.add_argument("--min-lr", type=positive, default=1e-6,
                   help="absolute lr at the end of the per-step cosine schedule (default 1e-6, the reference's; "
                        "one multiplier for all layers, so the final layer ends at min_lr * fc_lr_factor)")
    t.add_argument("--amp", action="store_true",
                   help="mixed precision for the training forward/backward (CUDA only; off by default: the paper's "
                        "numbers are fp32; the saliency G is computed in fp32 either way)")
    t.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under multi-GPU torchrun keep per-GPU BatchNorm (default: SyncBatchNorm, as the reference; "
                        "CPU/gloo runs always keep BatchNorm, torch's SyncBatchNorm needs a GPU)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


# -- the command ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """``ascood train``: every flag checked, ``--out`` claimed, then the run (or its resumption)."""
    from ..training.checkpoint import load_checkpoint
    from ..training.outliers import check_alpha_range
    from ..training.resume import fill_from_checkpoint
    from .presets import pretrained_weights_error

    err = pretrained_weights_error(args.resolved, args.weights) if getattr(args, "resolved", None) else None
    if err:
        raise checks.InputError(err)
    tree = tree_from_args(args, progress=args.progress)
    if tree is None:
        if args.data is None:
            raise checks.InputError("give the training data path, or --data-root DIR with --preset/--benchmark")
        checks.require_path(args.data, "data path")
    if args.val:
        checks.require_path(args.val, "validation data path")
    if args.weights:
        checks.require_path(args.weights, "weights file")
    resume = None
    if args.resume is not None:
        resume = args.resume or os.path.join(args.out, "last.pt")
        checks.require_path(resume, "checkpoint")
        # Flags not typed now take the checkpoint's values: `--resume` alone continues the saved run.
        filled = fill_from_checkpoint(args, getattr(args, "explicit", set()), load_checkpoint(resume))
        if filled:
            print(f"resuming {resume} with its saved settings for: {', '.join(filled)}", file=sys.stderr)
    try:
        check_alpha_range(args.alpha_min, args.alpha_max, names=("--alpha-min", "--alpha-max"))
    except ValueError as err:
        raise checks.InputError(str(err))
    checks.check_normalisation(args.mean, args.std, args.channels)
    checks.check_out_outside_data(args.out, [("DATA", args.data), ("--val", args.val)])
    with checks.claim_out(args.out, TRAIN_OUTPUTS):
        if resume is None and os.path.exists(os.path.join(args.out, "last.pt")):
            raise checks.InputError(f"{os.path.join(args.out, 'last.pt')} exists: pass --resume to continue it or "
                                    "choose another --out")
        return _train(args, resume, tree)


def _build(args, num_classes: int, weights=None, mean=None, std=None):
    from ..nets.registry import build_model

    return build_model(args.model, num_classes, in_channels=args.channels, head=args.head, sigma=args.sigma,
                       weights=weights, width=args.width, input_mean=mean, input_std=std)


def _normalisation(args, tree, mode: str) -> dict:
    """--mean/--std, ImageNet's for pretrained weights, or estimated from the training data."""
    from ..data import datasets as D
    from ..data.normalization import choose_normalization

    def estimate():
        from torchvision import transforms as T
        plain = T.Compose([T.Resize(args.image_size), T.CenterCrop(args.image_size), T.ToTensor()])
        return D.estimate_mean_std(tree.dataset("id_train", plain, mode) if tree else
                                   D.dataset_from_path(args.data, plain, train=True, fmt=args.data_format,
                                                       root=args.root, mode=mode,
                                                       allowed_roots=link_roots(args, [args.data, args.val])))

    try:
        norm = choose_normalization(args.channels, mean=args.mean, std=args.std, pretrained=bool(args.weights),
                                    estimate=estimate)
    except ValueError as err:
        raise checks.InputError(str(err))
    checks.check_normalisation(norm["mean"], norm["std"], args.channels)
    return norm


def _datasets(args, tree, mean, std, mode: str):
    """(train dataset, val dataset or None, class names): --val is matched to the training classes by name."""
    from ..data import datasets as D
    from ..data.classes import class_names, match_classes

    train_tf = D.build_transforms(args.image_size, mean, std, train=True)
    test_tf = D.build_transforms(args.image_size, mean, std, train=False)
    val_ds = None
    if tree is not None:
        ds = tree.dataset("id_train", train_tf, mode)
        val_ds = tree.dataset("id_val", test_tf, mode)
        num_classes = tree.benchmark.num_classes
    else:
        ds = D.dataset_from_path(args.data, train_tf, train=True, fmt=args.data_format, root=args.root, mode=mode,
                                 allowed_roots=link_roots(args, [args.data, args.val]))
        num_classes = checks.training_num_classes(ds, args.data)
    classes = class_names(ds) or [str(i) for i in range(num_classes)]
    if args.val:  # an explicit --val wins over the benchmark's ID val list
        val_ds = D.dataset_from_path(args.val, test_tf, train=False, fmt=args.data_format, root=args.root, mode=mode,
                                     allowed_roots=link_roots(args, [args.data, args.val]))
    if val_ds is not None:
        what = f"--val {args.val}" if args.val else "the benchmark's ID val list"
        checks.check_distinct_data(ds, f"DATA {args.data}" if tree is None else "the benchmark's ID train list",
                                   val_ds, what, "validation accuracy and best.pt would measure the training "
                                   "images, not held-out ones")
        try:
            note = match_classes(val_ds, classes, what=what).describe(what)
        except D.DataError as err:
            raise checks.InputError(str(err)) from None
        if note:
            print(f"note: {note}", file=sys.stderr)
    return ds, val_ds, classes


def _config(args):
    from ..training.trainer import TrainConfig

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
        raise checks.InputError(str(err))
    return config


def _train(args, resume: str | None, tree=None) -> int:
    import torch

    from ..data import datasets as D
    from ..data.classes import fingerprint
    from ..data.normalization import describe
    from ..training.trainer import Trainer, few_steps_note

    checks.check_image_size(lambda: _build(args, 2), args.image_size, args.channels, args.model)
    mode = "L" if args.channels == 1 else "RGB"
    if args.seed is not None:  # None only when resuming a checkpoint made through the API without a seed
        torch.manual_seed(args.seed)
    norm = _normalisation(args, tree, mode)
    mean, std = norm["mean"], norm["std"]
    ds, val_ds, classes = _datasets(args, tree, mean, std, mode)
    num_classes = len(classes)
    loader = D.make_loader(ds, args.batch_size, train=True, workers=args.workers, seed=args.seed)
    val_loader = D.make_loader(val_ds, args.batch_size, train=False, workers=args.workers) if val_ds else None
    model = _build(args, num_classes, args.weights, mean, std)
    config = _config(args)
    extra = {"mean": list(map(float, mean)), "std": list(map(float, std)), "normalization": norm,
             "image_size": args.image_size,
             "channels": args.channels, "classes": classes,
             "num_images": len(ds), "data_fingerprint": fingerprint(ds),
             "data": tree.root if tree else os.path.abspath(args.data),
             "data_format": "openood" if tree else args.data_format, "batch_size": args.batch_size,
             "val": os.path.abspath(args.val) if args.val else None}
    if tree is not None:
        extra["benchmark"] = tree.benchmark.name
    trainer = Trainer(model, loader, config, val_loader=val_loader, out_dir=args.out, resume=resume,
                      device=args.device, progress=args.progress, extra=extra, epoch_lines=True)
    if trainer.dist.is_main:
        print(describe(norm), flush=True)
        note = few_steps_note(len(ds), args.batch_size, len(trainer.loader))
        if note:
            warnings.warn(note, stacklevel=2)
    model = trainer.fit()
    if trainer.dist.is_main:
        print(f"checkpoint: {trainer.checkpoint_path}")
        if val_loader is not None and trainer.best_val_acc is not None:
            print(f"best checkpoint: {trainer.best_checkpoint_path} (ID val acc {100 * trainer.best_val_acc:.2f}%)")
        if args.figures and config.ood_type != "none":
            _outlier_figure(args, trainer, model, loader, mean, std)
    import torch.distributed as dist

    if trainer.dist.enabled and dist.is_initialized():  # started from torchrun's environment by the trainer
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _outlier_figure(args, trainer, model, loader, mean, std) -> None:
    """OUT/outliers.png: eight training images beside their virtual outliers at alpha_max."""
    from ..data.datasets import unpack_batch
    from ..scoring.plots import outlier_grid
    from ..training.outliers import synthesize_outliers

    config = trainer.config
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
