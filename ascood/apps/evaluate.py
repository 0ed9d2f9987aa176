"""``ascood eval``: OOD detection of a trained checkpoint, on folders/lists or an OpenOOD benchmark tree.

    ascood eval runs/mine --id data/test --ood far=data/ood_images --train data/train
    ascood eval runs/mine --preset cifar10 --data-root ~/openood/data
    ascood eval --model openood:resnet18_32x32 --weights best.ckpt --preprocessing cifar10 --id ... --ood ...

Every path and scorer name is checked, and ``--out`` claimed, before a model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import checks
from .argtypes import named_path
from .common_args import (add_data_args, add_feature_store_args, add_openood_args, default_features_dir,
                          feature_cache, feature_store_from_args, link_roots, openood_model_from_args,
                          store_checkpoint, tree_from_args)
from .presets import add_benchmark_args
from .torchrun import claim_on_rank0, require_store, torchrun_ranks

__all__ = ["add_parser", "run", "EVAL_OUTPUTS"]

#: What an evaluation writes into --out (checked and claimed before work starts).
EVAL_OUTPUTS = ("results.csv", "results.json")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``ascood eval`` on the top-level parser's subcommands."""
    from ..training.model_selection import CHECKPOINT_CHOICES

    e = sub.add_parser("eval", help="evaluate OOD detection of a trained checkpoint",
                       description="Scores ID and OOD sets with post-hoc scorers; FPR@95, AUROC, AUPR-In, AUPR-Out x100.")
    e.add_argument("checkpoint", nargs="?",
                   help="checkpoint written by `ascood train` (a .pt file) or its run directory (then best.pt when "
                        "present, else last.pt; see --which); or none, with --model openood:ARCH --weights FILE")
    e.add_argument("--which", choices=CHECKPOINT_CHOICES,
                   help="with a run directory: best = best ID val accuracy (the reference's model selection), "
                        "last = the final epoch")
    e.add_argument("--id", help="ID test data (folder, list, or CIFAR directory: its test batch); with --data-root: "
                   "the benchmark's ID test list")
    e.add_argument("--ood", action="append", type=named_path, default=[], metavar="[NAME=]PATH",
                   help="an OOD set (repeatable); folder of images, class folders, list or CIFAR directory")
    e.add_argument("--near", action="append", type=named_path, default=[], metavar="[NAME=]PATH",
                   help="a near-OOD set (repeatable; reported with a near-OOD mean)")
    e.add_argument("--far", action="append", type=named_path, default=[], metavar="[NAME=]PATH",
                   help="a far-OOD set (repeatable; reported with a far-OOD mean)")
    e.add_argument("--train", help="ID training data, needed by scorers that fit statistics (knn, mds, vim, ...)")
    e.add_argument("--val", metavar="PATH",
                   help="ID validation data that react (clip percentile) and tempscale (T) are fitted on, as OpenOOD "
                        "(default: --aps-id)")
    e.add_argument("--scorers", default="msp,mls,ebo,odin,scale",
                   help="comma-separated scorers: msp, tempscale, odin, iodin (i-ODIN), ebo, mls, gen, entropy, klm, "
                        "react, ash, scale, dice, gradnorm, knn, mds, rmds, vim, nnguide, relation, she "
                        "(default msp,mls,ebo,odin,scale)")
    e.add_argument("--convention", choices=("openood", "odin"), default="openood",
                   help="metric convention: openood (OOD positive, the paper's) or odin (ID positive)")
    e.add_argument("--out", help="directory for results.csv, results.json and score histograms")
    e.add_argument("--aps-id", metavar="PATH",
                   help="APS: ID validation data; with --aps-ood, each scorer's hyperparameters (e.g. i-ODIN's "
                        "temperature T and step eps) are chosen by AUROC on this validation split, never the test sets")
    e.add_argument("--aps-ood", metavar="PATH", help="APS: OOD validation data (see --aps-id)")
    add_data_args(e)
    add_feature_store_args(e)
    add_benchmark_args(e, "eval")
    add_openood_args(e, "CHECKPOINT")
    return e


