"""Which (backend, device, dtype) combinations the op tests run, and tolerances.

Every test that runs the CUDA kernels ("cuda" on a GPU) also runs them as
"cuda-emulated": the same kernel sources built for the host and run on CPU
tensors under the CUDA emulation (ascood_kernels.emulation; built once per
source state, about two minutes on two cores; ASCOOD_EMU=0 skips them).

Tolerances (output vs the float64 reference rounded to the tested dtype):
the compiled kernels evaluate in float32 (float64 for float64) and round once,
so they may differ from float64-then-round by one unit in the last place;
masks, selections and copied elements must match exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

from ascood_kernels import _backend

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Shared with the self-check (python -m ascood_kernels), so both judge a kernel alike.
from ascood_kernels._compare import TOL  # noqa: E402,F401


def _skip_reason(backend: str, device: str) -> str | None:
    if device == "cuda" and not HAS_CUDA:
        return "needs a CUDA device (none here)"
    if backend == "cpu" and not _backend.extension_loaded():
        return "C++ extension not built"
    if backend == "cuda" and not _backend.cuda_built():
        return "extension built without CUDA kernels"
    if backend == "cuda-emulated":
        from ascood_kernels import emulation

        if not emulation.load():
            return f"the CUDA emulation is unavailable: {emulation.why_not()}"
    if backend == "triton":
        if not _backend.triton_loaded():
            return f"triton kernels unavailable: {_backend._state.get('triton_error')}"
        if device == "cpu" and not INTERPRETED:
            return "Triton on CPU tensors needs TRITON_INTERPRET=1"
    return None


def combos(*, interp_dtypes=(torch.float32,), cpu_dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
           gpu_dtypes=(torch.float32, torch.float16, torch.bfloat16), cuda=True):
    """pytest params of (backend, device, dtype); unavailable ones are skipped with a reason.

    ``cuda=True`` (an op with CUDA kernels) adds "cuda" on CUDA tensors and
    "cuda-emulated" on CPU tensors, the latter in the GPU dtypes plus float64
    where the CPU dtypes have it (the CUDA kernels take float64 too).
    """
    out = []
    plan = [("reference", "cpu", cpu_dtypes), ("cpu", "cpu", cpu_dtypes), ("triton", "cpu", interp_dtypes),
            ("triton", "cuda", gpu_dtypes)]
    if cuda:
        plan.append(("cuda", "cuda", gpu_dtypes))
        emu = tuple(gpu_dtypes) + ((torch.float64,) if torch.float64 in cpu_dtypes and torch.float64 not in gpu_dtypes
                                   else ())
        plan.append(("cuda-emulated", "cpu", emu))
    for backend, device, dtypes in plan:
        reason = _skip_reason(backend, device)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        for dt in dtypes:
            out.append(pytest.param(backend, device, dt, marks=marks,
                                    id=f"{backend}-{device}-{str(dt).replace('torch.', '')}"))
    return out


def is_slow(backend: str, device: str) -> bool:
    """Triton's interpreter and the CUDA emulation run programs / blocks one by one: keep their shapes small."""
    return (backend == "triton" and device == "cpu") or backend == "cuda-emulated"


def emulation_trim(backend: str, dtype, numel: int, limit: int = 5000) -> bool:
    """True for an emulated case to skip: shapes over ``limit`` elements run in float32 only.

    The emulation runs every thread of a block as an OS thread (about 50 ms for a 512-thread block
    on two cores), so the large shapes of the op tests run once, not per dtype; the GPU-sized
    shapes are in test_cuda_emulated.py.
    """
    return backend == "cuda-emulated" and numel > limit and dtype != torch.float32

