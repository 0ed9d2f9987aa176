"""Build ascood_kernels._C (C++ CPU kernels, plus CUDA kernels when available).

USE_CUDA=auto (default): compile csrc/cuda/*.cu when torch was built with CUDA
and a CUDA toolkit is found (CUDA_HOME); USE_CUDA=1 forces it (a missing
toolkit is then an error); USE_CUDA=0 skips it. TORCH_CUDA_ARCH_LIST overrides
the default arch list "8.0;9.0". ASCOOD_PTXAS_VERBOSE=1 adds `-Xptxas -v` so
the register/spill report of every kernel is printed (review it in debug builds).
Build with `pip install --no-build-isolation .` so pip uses the torch you have.
"""
from __future__ import annotations

import glob
import os

from packaging.version import Version
from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

MIN_TORCH = Version("2.4")
if Version(torch.__version__.split("+")[0]) < MIN_TORCH:
    raise RuntimeError(f"ascood needs torch >= {MIN_TORCH}, found {torch.__version__}")

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    mode = os.environ.get("USE_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise ValueError(f"USE_CUDA must be auto, 0 or 1, got {mode!r}")
    have_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not have_toolkit:
        raise RuntimeError(
            "USE_CUDA=1 but no CUDA build is possible: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return mode == "1" or (mode == "auto" and have_toolkit)


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # Files built for a higher ISA (they say so with a target pragma and are
    # only called after a CPU check) go last: the linker keeps the first copy
    # of an inline function, so the baseline files never call their code.
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "avx2", "*.cpp")))
    # No -std flag: torch adds the standard its headers need (C++20 for torch 2.14).
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    extra = {"cxx": cxx}
    # py_limited_api=True below makes torch define Py_LIMITED_API itself (a second
    # definition would be a -Werror failure in nvcc).
    macros = []
    ext_cls = cpp_extension.CppExtension
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cuda_version = int(torch.version.cuda.split(".")[0]) * 1000 + int(torch.version.cuda.split(".")[1]) * 10
        macros += [("ASCOOD_WITH_CUDA", None), ("ASCOOD_CUDA_VERSION", str(cuda_version))]
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-Werror=all-warnings", "-lineinfo"]
        if os.environ.get("ASCOOD_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        extra["nvcc"] = nvcc
        ext_cls = cpp_extension.CUDAExtension
    return [
        ext_cls(
            "ascood_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=macros,
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
