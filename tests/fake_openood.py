"""A miniature OpenOOD v1.5 data root with the real folder and list-file names of every benchmark (tests only)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ascood.data.openood import BENCHMARKS, SetSpec


def _rel_path(spec: SetSpec, i: int) -> str:
    # Nested folders, as OpenOOD's lists have (e.g. cifar10/train/airplane/0001.png).
    return f"{spec.name}_{spec.role}/part{i % 2}/img_{i:03d}.png"


def write_set(root: str, spec: SetSpec, num_classes: int, n: int, size: int, rng: np.random.Generator) -> None:
    """Write ``n`` PNGs and the list file of one set (ID labels cycle through the classes; OOD labels -1)."""
    folder = os.path.join(root, spec.folder)
    lines = []
    for i in range(n):
        rel = _rel_path(spec, i)
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        label = i % num_classes if spec.is_id else -1
        base = 60 + 120 * (label % 2) if spec.is_id else 128
        img = np.clip(rng.normal(base, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path)
        lines.append(f"{rel} {label}")
    list_path = os.path.join(root, spec.list)
    os.makedirs(os.path.dirname(list_path), exist_ok=True)
    with open(list_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def make_tree(root: str, benchmarks=None, size: int = 12, n_train: int = 16, n_other: int = 6, seed: int = 0) -> str:
    """Every set of the named benchmarks (default all) under ``root``; returns root."""
    rng = np.random.default_rng(seed)
    done = set()
    for name in benchmarks or BENCHMARKS:
        bench = BENCHMARKS[name]
        for spec in bench.sets:
            key = (spec.list, spec.folder)
            if key in done:
                continue
            done.add(key)
            n = n_train if spec.role == "id_train" else n_other
            # Small ID lists must still hold every class once (labels cycle), but keep it tiny for 150 classes.
            if spec.is_id:
                n = max(n, min(bench.num_classes, 8))
            write_set(root, spec, bench.num_classes, n, size, rng)
    return root


def list_entry_path(root: str, spec: SetSpec, line: int) -> str:
    """Absolute image path of the 1-based ``line`` of a set's list."""
    with open(os.path.join(root, spec.list)) as f:
        rel = f.read().splitlines()[line - 1].rsplit(maxsplit=1)[0]
    return os.path.join(root, spec.folder, rel)
