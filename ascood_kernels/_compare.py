"""Tolerances and comparison rules shared by the op tests and the self-check (``python -m ascood_kernels``).

Outputs are compared with the float64 reference rounded to the tested dtype:
the compiled kernels evaluate in float32 (float64 for float64) and round once,
so they may differ from float64-then-round by about one unit in the last
place. Masks, selections and copied elements must match exactly.
"""
from __future__ import annotations

import torch

#: Elementwise ops (gradient_outlier, iodin_perturb): one rounding of the float32 result.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}

#: zscore forward/backward: row statistics accumulate rounding over m features.
ZSCORE_TOL = dict(TOL)
ZSCORE_TOL[torch.float32] = dict(rtol=1e-5, atol=1e-5)
ZSCORE_TOL[torch.float16] = dict(rtol=2e-3, atol=2e-3)
ZSCORE_TOL[torch.bfloat16] = dict(rtol=1.6e-2, atol=1.6e-2)

#: ascood_loss forward/backward: log-sum-exp over C classes and a mean over the batch.
LOSS_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.float16: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def mismatch(got: torch.Tensor, want: torch.Tensor, tol: dict | None = None) -> str | None:
    """None when ``got`` matches ``want`` (NaN where NaN; exact when ``tol`` is None), else why not.

    ``want`` is compared in ``got``'s dtype when it is floating (the float64
    reference rounded once to the tested dtype) and on ``got``'s device.
    """
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    if got.dtype != want.dtype and want.is_floating_point() and got.is_floating_point():
        want = want.to(got.dtype)
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != expected {want.dtype}"
    want = want.to(got.device)
    if not got.is_floating_point():
        bad = int((got != want).sum())
        return None if bad == 0 else f"{bad} of {got.numel()} elements differ"
    tol = tol or dict(rtol=0.0, atol=0.0)
    try:
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
    except AssertionError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        return "; ".join(lines[:3])
    return None
