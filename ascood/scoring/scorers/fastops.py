"""Row reductions the cached-feature scorers run on every batch, fast on the CPU, equal to the plain formulas.

Why this module: on cached features a scorer's whole cost is a few passes over a (B, C) or (B, m)
block, so per-pass costs decide the rate (BENCHMARKS.md, "Scorers round 3"). Measured on the
development VM (one thread, 2000 x 100 float32 logits, 1024 x 512 features): torch's ``argmax(1)``
takes 260 us where numpy's takes 55; ``torch.exp`` 165 us where numpy's takes 90 (so
``torch.logsumexp`` 240 us, unshifted with numpy's exp 115); ``torch.topk`` of 77 of 512 ReLU features (many
tied zeros) 7 ms where numpy's introselect ``np.partition`` takes 1; ``torch.isfinite(a).all()``
is 2 ns per element where ``a.sum()`` is 0.1.

Every function here gives the plain formula's result (the same value, or the same up to float
rounding where noted), including NaN / inf rows and ties: the fast path covers the common rows and
the plain formula recomputes the few rows it cannot (a check on the (B,) result, not per element).
Other devices than the CPU use the plain torch formula. ``tests/scoring/test_fastops.py`` checks each
against the plain formula on random odd shapes, float32 and float64.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["argmax_rows", "logsumexp_rows", "neg_entropy_rows", "softmax_plogp64", "top_values", "sort_desc", "all_finite", "to_float64", "matmul",
           "blas_threads"]

_NUMPY = (torch.float32, torch.float64)


def _cpu_numpy(a: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU float32/float64 tensor (no copy), else None (other devices / dtypes)."""
    if a.device.type != "cpu" or a.dtype not in _NUMPY or a.requires_grad:
        return None
    return a.numpy()


def argmax_rows(z: torch.Tensor) -> torch.Tensor:
    """``z.argmax(1)``: (B, C) -> (B,) int64, the first maximum of each row (NaN counts as the maximum, as
    torch and numpy both do). numpy's argmax on the CPU (5x faster than torch's at C = 100)."""
    a = _cpu_numpy(z)
    if a is None or z.dim() != 2 or z.shape[1] == 0:
        return z.argmax(1)
    return torch.from_numpy(np.ascontiguousarray(a.argmax(1)).astype(np.int64, copy=False))


def _exp_(d: torch.Tensor) -> torch.Tensor:
    """exp of a CPU float tensor in place (numpy's vectorised exp: about twice torch's rate here)."""
    a = _cpu_numpy(d)
    if a is None or not d.is_contiguous():
        return d.exp_()
    np.exp(a, out=a)
    return d


#: The unshifted sum of exponentials is used where it lies in [_LSE_LOW, inf): there every term that
#: float32 flushes or makes subnormal (< 1.2e-38) is below 1e-18 of the sum (C < 1e6 classes).
_LSE_LOW = 1e-20


