"""Tiny datasets and a tiny trained run shared by the CLI safety / bad-input tests (built once per module)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run small enough to train in about a second on one core.
TINY_TRAIN = ["--epochs", "1", "--batch-size", "6", "--image-size", "8", "--width", "4", "--alpha-mode", "relative",
              "--alpha-max", "1", "--alpha-min", "0.5", "--no-progress", "--no-figures"]


def run_cli(*args, timeout: float = 180, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m ascood ARGS`` with this checkout on the path."""
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run([sys.executable, "-m", "ascood", *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=ROOT, timeout=timeout, **kw)


def write_images(root, n: int, color, size: int = 8, seed: int = 0) -> None:
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.clip(np.array(color) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(root, f"{i}.png"))


def make_class_tree(root, n_per_class: int = 6, seed: int = 0) -> str:
    write_images(os.path.join(root, "red"), n_per_class, (220, 30, 30), seed=seed)
    write_images(os.path.join(root, "green"), n_per_class, (30, 220, 30), seed=seed + 10)
    return str(root)


def tree_hashes(root) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (to prove nothing was changed)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out
