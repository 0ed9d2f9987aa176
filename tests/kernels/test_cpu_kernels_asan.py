"""The C++ CPU kernels under AddressSanitizer: the CPU op tests run clean with instrumented kernels.

A fresh process started with libasan (ascood_kernels.emulation.asan_env) runs
the op tests' CPU-backend cases (tests/kernels/test_op_*.py, ``-k cpu-cpu``:
every op, shape and dtype those tests use) with the pytest plugin
tests/asan_cpu.py, which builds csrc/ops.cpp and csrc/cpu/ with
-fsanitize=address (cached under build/cpu-asan/) and loads that library in
place of ascood_kernels._C. An out-of-bounds or use-after-free access stops the
run with AddressSanitizer's report naming the kernel's frames.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from ascood_kernels import emulation

# A job of its own in CI (.ci/run), as it builds an instrumented library: ASCOOD_ASAN_TESTS=1 runs it.
pytestmark = pytest.mark.skipif(os.environ.get("ASCOOD_ASAN_TESTS", "0") != "1",
                                reason="AddressSanitizer job: set ASCOOD_ASAN_TESTS=1 (a step of its own in CI)")

TESTS = pathlib.Path(__file__).resolve().parents[1]
OP_TESTS = sorted(str(p) for p in (TESTS / "kernels").glob("test_op_*.py"))


def test_cpu_op_tests_pass_with_the_kernels_built_with_asan():
    if emulation.source_dir() is None:
        pytest.skip("needs the source tree (csrc/)")
    try:
        env = emulation.asan_env()
    except RuntimeError as err:
        pytest.skip(str(err))
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    env["ASCOOD_EMU"] = "0"  # only the CPU kernels here
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "asan_cpu", "-p", "no:cacheprovider",
                           "-k", "cpu-cpu", *OP_TESTS], capture_output=True, text=True, env=env, timeout=1200,
                          cwd=str(TESTS.parent))
    out = proc.stdout + proc.stderr
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("ASAN-CPU-LIBRARY ")]
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print(f"\n{marker[0] if marker else 'no ASan library line'}\n{summary}")
    assert "AddressSanitizer" not in out, out[-8000:]
    assert proc.returncode == 0 and marker, out[-8000:]
    assert marker[0].endswith("shipped _C loaded: False"), marker[0]
    assert " passed" in summary[0] and " failed" not in summary[0], summary
