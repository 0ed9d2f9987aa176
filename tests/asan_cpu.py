"""pytest plugin (``-p asan_cpu``): the C++ CPU kernels built with AddressSanitizer stand in for ascood_kernels._C.

Only for a process started with libasan (ascood_kernels.emulation.asan_env);
tests/kernels/test_cpu_kernels_asan.py runs the CPU op tests that way. At
import, before any conftest imports ascood_kernels, it builds (or reuses) the
sources of ascood_kernels._C (csrc/ops.cpp, csrc/cpu/) with -fsanitize=address
into build/cpu-asan/, loads that library (it registers the ``ascood`` ops and
their CPU kernels) and puts an empty module in place of ascood_kernels._C, so
the package's backend "cpu" runs the instrumented kernels. An invalid access
stops the process with AddressSanitizer's report, naming the kernel's frames.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]


def sources() -> list[str]:
    """As setup.py orders them: the files built for a higher ISA last."""
    csrc = ROOT / "csrc"
    files = sorted([*csrc.glob("*.cpp"), *(csrc / "cpu").glob("*.cpp")]) + sorted((csrc / "cpu" / "avx2").glob("*.cpp"))
    return [str(f) for f in files]


def build() -> str:
    """Build (or reuse) the ASan library of the CPU kernels and load it; returns its path."""
    import torch
    from torch.utils import cpp_extension

    hashed = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in {".cpp", ".h"} and "cuda" not in p.parts)
    h = hashlib.sha256("\0".join([*FLAGS, torch.__version__]).encode())
    for p in hashed:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    name = f"ascood_cpu_asan_{h.hexdigest()[:16]}"
    build_dir = ROOT / "build" / "cpu-asan" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    preload = os.environ.pop("LD_PRELOAD", None)  # this process has libasan; the compilers need none
    try:
        return cpp_extension.load(name=name, sources=sources(), extra_cflags=FLAGS,
                                  extra_ldflags=["-fsanitize=address", "-fopenmp"],
                                  extra_include_paths=[str(ROOT / "csrc")], build_directory=str(build_dir),
                                  is_python_module=False, verbose=False)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


_t0 = time.perf_counter()
LIBRARY = build()
BUILD_SECONDS = round(time.perf_counter() - _t0, 1)
sys.modules["ascood_kernels._C"] = types.ModuleType("ascood_kernels._C")


def _shipped_extension_mapped() -> bool:
    """True when the real ascood_kernels/_C.*.so was loaded into this process after all.

    Only ``_C.`` counts: a CUDA build's ``_C_cuda`` library (CUDA kernels only, loaded when torch has CUDA)
    registers no CPU kernel, so it does not stand in for the instrumented ones."""
    maps = pathlib.Path("/proc/self/maps")
    return maps.is_file() and any(re.search(r"ascood_kernels/_C\.[^/]*$", line.strip())
                                  for line in maps.read_text().splitlines())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"ASAN-CPU-LIBRARY {LIBRARY} (built or reused in {BUILD_SECONDS} s) stood in for "
                                f"ascood_kernels._C; shipped _C loaded: {_shipped_extension_mapped()}")
