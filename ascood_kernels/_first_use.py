"""First-use check of the GPU kernels that ``backend="auto"`` picks on CUDA tensors.

The CUDA C++ kernels are tested in CI under an emulation of the CUDA execution
model (:mod:`ascood_kernels.emulation`), but the first real GPU they run on is a
user's. So the first time an op runs with ``auto`` on a CUDA device (once per
process for each op, device and dtype), the kernel ``auto`` would use (CUDA,
else Triton) runs a small probe -- ties at the threshold, NaN and +-inf, a row
long enough for the multi-block select, one block per sample in i-ODIN, the
fused backwards -- and is compared with the reference on the same device. On a
mismatch or an error it warns once, naming the op, the device and the build,
and ``auto`` uses the next backend (Triton, else the reference) for that op,
device and dtype from then on.

A probe that cannot judge -- it fails on its reference side (e.g. an op that
``torch.use_deterministic_algorithms`` refuses) or for want of memory -- is no
pass: it warns once (op, device, dtype, the reason), the call uses the kernel
unchecked (the next backend's reference path may fail the same way), and the
next calls probe again, :data:`UNJUDGED_TRIES` probes in all; after that the
kernel stays in use unchecked (``python -m ascood_kernels`` is the full check).

``torch.compile``: the backend choice (:func:`ascood_kernels._backend.resolve`)
runs natively while Dynamo traces, before the graph is built, never inside it
(no lock, probe or warning is traced). An op traced before any eager call is
probed then, on the real device, and the graph is built with the checked
kernel; a graph keeps the backend chosen when it was traced. Where no real
tensor can be made -- under a fake-tensor or tracing mode (``torch.export``'s
non-strict tracing, ``make_fx``) or any other dispatch mode -- and during CUDA
graph capture (the probe synchronises), nothing is probed: a known verdict
applies, else the kernel is used unchecked and checked at the next call that
can probe. ``ASCOOD_FIRST_USE_CHECK=0`` turns the check off; explicit
``backend="cuda"`` or ``"triton"`` requests are never redirected. Cost: a few
small kernel launches and reference ops per op and dtype, once (BENCHMARKS.md,
GPU section).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Sequence

import torch

from . import reference
from ._compare import LOSS_TOL, TOL, ZSCORE_TOL, mismatch

__all__ = ["ENV", "FAMILY", "UNJUDGED_TRIES", "Unjudged", "enabled", "probe", "choose", "reset"]

#: Environment variable that turns the check off when set to 0.
ENV = "ASCOOD_FIRST_USE_CHECK"

#: The probe that covers each public op (forward and its fused backward).
FAMILY = {"invariant_mask": "select", "gradient_outlier": "select", "zscore": "zscore",
          "iodin_perturb": "iodin_perturb", "ascood_loss": "ascood_loss"}

#: Probes that could not judge a kernel, per op family, backend, device and dtype, before it is used unchecked.
UNJUDGED_TRIES = 3

_verdicts: dict[tuple, list[str]] = {}  # (family, backend, device, dtype) -> problems ([]: matched)
_unjudged: dict[tuple, int] = {}  # the same keys -> probes that could not judge
_warned: set[tuple] = set()
_lock = threading.RLock()  # only ever taken natively: never inside a torch.compile graph (module docstring)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def reset() -> None:
    """Forget every verdict and warning (tests)."""
    with _lock:
        _verdicts.clear()
        _unjudged.clear()
        _warned.clear()


# ---------------------------------------------------------------------------------------------
# Probes: fn(ns, device, dtype) -> list of problems ("what: why"); [] when every output matched.
# Inputs are drawn from a private generator (the caller's RNG state is untouched) in float64 on
# the CPU, then moved; the reference runs on the same float64 values on the same device.
def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(20241203)


def _ties_nan_inf(shape, gen) -> torch.Tensor:
    """Few distinct magnitudes (ties at any threshold), +-0, and some NaN and +-inf."""
    g = torch.randint(-3, 4, shape, generator=gen).double() * 0.25
    flat = g.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)
    flat[idx[:3]] = float("nan")
    flat[idx[3:5]] = float("inf")
    flat[idx[5:7]] = -float("inf")
    flat[idx[7:20]] = -0.0
    return g


def _compare(problems: list[str], what: str, got: torch.Tensor, want: torch.Tensor, tol) -> None:
    why = mismatch(got, want, tol)
    if why:
        problems.append(f"{what}: {why}")


def _select_probe(ns, device, dtype) -> list[str]:
    gen = _gen()
    # A row longer than the one-block select holds on chip (32 KiB of the dtype's bits)
    # takes the multi-block path; the short rows take the one-block path.
    n_long = 32768 // torch.empty((), dtype=dtype).element_size() + 1000
    long_g = torch.randn(2, n_long, generator=gen, dtype=torch.float64)
    long_g[:, ::5] = 0.75  # a tie block near the threshold of p = 0.3
    long_g[0, 17], long_g[1, 4], long_g[1, 9] = float("nan"), float("inf"), -float("inf")
    problems: list[str] = []
    for name, g64, p in (("3x37 ties", _ties_nan_inf((3, 37), gen), 0.3),
                         ("2x3x7x5 ties", _ties_nan_inf((2, 3, 7, 5), gen), 0.1),
                         (f"2x{n_long} multi-block", long_g, 0.3)):
        g64 = g64.to(dtype).double().to(device)  # values exactly representable in dtype
        x64 = torch.randn(g64.shape, generator=gen, dtype=torch.float64).to(dtype).double().to(device)
        want_mask = reference.invariant_mask(g64, p)
        want_out = reference.gradient_outlier(x64, g64, p, 2.5)
        _compare(problems, f"invariant_mask {name}", ns.invariant_mask(g64.to(dtype), p), want_mask, None)
        _compare(problems, f"gradient_outlier {name}", ns.gradient_outlier(x64.to(dtype), g64.to(dtype), p, 2.5),
                 want_out, TOL[dtype])
    return problems


def _zscore_probe(ns, device, dtype) -> list[str]:
    gen = _gen()
    problems: list[str] = []
    for name, shape in (("5x33 constant row", (5, 33)), ("2x3000", (2, 3000))):
        h64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
        if "constant" in name:
            h64[0] = 2.0  # the term through the std is 0 for this row
        h64 = h64.to(dtype).double().to(device)
        up64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double().to(device)
        out, mean, rstd = ns.zscore(h64.to(dtype), 0.5, 1e-2)
        dh = ns.zscore_backward(up64.to(dtype), h64.to(dtype), mean, rstd, 0.5)
        want, wmean, wrstd = reference.zscore(h64, 0.5, 1e-2)
        want_dh = reference.zscore_backward(up64, h64, wmean, wrstd, 0.5)
        tol = ZSCORE_TOL[dtype]
        _compare(problems, f"zscore {name}", out, want, tol)
        _compare(problems, f"zscore_backward {name}", dh, want_dh, tol)
    return problems


def _iodin_probe(ns, device, dtype) -> list[str]:
    gen = _gen()
    problems: list[str] = []
    shape = (2, 3, 8, 8)
    g64 = _ties_nan_inf(shape, gen).to(dtype).double().to(device)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double().to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    std = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.2).to(acc).to(device)
    # k = 1, 5: one block per sample, rounds of a block argmax; 40: the radix path; all: ODIN.
    for k in (1, 5, 40, 10 ** 6):
        want = reference.iodin_perturb(x64, g64, 0.07, std.double(), k)
        _compare(problems, f"iodin_perturb k={k}", ns.iodin_perturb(x64.to(dtype), g64.to(dtype), 0.07, std, k),
                 want, TOL[dtype])
    return problems


def _loss_probe(ns, device, dtype) -> list[str]:
    gen = _gen()
    problems: list[str] = []
    tol = LOSS_TOL[dtype]
    for B, B2, C in ((5, 7, 10), (3, 2, 1000)):
        zi = (torch.randn(B, C, generator=gen, dtype=torch.float64) * 3).to(dtype).double().to(device)
        zo = (torch.randn(B2, C, generator=gen, dtype=torch.float64) * 3).to(dtype).double().to(device)
        y = torch.randint(0, C, (B,), generator=gen).to(device)
        loss, lse_i, lse_o = ns.ascood_loss(zi.to(dtype), y, zo.to(dtype), 0.7)
        grad = torch.ones((), dtype=dtype, device=device)
        d_id, d_ood = ns.ascood_loss_backward(grad, zi.to(dtype), y, zo.to(dtype), 0.7, lse_i, lse_o)
        want, wlse_i, wlse_o = reference.ascood_loss(zi, y, zo, 0.7)
        want_id, want_ood = reference.ascood_loss_backward(torch.ones((), dtype=torch.float64, device=device), zi, y,
                                                           zo, 0.7, wlse_i, wlse_o)
        _compare(problems, f"ascood_loss B={B} B2={B2} C={C}", loss, want, tol)
        _compare(problems, f"ascood_loss_backward d_id B={B} C={C}", d_id, want_id, tol)
        _compare(problems, f"ascood_loss_backward d_ood B2={B2} C={C}", d_ood, want_ood, tol)
    return problems


PROBES: dict[str, Callable] = {"select": _select_probe, "zscore": _zscore_probe, "iodin_perturb": _iodin_probe,
                               "ascood_loss": _loss_probe}


class _KernelError(Exception):
    pass


class Unjudged(Exception):
    """A probe could not judge the kernel: something other than the kernel failed (the message says what)."""


class _Kernels:
    """The namespace's ops, with their exceptions told apart from the reference's."""

    def __init__(self, ns):
        self._ns = ns

    def __getattr__(self, name):
        try:
            fn = getattr(self._ns, name)
        except AttributeError as err:  # the backend lacks the op: that is the kernel's failure
            raise _KernelError(f"{name}: {_first_line(err)}") from err

        def call(*args):
            try:
                return fn(*args)
            except Exception as err:
                raise _KernelError(f"{name}: {_first_line(err)}") from err
        return call


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def probe(family: str, backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Run ``family``'s probe with ``backend``'s kernels on ``device``: the problems found ([]: all matched).

    A kernel that raises, or a CUDA error (device-side asserts surface at the
    next synchronisation), is a problem too. Raises :class:`Unjudged` when the
    probe could not judge the kernel because something else failed (e.g. the
    reference side, refused under ``torch.use_deterministic_algorithms``, or
    an allocation).
    """
    from . import _backend

    ns = _Kernels(_backend.op_namespace(backend))
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        try:
            problems = PROBES[family](ns, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except _KernelError as err:
            problems = [f"error: {err}"]
        except Exception as err:
            text = str(err)
            if "CUDA error" not in text and "device-side assert" not in text:
                raise Unjudged(_first_line(err)) from err
            problems = [f"error: {_first_line(err)}"]
    return problems


# ---------------------------------------------------------------------------------------------
def _device_text(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            cap = torch.cuda.get_device_capability(device)
            return f"{device} ({torch.cuda.get_device_name(device)}, sm_{cap[0]}{cap[1]})"
        except Exception:  # a device index that does not exist: the name is enough
            pass
    return str(device)


def _build_text(backend: str) -> str:
    from . import _backend

    if backend == "triton":
        try:
            import triton
            return f"Triton {triton.__version__}, torch {torch.__version__}"
        except Exception:
            return f"Triton, torch {torch.__version__}"
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        BUILD_INFO = {}
    cv = _backend._state.get("cuda_version", -1)
    cuda = f"CUDA {cv // 1000}.{cv % 1000 // 10}" if cv and cv > 0 else "CUDA"
    archs = BUILD_INFO.get("cuda_arch_list") or "default archs"
    return f"ascood_kernels._C built with torch {BUILD_INFO.get('torch', torch.__version__)}, {cuda}, arch list {archs}"


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:
        return False


def _real_tensors_here() -> bool:
    """True unless a dispatch mode is active (fake tensors, make_fx, non-strict export, a user's mode).

    Dynamo runs the backend choice natively with no such mode active, so an op
    traced by ``torch.compile`` is probed on real tensors before its graph is
    built; under a mode the probe's tensors would be fake (or its ops recorded).
    """
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        keys = torch._C._TorchDispatchModeKey
        infra = (keys.FAKE, keys.PROXY, keys.FUNCTIONAL)
        return not _get_current_dispatch_mode_stack() and all(torch._C._get_dispatch_mode(k) is None for k in infra)
    except (AttributeError, ImportError):  # another torch's internals: probe only outside any compilation
        return not torch.compiler.is_compiling()


def _can_probe(device: torch.device) -> bool:
    return _real_tensors_here() and not _capturing(device)


def _what(backend: str) -> str:
    return "CUDA C++" if backend == "cuda" else backend


def _warn_mismatch(op: str, device: torch.device, dt: str, backend: str, fallback: str, problems: list[str]) -> None:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    warnings.warn(
        f"ascood_kernels first-use check: the {_what(backend)} kernel of {op} ({dt}) does not match the reference "
        f"on {_device_text(device)} [{_build_text(backend)}]: {shown}. Using the {fallback} backend for "
        f"{op} on this device instead. Please report this with the output of `python -m ascood_kernels` "
        f"(the full check); {ENV}=0 skips this check.", RuntimeWarning, stacklevel=5)


def _warn_unjudged(op: str, device: torch.device, dt: str, backend: str, reason: str) -> None:
    again = (f"later calls probe it again ({UNJUDGED_TRIES} probes in all), then it stays in use unchecked"
             if UNJUDGED_TRIES > 1 else "it stays in use unchecked")
    warnings.warn(
        f"ascood_kernels first-use check: could not check the {_what(backend)} kernel of {op} ({dt}) on "
        f"{_device_text(device)} [{_build_text(backend)}]: the probe failed outside the kernel ({reason}). This call "
        f"uses the kernel unchecked; {again}. `python -m ascood_kernels` runs the full check; {ENV}=0 skips this "
        f"check.", RuntimeWarning, stacklevel=5)


def choose(op: str, device: torch.device, dtype: torch.dtype, candidates: Sequence[str]) -> str:
    """The first of ``candidates`` whose kernel passes ``op``'s probe on ``device`` (``"reference"`` if none).

    Probes each candidate at most once per process (per op family, device and
    dtype) and warns once for each that fails. A candidate whose probe could
    not judge it is used unchecked and probed again at later calls (up to
    :data:`UNJUDGED_TRIES` probes); where no probe can run (the module
    docstring), a known verdict applies, else the first candidate is used
    unchecked. Runs natively, never inside a ``torch.compile`` graph (its
    caller, :func:`ascood_kernels._backend.resolve`, is a constant to Dynamo).
    """
    family = FAMILY.get(op)
    if family is None or not enabled() or not candidates:
        return candidates[0] if candidates else "reference"
    dev = str(device)
    dt = str(dtype).replace("torch.", "")
    can_probe = _can_probe(device)
    with _lock:
        for i, backend in enumerate(candidates):
            key = (family, backend, dev, dt)
            problems = _verdicts.get(key)
            if problems is None:  # not judged yet
                if not can_probe or _unjudged.get(key, 0) >= UNJUDGED_TRIES:
                    return backend
                try:
                    problems = _verdicts[key] = probe(family, backend, device, dtype)
                except Unjudged as err:
                    _unjudged[key] = _unjudged.get(key, 0) + 1
                    if ("unjudged", key) not in _warned:
                        _warned.add(("unjudged", key))
                        _warn_unjudged(op, device, dt, backend, str(err))
                    return backend
            if not problems:
                return backend
            if key not in _warned:
                _warned.add(key)
                fallback = candidates[i + 1] if i + 1 < len(candidates) else "reference"
                _warn_mismatch(op, device, dt, backend, fallback, problems)
    return "reference"
