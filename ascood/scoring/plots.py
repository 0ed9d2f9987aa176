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

from ..files import atomic_write

__all__ = ["have_matplotlib", "score_histograms", "outlier_grid", "save_figure"]


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


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> str:
    """``fig.savefig`` atomically (a full disk or a kill leaves no truncated PNG under ``path``)."""
    atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    return os.fspath(path)


def _display_range(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The x-range of a histogram: the 0.5-99.5 percentiles of both sets, so one far spike (e.g. a few ID
    scores far from the rest) does not squash every other bar into one bin."""
    both = np.concatenate([a, b])
    both = both[np.isfinite(both)]
    if both.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(both, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(both.min()), float(both.max())
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


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
            id_s, ood_s = np.asarray(sets["ID"], dtype=np.float64), np.asarray(sets[name], dtype=np.float64)
            lo, hi = _display_range(id_s, ood_s)
            edges = np.linspace(lo, hi, bins + 1)
            # Values outside the shown range are drawn in the edge bins, so no sample disappears.
            ax.hist(np.clip(id_s, lo, hi), bins=edges, alpha=0.6, density=True, label="ID")
            ax.hist(np.clip(ood_s, lo, hi), bins=edges, alpha=0.6, density=True, label=name)
            ax.set_title(f"{scorer}: ID vs {name}")
            ax.set_xlabel("score (higher = more ID)")
            ax.set_ylabel("density")
            ax.legend()
        fig.tight_layout()
        path = save_figure(fig, os.path.join(os.fspath(out_dir), f"hist_{scorer}.png"))
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
    """Rows: ID images, their synthesized outliers, and |x' - x| magnified. (N, C, H, W) each, up to 8 shown.

    At small alpha an outlier looks like its image to the eye; the third row shows
    where and how much it changed (pixel units, max over channels, scaled so the
    largest change of the grid is white; the scale is printed on the row).
    """
    plt = _pyplot()
    if plt is None:
        return None
    n = min(8, images.shape[0])
    shown = [_to_display(images[i], mean, std) for i in range(n)]
    perturbed = [_to_display(outliers[i], mean, std) for i in range(n)]
    diffs = [np.abs(b - a) if a.ndim == 2 else np.abs(b - a).max(axis=2) for a, b in zip(shown, perturbed)]
    top = max(float(d.max()) for d in diffs) if diffs else 0.0
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), squeeze=False)
    for i in range(n):
        for row, img in enumerate((shown[i], perturbed[i])):
            axes[row][i].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[2][i].imshow(diffs[i] / top if top > 0 else diffs[i], cmap="magma", vmin=0, vmax=1)
        for row in range(3):
            axes[row][i].axis("off")
    axes[0][0].set_title("ID", loc="left", fontsize=9)
    axes[1][0].set_title("outlier", loc="left", fontsize=9)
    gain = f"x{1 / top:.3g}" if top > 0 else "(no change)"
    axes[2][0].set_title(f"|x' - x| {gain}", loc="left", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return os.fspath(path)
