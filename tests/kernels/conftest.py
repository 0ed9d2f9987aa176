"""Kernel-test setup: the cuda-emulated op tests run the GPU-size paths at their small shapes.

Every op test parametrized with backend "cuda-emulated" (tests/kernels/test_op_*.py)
runs with the emulation's tunables lowered (emu_checks.GPU_PATHS_AT_SMALL_SHAPES):
rows over 4 KiB (1024 float32) take the multi-block select, and the grid-stride loops of
zscore and i-ODIN's every-element kernel take more than one pass. The real-GPU
values stay the defaults of the CUDA build (ASCOOD_TUNABLE in csrc/cuda/common.cuh);
test_emulated_paths.py asserts, from the emulator's launch counts, that each path ran.
"""
from __future__ import annotations

import os

import pytest


def _runs_cuda_emulated(request) -> bool:
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and callspec.params.get("backend") == "cuda-emulated" \
        and os.path.basename(str(request.node.fspath)).startswith("test_op_")


@pytest.fixture(autouse=True)
def _gpu_paths_at_small_shapes(request):
    if not _runs_cuda_emulated(request):
        yield
        return
    import emu_checks
    from ascood_kernels import emulation

    if not emulation.load():  # the test skips itself with the reason
        yield
        return
    with emulation.options(**emu_checks.GPU_PATHS_AT_SMALL_SHAPES):
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """ASCOOD_EMU_COUNTS=1: the emulator's launch counts per kernel and path for this run (BENCHMARKS.md)."""
    if os.environ.get("ASCOOD_EMU_COUNTS", "0") != "1":
        return
    from ascood_kernels import emulation

    if not emulation._state.get("loaded"):
        terminalreporter.write_line("emulated launch counts: the emulation did not run")
        return
    counts = emulation.launch_counts()
    terminalreporter.write_line("emulated launch counts (kernel | path | launches):")
    for (kernel, path), n in sorted(counts.items()):
        terminalreporter.write_line(f"| {kernel} | {path} | {n} |")
