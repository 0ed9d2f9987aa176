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
occupancy and inter-block races need a real GPU. Fresh outputs are poisoned
(0xff) while an emulated op runs, the emulator counts launches per kernel and
per marked path (:func:`launch_counts`), and two more build flavours exist
(:data:`FLAVOURS`, ASCOOD_EMU_FLAVOUR): ``fma`` (multiply-adds fused as nvcc
does) and ``asan`` (AddressSanitizer; see :func:`asan_env`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import threading
from typing import Iterator, Mapping

import torch

__all__ = ["NAMESPACE", "KERNEL_FILES", "FLAVOURS", "source_dir", "flavour", "build", "build_variants", "load",
           "available", "why_not", "options", "selftest", "launch_counts", "asan_env"]

#: torch.ops namespace of the emulated kernels.
NAMESPACE = "ascood_emu"
#: The CUDA sources compiled into the emulated library (each with its launchers).
KERNEL_FILES = ("select.cu", "iodin.cu", "zscore.cu", "loss.cu")
_LIBRARY_FILES = ("register.cpp", "selftest.cpp", "poison.cpp")
# -ffp-contract=off: nothing is fused into an FMA, as the kernels' *_rn arithmetic requires.
# -fsanitize=thread: GCC's access instrumentation, whose hooks the emulator's runtime
# implements for its race check (no libtsan). -O1: the emulator's cost is in thread
# switches, not in the kernels' arithmetic, and it compiles faster.
_CFLAGS = ("-O1", "-fsanitize=thread", "-ffp-contract=off", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           "-DASCOOD_CUDA_EMULATION")

#: Build flavours (ASCOOD_EMU_FLAVOUR, or the ``flavour`` argument), each cached in its own
#: build directory: flags replaced in :data:`_CFLAGS` and link flags added.
#: "fma": a * b + c contracts into an FMA as nvcc does by default (-fmad=true); the *_rn
#: intrinsics stay unfused behind a barrier (cuda_emu.h), as on a GPU; x86-64 with FMA only.
#: "asan": AddressSanitizer instead of the race check's instrumentation (the race_check
#: option then sees nothing); the library only loads into a process that starts with
#: libasan (LD_PRELOAD, see :func:`asan_env`).
FLAVOURS = {
    "default": ({}, []),
    # GCC contracts only with -fexpensive-optimizations (on from -O2; the build is -O1).
    "fma": ({"-ffp-contract=off": "-ffp-contract=fast -mfma -fexpensive-optimizations -DASCOOD_EMU_FP_CONTRACT"}, []),
    "asan": ({"-fsanitize=thread": "-fsanitize=address -fno-omit-frame-pointer -g"}, ["-fsanitize=address"]),
}
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


def flavour(name: str | None = None) -> str:
    """The build flavour: ``name``, else ASCOOD_EMU_FLAVOUR, else "default" (see :data:`FLAVOURS`)."""
    name = name or os.environ.get("ASCOOD_EMU_FLAVOUR", "") or "default"
    if name not in FLAVOURS:
        raise ValueError(f"ASCOOD_EMU_FLAVOUR must be one of {', '.join(FLAVOURS)}, got {name!r}")
    if name == "fma" and not _cpu_has_fma():
        raise RuntimeError("the fma flavour needs an x86-64 CPU with FMA (no 'fma' flag in /proc/cpuinfo)")
    return name


def _cpu_has_fma() -> bool:
    try:
        return " fma " in f" {pathlib.Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


def _flavour_flags(name: str) -> tuple[list[str], list[str]]:
    """(compile flags, extra link flags) of flavour ``name``."""
    replace, ldflags = FLAVOURS[name]
    cflags = [part for f in _CFLAGS for part in replace.get(f, f).split()]
    return cflags, list(ldflags)


def _library_name(base: str, name: str) -> str:
    return base if name == "default" else f"{base}_{name}"


def asan_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a Python process that loads an ``asan`` flavour library.

    GCC's libasan must be the first library of the process, so it is preloaded
    (LD_PRELOAD of ``c++ -print-file-name=libasan.so``), followed by the
    compiler's libstdc++: the interpreter does not link it, and without it
    preloaded libasan's interceptor of ``__cxa_throw`` finds no real function
    and the first C++ exception (any TORCH_CHECK) stops the process with
    "CHECK failed: asan_interceptors.cpp". Leak detection is off (the
    interpreter's own allocations are never freed); an error exits with the
    report on stderr. Raises RuntimeError when no libasan is found.
    """
    cxx = os.environ.get("CXX", "c++")
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        proc = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
        lib = proc.stdout.strip()
        if proc.returncode != 0 or not os.path.isabs(lib) or not os.path.exists(lib):
            raise RuntimeError(f"no {name} for {cxx} (got {lib!r}); install the compiler's AddressSanitizer runtime")
        libs.append(os.path.realpath(lib))
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = " ".join(x for x in (*libs, out.get("LD_PRELOAD", "")) if x)
    out["ASAN_OPTIONS"] = ":".join(x for x in ("detect_leaks=0:abort_on_error=0:halt_on_error=1",
                                               out.get("ASAN_OPTIONS", "")) if x)
    return out


def _compile_library(name: str, sources: list[str], hashed: list[pathlib.Path], flags: list[str],
                     csrc: pathlib.Path, write: Mapping[str, str], verbose: bool,
                     ldflags: list[str] | None = None) -> str:
    """Build (or reuse) and load one library from ``sources`` plus generated files ``write`` (name -> text)."""
    from torch.utils import cpp_extension

    cuda_dir = csrc / "cuda"
    ldflags = list(ldflags or [])
    digest = _digest(hashed, [*flags, *ldflags, torch.__version__, *sources,
                              *(f"{k}\0{v}" for k, v in sorted(write.items()))])
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
                              extra_ldflags=["-pthread", "-Wl,-Bsymbolic", str(runtime), *ldflags],
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


def build(verbose: bool = False, flavour_name: str | None = None) -> str:
    """Compile (or reuse) the emulated kernels of :data:`KERNEL_FILES` and load them; returns the library path.

    The build directory is named by the flavour (:func:`flavour`) and a hash of
    every source and flag. Also builds the emulator's self-test kernels
    (tests/test_cuda_emulator.py).
    """
    fl = flavour(flavour_name)
    csrc = source_dir()
    if csrc is None:
        raise RuntimeError("the cuda-emulated backend needs the source tree (csrc/ beside ascood_kernels/)")
    cuda_dir = csrc / "cuda"
    # torch compiles .cu files with nvcc: each kernel file goes through a C++ wrapper.
    write = {f"emulated_{k.replace('.', '_')}.cpp": f'// Generated: {k} for the CUDA emulation.\n'
                                                    f'#include "{(cuda_dir / k).resolve()}"\n' for k in KERNEL_FILES}
    sources = [str(cuda_dir / "emulation" / f) for f in _LIBRARY_FILES]
    cflags, ldflags = _flavour_flags(fl)
    flags = [*cflags, f"-DASCOOD_EMU_NS={NAMESPACE}", "-DASCOOD_EMU_SELFTEST"]
    return _compile_library(_library_name(NAMESPACE, fl), sources, _sources_hash(csrc), flags, csrc, write, verbose,
                            ldflags)


def build_variants(variants: Mapping[str, pathlib.Path], name: str = "ascood_emu_variants",
                   verbose: bool = False, flavour_name: str | None = None) -> str:
    """Build modified copies of kernel files into one library, each under its own op namespace.

    ``variants`` maps a namespace (e.g. ``ascood_fault_sync``) to a copy of one
    of :data:`KERNEL_FILES` with a copy of ``common.cuh`` (modified or not)
    beside it, which its include finds first. Each copy is compiled inside a
    C++ namespace of its own, so the modified inline helpers of one variant
    never replace another's (or the original's) at link time. Used by the
    fault-injection test; returns the library path. ``flavour_name`` as in
    :func:`build` (the ASan test builds its variants as "asan").
    """
    fl = flavour(flavour_name)
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
            f'[[maybe_unused]] static const bool {ns}_poisoned = ::ascood::emu::poison_outputs_of("{ns}");\n'
            f"TORCH_LIBRARY({ns}, m) {{\n  ::ascood::define_kernel_schemas(m);\n"
            f'  m.def("_emu_option(str name, int value) -> int", &{ns}_option);\n}}\n')
    cflags, ldflags = _flavour_flags(fl)
    flags = [*cflags, f"-DASCOOD_EMU_NS={name}"]
    write["poison.cpp"] = f'#include "{(csrc / "cuda" / "emulation" / "poison.cpp").resolve()}"\n'
    return _compile_library(_library_name(name, fl), [], _sources_hash(csrc), flags, csrc, write, verbose, ldflags)


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
    (candidate-list entries per chunk of samples; default 2**24),
    ``zscore_max_blocks`` (grid of the zscore kernels, rows beyond it take
    further grid-stride passes; default 2**20), ``iodin_all_blocks_per_sm``
    (grid of i-ODIN's every-element kernel per SM; default 32).
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


def launch_counts(reset: bool = False, library: str | None = None) -> dict[tuple[str, str], int]:
    """Completed launches of the emulated kernels: {(kernel, path): count}.

    ``path`` is "launches" (every launch of the kernel) or a path the kernel
    marks with ASCOOD_PATH (csrc/cuda/common.cuh), counted once per launch that
    reached it, e.g. "grid-stride pass >= 2". Counts accumulate over the
    process; ``reset`` clears them after reading. ``library``: the path of a
    build_variants library (default: the ``ascood_emu`` library).
    """
    if library is None:
        if not load():
            raise RuntimeError(f"the cuda-emulated backend is not available: {why_not()}")
        library = _state["library"]
    fn = ctypes.CDLL(library).ascood_emu_launch_counts
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_int]
    counts = {}
    for line in fn(1 if reset else 0).decode().splitlines():
        kernel, path, count = line.split("\t")
        counts[(kernel, path)] = int(count)
    return counts
