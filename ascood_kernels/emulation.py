"""The ``cuda-emulated`` backend: the CUDA kernels on CPU tensors, for tests.

No GPU is needed to run the CUDA C++ kernels of ``csrc/cuda``: with
``ASCOOD_CUDA_EMULATION`` the same sources (kernels and their launchers)
compile with the host C++ compiler against ``csrc/cuda/emulation/cuda_emu.h``,
an emulation of the CUDA execution model (blocks one after another, the
threads of a block as real OS threads, block barriers, warp exchanges that
every named lane must reach, per-block shared memory, atomics; see that
header). :func:`load` builds that test library on first use (about two
minutes on two cores; cached under ``build/cuda-emulated/`` of the source
tree, or ``ASCOOD_EMU_BUILD_DIR``) and registers its ops as
``torch.ops.ascood_emu``; ``backend="cuda-emulated"`` then runs them on CPU
tensors. It needs the source tree (``csrc/``) and a C++20 compiler; it is
never part of the installed ``ascood_kernels._C``.

It checks what the kernels compute (against the reference, in the op tests and
``python -m ascood_kernels --backend cuda-emulated``), not their speed: timing,
occupancy and inter-block races need a real GPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import subprocess
import threading
from typing import Iterator, Mapping

import torch

__all__ = ["NAMESPACE", "KERNEL_FILES", "source_dir", "build", "build_variants", "load", "available", "why_not",
           "options", "selftest"]

#: torch.ops namespace of the emulated kernels.
NAMESPACE = "ascood_emu"
#: The CUDA sources compiled into the emulated library (each with its launchers).
KERNEL_FILES = ("select.cu", "iodin.cu", "zscore.cu", "loss.cu")
_LIBRARY_FILES = ("register.cpp", "selftest.cpp")
# -ffp-contract=off: nothing is fused into an FMA, as the kernels' *_rn arithmetic requires.
# -fsanitize=thread: GCC's access instrumentation, whose hooks the emulator's runtime
# implements for its race check (no libtsan). -O1: the emulator's cost is in thread
# switches, not in the kernels' arithmetic, and it compiles faster.
_CFLAGS = ("-O1", "-fsanitize=thread", "-ffp-contract=off", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           "-DASCOOD_CUDA_EMULATION")
# The runtime implements the instrumentation hooks, so it is compiled without it.
_RUNTIME_CFLAGS = ("-std=c++20", "-O2", "-fPIC", "-pthread", "-Wall")

_state: dict = {}
_lock = threading.RLock()


def source_dir() -> pathlib.Path | None:
    """``csrc/`` of the source tree this package runs from, or None (an installed wheel has none)."""
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    return csrc if (csrc / "cuda" / "common.cuh").is_file() else None


def _build_root(csrc: pathlib.Path) -> pathlib.Path:
    env = os.environ.get("ASCOOD_EMU_BUILD_DIR")
    return pathlib.Path(env) if env else csrc.parent / "build" / "cuda-emulated"


def _digest(files: list[pathlib.Path], extra: list[str]) -> str:
    h = hashlib.sha256()
    for s in extra:
        h.update(s.encode() + b"\0")
    for f in files:
        h.update(str(f.name).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _compile_library(name: str, sources: list[str], hashed: list[pathlib.Path], flags: list[str],
                     csrc: pathlib.Path, write: Mapping[str, str], verbose: bool) -> str:
    """Build (or reuse) and load one library from ``sources`` plus generated files ``write`` (name -> text)."""
    from torch.utils import cpp_extension

    cuda_dir = csrc / "cuda"
    digest = _digest(hashed, [*flags, torch.__version__, *sources, *(f"{k}\0{v}" for k, v in sorted(write.items()))])
    build_dir = _build_root(csrc) / f"{name}_{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    for fname, text in write.items():
        f = build_dir / fname
        f.parent.mkdir(parents=True, exist_ok=True)
        if not f.is_file() or f.read_text() != text:
            f.write_text(text)
        if f.suffix == ".cpp":
            sources = [*sources, str(f)]
    runtime = build_dir / "runtime_uninstrumented.o"
    if not runtime.is_file():
        cxx = os.environ.get("CXX", "c++")
        proc = subprocess.run([cxx, *_RUNTIME_CFLAGS, f"-I{cuda_dir}", "-c",
                               str(cuda_dir / "emulation" / "runtime.cpp"), "-o", str(runtime) + ".tmp"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the emulation runtime failed:\n{proc.stderr[-3000:]}")
        os.replace(str(runtime) + ".tmp", runtime)
    # -Bsymbolic: the library uses its own runtime even if another emulated library is loaded.
    path = cpp_extension.load(name=build_dir.name, sources=sources, extra_cflags=flags,
                              extra_ldflags=["-pthread", "-Wl,-Bsymbolic", str(runtime)],
                              extra_include_paths=[str(csrc), str(cuda_dir)], build_directory=str(build_dir),
                              is_python_module=False, verbose=verbose)
    # Builds of older sources under this name are stale: remove them (best effort).
    for old in build_dir.parent.glob(f"{name}_{'?' * len(digest)}"):
        if old != build_dir and old.is_dir() and all(c in "0123456789abcdef" for c in old.name[-len(digest):]):
            shutil.rmtree(old, ignore_errors=True)
    return path


def _sources_hash(csrc: pathlib.Path) -> list[pathlib.Path]:
    # Everything the kernels may include: a change anywhere rebuilds (torch's own
    # check hashes only the listed sources, not the headers they include).
    return sorted(p for p in (csrc / "cuda").rglob("*") if p.suffix in {".cu", ".cuh", ".h", ".cpp"}) + \
        [csrc / "schema.h"]


def build(verbose: bool = False) -> str:
    """Compile (or reuse) the emulated kernels of :data:`KERNEL_FILES` and load them; returns the library path.

    The build directory is named by a hash of every source and flag. Also
    builds the emulator's self-test kernels (tests/test_cuda_emulator.py).
    """
    csrc = source_dir()
    if csrc is None:
        raise RuntimeError("the cuda-emulated backend needs the source tree (csrc/ beside ascood_kernels/)")
    cuda_dir = csrc / "cuda"
    # torch compiles .cu files with nvcc: each kernel file goes through a C++ wrapper.
    write = {f"emulated_{k.replace('.', '_')}.cpp": f'// Generated: {k} for the CUDA emulation.\n'
                                                    f'#include "{(cuda_dir / k).resolve()}"\n' for k in KERNEL_FILES}
    sources = [str(cuda_dir / "emulation" / f) for f in _LIBRARY_FILES]
    flags = [*_CFLAGS, f"-DASCOOD_EMU_NS={NAMESPACE}", "-DASCOOD_EMU_SELFTEST"]
    return _compile_library(NAMESPACE, sources, _sources_hash(csrc), flags, csrc, write, verbose)


def build_variants(variants: Mapping[str, pathlib.Path], name: str = "ascood_emu_variants",
                   verbose: bool = False) -> str:
    """Build modified copies of kernel files into one library, each under its own op namespace.

    ``variants`` maps a namespace (e.g. ``ascood_fault_sync``) to a copy of one
    of :data:`KERNEL_FILES` with a copy of ``common.cuh`` (modified or not)
    beside it, which its include finds first. Each copy is compiled inside a
    C++ namespace of its own, so the modified inline helpers of one variant
    never replace another's (or the original's) at link time. Used by the
    fault-injection test; returns the library path.
    """
    csrc = source_dir()
    if csrc is None:
        raise RuntimeError("building emulated variants needs the source tree (csrc/ beside ascood_kernels/)")
    write = {}
    for i, (ns, path) in enumerate(sorted(variants.items())):
        path = pathlib.Path(path).resolve()
        if not ns.isidentifier():
            raise ValueError(f"variant namespace must be an identifier, got {ns!r}")
        if path.name not in KERNEL_FILES or not (path.parent / "common.cuh").is_file():
            raise ValueError(f"variant {ns}: expected a copy of one of {KERNEL_FILES} with a common.cuh beside it, "
                             f"got {path}")
        # The copies go into the build directory, so the build is named by their contents,
        # not by where the caller put them (a rerun with fresh temporary copies reuses it).
        write[f"{ns}/{path.name}"] = path.read_text()
        write[f"{ns}/common.cuh"] = (path.parent / "common.cuh").read_text()
        path = pathlib.PurePosixPath(ns) / path.name
        # Everything the kernel sources include is included first, outside the isolating
        # namespace; inside it their includes are then no-ops (include guards), except a
        # modified common.cuh beside the copy, which defines the variant's own helpers.
        write[f"variant_{i}_{ns}.cpp"] = (
            f"// Generated: {path.name} as variant {ns} for the CUDA emulation.\n"
            "#include <algorithm>\n#include <cmath>\n#include <limits>\n"
            '#include "common.cuh"\n#include "schema.h"\n'
            f"#undef ASCOOD_EMU_NS\n#define ASCOOD_EMU_NS {ns}\n"
            f"namespace ascood_variant_{i} {{\n#include \"{path}\"\n}}\n"  # relative to this file
            f"static int64_t {ns}_option(std::string n, int64_t v) {{ return ::ascood::emu::set_option(n, v); }}\n"
            f"TORCH_LIBRARY({ns}, m) {{\n  ::ascood::define_kernel_schemas(m);\n"
            f'  m.def("_emu_option(str name, int value) -> int", &{ns}_option);\n}}\n')
    flags = [*_CFLAGS, f"-DASCOOD_EMU_NS={name}"]
    return _compile_library(name, [], _sources_hash(csrc), flags, csrc, write, verbose)


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the emulated kernels as ``torch.ops.ascood_emu``; True when they loaded.

    Registers the ops' fake kernels and autograd like the compiled backends',
    so ``backend="cuda-emulated"`` supports forward and backward. A failure is
    remembered (see :func:`why_not`) and not retried in this process.
    """
    with _lock:
        if "loaded" in _state:
            return _state["loaded"]
        if os.environ.get("ASCOOD_EMU", "1") == "0":
            _state.update(loaded=False, error="disabled by ASCOOD_EMU=0")
            return False
        try:
            _state["library"] = build(verbose=verbose)
            from .ops import _common

            _common.register_namespace(NAMESPACE)
            _state.update(loaded=True, error=None)
        except Exception as err:  # no compiler, no source tree, a compile error
            msg = str(err).strip().splitlines()
            _state.update(loaded=False, error=f"{type(err).__name__}: {msg[-1] if msg else ''}")
        return _state["loaded"]


