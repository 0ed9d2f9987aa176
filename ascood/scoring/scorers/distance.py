"""Feature-distance scorers: KNN, MDS, RMDS, ViM, NNGuide, Relation, SHE.

Fits read the ID features in row chunks (``chunk_rows``), from RAM, a
memory-mapped feature file (:func:`~.features.extract_features` with
``directory=``) or, for one-pass statistics, straight from a loader. Memory
of a fit on N x m features with C classes, beyond the features themselves:

* KNN, NNGuide, Relation keep a *bank*: a reference to the features (no
  copy; NNGuide's ``bank="random"`` copies its alpha fraction) plus a
  normalised copy only while it fits under ``max_device_bank_mb`` (1 GiB by
  default); larger banks are normalised chunk by chunk (``bank.chunk`` rows)
  at scoring time, so a memory-mapped bank stays on disk;
* MDS / RMDS: class means (C, m) and one (m, m) scatter matrix, float64,
  accumulated by Chan et al.'s pairwise update (exact to float64 rounding,
  no N x m float64 copy), plus one chunk;
* ViM: two (m, m) float64 matrices (covariance, eigenvectors) plus a chunk.
  It reads the features twice (covariance, then alpha), so it needs a
  record, not a loader stream;
* SHE: class sums (C, m) float64.

Nearest neighbours are exact, by matmul + top-k over bank chunks (no faiss).
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ... import _ops
from .base import FeatureScorer, check_int, energy, warn_once
from .fastops import blas_threads, logsumexp_rows, matmul, sort_desc, to_float64, top_values
from .features import LinearHead, model_features
from .perturb import InputStd

__all__ = ["KNN", "MDS", "RMDS", "ViM", "NNGuide", "Relation", "SHE", "l2_normalize", "topk_similarity",
           "TiedGaussian", "NNGUIDE_BANKS", "eigh", "pinvh"]

NNGUIDE_BANKS = ("all", "random", "first")


def l2_normalize(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, (N, m) -> (N, m) (1e-10 guards zero rows)."""
    return h / torch.sqrt((h * h).sum(1, keepdim=True) + 1e-10)


class _Bank:
    """N rows made chunk by chunk by ``block(start, stop) -> (stop - start, width)`` float32 CPU tensors.

    When the whole bank takes at most ``max_device_mb`` it is built once, at
    fit (:meth:`prepare`), and kept (copied once to another scoring device);
    otherwise every scoring batch streams it in ``chunk``-row blocks (peak
    memory: one block and its similarities).
    """

    def __init__(self, n: int, width: int, block: Callable[[int, int], torch.Tensor], max_device_mb: float,
                 chunk: int = 16384) -> None:
        self.n, self.width, self.block = n, width, block
        self.max_bytes = max_device_mb * 2 ** 20
        self.chunk = chunk
        self._full: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.n * self.width * 4

    @property
    def resident(self) -> bool:
        """Whether the bank is kept whole (it fits under ``max_device_mb``)."""
        return self.nbytes <= self.max_bytes

    def prepare(self) -> "_Bank":
        """Build the whole bank now when it is kept resident (a fit's work, not the first scoring's)."""
        if self.resident and self._full is None:
            full = torch.empty(self.n, self.width, dtype=torch.float32)
            for start in range(0, self.n, self.chunk):
                stop = min(self.n, start + self.chunk)
                full[start:stop] = self.block(start, stop)
            self._full = full
        return self

    def chunks(self, device: torch.device):
        """(start row, block on ``device``) pairs covering the bank."""
        if self.resident:
            self.prepare()
            if self._full.device != torch.device(device):
                self._full = self._full.to(device)
            yield 0, self._full
            return
        for start in range(0, self.n, self.chunk):
            yield start, self.block(start, min(self.n, start + self.chunk)).to(device, non_blocking=True)


def topk_similarity(query: torch.Tensor, bank: _Bank, k: int) -> torch.Tensor:
    """The k largest dot products of each query row with the bank rows: (B, m) -> (B, k), descending.

    Each bank block's similarities are merged with the best so far by selection, not an ordered top-k
    (:func:`~.fastops.top_values`); only the final (B, k) is sorted."""
    best = None
    for _, block in bank.chunks(query.device):
        sims = matmul(query, block.T)  # numpy's GEMM: 222 ms against torch's 351 for 1024 x 512 x 20,000 here
        merged = sims if best is None else torch.cat([best, sims], 1)
        best = top_values(merged, min(k, merged.shape[1]))
    return sort_desc(best)


