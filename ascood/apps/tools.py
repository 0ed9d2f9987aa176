"""``ascood demo | bench | doctor``: commands whose arguments pass through to another program untouched.

``demo`` runs :mod:`ascood.apps.demo`, ``bench`` runs the pytest-benchmark suite in
``benchmarks/``, ``doctor`` runs :mod:`ascood_kernels.doctor` (also ``python -m ascood_kernels``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys

from . import checks

__all__ = ["PASS_THROUGH", "add_parsers", "run_demo", "run_bench", "run_doctor", "bench_args"]

#: Commands whose every later word is theirs (argparse would eat "-k", "--help", ...).
PASS_THROUGH = ("demo", "bench", "doctor")


def add_parsers(sub) -> None:
    """Register the three pass-through commands (for ``ascood --help``)."""
    d = sub.add_parser("demo", help="run the bundled demo (arguments are passed to it)", add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="run the benchmark suite: pytest benchmarks/ --benchmark-only [ARGS] "
                       "(--quick, --json FILE, --md FILE, --bench-device cpu|cuda)",
                       add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    k = sub.add_parser("doctor", help="self-check: every kernel on every backend against the reference (run this "
                       "after installing on a GPU; same as python -m ascood_kernels; --help for its flags)",
                       add_help=False)
    k.add_argument("args", nargs=argparse.REMAINDER)


def run_demo(args: argparse.Namespace) -> int:
    # The demo lives in its own module (a separate piece of work); this is only the hook.
    if importlib.util.find_spec("ascood.apps.demo") is None:
        print("ascood demo: error: the demo is not available in this install (module ascood.apps.demo is missing)",
              file=sys.stderr)
        return 2
    rc = importlib.import_module("ascood.apps.demo").main(args.args)
    return int(rc or 0)


def run_bench(args: argparse.Namespace) -> int:
    bench_dir = "benchmarks"
    if not os.path.isdir(bench_dir):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "benchmarks")
        if not os.path.isdir(here):
            raise checks.InputError("benchmarks/ not found (run from the repository root)")
        bench_dir = here
    cmd = [sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", *bench_args(args.args)]
    return subprocess.call(cmd)


def bench_args(args: list[str]) -> list[str]:
    """``--json FILE`` / ``--md FILE`` are short for pytest-benchmark's ``--benchmark-json`` and the suite's
    ``--bench-md``; everything else (``--quick``, ``--bench-device``, ``-k ...``) goes to pytest unchanged."""
    aliases = {"--json": "--benchmark-json", "--md": "--bench-md"}
    out = []
    for a in args:
        name, sep, value = a.partition("=")
        out.append(aliases[name] + sep + value if name in aliases else a)
    return out


def run_doctor(args: argparse.Namespace) -> int:
    # The self-check lives in ascood_kernels.doctor (also `python -m ascood_kernels`); this is only the hook.
    from ascood_kernels.doctor import main as doctor_main

    return doctor_main(args.args)
