"""Checks of emulated CUDA kernels against the reference, shared by the emulated tests
(test_cuda_emulated.py) and the fault-injection run (test_cuda_emulated_faults.py).

Each check takes the torch.ops namespace holding the kernels (ascood_emu, or a
fault variant's) and returns the problems it found ([]: all outputs match).
"""
from __future__ import annotations

import json
import sys
import time

import torch

from ascood_kernels import reference
from ascood_kernels._compare import LOSS_TOL, TOL, ZSCORE_TOL, mismatch

ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ITEM = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def saliency(shape, kind, gen):
    """float64 test saliency: normal, ties (few magnitudes), zeros (+-0), or normal with NaN / +-inf."""
    if kind == "ties":
        g = torch.randint(-3, 4, shape, generator=gen).double() * 0.25
    elif kind == "zeros":
        g = torch.zeros(shape, dtype=torch.float64)
        g.view(-1)[::2] = -0.0
    else:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind in ("nan", "inf"):
        flat = g.view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[: max(1, flat.numel() // 40)]
        flat[idx] = float("nan") if kind == "nan" else float("inf")
        if kind == "inf":
            flat[idx[::2]] = -float("inf")
    return g


def select(ns, shape, dtype, p, kind, seed=0, alpha=2.5) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    g = saliency(shape, kind, gen).to(dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    problems = []
    why = mismatch(ns.invariant_mask(g, p), reference.invariant_mask(g.double(), p))
    if why:
        problems.append(f"mask: {why}")
    why = mismatch(ns.gradient_outlier(x, g, p, alpha), reference.gradient_outlier(x.double(), g.double(), p, alpha),
                   TOL[dtype])
    if why:
        problems.append(f"outlier: {why}")
    return problems


def iodin(ns, shape, dtype, k, kind, seed=0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    g = saliency(shape, kind, gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    std = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.2).to(acc)
    why = mismatch(ns.iodin_perturb(x, g, 0.07, std, k),
                   reference.iodin_perturb(x.double(), g.double(), 0.07, std.double(), k), TOL[dtype])
    return [f"perturb: {why}"] if why else []


def zscore(ns, rows, m, dtype, seed=0, constant_row=True, kind="normal") -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    h = saliency((rows, m), kind, gen) * 3 + 1
    if constant_row and rows > 1:
        h[rows // 2] = 1.25
    h = h.to(dtype)
    up = torch.randn(rows, m, generator=gen, dtype=torch.float64).to(dtype)
    out, mean, rstd = ns.zscore(h, 0.5, 1e-2)
    dh = ns.zscore_backward(up, h, mean, rstd, 0.5)
    want, wm, wr = reference.zscore(h.double(), 0.5, 1e-2)
    want_dh = reference.zscore_backward(up.double(), h.double(), wm, wr, 0.5)
    problems = []
    for what, got, exp in (("forward", out, want), ("backward", dh, want_dh)):
        why = mismatch(got, exp, ZSCORE_TOL[dtype])
        if why:
            problems.append(f"{what}: {why}")
    return problems


def loss(ns, B, B2, C, dtype, w=0.7, grad=1.0, seed=0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    zi = (torch.randn(B, C, generator=gen, dtype=torch.float64) * 3).to(dtype)
    zo = (torch.randn(B2, C, generator=gen, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, C, (B,), generator=gen)
    if B and C > 1:
        zi[0, 0] = -float("inf")  # a masked-out class: probability 0, the row stays finite
        y[0] = 1
    out, lse_i, lse_o = ns.ascood_loss(zi, y, zo, w)
    d_id, d_ood = ns.ascood_loss_backward(torch.tensor(grad, dtype=dtype), zi, y, zo, w, lse_i, lse_o)
    want, wi, wo = reference.ascood_loss(zi.double(), y, zo.double(), w)
    want_id, want_ood = reference.ascood_loss_backward(torch.tensor(grad, dtype=torch.float64), zi.double(), y,
                                                       zo.double(), w, wi, wo)
    problems = []
    for what, got, exp in (("loss", out, want), ("d_id", d_id, want_id), ("d_ood", d_ood, want_ood)):
        why = mismatch(got, exp, LOSS_TOL[dtype])
        if why:
            problems.append(f"{what}: {why}")
    return problems


# ---------------------------------------------------------------------------------------------
# Fault injection: the checks a fault variant runs, by the kernel file it modifies.
FAULT_CASES = {
    "select.cu": [
        ("select 2x300 ties p=0.3 (one block per row)", lambda ns: select(ns, (2, 300), torch.float32, 0.3, "ties")),
        ("select 3x37 NaN p=0.1", lambda ns: select(ns, (3, 37), torch.float32, 0.1, "nan", seed=1)),
        ("select 2x3x10x10 float16 normal p=0.1", lambda ns: select(ns, (2, 3, 10, 10), torch.float16, 0.1, "normal")),
        ("select 2x9000 ties p=0.3 (multi-block)", lambda ns: select(ns, (2, 9000), torch.float32, 0.3, "ties")),
        ("select 2x9000 normal p=0.05 (multi-block)", lambda ns: select(ns, (2, 9000), torch.float32, 0.05, "normal")),
    ],
    "zscore.cu": [
        ("zscore 5x33", lambda ns: zscore(ns, 5, 33, torch.float32)),
        ("zscore 3x300", lambda ns: zscore(ns, 3, 300, torch.float32, seed=1)),
        ("zscore 4x20 float64", lambda ns: zscore(ns, 4, 20, torch.float64, seed=2)),
    ],
    "iodin.cu": [
        ("iodin 2x3x10x10 k=1 ties (rounds)", lambda ns: iodin(ns, (2, 3, 10, 10), torch.float32, 1, "ties")),
        ("iodin 3x2x7x7 k=5 NaN (rounds)", lambda ns: iodin(ns, (3, 2, 7, 7), torch.float32, 5, "nan", seed=1)),
        ("iodin 2x3x10x10 k=40 (radix)", lambda ns: iodin(ns, (2, 3, 10, 10), torch.float32, 40, "ties", seed=2)),
        ("iodin 2x3x10x10 float16 k=all", lambda ns: iodin(ns, (2, 3, 10, 10), torch.float16, 10 ** 6, "normal")),
        ("iodin 3x1x9x9 k=all", lambda ns: iodin(ns, (3, 1, 9, 9), torch.float32, 10 ** 6, "nan", seed=3)),
    ],
    "loss.cu": [
        ("loss 4+3 rows x 10 classes", lambda ns: loss(ns, 4, 3, 10, torch.float32)),
        ("loss 2+5 rows x 1000 classes float64", lambda ns: loss(ns, 2, 5, 1000, torch.float64, seed=1)),
    ],
}

#: Tunables that send the op tests' small shapes down the GPU-size paths under the emulation
#: (tests/kernels/conftest.py sets them for every cuda-emulated op test): rows over 4 KiB (1024
#: float32, e.g. the op tests' 3x32x32 samples) take the multi-block select (up to 4 blocks per
#: row with one SM), shorter rows the one-block select; zscore runs 2 blocks, so 3 rows
#: or more take a second grid-stride pass; i-ODIN's every-element kernel runs 1 block of 256
#: threads, so over 256 elements take a second pass.
GPU_PATHS_AT_SMALL_SHAPES = {"small_bytes": 4096, "num_sms": 1, "zscore_max_blocks": 2, "iodin_all_blocks_per_sm": 1}

#: (kernel, path) launch counts that must be non-zero after the op tests' emulated cases ran
#: with GPU_PATHS_AT_SMALL_SHAPES (tests/kernels/test_emulated_paths.py asserts them).
REQUIRED_PATHS = [
    ("zscore_fwd_kernel", "grid-stride pass >= 2"),
    ("zscore_bwd_kernel", "grid-stride pass >= 2"),
    ("iodin_all_kernel", "grid-stride pass >= 2"),
    ("select_small_kernel", "launches"),
    # the multi-block select: every kernel of the large-row path
    ("hist_top_kernel", "launches"),
    ("select_digit_kernel", "launches"),
    ("split_kernel", "launches"),
    ("hist_cand_kernel", "launches"),
    ("apply_cand_kernel", "launches"),
]


def run_fault_checks(variants: dict[str, str], race_check: int) -> dict:
    """In a fresh process: load the variants' library, run each variant's cases; what each found.

    ``variants`` maps namespace -> kernel file name (the library is already built
    and loaded by the caller through ascood_kernels.emulation.build_variants).
    """
    from ascood_kernels import emulation

    out = {}
    for ns, kernel in variants.items():
        ops = getattr(torch.ops, ns)
        found = {"cases": 0, "mismatch": [], "error": []}
        with emulation.options(namespace=ns, race_check=race_check, num_sms=4, deadlock_timeout_ms=2000):
            for name, fn in FAULT_CASES[kernel]:
                found["cases"] += 1
                try:
                    problems = fn(ops)
                    if problems:
                        found["mismatch"].append(f"{name}: {problems[0][:200]}")
                except RuntimeError as err:
                    found["error"].append(f"{name}: {str(err).splitlines()[0][:400]}")
        out[ns] = found
    return out


def _fault_main(argv: list[str]) -> None:
    """python emu_checks.py faults '<json {namespace: [copy path, kernel file]}>'"""
    from ascood_kernels import emulation

    spec = json.loads(argv[0])
    t0 = time.perf_counter()
    emulation.build_variants({ns: path for ns, (path, _) in spec.items()})
    built = time.perf_counter() - t0
    kernels = {ns: kernel for ns, (_, kernel) in spec.items()}
    result = {"build_seconds": round(built, 1)}
    for mode in (1, 0):
        t0 = time.perf_counter()
        result[f"race_check={mode}"] = run_fault_checks(kernels, mode)
        result[f"race_check={mode} seconds"] = round(time.perf_counter() - t0, 1)
    print("FAULT-RESULTS " + json.dumps(result))


def _asan_main(argv: list[str]) -> None:
    """python emu_checks.py asan '<json {namespace: [copy path, kernel file]}>' '<json [namespace to run]>'

    Run in a process started with libasan (ascood_kernels.emulation.asan_env):
    builds the variants as the "asan" flavour (cached), then runs the checks of
    the listed namespaces. An invalid access aborts the process with
    AddressSanitizer's report on stderr; else prints ASAN-RESULTS.
    """
    import os

    from ascood_kernels import emulation

    os.environ.pop("LD_PRELOAD", None)  # this process has libasan; the compilers it starts need none
    spec = json.loads(argv[0])
    t0 = time.perf_counter()
    emulation.build_variants({ns: path for ns, (path, _) in spec.items()}, name="ascood_emu_asan_checks",
                             flavour_name="asan")
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = run_fault_checks({ns: spec[ns][1] for ns in json.loads(argv[1])}, race_check=0)
    print("ASAN-RESULTS " + json.dumps({"build_seconds": round(built, 1),
                                        "check_seconds": round(time.perf_counter() - t0, 1), "results": results}))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "faults":
        _fault_main(sys.argv[2:])
    elif len(sys.argv) >= 4 and sys.argv[1] == "asan":
        _asan_main(sys.argv[2:])
    else:
        sys.exit("usage: python emu_checks.py faults '<json spec>' | asan '<json spec>' '<json namespaces>'")
