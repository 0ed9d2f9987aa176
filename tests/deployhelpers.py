"""A tiny trained classifier, its data and fitted detectors, shared by tests/deploy (built once per process).

Three ID classes are images dominated by one colour channel each (plus noise);
OOD images are grey-blue checkerboards. A small_cnn of width 4 at 8x8 learns
the ID classes in a few dozen steps, so every scorer (SHE needs each class
classified correctly at least once) fits on it.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import ascood

SIZE = 8
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
PREP = {"image_size": SIZE, "mean": MEAN, "std": STD, "channels": 3}
CLASSES = ["red", "green", "blue"]


def id_pixels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, 8, 8) float32 in [0, 1], labels (n,) int64) of the three colour classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.15 + 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    x[torch.arange(n), y] += 0.55 + 0.2 * torch.rand(n, SIZE, SIZE, generator=g)
    return x.clamp(0, 1), y


def ood_pixels(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 8, 8) checkerboards in [0, 1]: no single dominant channel (far from every ID class)."""
    g = torch.Generator().manual_seed(seed)
    board = ((torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2).float()
    x = 0.3 + 0.4 * board[None, None] * torch.rand(n, 3, 1, 1, generator=g)
    return (x + 0.05 * torch.rand(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN)[None, :, None, None]) / torch.tensor(STD)[None, :, None, None]


def dataset(x: torch.Tensor, y: torch.Tensor | None = None) -> TensorDataset:
    """A TensorDataset of normalised images (as a DataLoader from build_transforms would give)."""
    return TensorDataset(normalise(x), y if y is not None else torch.full((x.shape[0],), -1))


@functools.lru_cache(maxsize=None)
def trained_model() -> torch.nn.Module:
    """small_cnn (width 4, z-score head) trained 40 steps of plain cross-entropy on the colour classes."""
    torch.manual_seed(0)
    model = ascood.build_model("small_cnn", 3, width=4, input_mean=MEAN, input_std=STD)
    x, y = id_pixels(480, seed=1)
    xn = normalise(x)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for step in range(40):
        idx = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
        loss = torch.nn.functional.cross_entropy(model(xn[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def splits():
    """(id_train, id_val, ood_val) TensorDatasets: 240 / 200 / 80 images."""
    xt, yt = id_pixels(240, seed=2)
    xv, yv = id_pixels(200, seed=3)
    return dataset(xt, yt), dataset(xv, yv), dataset(ood_pixels(80, seed=4))


@functools.lru_cache(maxsize=None)
def fitted(scorer: str, tpr: float = 0.9):
    """A Detector with ``scorer`` fitted on the shared model and data (no APS), cached per process."""
    train, val, _ = splits()
    # A fresh copy of the model per detector: export lowers the model in place on CPU; detectors stay apart.
    import copy

    model = copy.deepcopy(trained_model())
    kwargs = {"K": 5} if scorer in ("knn", "nnguide") else {}
    from ascood.scoring.scorers import scorer_for_model

    s = scorer_for_model(scorer, STD)
    if kwargs:
        s.set_params(**kwargs)
    if scorer == "nnguide":
        s.set_params(bank="all")  # 1% of 240 rows would be a 2-row bank
    if scorer == "vim":
        s.set_params(dim=8)  # 16-d features: 256 leaves no residual space
    uses_train = s.needs_fit and s.fit_split == "train"  # id_train for others would only warn "not used"
    return ascood.Detector.fit(model, id_train=train if uses_train else None, id_val=val, scorer=s, tpr=tpr,
                               preprocessing=PREP, classes=CLASSES, device="cpu")


def write_png_dir(root: str, x: torch.Tensor, prefix: str = "img") -> list[str]:
    """Save (n, 3, H, W) [0, 1] images as PNG files under ``root``; returns their paths."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        a = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = os.path.join(root, f"{prefix}{i:03d}.png")
        Image.fromarray(a).save(path)
        paths.append(path)
    return paths
