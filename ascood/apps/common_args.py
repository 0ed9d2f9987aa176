"""Arguments that several commands share: data loading and the OpenOOD tree (presets: :mod:`.presets`).

``ascood train`` and ``ascood eval`` both read data the same way; one definition
keeps their flags, defaults and messages identical.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from ..data.openood import BENCHMARKS, OpenOODTreeError, ResolvedBenchmark, resolve_benchmark
from .argtypes import device_name, existing_dir, non_negative_int, positive_int

__all__ = ["add_data_args", "add_tree_args", "tree_from_args", "link_roots", "LINK_FLAG"]

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