def logsumexp_rows(z: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(z, 1)``: (B, C) -> (B,), z's dtype, equal up to float rounding (a few ulp).

    On the CPU: log(sum exp(z)) unshifted, the exp numpy's (half torch's time here, and no max pass, no
    shifted copy). That is exact to float rounding wherever the sum neither overflows nor falls towards
    the subnormal range; the rows where it does (logits above ~88 - log C, all below ~-46, NaN, inf) are
    recomputed by ``torch.logsumexp`` (max-shifted), so they get its value.
    """
    a = _cpu_numpy(z)
    if a is None or z.dim() != 2 or z.shape[1] == 0:
        return torch.logsumexp(z, 1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        total = torch.from_numpy(np.exp(a)).sum(1)
    # Two reductions on (B,) decide the common case (NaN fails both comparisons); the mask only if needed.
    fine = float(total.amin()) >= _LSE_LOW and float(total.amax()) < float("inf")
    out = total.log_()
    if not fine:
        bad = ~((out >= np.log(_LSE_LOW)) & (out < float("inf")))
        out[bad] = torch.logsumexp(z[bad], 1)
    return out


def _neg_entropy_plain(z: torch.Tensor) -> torch.Tensor:
    """sum_k p_k log p_k in float64 from log_softmax (exact where p_k underflows), as float32."""
    logp = torch.log_softmax(z.double(), 1)
    return (logp.exp() * logp).sum(1).float()


#: Below this |sum p log p| the float32 path's flushed terms (exp(d) < 1e-38, each term < 1e-36) could
#: be more than 1e-16 of the result: such rows (near one-hot) are recomputed in float64.
_ENTROPY_TINY = 1e-20


def neg_entropy_rows(z: torch.Tensor) -> torch.Tensor:
    """The negative Shannon entropy of softmax(z), sum_k p_k log p_k: (B, C) -> (B,) float32.

    Plain formula: float64 log_softmax, so terms are exact where p_k underflows (a one-hot-like row has
    entropy ~0, not rounding noise). Fast path (CPU): float32 with no cancellation. With d = z - max z
    (0 at the row's n0 maxima), e = exp(d) and r = the sum of e over the other classes,

        sum p log p = (sum_k e_k d_k) / (n0 + r) - log n0 - log1p(r / n0),

    non-positive terms each to float32's relative precision (the softmax form subtracts two O(1)
    numbers for a confident row; float64 log_softmax loses r below 1e-16 in log(1 + r)). Rows whose
    result is not finite or below 1e-20 in magnitude (float32 flushes terms under ~1e-36 there) are
    recomputed by the plain formula.
    """
    a = _cpu_numpy(z)
    if a is None or z.dim() != 2 or z.shape[1] == 0 or z.dtype != torch.float32:
        return _neg_entropy_plain(z)
    d = z - z.amax(1, keepdim=True)
    sg = d.sign()  # -1 off the maxima, 0 at them (NaN for NaN): no bool tensor (slow on the CPU)
    with np.errstate(under="ignore", invalid="ignore"):
        e = torch.from_numpy(np.exp(d.numpy())).mul_(sg)  # -exp(d) off the maxima, 0 at them
    # (n0 - 1) + r: log(n0 + r) = log1p of it, precise for one maximum and tiny r.
    t = sg.sum(1).add_(z.shape[1] - 1).sub_(e.sum(1))
    # e holds -exp(d) off the maxima, so vecdot(e, d) = -(sum_k e_k d_k) >= 0.
    out = torch.linalg.vecdot(e, d).div_(t + 1).add_(torch.log1p(t)).neg_()
    # out <= 0; NaN (an inf or NaN logit) propagates into the max and fails the comparison too.
    if not float(out.amax()) <= -_ENTROPY_TINY:
        redo = ~(out.abs() >= _ENTROPY_TINY)
        out[redo] = _neg_entropy_plain(z[redo])
    return out


def softmax_plogp64(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e (B, C), s (B,), sum_k p_k log p_k (B,)), float64, with softmax(z) = e / s[:, None] (KL-Matching's
    factors; the division is left to the caller, who may apply it to a smaller product).

    Plain formula: float64 log_softmax, its exp (e, s = 1), and the sum of their product. On the CPU: d =
    z - max z (exact: the difference of two float32 numbers is a float64 number), e = exp(d) (numpy's), s = sum e, and sum p log p = (sum e d) / s - log s: the same float64
    quantities (to float64 rounding) in fewer passes. Rows that are not finite take the plain formula.
    """
    if z.device.type != "cpu" or z.dim() != 2 or z.shape[1] == 0 or z.dtype != torch.float32:
        logp = torch.log_softmax(z.double(), 1)
        p = logp.exp()
        return p, torch.ones(p.shape[0], dtype=p.dtype, device=p.device), (p * logp).sum(1)
    d = to_float64(z)
    d -= d.amax(1, keepdim=True)
    with np.errstate(under="ignore", invalid="ignore"):
        e = torch.from_numpy(np.exp(d.numpy()))
    s = e.sum(1)
    plogp = torch.linalg.vecdot(e, d).div_(s).sub_(s.log())
    if not bool(torch.isfinite(plogp.sum())):  # NaN / inf logits: their rows as the plain formula
        bad = ~torch.isfinite(plogp)
        logp = torch.log_softmax(z[bad].double(), 1)
        e[bad] = logp.exp()
        s[bad] = 1.0
        plogp[bad] = (e[bad] * logp).sum(1)
    return e, s, plogp