# -- the command ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """``ascood eval``: checks, the claim of --out, then the evaluation."""
    from ..scoring.scorers import get_scorer
    from ..training.model_selection import resolve_checkpoint

    # An OpenOOD checkpoint (--model openood:ARCH --weights FILE) is read and checked here, before any data.
    ckpt_path = openood_model_from_args(args, args.checkpoint, "CHECKPOINT")
    if ckpt_path is None:
        checks.require_path(args.checkpoint, "checkpoint")
        try:
            ckpt_path = resolve_checkpoint(args.checkpoint, args.which)
        except ValueError as err:
            raise checks.InputError(str(err))
        args.feature_store = feature_store_from_args(args, default_features_dir(ckpt_path))
    else:
        if args.which:
            raise checks.InputError("--which picks a checkpoint of an ascood run directory; it does not apply to "
                                    "--model")
        # An OpenOOD checkpoint lives in the user's folder, not an ascood run: no store is made beside it unless
        # --features DIR asks for one (keyed by the --weights file's sha256).
        args.feature_store = feature_store_from_args(args, None)
    if args.data_root:
        return _eval_benchmark(args, ckpt_path)
    if not args.id:
        raise checks.InputError("give the ID test data with --id, or --data-root DIR with --preset/--benchmark")
    checks.require_path(args.id, "ID data path")
    for _, path in args.ood + args.near + args.far:
        checks.require_path(path, "OOD data path")
    for path in (args.aps_id, args.aps_ood):
        if path:
            checks.require_path(path, "APS validation data path")
    if args.val:
        checks.require_path(args.val, "ID validation data path")
    if args.train:
        checks.require_path(args.train, "training data path")
    if not (args.ood or args.near or args.far):
        raise checks.InputError("give at least one OOD set with --ood, --near or --far")
    checks.check_ood_names(args.ood, args.near, args.far)
    checks.check_out_outside_data(args.out, [("--id", args.id), ("--train", args.train), ("--val", args.val),
                                             ("--aps-id", args.aps_id), ("--aps-ood", args.aps_ood)]
                                  + [(f"--ood {n}", p) for n, p in args.ood + args.near + args.far])
    if bool(args.aps_id) != bool(args.aps_ood):
        raise checks.InputError("APS needs both --aps-id and --aps-ood")
    # Built here to check names and needs before any work; rebuilt with the model's std once it is loaded.
    probes = checks.parse_scorer_names(args.scorers, get_scorer)
    checks.check_scorers_have_train(probes, bool(args.train), bool(args.val or args.aps_id))
    names = [s.name for s in probes]
    with torchrun_ranks(args.device) as ranks:
        require_store(args.feature_store, ranks)
        with claim_on_rank0(ranks, lambda: checks.claim_out(args.out, EVAL_OUTPUTS)):
            return _evaluate(args, names, ckpt_path, ranks)


def _load_model(args, ckpt_path, ranks=None):
    """(model on --device (under torchrun: this rank's GPU), checkpoint dict); prints which checkpoint it is.
    ``ckpt_path``: an ascood checkpoint's path, or the (model, checkpoint-like dict) of an OpenOOD checkpoint
    already read."""
    import torch

    from ..training.checkpoint import load_model
    from ..training.model_selection import describe_checkpoint

    device = ranks.device(args.device) if ranks is not None else \
        torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(ckpt_path, tuple):
        model, ckpt = ckpt_path
        print(describe_openood(ckpt["openood"], ckpt["extra"]), flush=True)
        return model.to(device), ckpt
    model, ckpt = load_model(ckpt_path, map_location="cpu")
    print(describe_checkpoint(ckpt_path, ckpt), flush=True)
    return model.to(device), ckpt


def describe_openood(source: dict, extra: dict) -> str:
    """'scoring OpenOOD checkpoint FILE (openood:ARCH: ..., C classes; preprocessing NAME)'."""
    kind = (f"ASCOODNet wrapper, z-score head, sigma {source['sigma']:g}" if source["ascood_wrapper"]
            else "plain network, linear head")
    return (f"scoring OpenOOD checkpoint {source['file']} ({source['model']}: {kind}, {source['num_classes']} classes; "
            f"preprocessing {extra['normalization']['source']})")


def _model_classes(model, extra: dict) -> list[str]:
    """The checkpoint's class names (indices for checkpoints from before names were stored)."""
    n = int(getattr(model, "num_classes", 0) or 0)
    classes = [str(c) for c in extra.get("classes") or range(n)]
    if n and len(classes) != n:
        raise checks.InputError(f"the checkpoint names {len(classes)} classes but its model has {n} outputs")
    return classes


