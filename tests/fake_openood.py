"""A miniature OpenOOD v1.5 data root with the real folder and list-file names of every benchmark (tests only)."""
from __future__ import annotations

import os
import zlib

import numpy as np
from PIL import Image

from ascood.data.openood import BENCHMARKS, SetSpec

#: imagenet100's fake ImageNet-1K lists: the class list's 100 classes are the even labels 0..198 (written as
#: WordNet ids, shuffled), and the lists also hold 10 other classes (odd labels 1..19) that must be left out.
SUBSET_LABELS = tuple(range(0, 200, 2))
OTHER_LABELS = tuple(range(1, 20, 2))
CLASS_LIST_NAME = "imagenet100_classes.txt"


def wnid(label: int) -> str:
    """A made-up WordNet id per ImageNet-1K label (the fake lists' class folders)."""
    return f"n{1440764 + label:08d}"


def _rel_path(spec: SetSpec, i: int) -> str:
    # Nested folders, as OpenOOD's lists have (e.g. cifar10/train/airplane/0001.png).
    return f"{spec.name}_{spec.role}/part{i % 2}/img_{i:03d}.png"


def _image(label: int, is_id: bool, size: int, rng: np.random.Generator, ood_base: int = 128) -> Image.Image:
    base = 60 + 120 * (label % 2) if is_id else ood_base
    return Image.fromarray(np.clip(rng.normal(base, 40, (size, size, 3)), 0, 255).astype(np.uint8))


def _ood_base(spec: SetSpec) -> int:
    """Each OOD test set its own mean intensity, so scorers give different numbers per set (and a mean over the
    wrong sets shows); the OOD validation set stays at mid-grey."""
    return 128 if spec.role == "ood_val" else 20 + zlib.crc32(spec.name.encode()) % 216


def _write(root: str, spec: SetSpec, entries: list[tuple[str, int]], size: int, rng: np.random.Generator) -> None:
    folder = os.path.join(root, spec.folder)
    for rel, label in entries:
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _image(label, spec.is_id, size, rng, _ood_base(spec)).save(path)
    list_path = os.path.join(root, spec.list)
    os.makedirs(os.path.dirname(list_path), exist_ok=True)
    with open(list_path, "w") as f:
        f.write("\n".join(f"{rel} {label}" for rel, label in entries) + "\n")


def write_set(root: str, spec: SetSpec, num_classes: int, n: int, size: int, rng: np.random.Generator) -> None:
    """Write ``n`` PNGs and the list file of one set (ID labels cycle through the classes; OOD labels -1)."""
    _write(root, spec, [(_rel_path(spec, i), i % num_classes if spec.is_id else -1) for i in range(n)], size, rng)


def write_subset_id_set(root: str, spec: SetSpec, size: int, rng: np.random.Generator) -> None:
    """An ImageNet-1K-style ID list: ``imagenet_1k/<split>/<wnid>/<file> <label>``, one image per class of
    SUBSET_LABELS and OTHER_LABELS (train: the subset's classes twice)."""
    split = spec.role.split("_")[1]
    labels = list(SUBSET_LABELS) * (2 if split == "train" else 1) + list(OTHER_LABELS)
    entries = [(f"imagenet_1k/{split}/{wnid(lab)}/{wnid(lab)}_{i:04d}.png", lab) for i, lab in enumerate(labels)]
    _write(root, spec, entries, size, rng)


def write_class_list(root: str, seed: int = 0) -> str:
    """<root>/imagenet100_classes.txt: the 100 subset classes as WordNet ids, in a shuffled order, one a line."""
    order = np.random.default_rng(seed).permutation(SUBSET_LABELS)
    path = os.path.join(root, CLASS_LIST_NAME)
    with open(path, "w") as f:
        f.write("# ImageNet-100 classes (fake)\n" + "\n".join(wnid(int(lab)) for lab in order) + "\n")
    return path


def make_tree(root: str, benchmarks=None, size: int = 12, n_train: int = 16, n_other: int = 6, seed: int = 0) -> str:
    """Every set of the named benchmarks (default all) under ``root``; returns root.

    imagenet100's ID lists are ImageNet-1K-style (see :func:`write_subset_id_set`) and its class list is
    written to ``<root>/imagenet100_classes.txt``.
    """
    rng = np.random.default_rng(seed)
    done = set()
    for name in benchmarks or BENCHMARKS:
        bench = BENCHMARKS[name]
        for spec in bench.sets:
            key = (spec.list, spec.folder)
            if key in done:
                continue
            done.add(key)
            if bench.source_classes is not None and spec.role in ("id_train", "id_val", "id_test"):
                write_subset_id_set(root, spec, size, rng)
                continue
            n = n_train if spec.role == "id_train" else n_other
            # Small ID lists must still hold every class once (labels cycle), but keep it tiny for 150 classes.
            if spec.is_id:
                n = max(n, min(bench.num_classes, 8))
            write_set(root, spec, bench.num_classes, n, size, rng)
        if bench.source_classes is not None:
            write_class_list(root, seed)
    return root


def list_entry_path(root: str, spec: SetSpec, line: int) -> str:
    """Absolute image path of the 1-based ``line`` of a set's list."""
    with open(os.path.join(root, spec.list)) as f:
        rel = f.read().splitlines()[line - 1].rsplit(maxsplit=1)[0]
    return os.path.join(root, spec.folder, rel)