def _warn_capped(name: str, K: int, n: int, fix: str) -> None:
    """K above the bank size: scored with K = n (a weaker score, not a meaningless one). Said once per scorer
    and K: the demo's 27 networks (banks of 9 to 11 rows) share the cause and its fix."""
    warn_once(("capped K", name, K), f"{name}: K = {K} is larger than its bank of {n} ID features; using K = {n} "
              f"(a bank smaller than K changes the score: {fix}; said once, for any bank smaller than K)",
              stacklevel=5)


class KNN(FeatureScorer):
    """Deep nearest neighbours: -(squared L2 distance to the K-th nearest normalised ID-train feature).

    Features are L2-normalised, so ||a - b||^2 = 2 - 2 a.b (OpenOOD's score is
    minus the faiss squared distance to the K-th neighbour). K = 50 by default,
    capped at the number of ID-train features with a warning, once per K: the
    score is then the distance to the farthest bank row, weaker but
    still a distance, so it is warned about, not refused. The bank is the fit's
    features themselves (see the module docstring for memory).
    """

    name = "knn"
    needs_fit = True
    default_grid = {"K": [50, 100, 200, 500, 1000]}  # benchmarks.md

    def __init__(self, K: int = 50, feature_space: str = "raw", max_device_bank_mb: float = 1024) -> None:
        super().__init__(feature_space)
        self.K = K
        self.max_device_bank_mb = max_device_bank_mb
        self._validate()

    def _validate(self) -> None:
        self.K = check_int(self.name, "K", self.K)

    def _fit(self, feats) -> None:
        feats.require("features", self.name)
        head = feats.head
        self.in_space(feats.feature_rows(0, 1), head)  # fail now, not at scoring, without a needed head
        self.bank = _Bank(len(feats), feats.features.shape[1],
                          lambda s, e: l2_normalize(self.in_space(feats.feature_rows(s, e), head)),
                          self.max_device_bank_mb).prepare()

    def _score(self, logits, h, head):
        k = min(self.K, self.bank.n)
        if k < self.K:
            _warn_capped(self.name, self.K, self.bank.n, "fit on more ID-train rows or pass a smaller K")
        kth = topk_similarity(l2_normalize(self.in_space(h, head)), self.bank, k)[:, -1]
        return -(2.0 - 2.0 * kth)