def _match_labelled(ds, classes: list[str], what: str) -> None:
    """Relabel a labelled split onto the model's classes by name (a subset is said; an unknown class is an error)."""
    from ..data.classes import is_labelled, match_classes
    from ..data.datasets import DataError

    if not is_labelled(ds):
        return
    try:
        note = match_classes(ds, classes, what=what).describe(what)
    except DataError as err:
        raise checks.InputError(str(err)) from None
    if note:
        print(f"note: {note}", file=sys.stderr)


def _check_fit_labels(scorers, split: str, ds, flag: str, path: str) -> None:
    """Scorers whose fit reads the ID classes (tempscale on --val; mds, rmds, she on --train) need every
    image of that split labelled: an InputError names the flag, before the model runs over the split."""
    readers = [s.name for s in scorers if getattr(s, "uses_labels", False) and s.needs_fit and s.fit_split == split]
    targets = getattr(ds, "targets", None)
    targets = [] if targets is None else list(targets)
    unlabelled = [i for i, t in enumerate(targets) if int(t) < 0]
    if not readers or not unlabelled:
        return
    lines = getattr(ds, "lines", None)
    if len(unlabelled) == len(targets):
        which = f"{flag} {path} has no labels"
    elif lines:  # a list file: point at the line
        which = f"{flag} {ds.list_file}:{lines[unlabelled[0]]}: no label ({len(unlabelled)} unlabelled line(s))"
    else:
        which = f"{flag} {path} has {len(unlabelled)} unlabelled image(s) (the first is sample {unlabelled[0]})"
    raise checks.InputError(f"{which}: scorer(s) {', '.join(readers)} fit on the ID class of every image there "
                            "(use class folders root/<class>/<image> or a list of 'path label' lines)")


def _feature_cache(model, ranks, store, checkpoint: str):
    """Each split runs through the model once, for every scorer and APS grid point (kept in ``store`` when
    there is one); under torchrun once over all ranks (:mod:`ascood.scoring.distributed`)."""
    from ..scoring.distributed import ShardedFeatureCache

    if ranks.enabled:
        return ShardedFeatureCache(model, store, ranks, checkpoint=checkpoint)
    return feature_cache(model, store, checkpoint)


def _evaluate(args, names: list[str], ckpt_path, ranks) -> int:
    from ..data import datasets as D
    from ..scoring.evaluator import evaluate
    from ..scoring.scorers import get_scorer

    model, ckpt = _load_model(args, ckpt_path, ranks)
    cache = _feature_cache(model, ranks, args.feature_store, store_checkpoint(args, ckpt_path))
    extra = ckpt.get("extra") or {}
    size, mean, std = extra.get("image_size", 32), extra.get("mean", [0.5] * 3), extra.get("std", [0.5] * 3)
    if getattr(model, "input_std", None) is None and "std" in extra:
        # Checkpoints from before the model carried its normalisation: ODIN / i-ODIN read it from here.
        model.input_mean, model.input_std = [float(v) for v in mean], [float(v) for v in std]
    mode = "L" if extra.get("channels", 3) == 1 else "RGB"
    tf = D.build_transforms(size, mean, std, train=False)

    named = [args.id, args.train, args.val, args.aps_id, args.aps_ood] + [p for _, p in args.ood + args.near + args.far]
    allowed = link_roots(args, named)

    def dataset(path: str, train: bool = False):
        return D.dataset_from_path(path, tf, train=train, fmt=args.data_format, root=args.root, mode=mode,
                                   allowed_roots=allowed)

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
    classes = _model_classes(model, extra)
    train_ds = dataset(args.train, train=True) if args.train else None
    val_ds = dataset(val_path) if val_path else None
    for ds, flag, path, split in ((train_ds, "--train", args.train, "train"),
                                  (val_ds, "--val" if args.val else "--aps-id", val_path, "val")):
        if ds is not None:
            _check_fit_labels(scorers, split, ds, flag, path)
            _match_labelled(ds, classes, f"{flag} {path}")
    train_loader = loader(train_ds) if train_ds is not None else None
    val_loader = loader(val_ds) if val_ds is not None else None
    aps_sets = (dataset(args.aps_id), dataset(args.aps_ood)) if args.aps_id else None
    id_ds = dataset(args.id)
    _check_id_apart_from_ood(args, id_ds, ood)  # every set is read, nothing is fitted or swept yet
    if aps_sets is not None:
        from ..scoring.scorers import sweep

        val_id, val_ood = loader(aps_sets[0]), loader(aps_sets[1])
        for scorer in scorers:
            if scorer.default_grid:
                res = sweep(scorer, model, val_id, val_ood, id_train_loader=train_loader, id_val_loader=val_loader,
                            cache=cache)
                print(f"APS {scorer.name}: {res.best_params} (validation AUROC {100 * res.best_auroc:.2f})")
    checks.warn_unlabelled_id(id_ds, args.id)
    _match_labelled(id_ds, _model_classes(model, extra), f"--id {args.id}")
    table = evaluate(model, loader(id_ds), ood, scorers=scorers, id_train_loader=train_loader,
                     id_val_loader=val_loader, convention=args.convention, model_name=None, features=cache)
    print(table)
    if hasattr(cache, "summary"):
        print(cache.summary())
    if args.out and ranks.is_main:  # every rank holds the same table; one writes it
        table.to_csv(os.path.join(args.out, "results.csv"))
        table.to_json(os.path.join(args.out, "results.json"))
        from ..scoring.plots import score_histograms
        paths = score_histograms(table.scores, args.out)
        print(f"results: {os.path.join(args.out, 'results.csv')}" + (f"; figures: {len(paths)}" if paths else ""))
    return 0