def available() -> bool:
    """True when the emulated kernels are loaded (building them first if needed)."""
    return load()


def why_not() -> str | None:
    """Why :func:`load` failed, or None."""
    return _state.get("error")


@contextlib.contextmanager
def options(namespace: str = NAMESPACE, **values: int) -> Iterator[None]:
    """Set emulation options for the duration of a ``with`` block (restored after).

    Tunables (constants of the kernels' launchers, lowered to reach a path at
    small sizes): ``num_sms`` (default 4; the multi-block select splits a
    row into up to ``4 * num_sms / B`` blocks), ``small_bytes`` (rows up to this
    many bytes take the one-block select; default 32768), ``cand_budget``
    (candidate-list entries per chunk of samples; default 2**24).
    The emulator's own: ``deadlock_timeout_ms`` (default 10000), ``poison``
    (byte that fills fresh shared memory; default 0xff), ``race_check`` (1:
    report data races on shared and global memory; default 0).
    ``namespace`` selects another emulated library (build_variants).
    """
    if namespace == NAMESPACE and not load():
        raise RuntimeError(f"the cuda-emulated backend is not available: {why_not()}")
    op = getattr(torch.ops, namespace)._emu_option
    old = {}
    try:
        for name, value in values.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"option {name} must be an int >= 0, got {value!r}")
            old[name] = op(name, value)
        yield
    finally:
        for name, value in old.items():
            op(name, value)


def selftest(name: str, arg: int = 0) -> torch.Tensor:
    """Run one of the emulator's self-test kernels (csrc/cuda/emulation/selftest.cpp)."""
    if not load():
        raise RuntimeError(f"the cuda-emulated backend is not available: {why_not()}")
    return getattr(torch.ops, NAMESPACE)._emu_selftest(name, arg)