def top_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row, (B, n) -> (B, k), in no particular order (a multiset equal to
    ``x.topk(k, 1).values``; NaN counts as the largest, as in topk). numpy's introselect on the CPU
    where k is over 1/40 of n, else torch's topk."""
    a = _cpu_numpy(x)
    n = x.shape[1]
    if k == n and x.dim() == 2:
        return x
    # numpy's introselect costs ~6 ns per element whatever k; torch's topk is faster only for a few of many
    # (k = 100 of 20,000: 66 ms against 127 for 1024 rows; k = 77 of 512: 5.8 ms against 1.0).
    if a is None or x.dim() != 2 or not 0 < k < n or k * 40 < n:
        return x.topk(k, 1, sorted=False).values
    return torch.from_numpy(np.partition(a, n - k, axis=1)[:, n - k:])


_CONTROLLER = None


def blas_threads(n: int):
    """A context limiting numpy's BLAS to ``n`` threads. The library scan (threadpoolctl's controller) is
    done once per process: ``threadpool_limits`` repeats it on every call (1-3 ms here)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n, user_api="blas")


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` of two (B, m) tensors of one dtype: (B,). numpy's einsum on the CPU (one pass, no
    (B, m) product in memory: 0.35 against 0.97 ms for NCI's 2000 x 512 float32 rows here), else torch."""
    x, y = _cpu_numpy(a), _cpu_numpy(b)
    if x is None or y is None or a.dim() != 2 or a.shape != b.shape or a.dtype != b.dtype:
        return (a * b).sum(1)
    return torch.from_numpy(np.einsum("ij,ij->i", x, y))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of two 2-D float tensors. On the CPU numpy's (OpenBLAS) on torch's thread count: on the
    development VM (AMD EPYC) its GEMM took 7.7 ms where torch's (MKL) took 8.8 for ViM's 2000 x 512 x 356
    float32 product, 0.93 against 1.2 ms for KL-Matching's float64 2000 x 100 x 100."""
    x, y = _cpu_numpy(a), _cpu_numpy(b)
    if x is None or y is None or a.dim() != 2 or b.dim() != 2 or a.dtype != b.dtype:
        return a @ b
    with blas_threads(torch.get_num_threads()):
        return torch.from_numpy(x @ y)


def sort_desc(x: torch.Tensor) -> torch.Tensor:
    """Each row sorted in descending order, (B, k) -> (B, k) (torch's sort along rows is slow on the CPU:
    numpy's here). NaN first, as ``torch.sort(descending=True)`` puts it."""
    a = _cpu_numpy(x)
    if a is None or x.dim() != 2:
        return x.sort(1, descending=True).values
    return torch.from_numpy(np.sort(a, axis=1)[:, ::-1].copy())  # copy: torch refuses negative strides


def all_finite(a: torch.Tensor) -> bool:
    """Whether every element of a float tensor is finite. Sum first, in the tensor's own dtype (NaN and inf
    propagate into it, so a finite sum proves every element finite: 0.3 ms for 8192 x 512 float32 here
    against 9 ms for ``isfinite(a).all()``); only a non-finite sum (a bad element, or finite values whose
    sum overflows) runs the per-element check."""
    if not a.is_floating_point() or a.numel() == 0:
        return True
    if bool(torch.isfinite(a.sum())):
        return True
    return bool(torch.isfinite(a).all())


def to_float64(a: torch.Tensor) -> torch.Tensor:
    """``a.double()`` (a copy for other dtypes). numpy's conversion on the CPU: torch's float32 -> float64
    copy ran at 4 ns per element here (16 ms for 8192 x 512), numpy's at about a quarter of that."""
    if a.dtype == torch.float64:
        return a
    n = _cpu_numpy(a)
    if n is None:
        return a.double()
    return torch.from_numpy(n.astype(np.float64))
