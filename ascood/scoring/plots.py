"""Figures (matplotlib is optional: every function returns None with a note when it is missing).

* :func:`score_histograms`: ID vs OOD score histograms per scorer (the paper's Figure 4).
* :func:`outlier_grid`: ID images above their synthesized outliers (the paper's Figure 3).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
import torch

__all__ = ["have_matplotlib", "score_histograms", "outlier_grid"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _pyplot():
    if not have_matplotlib():
        print("note: matplotlib is not installed; figures skipped (pip install matplotlib)", file=sys.stderr)
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def score_histograms(scores: dict, out_dir: str | os.PathLike, bins: int = 50) -> list[str] | None:
    """One PNG per scorer: ``hist_<scorer>.png`` with a panel per OOD set (ID in every panel).

    ``scores``: {scorer: {"ID": array, ood_name: array, ...}} (``ResultTable.scores``).
    Returns the written paths, or None without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return None
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for scorer, sets in scores.items():
        ood = [k for k in sets if k != "ID"]
        fig, axes = plt.subplots(1, len(ood), figsize=(4 * len(ood), 3), squeeze=False)
        for ax, name in zip(axes[0], ood):
            both = np.concatenate([sets["ID"], sets[name]])
            edges = np.histogram_bin_edges(both, bins=bins)
            ax.hist(sets["ID"], bins=edges, alpha=0.6, density=True, label="ID")
            ax.hist(sets[name], bins=edges, alpha=0.6, density=True, label=name)
            ax.set_title(f"{scorer}: ID vs {name}")
            ax.set_xlabel("score (higher = more ID)")
            ax.legend()
        fig.tight_layout()
        path = os.path.join(os.fspath(out_dir), f"hist_{scorer}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(C, H, W) normalised -> (H, W[, 3]) in [0, 1] for imshow."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        return img[0].numpy()
    return img[:3].permute(1, 2, 0).numpy()


def outlier_grid(images: torch.Tensor, outliers: torch.Tensor, path: str | os.PathLike,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), title: str = "") -> str | None:
    """Top row: ID images; bottom row: their synthesized outliers. (N, C, H, W) each, up to 8 shown."""
    plt = _pyplot()
    if plt is None:
        return None
    n = min(8, images.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        for row, src in enumerate((images, outliers)):
            ax = axes[row][i]
            img = _to_display(src[i], mean, std)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.axis("off")
    axes[0][0].set_title("ID", loc="left", fontsize=9)
    axes[1][0].set_title("outlier", loc="left", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)
