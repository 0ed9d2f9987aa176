"""Arguments that several commands share: data loading and the OpenOOD tree (presets: :mod:`.presets`).

``ascood train`` and ``ascood eval`` both read data the same way; one definition
keeps their flags, defaults and messages identical.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..data.openood import BENCHMARKS, OpenOODTreeError, ResolvedBenchmark, resolve_benchmark
from .argtypes import device_name, existing_dir, non_negative_int, positive_int

__all__ = ["add_data_args", "add_tree_args", "tree_from_args", "link_roots", "LINK_FLAG", "add_feature_store_args",
           "feature_store_from_args", "default_features_dir", "feature_cache"]

#: The flag that adds a folder symlinked list entries may lead into.
LINK_FLAG = "--allow-links-into"


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--data-format, --root, --batch-size, --workers, --device."""
    from ..data.datasets import DATA_FORMATS

    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                   help="how to read data paths: auto-detect (default), class folders, a flat folder of images, "
                        "an OpenOOD image list ('relative/path label' lines; see --root), or CIFAR python batches")
    p.add_argument("--root", help="root directory that image-list paths are relative to (default: the list's folder)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(LINK_FLAG, dest="link_roots", action="append", type=existing_dir, default=[], metavar="DIR",
                   help="image-list entries (and OpenOOD lists) may reach images through symlinks that lead into "
                        "the list's root, the --data-root, or a data path named on the command line; this adds "
                        "DIR to those places (repeatable; e.g. the disk that images_classic/cifar10 links to). "
                        "An entry leading anywhere else is refused with its file and line")


def add_tree_args(p) -> None:
    """--benchmark, --data-root, --allow-missing on an argparse parser."""
    p.add_argument("--benchmark", choices=tuple(BENCHMARKS),
                   help="read an OpenOOD v1.5 benchmark's image lists from --data-root (default with --preset: "
                        "the preset's benchmark)")
    p.add_argument("--data-root", metavar="DIR",
                   help="OpenOOD v1.5 data root (benchmark_imglist/, images_classic/, images_largescale/)")
    p.add_argument("--allow-missing", action="store_true",
                   help="run with the OOD sets that are present when some lists/images are missing (they are "
                        "reported as skipped); ID train/val/test are always required")
    p.add_argument("--class-list", metavar="FILE",
                   help="imagenet100: its 100 ImageNet classes, one per line (WordNet id such as n01440764, or "
                        "ImageNet-1K label); not part of OpenOOD's tree")


def link_roots(args, paths: Sequence[str | None] = ()) -> list[str]:
    """The folders symlinked list entries may lead into: the data ``paths`` named on the command line (a list
    file counts as its folder), ``--root``, ``--data-root`` and every ``--allow-links-into DIR``."""
    named = [*paths, getattr(args, "root", None), getattr(args, "data_root", None)]
    out = [p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in named if p and os.path.exists(p)]
    return out + list(getattr(args, "link_roots", None) or [])


def tree_from_args(args, progress: bool = False) -> ResolvedBenchmark | None:
    """The resolved benchmark when --data-root is given (None otherwise); errors name every missing piece."""
    root = getattr(args, "data_root", None)
    if root is None:
        if getattr(args, "benchmark", None) and getattr(args, "preset", None) is None:
            raise OpenOODTreeError("--benchmark needs --data-root DIR (the OpenOOD v1.5 data root)")
        return None
    name = getattr(args, "benchmark", None)
    if not name:
        raise OpenOODTreeError("--data-root needs --benchmark NAME or --preset NAME "
                               f"(one of {', '.join(BENCHMARKS)})")
    return resolve_benchmark(name, root, allow_missing=bool(getattr(args, "allow_missing", False)), progress=progress,
                             class_list=getattr(args, "class_list", None),
                             link_roots=list(getattr(args, "link_roots", None) or []))


# -- the feature store (--features) -----------------------------------------------------------------------------
#: What --features DIR keeps, for the commands' help.
FEATURES_HELP = ("feature store: each split's logits, raw features and labels are kept in DIR as checksummed "
                 "safetensors shards, keyed by the checkpoint's sha256, the split's files (paths, sizes, "
                 "mtimes, labels), the preprocessing and the feature layer, and reused by every later run with "
                 "other scorers or APS grids (no model forward for a stored split); a changed key extracts again, "
                 "a killed extraction resumes at its first missing shard. Default: {default}; 'none' (or "
                 "--no-feature-store) keeps them in memory for this run only. ODIN / i-ODIN always run the model")


def add_feature_store_args(p, default: str = "RUN/features (RUN: the checkpoint's run folder)") -> None:
    """--features DIR|none, --no-feature-store, --features-dtype, --shard-rows."""
    p.add_argument("--features", metavar="DIR", help=FEATURES_HELP.format(default=default))
    p.add_argument("--no-feature-store", action="store_true", help="same as --features none")
    p.add_argument("--features-dtype", choices=("float32", "float16"), default="float32",
                   help="precision of the stored raw features (float16: half the size, ~5e-4 relative rounding; "
                        "logits stay float32). Part of the key: another dtype is extracted again")
    p.add_argument("--shard-rows", type=positive_int, default=4096,
                   help="images per stored shard of a new split (default 4096; the unit of resuming)")


def feature_store_from_args(args, default_root: str | None, *, log=None):
    """The :class:`~ascood.scoring.store.FeatureStore` the flags ask for, or None (--features none,
    --no-feature-store, or no default folder). ``default_root``: the folder used without --features. An
    explicit --features that is a file or cannot be created is an InputError naming the flag; a default folder
    that cannot be created is said in one line and the run goes on without a store."""
    from ..scoring.store import FeatureStore
    from .checks import InputError

    given = getattr(args, "features", None)
    if getattr(args, "no_feature_store", False) or (given is not None and given.lower() == "none"):
        return None
    root = given or default_root
    if root is None:
        return None
    # Checked, not created: the folder appears with the first extracted split (a run refused later leaves none).
    existing = os.path.abspath(root)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    why = None
    if os.path.exists(root) and not os.path.isdir(root):
        why = f"{root} is a file, not a folder"
    elif not os.path.isdir(existing):
        why = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    if why:
        if given:
            raise InputError(f"--features {given}: cannot use it as the feature store ({why})") from None
        print(f"ascood: no feature store ({why}); give --features DIR to keep the features", file=sys.stderr)
        return None
    return FeatureStore(root, shard_rows=getattr(args, "shard_rows", 4096),
                        features_dtype=getattr(args, "features_dtype", "float32"), log=log)


def default_features_dir(ckpt_path: str) -> str:
    """The feature store used without --features: ``features/`` in the checkpoint's run folder."""
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "features")


def feature_cache(model, store, ckpt_path: str | None):
    """The FeatureCache of an evaluation: every split runs through the model once for every scorer and APS grid
    point; with a store, a split stored under the same key (``ckpt_path``'s sha256) runs through it not at all."""
    from ..scoring.scorers import FeatureCache
    from ..scoring.store import StoreFeatureCache

    return FeatureCache(model) if store is None else StoreFeatureCache(model, store, checkpoint=ckpt_path)
