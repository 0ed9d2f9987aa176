"""Test setup shared by all test modules.

Without a GPU the Triton kernels run through Triton's CPU interpreter; the
variable must be set before triton is first imported, so it is set here.
"""
import os
import sys

import torch

# tests/ mirrors the package's layers (kernels/, data/, nets/, training/, scoring/, apps/); the helper
# modules they share (backends, clihelpers, fake_openood) stay here, importable from every folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ascood_kernels  # noqa: E402,F401  (registers ops once, after the env var)

HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    from ascood_kernels import available_backends
    return [f"ascood_kernels backends: {available_backends()}; CUDA device: {HAS_CUDA}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _scorer_warnings_fresh():
    """Each test sees the scorers' once-per-process warnings (ascood.scoring.scorers.base.warn_once) anew."""
    from ascood.scoring.scorers import base

    base._WARNED.clear()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many passed tests ran the CUDA kernels under the emulation (quoted in BENCHMARKS.md)."""
    items = 0
    cases = 0
    seconds = 0.0
    for rep in terminalreporter.stats.get("passed", []):
        if rep.when != "call":
            continue
        props = dict(rep.user_properties)
        path = rep.nodeid.split("::")[0]
        if "cuda-emulated" in rep.nodeid or path.endswith(("test_cuda_emulated.py", "test_cuda_emulator.py")) \
                or "emu_cases" in props:
            items += 1
            cases += props.get("emu_cases", 1)
            seconds += rep.duration
    if items:
        terminalreporter.write_line(f"cuda-emulated: {items} passed tests ran the CUDA kernels or the emulator "
                                    f"({cases} cases counting each random-sweep case; {seconds:.0f} s in calls)")