def _check_id_apart_from_ood(args, id_ds, ood: dict) -> None:
    """An OOD set holding the --id images (the same folder, a link to it, a list of the same files) is refused,
    a partial overlap is warned about, each naming both flags."""
    for flag, items in (("--ood", args.ood), ("--near", args.near), ("--far", args.far)):
        for name, path in items:
            ood_ds = (ood[name] if flag == "--ood" else ood[flag[2:]][name]).dataset
            checks.check_distinct_data(id_ds, f"--id {args.id}", ood_ds, f"{flag} {name}={path}",
                                       "images scored as both ID and OOD make FPR/AUROC meaningless",
                                       same_path=os.path.realpath(path) == os.path.realpath(args.id))


def _eval_benchmark(args, ckpt_path) -> int:
    """``ascood eval CKPT --benchmark NAME --data-root DIR``: APS on the benchmark's val split, then its test sets."""
    from ..scoring.scorers import get_scorer

    scorers = [s.name for s in checks.parse_scorer_names(args.scorers, get_scorer)]
    with torchrun_ranks(args.device) as ranks:
        tree = tree_from_args(args, progress=ranks.is_main)
        require_store(args.feature_store, ranks)
        with claim_on_rank0(ranks, lambda: checks.claim_out(args.out, EVAL_OUTPUTS + ("aps.json",))):
            return _evaluate_benchmark(args, ckpt_path, tree, scorers, ranks)


def _evaluate_benchmark(args, ckpt_path, tree, scorers: list[str], ranks) -> int:
    from ..scoring.benchmark import evaluate_on_benchmark

    model, ckpt = _load_model(args, ckpt_path, ranks)
    cache = _feature_cache(model, ranks, args.feature_store, store_checkpoint(args, ckpt_path))
    # A preset's scorer arguments (NNGuide's whole-set bank, as the authors' fork) apply here as in reproduce.
    params = None
    if getattr(args, "preset", None):
        from .presets import get_preset

        params = {n: get_preset(args.preset).params_for(n) for n in scorers if get_preset(args.preset).params_for(n)}
    table, aps = evaluate_on_benchmark(model, ckpt.get("extra") or {}, tree, scorers, batch_size=args.batch_size,
                                       workers=args.workers, out_dir=args.out if ranks.is_main else None,
                                       progress=ranks.is_main, scorer_params=params, cache=cache)
    for name, res in aps.items():
        print(f"APS {name}: {res['params']} (validation AUROC {res['val_auroc']:.2f})")
    print(table)
    if hasattr(cache, "summary"):
        print(cache.summary())
    if tree.skipped:
        print("skipped (missing): " + ", ".join(tree.skipped_names()))
    return 0
