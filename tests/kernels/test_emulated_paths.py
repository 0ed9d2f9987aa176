"""The GPU-size paths run under the emulation at the op tests' small shapes, by the emulator's launch counts.

With the tunables the cuda-emulated op tests run under (emu_checks.
GPU_PATHS_AT_SMALL_SHAPES, set by tests/kernels/conftest.py), a few op-test
shapes through the public ops must reach every path of emu_checks.REQUIRED_PATHS:
the second pass of the grid-stride loops of zscore (forward and backward) and
of i-ODIN's every-element kernel, and every kernel of the multi-block select
(and still the one-block select for short rows), each matching the reference.
Without the lowered tunables the same shapes reach none of the GPU-size paths.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import ascood_kernels as ak
import emu_checks
from ascood_kernels import emulation, reference
from ascood_kernels._compare import TOL, ZSCORE_TOL, mismatch

pytestmark = pytest.mark.skipif(not emulation.load(), reason=f"CUDA emulation unavailable: {emulation.why_not()}")


def _run_op_test_shapes() -> list[str]:
    """zscore (7, 33) forward + backward, i-ODIN (5, 3, 17, 19) with k = all, select (8, 3, 32, 32), (5, 3, 17, 19).

    Returns the mismatches with the reference ([] when all match)."""
    gen = torch.Generator().manual_seed(0)
    problems = []
    h = (torch.randn(7, 33, generator=gen, dtype=torch.float64) * 3 + 1).float().requires_grad_()
    out = ak.zscore(h, 0.5, 1e-6, backend="cuda-emulated")
    up = torch.randn(7, 33, generator=gen)
    (dh,) = torch.autograd.grad(out, h, up)
    hd = h.detach().double().requires_grad_()
    want = reference.zscore(hd, 0.5, 1e-6)[0]
    (want_dh,) = torch.autograd.grad(want, hd, up.double())
    problems += [f"zscore: {w}" for w in (mismatch(out.detach(), want.detach(), ZSCORE_TOL[torch.float32]),
                                           mismatch(dh, want_dh, ZSCORE_TOL[torch.float32])) if w]
    x = torch.randn(5, 3, 17, 19, generator=gen)
    g = torch.randn(5, 3, 17, 19, generator=gen)
    std = torch.linspace(0.2, 0.3, 3)
    why = mismatch(ak.iodin_perturb(x, g, 0.01, std, 10 ** 6, backend="cuda-emulated"),
                   reference.iodin_perturb(x.double(), g.double(), 0.01, std.double(), 10 ** 6), TOL[torch.float32])
    problems += [f"iodin: {why}"] if why else []
    for shape in ((8, 3, 32, 32), (5, 3, 17, 19)):
        problems += [f"select {shape}: {p}" for p in emu_checks.select(_emu_ops(), shape, torch.float32, 0.1, "ties")]
    return problems


def _emu_ops():
    return getattr(torch.ops, emulation.NAMESPACE)


def test_every_gpu_size_path_runs_at_the_op_tests_shapes():
    emulation.launch_counts(reset=True)
    with emulation.options(**emu_checks.GPU_PATHS_AT_SMALL_SHAPES):
        assert _run_op_test_shapes() == []
    counts = emulation.launch_counts(reset=True)
    missing = [path for path in emu_checks.REQUIRED_PATHS if counts.get(path, 0) == 0]
    assert not missing, f"paths that did not run: {missing}; counts: {counts}"


def test_without_the_lowered_tunables_the_same_shapes_reach_no_gpu_size_path():
    emulation.launch_counts(reset=True)
    assert _run_op_test_shapes() == []
    counts = emulation.launch_counts(reset=True)
    ran = [path for path in emu_checks.REQUIRED_PATHS if counts.get(path, 0) and path[0] != "select_small_kernel"]
    assert ran == [], counts
    assert counts.get(("select_small_kernel", "launches"), 0) > 0


def test_launch_counts_count_launches_and_reset():
    emulation.launch_counts(reset=True)
    h = torch.randn(3, 8)
    with emulation.options(zscore_max_blocks=1):
        _emu_ops().zscore(h, 0.5, 0.0)
        _emu_ops().zscore(h[:1], 0.5, 0.0)  # one row: a single pass
    counts = emulation.launch_counts()
    assert counts[("zscore_fwd_kernel", "launches")] == 2
    assert counts[("zscore_fwd_kernel", "grid-stride pass >= 2")] == 1
    assert emulation.launch_counts(reset=True) == counts
    assert emulation.launch_counts() == {}


@pytest.mark.skipif(os.environ.get("ASCOOD_EMU_FLAVOUR") != "fma",
                    reason="the fma flavour only (ASCOOD_EMU_FLAVOUR=fma)")
def test_fma_flavour_fuses_multiply_adds():
    """The flavour CI runs to hold the tolerances under nvcc's default contraction really emits FMA instructions."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump")
    obj = pathlib.Path(emulation._state["library"]).parent / "emulated_zscore_cu.o"
    text = subprocess.run([objdump, "-d", str(obj)], capture_output=True, text=True, check=True).stdout
    assert "vfmadd" in text or "vfmsub" in text or "vfnmadd" in text
