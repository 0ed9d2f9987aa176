"""The emulated CUDA kernels under AddressSanitizer: out-of-bounds accesses to global memory fail, naming the kernel.

The emulator cannot see an access past a tensor (the review of issue 31 broke
iodin.cu's row loop `<` into `<=`: 2 of 126 emulated cases failed and the read
itself was never reported). Here unmodified copies of the four kernel files
and the two memory faults of test_cuda_emulated_faults.py (``by="asan"``) are
built into one library of the "asan" flavour (ascood_kernels.emulation:
-fsanitize=address, cached under build/cuda-emulated/) and run in fresh Python
processes started with libasan (emulation.asan_env: LD_PRELOAD of
``gcc -print-file-name=libasan.so``, ASAN_OPTIONS=detect_leaks=0): the
unmodified kernels run the fault checks of emu_checks.py (every kernel file)
without a report, and each fault stops its process with AddressSanitizer's
report and the emulator's line naming the kernel launch.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ascood_kernels import emulation
from test_cuda_emulated_faults import FAULTS, make_copies

# A job of its own in CI (.ci/run), as it builds an instrumented library: ASCOOD_ASAN_TESTS=1 runs it.
pytestmark = pytest.mark.skipif(os.environ.get("ASCOOD_ASAN_TESTS", "0") != "1",
                                reason="AddressSanitizer job: set ASCOOD_ASAN_TESTS=1 (a step of its own in CI)")

ASAN_FAULTS = [f for f in FAULTS if f.by == "asan"]
# The kernel each fault's report must name (the launch it happened in).
KERNEL_OF = {"iodin_row_overrun": "iodin_rounds_kernel", "select_write_past_row": "select_small_kernel"}
ACCESS_OF = {"iodin_row_overrun": "READ of size", "select_write_past_row": "WRITE of size"}


def _asan_env_or_skip() -> dict[str, str]:
    if emulation.source_dir() is None:
        pytest.skip("needs the source tree (csrc/)")
    try:
        env = emulation.asan_env()
    except RuntimeError as err:
        pytest.skip(str(err))
    tests_dir = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), str(tests_dir.parent), env.get("PYTHONPATH", "")])
    return env


def _run(env, spec, namespaces) -> subprocess.CompletedProcess:
    tests_dir = pathlib.Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(tests_dir / "emu_checks.py"), "asan", json.dumps(spec),
                           json.dumps(namespaces)], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def asan_setup(tmp_path_factory):
    """(env, spec, clean namespaces); the first run builds the library, checks the clean copies, and must pass."""
    env = _asan_env_or_skip()
    tmp = tmp_path_factory.mktemp("asan")
    cuda_dir = emulation.source_dir() / "cuda"
    spec = make_copies(tmp, ASAN_FAULTS)
    clean = []
    for kernel in emulation.KERNEL_FILES:
        d = tmp / f"clean_{kernel.split('.')[0]}"
        d.mkdir()
        for name in ("common.cuh", kernel):
            (d / name).write_text((cuda_dir / name).read_text())
        ns = f"ascood_asan_{kernel.split('.')[0]}"
        spec[ns] = [str(d / kernel), kernel]
        clean.append(ns)
    proc = _run(env, spec, clean)
    return env, spec, clean, proc


def _results(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ASAN-RESULTS ")]
    assert proc.returncode == 0 and lines, f"ASan run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("ASAN-RESULTS "):])


def test_unmodified_kernels_run_clean_under_asan(asan_setup):
    _, _, clean, proc = asan_setup
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-6000:]
    result = _results(proc)
    print(f"\nASan build {result['build_seconds']} s, checks {result['check_seconds']} s")
    for ns in clean:
        found = result["results"][ns]
        assert found["cases"] > 0 and not found["mismatch"] and not found["error"], (ns, found)


@pytest.mark.parametrize("fault", ASAN_FAULTS, ids=lambda f: f.name)
def test_memory_fault_is_caught_naming_the_kernel(fault, asan_setup):
    env, spec, _, _ = asan_setup
    proc = _run(env, spec, [f"ascood_fault_{fault.name}"])
    report = proc.stderr
    shown = [ln for ln in report.splitlines() if "AddressSanitizer" in ln or ln.lstrip().startswith(("#0", "#1"))]
    print(f"\n{fault.name} ({fault.what}): exit {proc.returncode}\n  " + "\n  ".join(shown[:6]))
    assert proc.returncode != 0, f"{fault.name}: the process was not stopped:\n{proc.stdout[-2000:]}"
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, report[-6000:]
    assert ACCESS_OF[fault.name] in report, report[-6000:]
    assert f"AddressSanitizer stopped the process in kernel {KERNEL_OF[fault.name]}" in report, report[-6000:]
