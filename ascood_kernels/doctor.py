"""Self-check: ``python -m ascood_kernels`` (also ``ascood doctor``).

Prints what this install is (torch, the CUDA runtime, the GPU architectures
the extension was compiled for, Triton), which backends loaded and why one did
not, the device, and then runs every op on every available backend on that
device against the plain-PyTorch reference, at several shapes and dtypes:
rows small enough for the one-block select and large enough for the
multi-block one, tied and NaN saliencies, channels-last images, float16 /
bfloat16 / float32 / float64, forward and the fused backwards. The verdicts
use the op tests' tolerances (:mod:`ascood_kernels._compare`). Exit status:
0 all matched, 1 a mismatch or an error, 2 nothing could be checked.

On the CPU the check is ``--quick`` by default (small shapes: the Triton
interpreter, used when ``TRITON_INTERPRET=1``, runs programs one by one).
``--backend cuda-emulated`` (CPU only, never part of the default set) runs
the CUDA kernels under the CUDA emulation (:mod:`ascood_kernels.emulation`,
built on first use from the source tree), with its race check on.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from . import _backend
from ._compare import LOSS_TOL, TOL, ZSCORE_TOL, mismatch

__all__ = ["environment", "check_backends", "run", "main", "CheckResult"]

CHECKED_BACKENDS = ("cpu", "cuda", "triton", "cuda-emulated")
#: Checked only when asked for (--backend): the emulation builds on first use and is slow.
ON_REQUEST = ("cuda-emulated",)
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
               torch.bfloat16: "bfloat16", torch.int64: "int64"}


# ---------------------------------------------------------------------------------------------
# What is installed
def _build_info() -> dict | None:
    return _backend.build_info()


def _abi_line(build: dict | None) -> str:
    """The torch the kernels were built with, the one running, and the lowest torch they load under."""
    if not build or not build.get("stable_abi_target"):
        return f"unknown build; running under torch {torch.__version__}"
    return (f"LibTorch stable ABI, target torch >= {build['stable_abi_target']}; built with torch {build['torch']}, "
            f"running under torch {torch.__version__}")


def environment(device: torch.device) -> dict:
    """Versions, build facts, loaded backends (with the reason for each missing one) and the device."""
    ext = _backend.extension_loaded()
    cuda_kernels = _backend.cuda_built()
    compiled_cuda = _backend._state.get("cuda_version", -1)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda_runtime": torch.version.cuda,
        "extension": "loaded" if ext else f"not loaded: {_backend._state.get('ext_error')}",
        "cuda_kernels": (f"compiled (CUDA {compiled_cuda // 1000}.{compiled_cuda % 1000 // 10})" if cuda_kernels
                         else f"not loaded: {_backend._why_not('cuda')}"),
        "build": _build_info() or "unknown (no ascood_kernels/_build_info.py: built before setup.py recorded it)",
        "abi": _abi_line(_build_info()),
        "triton": _triton_line(),
        "triton_interpret": _backend.triton_interpreter(),
        "available_backends": _backend.available_backends(),
        "device": str(device),
    }
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        info["gpu"] = f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})"
        archs = (info["build"] or {}).get("cuda_arch_list") if isinstance(info["build"], dict) else None
        if archs:
            built = {a.strip().replace("+PTX", "") for a in archs.replace(",", ";").replace(" ", ";").split(";")
                     if a.strip()}
            if f"{cap[0]}.{cap[1]}" not in built and not any("+PTX" in a for a in archs.split(";")):
                info["warning"] = (f"the CUDA kernels were built for {archs}, not for this GPU's {cap[0]}.{cap[1]}: "
                                   f"rebuild with TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
    return info


def _triton_line() -> str:
    try:
        import triton
        version = triton.__version__
    except Exception as err:  # not installed, or broken
        return f"not importable: {type(err).__name__}: {err}"
    if _backend.triton_loaded():
        return f"{version}, kernels loaded"
    return f"{version}, kernels not loaded: {_backend._state.get('triton_error')}"


def check_backends(device: torch.device, wanted: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(backends to check on ``device``, {backend: why skipped}) among ``wanted`` (default: all)."""
    run_, skipped = [], {}
    for b in (wanted or [b for b in CHECKED_BACKENDS if b not in ON_REQUEST]):
        if b not in CHECKED_BACKENDS:
            raise ValueError(f"--backend must name {', '.join(CHECKED_BACKENDS)}, got {b!r}")
        if b == "cpu":
            reason = None if device.type == "cpu" else "runs on CPU tensors (use --device cpu)"
            reason = reason or (None if _backend.extension_loaded() else _backend._why_not("cpu"))
        elif b == "cuda":
            reason = None if device.type == "cuda" else "needs a CUDA device"
            reason = reason or (None if _backend.cuda_built() else _backend._why_not("cuda"))
        elif b == "cuda-emulated":
            from . import emulation

            reason = None if device.type == "cpu" else "runs the CUDA kernels on CPU tensors (use --device cpu)"
            reason = reason or (None if emulation.load() else emulation.why_not())
        else:
            reason = None if _backend.triton_loaded() else _backend._why_not("triton")
            if reason is None and device.type == "cpu" and not _backend.triton_interpreter():
                reason = "on CPU tensors it needs the Triton interpreter: set TRITON_INTERPRET=1"
        if reason:
            skipped[b] = reason
        else:
            run_.append(b)
    return run_, skipped


