"""Figures are written atomically and show what they claim (issue 25)."""
import errno
import os

import numpy as np
import pytest
import torch

from ascood.scoring.plots import have_matplotlib, outlier_grid, score_histograms

pytestmark = pytest.mark.skipif(not have_matplotlib(), reason="matplotlib is an optional extra")


def test_histogram_on_a_full_disk_leaves_no_truncated_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(self, f, **kwargs):
        f.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    scores = {"msp": {"ID": np.random.rand(50), "far": np.random.rand(50)}}
    with pytest.raises(OSError, match="no space left writing .*hist_msp.png"):
        score_histograms(scores, tmp_path)
    assert os.listdir(tmp_path) == []


def test_histogram_range_ignores_one_far_spike(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    ident = np.concatenate([rng.normal(0, 1, 500), [1e6]])  # one ID score far away
    paths = score_histograms({"ebo": {"ID": ident, "far": rng.normal(-2, 1, 500)}}, tmp_path)
    assert paths and os.path.getsize(paths[0]) > 0


def test_outlier_grid_has_a_difference_row(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = {}
    real = Figure.savefig

    def spy(self, f, **kwargs):
        seen["rows"] = len({round(ax.get_position().y0, 3) for ax in self.axes})
        seen["titles"] = [ax.get_title(loc="left") for ax in self.axes if ax.get_title(loc="left")]
        return real(self, f, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    x = torch.rand(4, 3, 8, 8)
    xo = x.clone()
    xo[:, :, 2, 2] += 0.01  # invisible to the eye at this scale
    path = outlier_grid(x, xo, tmp_path / "g.png")
    assert os.path.isfile(path) and seen["rows"] == 3
    assert any(t.startswith("|x' - x| x") for t in seen["titles"]), seen["titles"]