class TiedGaussian:
    """Class means and the tied (pooled within-class) scatter of streamed (h, y) chunks, float64.

    Each chunk's class means and centred scatter are merged into the running
    ones by Chan, Golub & LeVeque's pairwise update, so the result equals the
    two-pass computation up to float64 rounding while memory stays (C, m) +
    (m, m) + one chunk. Labels must be class indices >= 0.
    """

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # (C,) float64
        self.means: torch.Tensor | None = None  # (C, m) float64
        self.scatter: torch.Tensor | None = None  # (m, m) float64
        self.n = 0

    @staticmethod
    def chunk_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shift (m,), c = h - shift (b, m), gram(c) (m, m)), float64: a chunk centred on its own mean and
        its scatter about it. :meth:`update` takes them so two accumulators of the same rows (RMDS's class
        and whole-set Gaussians) share the chunk's one Gram matrix, the fit's O(b m^2) cost."""
        # numpy: torch's float32 -> float64 conversions and mixed-dtype ops ran at 2-4 ns per element here,
        # numpy's 4x faster; the rows are summed in float64 and promoted to float64 as they are centred.
        a = (h if h.dtype in (torch.float32, torch.float64) else h.double()).detach().cpu().numpy()
        shift = a.mean(0, dtype=np.float64)
        c = torch.from_numpy(np.subtract(a, shift, dtype=np.float64))
        return torch.from_numpy(shift), c, gram(c)

    def update(self, h: torch.Tensor, y: torch.Tensor,
               stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add a chunk: h (b, m) (any float dtype; used in float64), y (b,) int64 class indices;
        ``stats``: :meth:`chunk_stats` of h when already computed (else computed here)."""
        if h.shape[0] == 0:
            return
        if bool((y < 0).any()):
            raise ValueError("labels must be class indices >= 0 (rows labelled -1 are OOD, not ID training data)")
        k = int(y.max()) + 1
        if self.means is None:
            m = h.shape[1]
            self.counts = torch.zeros(k, dtype=torch.float64)
            self.means = torch.zeros(k, m, dtype=torch.float64)
            self.scatter = torch.zeros(m, m, dtype=torch.float64)
        elif k > self.counts.shape[0]:
            grow = k - self.counts.shape[0]
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
            self.means = torch.cat([self.means, self.means.new_zeros(grow, self.means.shape[1])])
        shift, c, g = self.chunk_stats(h) if stats is None else stats
        classes, inv = torch.unique(y, return_inverse=True)
        nb = torch.bincount(inv, minlength=classes.numel()).double()
        # The chunk's within-class scatter, sum (h - mb_c)(h - mb_c)^T, as the scatter about the chunk mean
        # minus its between-class part: no (b, m) gather of class means, and float64 keeps it exact to
        # ~1e-13 relative (the cancellation is only the between- / within-class variance ratio).
        d = torch.zeros(classes.numel(), c.shape[1], dtype=torch.float64).index_add_(0, inv, c) / nb[:, None]
        self.scatter += g - (d * nb[:, None]).T @ d
        mb = d + shift
        na = self.counts[classes]
        n = na + nb
        delta = mb - self.means[classes]
        self.scatter += (delta * (na * nb / n)[:, None]).T @ delta
        self.means[classes] += delta * (nb / n)[:, None]
        self.counts[classes] = n
        self.n += h.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes present (K',) int64, their means (K', m), covariance (m, m) = scatter / N), float64.

        The covariance is the empirical (biased) one of the class-centred
        features, as sklearn's EmpiricalCovariance.
        """
        if not self.n:
            raise ValueError("no ID samples to fit on")
        present = self.counts > 0
        cov = self.scatter / self.n
        return torch.nonzero(present)[:, 0], self.means[present], (cov + cov.T) / 2


def gram(c: torch.Tensor) -> torch.Tensor:
    """c^T c of a (b, m) matrix as a (m, m) float64 CPU tensor, by BLAS ``syrk`` (numpy's ``a.T @ a``).

    Why numpy: it recognises ``a.T @ a`` and computes one triangle (syrk, half
    the multiply-adds of the general product torch calls); in float64 on one
    thread that was 51 ms against torch's 108 ms for 8192 x 512 here
    (BENCHMARKS.md, "Scorers round 2"). Runs on as many BLAS threads as torch
    is set to use.
    """
    a = c.detach().to(device="cpu", dtype=torch.float64).contiguous().numpy()
    with blas_threads(torch.get_num_threads()):
        return torch.from_numpy(a.T @ a)


def eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric (m, m) float64 CPU matrix, on one thread.

    Why one thread: LAPACK's divide-and-conquer gains little from threads at
    feature sizes (m <= a few thousand: O(m^3), small beside the fit's
    O(N m^2) Gram matrix) and collapses when the cores are shared: on a
    loaded 2-core machine a 512 x 512 feature covariance took 530 ms with
    2 threads (MKL through torch, and 300 ms with OpenBLAS through numpy)
    against 41 ms of CPU time on one (BENCHMARKS.md, "Scorers round 2").
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w, v = torch.linalg.eigh(sym.detach().cpu())
    finally:
        torch.set_num_threads(threads)
    return w, v


def pinvh(sym: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric positive semi-definite (m, m) float64 matrix (a covariance).

    Eigenvalues with |lambda| <= m * eps * max|lambda| are dropped: the cutoff of
    ``torch.linalg.pinv(hermitian=True)`` and scipy's ``pinvh`` (sklearn's
    EmpiricalCovariance precision), from :func:`eigh`. Fast path: when a Cholesky factorisation succeeds
    and the condition number is provably below that cutoff (cond_2 <= ||A||_F ||A^-1||_F, with a 1000x
    margin), no eigenvalue is dropped and the pseudo-inverse is the inverse: ``cholesky_inverse``
    (m^3 / 3 multiply-adds against eigh's ~9 m^3: 10 ms instead of 42 ms at m = 512 on one thread).
    """
    sym = sym.detach().cpu()
    m = sym.shape[0]
    L, info = torch.linalg.cholesky_ex(sym)
    if int(info) == 0:
        inv = torch.cholesky_inverse(L)
        bound = float(torch.linalg.matrix_norm(sym) * torch.linalg.matrix_norm(inv))
        if bound == bound and bound * m * torch.finfo(torch.float64).eps * 1000 < 1:
            return (inv + inv.T) / 2
    return _pinvh_eig(sym)


def _pinvh_eig(sym: torch.Tensor) -> torch.Tensor:
    """:func:`pinvh` by the eigendecomposition (any symmetric matrix, singular or not)."""
    w, v = eigh(sym)
    keep = w.abs() > sym.shape[0] * torch.finfo(torch.float64).eps * w.abs().max()
    v = v[:, keep]
    return (v / w[keep]) @ v.T


def _mahalanobis(h: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(B, m), (K, m), (m, m) -> (B, K) squared Mahalanobis distances."""
    hp = h @ precision
    return (hp * h).sum(1, keepdim=True) - 2 * hp @ means.T + ((means @ precision) * means).sum(1)[None]


class MDS(InputStd, FeatureScorer):
    """Mahalanobis: max over classes of -(h - mu_c)^T P (h - mu_c), tied precision P from ID train.

    P = pinv of the class-centred covariance (float64, as sklearn's
    EmpiricalCovariance; see the module docstring for the fit's memory).
    ``eps > 0`` adds Lee et al.'s (NeurIPS 2018) input preprocessing, ODIN
    style: x~ = x - eps * sign(d D_closest(x) / dx) / std_c, the step that
    brings x closer to its nearest class mean (``std``: the input
    normalisation's per-channel std, default the model's, as ODIN), then the
    score of x~. Zero gradients step by +eps (ODIN's and Lee et al.'s
    ``grad >= 0`` rule; pytorch-ood's MahalanobisODIN leaves them). pred is
    the model's prediction on x. With eps > 0 the scorer needs the images
    (``needs_input``); eps is not searched by default (pass ``grid=``).

    Degenerate fits: a fit whose classes have no within-class spread (every
    class one row: the tied covariance and its pseudo-inverse are zero, every
    score equal) is refused; a class of a single row is warned about (its mean
    is that sample: a weak estimate, still a distance).

    In the ``"head"`` space of a z-score head every feature row sums to 0, so
    the covariance is singular in that direction and its pseudo-inverse
    depends on float64 rounding there (scores move by ~1e-3 relative between
    two chunkings); the default ``"raw"`` space has no such constraint.
    """

    name = "mds"
    needs_fit = True
    streams_fit = True
    uses_labels = True

    def __init__(self, feature_space: str = "raw", eps: float = 0.0,
                 std: float | Sequence[float] | None = None) -> None:
        super().__init__(feature_space)
        self.eps, self.std = eps, std
        self._validate()

    def _validate(self) -> None:
        if not self.eps >= 0:
            raise ValueError(f"{self.name} eps must be >= 0, got {self.eps}")

    @property
    def needs_input(self) -> bool:  # the preprocessing needs input gradients
        return self.eps > 0

    def _accumulators(self) -> dict[str, TiedGaussian]:
        return {"class": TiedGaussian()}

    def _fit(self, feats) -> None:
        acc = self._accumulators()
        centre = self.feature_space == "head" and getattr(feats.head, "zero_mean_rows", False)
        for z, h, y in self.space_chunks(feats):
            if y is None:
                raise ValueError(f"{self.name} needs labels (the ID training classes)")
            if centre:
                # A z-score head's rows sum to 0 over the features, up to the float32 rounding of the
                # standardisation (~1e-6 of a row here): the covariance's eigenvalue along the all-ones vector
                # is that rounding (~1e-14 of the largest), above pinvh's cutoff, and its inverse (~1e13) made
                # the noise in every test row's ones-component dominate the distance (scores moved ~10 % with
                # the fit's chunking). Fitting on the rows projected onto the hyperplane makes that eigenvalue
                # exactly ~0, so pinvh drops it and the precision ignores the ones-component of any test row;
                # scoring needs no projection (a saved detector scores as before).
                h = to_float64(h)
                h = h - h.mean(1, keepdim=True)
            stats = TiedGaussian.chunk_stats(h) if h.shape[0] else None
            acc["class"].update(h, y, stats)
            if "whole" in acc:
                acc["whole"].update(h, torch.zeros_like(y), stats)
        self._check_class_counts(acc["class"])
        self._fit_stats(acc)

    def _check_class_counts(self, acc: TiedGaussian) -> None:
        """Refuse a fit with no within-class spread (every class one row: the tied covariance is zero, its
        pseudo-inverse too, and every score equal: meaningless); warn, once per cause, about classes of one
        row (their mean is that one sample: a weak estimate, but still a distance)."""
        if acc.counts is None:
            return  # no rows: TiedGaussian.result() says so
        present = int((acc.counts > 0).sum())
        if acc.n - present < 1:
            raise ValueError(f"{self.name}: {acc.n} row(s) in {present} class(es) have no within-class spread: "
                             f"needs at least {present + 1} rows (2 in some class) for the tied covariance, "
                             "else every score is equal")
        single = torch.nonzero(acc.counts == 1)[:, 0].tolist()
        if single:
            shown = ", ".join(map(str, single[:10])) + (" ..." if len(single) > 10 else "")
            what = f"class {shown} has 1 row" if len(single) == 1 else f"classes {shown} have 1 row each"
            warn_once((self.name, "single-row classes", tuple(single[:10]), acc.n),
                      f"{self.name}: {what}, needs at least 2 for a class mean that is more than one sample "
                      "(fit on more ID-train rows of that class)", stacklevel=5)

    def _fit_stats(self, acc: dict[str, TiedGaussian]) -> None:
        self.classes, self.means, cov = acc["class"].result()
        if not bool(cov.abs().max() > 0):
            raise ValueError(f"{self.name}: the features do not vary within any class (the tied covariance is 0, "
                             "so every score would be equal): the model's features are constant on this data")
        self.precision = pinvh(cov)

    def _distances(self, h: torch.Tensor) -> torch.Tensor:
        return _mahalanobis(h, self.means.to(h.device), self.precision.to(h.device))

    def _score(self, logits, h, head):
        return (-self._distances(to_float64(self.in_space(h, head)))).amax(1).float()

    def score(self, model: nn.Module, x: torch.Tensor):
        if self.eps == 0:
            return super().score(model, x)
        self._check_fitted()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits, h = model_features(model, xg, "raw")
            d = self._distances(self.in_space(h, LinearHead.from_model(model)).double())
            # d D_closest / dx with the closest class fixed (Lee et al.'s code); only the sign is used.
            loss = d.gather(1, d.argmin(1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(loss, xg)
        x_t = _ops.iodin_perturb(xg.detach(), grad.to(x.dtype), self.eps,
                                 self._std_on(self._input_std(model), x.device), k=x[0].numel())
        with torch.no_grad():
            z_t, h_t = model_features(model, x_t, "raw")
            score = self._score(z_t, h_t, LinearHead.from_model(model))
        return logits.detach().argmax(1), score


class RMDS(MDS):
    """Relative Mahalanobis: max_c -(MD_c(h) - MD_0(h)), MD_0 with the global mean and covariance.

    Both fitted in the same streamed pass (two accumulators). No input preprocessing.
    """

    name = "rmds"

    def __init__(self, feature_space: str = "raw") -> None:
        super().__init__(feature_space)

    def _accumulators(self) -> dict[str, TiedGaussian]:
        return {"class": TiedGaussian(), "whole": TiedGaussian()}

    def _fit_stats(self, acc: dict[str, TiedGaussian]) -> None:
        super()._fit_stats(acc)
        _, self.whole_mean, cov0 = acc["whole"].result()
        self.whole_precision = pinvh(cov0)

    def _score(self, logits, h, head):
        h = to_float64(self.in_space(h, head))
        d = self._distances(h)
        d0 = _mahalanobis(h, self.whole_mean.to(h.device), self.whole_precision.to(h.device))
        return (-(d - d0)).amax(1).float()


class ViM(FeatureScorer):
    """Virtual-logit matching: energy(W h + b) - alpha * ||(h - u) projected on the residual space||.

    u = -pinv(W) b; the principal space is spanned by the ``dim`` leading
    eigenvectors of the (uncentred about u) covariance of ID-train features,
    the residual space by the rest; alpha = mean max-logit / mean residual
    norm on ID train. ``dim`` defaults to 256 (the authors' configs; grid
    {256, 1000}); features of 256 or fewer dimensions get m // 2 instead
    (256 would leave no residual space). Logits are fc(feature) in the chosen
    feature space. A fit on ``dim`` or fewer rows is refused: the rows then
    lie in the principal space, every residual norm is 0 and alpha undefined.
    The fit is float64; scoring float32 (its matrices cast once per fit). The fit reads the features twice
    (covariance, then alpha); refitting the same record for another ``dim``
    (the APS grid) reuses the eigendecomposition.
    """

    name = "vim"
    needs_fit = True
    default_grid = {"dim": [256, 1000]}
    DEFAULT_DIM = 256
    refit_params = ("dim",)

    def __init__(self, dim: int | None = None, feature_space: str = "raw") -> None:
        super().__init__(feature_space)
        self.dim = dim
        self._eig_of = None  # weak reference to the record the cached eigendecomposition belongs to
        self._validate()

    def _validate(self) -> None:
        self.dim = check_int(self.name, "dim", self.dim, allow_none=True)

    def _fit(self, feats) -> None:
        feats.require("head", self.name)
        feats.require("features", self.name)
        m = feats.features.shape[1]
        dim = self.dim if self.dim is not None else (self.DEFAULT_DIM if m > self.DEFAULT_DIM else m // 2)
        if not 1 <= dim < m:
            raise ValueError(f"vim dim must be in [1, {m - 1}] for {m}-d features, got {dim}")
        if len(feats) <= dim:
            # N rows span at most N directions: the principal space then holds every training feature, the
            # residual norms are all 0 and alpha = mean logit / 0 (meaningless): refused, not warned.
            raise ValueError(f"vim: dim = {dim} principal dimensions need more than {dim} ID-train rows, the fit "
                             f"has {len(feats)} (the residual space would hold none of them): fit on more rows "
                             "or pass a smaller dim")
        W = feats.head.weight.detach().double().cpu()
        b = feats.head.bias_or_zero().detach().double().cpu()
        if self._eig_of is None or self._eig_of() is not feats:
            u = -(torch.linalg.pinv(W) @ b)
            g, n = torch.zeros(m, m, dtype=torch.float64), 0
            for _, h, _ in self.space_chunks(feats):
                g += gram(to_float64(h) - u)
                n += h.shape[0]
            eigvals, eigvecs = eigh(g / n)  # ascending
            self._eig = (u, eigvecs[:, torch.argsort(eigvals, descending=True)])
            self._eig_of = weakref.ref(feats)
        self.u, order = self._eig
        self.NS = order[:, dim:].contiguous()
        # ||c projected on the residual space|| with the smaller of the two projections: ||c NS||, or
        # sqrt(||c||^2 - ||c PS||^2) when the principal space is the smaller (dim 256 of m = 2048: 7x fewer
        # multiply-adds; float64 keeps the difference exact to ~1e-13 here).
        PS = order[:, :dim].contiguous() if dim < m - dim else None
        vsum = lsum = 0.0
        n = 0
        W32, b32 = W.float(), b.float()
        for _, h, _ in self.space_chunks(feats):
            h = to_float64(h)
            c = h - self.u
            if PS is None:
                vsum += float(torch.linalg.norm(c @ self.NS, dim=1).sum())
            else:
                vsum += float(((c * c).sum(1) - (c @ PS).pow(2).sum(1)).clamp(min=0).sqrt().sum())
            # The max-logit only enters alpha through its mean: float32 logits (7 digits) summed in float64
            # halve this pass's largest product (C x m per row: 1000 x 512 at ImageNet size).
            lsum += float((h.float() @ W32.T + b32).amax(1).double().sum())
            n += h.shape[0]
        if not vsum > 0:
            raise ValueError(f"vim: the ID-train features have no component in the residual space (dim = {dim} of "
                             f"{m}): alpha = mean max-logit / 0 is undefined; pass a smaller dim")
        self.alpha = (lsum / n) / (vsum / n)
        self.W, self.b = W, b

    def _scoring_mats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """([W^T | NS] (m, C + m - dim), [b | -u NS]) in float32 on ``device``, made once per fitted (or
        restored) u, NS, W, b; u NS is formed in float64."""
        key = (id(self.NS), id(self.W), id(self.b), id(self.u), torch.device(device))
        if getattr(self, "_mats_key", None) != key:
            both = torch.cat([self.W.T, self.NS], 1)
            const = torch.cat([self.b, -(self.u @ self.NS)])
            self._mats = tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in (both, const))
            self._mats_key = key
        return self._mats

    def _score(self, logits, h, head):
        # Scored in float32, as pytorch-ood (float64 products took twice the time); the fit (covariance,
        # eigenvectors, alpha) stays float64. The residual (h - u) NS is formed as h NS - u NS, the constant
        # from float64: u (the logits' origin) can lie far from the features (|u| = 333 against a residual
        # norm of 0.15 in a z-scored head space, where float32 (h - u) NS lost 1e-3 of the norm), while
        # |h NS| <= |h|, so float32's error stays that of the features' own size. One product for the
        # logits and the residual.
        h = self.in_space(h, head).float()
        both, const = self._scoring_mats(h.device)
        out = matmul(h, both).add_(const)
        c = self.W.shape[0]
        vlogit = torch.linalg.vector_norm(out[:, c:], dim=1) * self.alpha
        return logsumexp_rows(out[:, :c]) - vlogit


class NNGuide(FeatureScorer):
    """NNGuide: energy(z) * mean of the K largest similarities to a confidence-scaled ID bank.

    Bank rows: normalise(h_train) * energy(z_train) (energy = logsumexp of the
    model's logits). Test: normalise(h) against the bank, mean of the top K dot
    products, times the test energy. Which ID-train rows form the bank is
    ``bank``:

    * ``"random"`` (default here): a random ``alpha`` fraction,
      round(alpha * N) rows (fixed seed), as NNGuide's own paper code;
    * ``"all"``: the whole ID training set, as the ASCOOD authors' OpenOOD
      fork (it removed the subsampling); ``alpha`` is ignored;
    * ``"first"``: OpenOOD's: the first loader batches, up to the first whose
      end passes int(alpha * N) rows (needs the loader's batch size, which
      :func:`~.features.extract_features` records).

    K is capped at the bank size with a warning, once per K (a
    bank smaller than K, e.g. 1% of a small train set, changes the score but
    keeps it a similarity: warned, not refused). Defaults K 100, alpha 0.01
    (the authors' configs); not searched by APS (pass ``grid=`` to
    :func:`sweep` to search). Memory: a 1.28M x 512 float32 bank is 2.5 GiB
    (x 2048: 10 GiB), referenced, not copied (memory-mapped: it stays on
    disk); scoring streams it in ``bank.chunk``-row blocks. Measured here
    (BENCHMARKS.md, "Scorers round 2"; one core): at 1.28M x 512 from a
    memory-mapped file the fit took 6.2 s and 189 MiB, scoring 49 ms per
    query; at 128k x 512 (kept normalised in RAM, 250 MiB) 4.0 ms per query:
    exact search is linear in the bank size.
    """

    name = "nnguide"
    needs_fit = True
    param_names = ("K", "alpha", "bank")
    refit_params = ("alpha", "bank")

    def __init__(self, K: int = 100, alpha: float = 0.01, feature_space: str = "raw",
                 max_device_bank_mb: float = 1024, bank: str = "random") -> None:
        super().__init__(feature_space)
        self.K, self.alpha = K, alpha
        self.bank_mode = bank
        self.max_device_bank_mb = max_device_bank_mb
        self._validate()

    # ``bank`` is the constructor's and set_params' name; the fitted bank object is ``self.bank_rows``.
    @property
    def bank(self) -> str:
        return self.bank_mode

    @bank.setter
    def bank(self, value: str) -> None:
        self.bank_mode = value

    def _validate(self) -> None:
        self.K = check_int(self.name, "K", self.K)
        if not 0 < self.alpha <= 1:
            raise ValueError(f"nnguide needs alpha in (0, 1], got alpha={self.alpha}")
        if self.bank_mode not in NNGUIDE_BANKS:
            raise ValueError(f"nnguide bank must be one of {NNGUIDE_BANKS}, got {self.bank_mode!r}")

    def bank_subset(self, feats):
        """The ID-train rows (a record) that form the bank under ``bank`` / ``alpha``."""
        n = len(feats)
        if self.bank_mode == "all":
            return feats
        if self.bank_mode == "random":
            keep = max(1, int(round(self.alpha * n)))
            if keep >= n:
                return feats
            return feats.take(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:keep])
        bs = feats.batch_size
        if not bs:
            raise ValueError("nnguide bank='first' takes the first loader batches: it needs the loader's batch size "
                             "(Features.batch_size; extract_features records it)")
        batches = int(n * self.alpha) // bs + 1  # OpenOOD stops after the first batch that passes int(N * alpha)
        return feats.slice(min(n, batches * bs))

    def _fit(self, feats) -> None:
        feats.require("features", self.name)
        feats.require("logits", self.name)
        src = self.bank_subset(feats)
        head = feats.head
        # The energies read only the logits, chunk by chunk, into one preallocated vector: a list of small
        # per-chunk results kept between the large transient chunks let glibc's heap fragment (the anonymous
        # memory of this loop varied from 0.1 to 4.5 GiB at 1.28M x 1000 logits; preallocated it stays flat).
        n = len(src)
        conf = torch.empty(n, dtype=torch.float32)
        for s in range(0, n, self.chunk_rows):
            e = min(n, s + self.chunk_rows)
            conf[s:e] = energy(src.logit_rows(s, e))
        self.bank_rows = _Bank(len(src), src.features.shape[1],
                               lambda s, e: l2_normalize(self.in_space(src.feature_rows(s, e), head)) * conf[s:e, None],
                               self.max_device_bank_mb).prepare()

    def _score(self, logits, h, head):
        k = min(self.K, self.bank_rows.n)
        if k < self.K:
            _warn_capped(self.name, self.K, self.bank_rows.n,
                         "a larger alpha or bank='all' (more ID-train rows), or a smaller K")
        guidance = topk_similarity(l2_normalize(self.in_space(h, head)), self.bank_rows, k).mean(1)
        return guidance * energy(logits)


class Relation(FeatureScorer):
    """Neural relation graph: sum over ID-train j of rel_j^pow, rel_j = max(h.h_j, 0) * (p.p_j).

    h normalised, p = softmax(z); edges with |rel| <= ``threshold`` (0.03) are
    dropped; ``pow`` (default 1, grid {1, 2, 4, 6, 8} as the authors'
    configs) sharpens the kernel. The bank is [normalised h | p] per ID-train
    row, built chunk by chunk like KNN's.
    """

    name = "relation"
    needs_fit = True
    default_grid = {"pow": [1, 2, 4, 6, 8]}

    def __init__(self, pow: int = 1, threshold: float = 0.03, feature_space: str = "raw",
                 max_device_bank_mb: float = 1024) -> None:
        super().__init__(feature_space)
        self.pow, self.threshold = pow, threshold
        self.max_device_bank_mb = max_device_bank_mb
        self._validate()

    def _validate(self) -> None:
        self.pow = check_int(self.name, "pow", self.pow)

    def _fit(self, feats) -> None:
        feats.require("features", self.name)
        feats.require("logits", self.name)
        head = feats.head
        self.m = feats.features.shape[1]

        def block(s: int, e: int) -> torch.Tensor:
            # One bank holding [feature | prob] so both halves stream together.
            return torch.cat([l2_normalize(self.in_space(feats.feature_rows(s, e), head)),
                              torch.softmax(feats.logit_rows(s, e), 1)], 1)

        self.bank = _Bank(len(feats), self.m + feats.logits.shape[1], block, self.max_device_bank_mb).prepare()

    def _score(self, logits, h, head):
        feat, prob = l2_normalize(self.in_space(h, head)), torch.softmax(logits, 1)
        total = torch.zeros(h.shape[0], device=h.device, dtype=torch.float32)
        for _, block in self.bank.chunks(h.device):
            rel = (feat @ block[:, : self.m].T).clamp(min=0) * (prob @ block[:, self.m:].T)
            rel = rel * (rel.abs() > self.threshold)
            total += (rel.sign() * rel.abs().pow(self.pow)).sum(1)
        return total


class SHE(FeatureScorer):
    """SHE, simplified Hopfield energy (Zhang et al., ICLR 2023): h . S_pred.

    S_k is the mean feature of the ID-train samples of class k the model
    classifies correctly (label == argmax z); pred is the model's argmax.
    Inner product, OpenOOD's default metric (pytorch-ood's score is its
    negative). A class with no correctly classified training sample raises a
    ValueError (OpenOOD gets a NaN pattern there). Fit: one streamed pass,
    class sums (C, m) float64. Not searched by APS.
    """

    name = "she"
    needs_fit = True
    streams_fit = True
    uses_labels = True

    def _fit(self, feats) -> None:
        sums = counts = None
        for z, h, y in self.space_chunks(feats):
            if y is None:
                raise ValueError("she needs labels (the ID training classes)")
            if z is None:
                raise ValueError("she needs logits (the model's predictions)")
            if sums is None:
                sums = torch.zeros(z.shape[1], h.shape[1], dtype=torch.float64)
                counts = torch.zeros(z.shape[1], dtype=torch.float64)
            pred = z.argmax(1)
            ok = pred == y
            sums.index_add_(0, pred[ok], h[ok].double())
            counts += torch.bincount(pred[ok], minlength=z.shape[1]).double()
        if sums is None:
            raise ValueError("she: the ID training data is empty")
        missing = torch.nonzero(counts == 0)[:, 0].tolist()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"she: no correctly classified ID-train sample for class(es) {shown}: "
                             "their stored pattern would be undefined")
        self.patterns = sums / counts[:, None]

    def _score(self, logits, h, head):
        pred = logits.argmax(1)
        return (self.in_space(h, head).double() * self.patterns.to(h.device)[pred]).sum(1).float()
