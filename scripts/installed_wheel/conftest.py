"""conftest of the op tests run against an installed wheel (scripts/check_wheel.sh).

scripts/check_wheel.sh copies tests/backends.py and tests/kernels/test_op_*.py
beside this file, outside the source tree, so `import ascood_kernels` finds the
installed package. Only what the op tests need from tests/conftest.py is here:
the helper modules' folder on sys.path and the per-test seed (the repository's
conftest also resets the scorers' warnings, which would import `ascood` and
its dependencies, not installed beside the older torch).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ascood_kernels  # noqa: E402,F401  (registers the ops once)


def pytest_report_header(config):
    from ascood_kernels import available_backends
    return [f"installed ascood_kernels at {os.path.dirname(ascood_kernels.__file__)}; torch {torch.__version__}; "
            f"backends: {available_backends()}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