# ---------------------------------------------------------------------------------------------
# The checks
@dataclass
class CheckResult:
    op: str
    backend: str
    dtype: str
    case: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass
class _Case:
    op: str
    name: str
    dtypes: tuple
    fn: Callable  # fn(backend, device, dtype, gen) -> list of (what, got, want, tol) to compare
    extra: dict = field(default_factory=dict)


def _randn(shape, gen, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _saliency(shape, gen, dtype, device, kind):
    """Gradient-like tensors: plain normal, heavy ties (few distinct values) or with NaN."""
    if kind == "ties":
        g = torch.randint(-3, 4, shape, generator=gen).to(torch.float64) * 0.25
    else:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "nan":
        flat = g.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[: max(1, flat.numel() // 50)]] = float("nan")
    return g.to(device=device, dtype=dtype)


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _select_case(shape, kind, p, channels_last=False):
    def fn(backend, device, dtype, gen):
        import ascood_kernels as ak

        g = _layout(_saliency(shape, gen, dtype, device, kind), channels_last)
        x = _layout(_randn(shape, gen, dtype, device), channels_last)
        mask = ak.invariant_mask(g, p, backend=backend)
        want_mask = ak.invariant_mask(g.double(), p, backend="reference")
        out = ak.gradient_outlier(x, g, p, 2.5, backend=backend)
        want = ak.gradient_outlier(x.double(), g.double(), p, 2.5, backend="reference")
        checks = [("mask", mask, want_mask, None), ("outlier", out, want, TOL[dtype])]
        if channels_last:
            checks.append(("layout", torch.tensor(out.is_contiguous(memory_format=torch.channels_last)),
                           torch.tensor(True), None))
        return checks
    return fn


def _zscore_case(shape, constant_row=False):
    def fn(backend, device, dtype, gen):
        import ascood_kernels as ak

        h = _randn(shape, gen, torch.float64, "cpu", 3.0) + 1.0
        if constant_row:
            h.view(-1, shape[-1])[0] = 2.0
        h = h.to(device=device, dtype=dtype).requires_grad_()
        up = _randn(shape, gen, dtype, device)
        out = ak.zscore(h, 0.5, backend=backend)
        (dh,) = torch.autograd.grad(out, h, up)
        h64 = h.detach().double().requires_grad_()
        want = ak.zscore(h64, 0.5, backend="reference")
        (want_dh,) = torch.autograd.grad(want, h64, up.double())
        tol = ZSCORE_TOL[dtype]
        return [("forward", out.detach(), want.detach(), tol), ("backward", dh, want_dh, tol)]
    return fn


def _permutation_case(rows, n):
    """random_permutations (the shuffle's draw): the C++ kernel against the reference, bit for bit."""
    def fn(backend, device, dtype, gen):
        from .ops.permutations import random_permutations

        seeds = torch.randint(0, 2 ** 32, (rows,), generator=gen)
        out = random_permutations(seeds, n, backend="cpu")
        want = random_permutations(seeds, n, backend="reference")
        return [("permutations", out, want, None)]
    return fn


def _shuffle_case(shape, kind, p, per_pixel=False, channels_last=False):
    def fn(backend, device, dtype, gen):
        import ascood_kernels as ak

        x = _layout(_randn(shape, gen, dtype, device), channels_last)
        s_shape = (shape[0], *shape[2:]) if per_pixel else shape
        s = _saliency(s_shape, gen, dtype, device, kind).abs()
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
        out = ak.shuffle_outlier(x, s, p, torch.Generator(device=device).manual_seed(seed), backend=backend)
        want = ak.shuffle_outlier(x, s, p, torch.Generator(device=device).manual_seed(seed), backend="reference")
        return [("shuffle", out, want, None)]
    return fn


def _iodin_case(shape, kind, k, channels_last=False):
    def fn(backend, device, dtype, gen):
        import ascood_kernels as ak

        x = _layout(_randn(shape, gen, dtype, device), channels_last)
        g = _layout(_saliency(shape, gen, dtype, device, kind), channels_last)
        std = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.2
        out = ak.iodin_perturb(x, g, 0.07, std.to(device), k, backend=backend)
        want = ak.iodin_perturb(x.double(), g.double(), 0.07, std.to(device), k, backend="reference")
        return [("perturb", out, want, TOL[dtype])]
    return fn


def _loss_case(B, B2, C, w=1.0):
    def fn(backend, device, dtype, gen):
        import ascood_kernels as ak

        zi = _randn((B, C), gen, dtype, device, 3.0).requires_grad_()
        zo = _randn((B2, C), gen, dtype, device, 3.0).requires_grad_()
        y = torch.randint(0, C, (B,), generator=gen).to(device)
        loss = ak.ascood_loss(zi, y, zo, w, backend=backend)
        gi, go = torch.autograd.grad(loss, (zi, zo))
        zi64, zo64 = zi.detach().double().requires_grad_(), zo.detach().double().requires_grad_()
        want = ak.ascood_loss(zi64, y, zo64, w, backend="reference")
        wgi, wgo = torch.autograd.grad(want, (zi64, zo64))
        tol = LOSS_TOL[dtype]
        return [("loss", loss.detach(), want.detach(), tol), ("d_id", gi, wgi, tol), ("d_ood", go, wgo, tol)]
    return fn


ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def plan(device: torch.device, backend: str, quick: bool) -> list[_Case]:
    """The cases for ``backend`` on ``device``; ``quick`` keeps every shape small."""
    interp = backend == "triton" and device.type == "cpu"
    dtypes = (torch.float32, torch.float16) if interp else ALL
    cases = [
        _Case("invariant_mask+gradient_outlier", "3x3x7x5 p=0.1", dtypes, _select_case((3, 3, 7, 5), "normal", 0.1)),
        _Case("invariant_mask+gradient_outlier", "4x37 ties p=0.3", dtypes, _select_case((4, 37), "ties", 0.3)),
        _Case("invariant_mask+gradient_outlier", "2x3x6x6 NaN p=0.2", dtypes, _select_case((2, 3, 6, 6), "nan", 0.2)),
        _Case("invariant_mask+gradient_outlier", "2x3x5x4 channels-last", dtypes,
              _select_case((2, 3, 5, 4), "normal", 0.25, channels_last=True)),
        _Case("zscore", "5x17", dtypes, _zscore_case((5, 17))),
        _Case("zscore", "2x3x33 constant row", dtypes, _zscore_case((2, 3, 33), constant_row=True)),
        _Case("shuffle_outlier", "2x3x9x7 p=0.3", dtypes, _shuffle_case((2, 3, 9, 7), "normal", 0.3)),
        _Case("shuffle_outlier", "2x3x6x6 ties, per-pixel", dtypes,
              _shuffle_case((2, 3, 6, 6), "ties", 0.5, per_pixel=True)),
        _Case("shuffle_outlier", "2x3x5x5 NaN channels-last", dtypes,
              _shuffle_case((2, 3, 5, 5), "nan", 0.4, channels_last=True)),
        _Case("iodin_perturb", "2x3x8x8 k=1", dtypes, _iodin_case((2, 3, 8, 8), "normal", 1)),
        _Case("iodin_perturb", "2x3x8x8 ties k=5", dtypes, _iodin_case((2, 3, 8, 8), "ties", 5)),
        _Case("iodin_perturb", "2x3x8x8 NaN k=40", dtypes, _iodin_case((2, 3, 8, 8), "nan", 40)),
        _Case("iodin_perturb", "2x3x4x4 all (ODIN) channels-last", dtypes,
              _iodin_case((2, 3, 4, 4), "normal", 10 ** 6, channels_last=True)),
        _Case("ascood_loss", "B=5 B2=7 C=10", dtypes, _loss_case(5, 7, 10, 0.7)),
        _Case("ascood_loss", "B=4 B2=0 C=3", dtypes, _loss_case(4, 0, 3)),
    ]
    if backend == "cpu" and device.type == "cpu":  # a CPU-only op: its kernel takes CPU seeds
        cases.append(_Case("random_permutations", "5 rows x 300", (torch.int64,), _permutation_case(5, 300)))
    if backend == "cuda-emulated":
        # Only the ops with CUDA kernels; plus the multi-block select (rows over 32 KiB), small enough
        # for the emulation even in --quick.
        cases = [c for c in cases if c.op != "shuffle_outlier"]
        cases += [_Case("invariant_mask+gradient_outlier", "2x9000 multi-block ties p=0.3", ALL,
                        _select_case((2, 9000 if quick else 20000), "ties", 0.3))]
    if quick:
        return cases
    # Rows large enough for the multi-block paths (CUDA select: > 8192 float32 / 16384 16-bit
    # elements per sample; zscore/loss: long rows), ties and NaN among them.
    cases += [
        _Case("invariant_mask+gradient_outlier", "2x3x96x96 multi-block p=0.1", ALL,
              _select_case((2, 3, 96, 96), "normal", 0.1)),
        _Case("invariant_mask+gradient_outlier", "3x3x80x80 multi-block ties channels-last", ALL,
              _select_case((3, 3, 80, 80), "ties", 0.05, channels_last=True)),
        _Case("invariant_mask+gradient_outlier", "2x3x96x96 multi-block NaN p=0.5", ALL,
              _select_case((2, 3, 96, 96), "nan", 0.5)),
        _Case("zscore", "16x4096", ALL, _zscore_case((16, 4096))),
        _Case("shuffle_outlier", "2x3x64x64 p=0.15", ALL, _shuffle_case((2, 3, 64, 64), "normal", 0.15)),
        _Case("iodin_perturb", "2x3x64x64 ties k=300", ALL, _iodin_case((2, 3, 64, 64), "ties", 300)),
        _Case("ascood_loss", "B=64 B2=64 C=1000", ALL, _loss_case(64, 64, 1000)),
    ]
    if device.type == "cuda":
        # Candidate scratch of the multi-block select is per chunk of samples: 3 samples of 6.3M
        # elements take two chunks.
        cases.append(_Case("invariant_mask+gradient_outlier", "3x3x1448x1448 chunked", (torch.float32,),
                           _select_case((3, 3, 1448, 1448), "normal", 0.1)))
    return cases


def run(device: torch.device, backends: Sequence[str], quick: bool, seed: int = 0) -> list[CheckResult]:
    """Every case of :func:`plan` on every backend; an exception is a failed check, not a crash."""
    results = []
    for backend in backends:
        with _race_checked(backend):
            results += _run_backend(device, backend, quick, seed)
    return results


def _race_checked(backend: str):
    import contextlib

    if backend != "cuda-emulated":
        return contextlib.nullcontext()
    from . import emulation

    return emulation.options(race_check=1)


def _run_backend(device: torch.device, backend: str, quick: bool, seed: int) -> list[CheckResult]:
    results = []
    for case in plan(device, backend, quick):
        for dtype in case.dtypes:
            gen = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            try:
                problems = []
                for what, got, want, tol in case.fn(backend, device, dtype, gen):
                    why = mismatch(got, want, tol)
                    if why:
                        problems.append(f"{what}: {why}")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ok, detail = not problems, " | ".join(problems)
            except Exception as err:  # a kernel that raises is a failure of that kernel
                msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                ok, detail = False, f"error: {type(err).__name__}: {msg}"
            results.append(CheckResult(case.op, backend, DTYPE_NAMES[dtype], case.name, ok, detail,
                                       round(time.perf_counter() - t0, 4)))
    return results


# ---------------------------------------------------------------------------------------------
# Report
def _table(results: list[CheckResult]) -> str:
    """One line per (op, backend, dtype): cases passed, and the first failure's case and reason."""
    groups: dict[tuple, list[CheckResult]] = {}
    for r in results:
        groups.setdefault((r.op, r.backend, r.dtype), []).append(r)
    rows = [("op", "backend", "dtype", "cases", "result", "first failure")]
    for (op, backend, dtype), rs in groups.items():
        bad = [r for r in rs if not r.ok]
        first = f"{bad[0].case}: {bad[0].detail}" if bad else ""
        rows.append((op, backend, dtype, f"{len(rs) - len(bad)}/{len(rs)}", "FAIL" if bad else "pass", first[:160]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) for j, c in enumerate(r[:5])) + ("  " + r[5] if r[5] else ""))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ascood_kernels",
                                description="Check every ascood_kernels op on every available backend against the "
                                            "plain-PyTorch reference; exit 1 on any mismatch.")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--backend", action="append",
                   help="only these backends (cpu, cuda, triton, cuda-emulated; repeat or comma-separate); "
                        "default: cpu, cuda and triton where available (cuda-emulated: the CUDA kernels under the "
                        "CUDA emulation on the CPU, built on first use from the source tree; only when asked for)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None, help="small shapes only (default on CPU)")
    size.add_argument("--full", dest="quick", action="store_false",
                      help="also the large shapes (multi-block paths; default on CUDA)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verbose", "-v", action="store_true", help="list every case, not one line per op/dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ascood_kernels``; returns the exit status."""
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m ascood_kernels: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"python -m ascood_kernels: error: --device must be cpu or cuda[:N], got {args.device}", file=sys.stderr)
        return 2
    wanted = [b.strip() for spec in (args.backend or []) for b in spec.split(",") if b.strip()] or None
    try:
        backends, skipped = check_backends(device, wanted)
    except ValueError as err:
        print(f"python -m ascood_kernels: error: {err}", file=sys.stderr)
        return 2
    quick = args.quick if args.quick is not None else device.type == "cpu"
    env = environment(device)
    t0 = time.perf_counter()
    results = run(device, backends, quick, args.seed)
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    status = 1 if failed else (2 if not results else 0)
    if args.json:
        print(json.dumps({"environment": env, "checked_backends": backends, "skipped_backends": skipped,
                          "quick": quick, "seconds": round(elapsed, 3), "ok": status == 0,
                          "failures": len(failed), "results": [asdict(r) for r in results]}, indent=2, default=str))
        return status
    print("ascood_kernels self-check")
    for k, v in env.items():
        print(f"  {k:20s} {v}")
    for b, why in skipped.items():
        print(f"  skipped backend {b}: {why}")
    print(f"  checked backends     {', '.join(backends) or 'none'} ({'quick' if quick else 'full'} shapes)\n")
    if results:
        if args.verbose:
            for r in results:
                print(f"  {'pass' if r.ok else 'FAIL'}  {r.op:32s} {r.backend:7s} {r.dtype:9s} {r.case}"
                      f"{'  ' + r.detail if r.detail else ''}")
            print()
        print(_table(results))
    n_cases = len(results)
    if failed:
        print(f"\nFAILED: {len(failed)} of {n_cases} checks did not match the reference ({elapsed:.1f} s). "
              "Do not trust training runs on this backend; please report the table above.")
    elif not results:
        print("\nnothing was checked: no backend is available on this device (see above)")
    else:
        print(f"\nall {n_cases} checks match the reference ({elapsed:.1f} s)")
    return status
