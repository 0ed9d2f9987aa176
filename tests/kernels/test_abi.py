"""The compiled kernels are built on the LibTorch stable ABI (docs/OPS.md "Build and ABI").

* no library of the package needs a symbol of libtorch's C++ ABI (``at::``,
  ``c10::``, ``torch::``): only the stable C shims, so one binary loads under
  every torch >= its target;
* a torch older than the target gets one line saying why the compiled kernels
  are not used (and the reference ops), a CPU-only torch keeps the CPU kernels
  of a CUDA build;
* the self-check reports the build's torch, the running torch and the target.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import warnings

import pytest
import torch

import ascood_kernels
from ascood_kernels import _backend, doctor

PACKAGE = pathlib.Path(ascood_kernels.__file__).parent
LIBRARIES = sorted(PACKAGE.glob("_C*.so"))
CXX_NAMESPACES = ("at::", "c10::", "torch::", "caffe2::")


def libtorch_cxx_imports(library: pathlib.Path) -> list[str]:
    """The undefined (imported) dynamic symbols of ``library`` that belong to libtorch's C++ ABI, demangled."""
    out = subprocess.run(["nm", "-DC", "--undefined-only", str(library)], check=True, capture_output=True,
                         text=True).stdout
    return [line.strip() for line in out.splitlines() if any(ns in line for ns in CXX_NAMESPACES)]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
@pytest.mark.skipif(not LIBRARIES, reason="the extension is not built")
@pytest.mark.parametrize("library", LIBRARIES, ids=lambda p: p.name)
def test_library_imports_no_libtorch_cxx_symbol(library):
    assert libtorch_cxx_imports(library) == []


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
@pytest.mark.skipif(not LIBRARIES, reason="the extension is not built")
def test_library_imports_the_stable_c_shims():
    # The check above would pass on a library that imports nothing from torch at all (e.g. not
    # registering anything); the kernels reach torch through its stable C shims.
    out = subprocess.run(["nm", "-D", "--undefined-only", str(PACKAGE / LIBRARIES[0].name)], check=True,
                         capture_output=True, text=True).stdout
    assert "torch_call_dispatcher" in out and "torch_library_impl" in out


def _fresh_state(monkeypatch) -> None:
    monkeypatch.setattr(_backend, "_state", {})


def test_torch_older_than_the_target_says_why_in_one_line(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setattr(_backend, "build_info", lambda: {"torch": "2.14.1", "stable_abi_target": "2.10"})
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _backend.extension_loaded()
        backends = _backend.available_backends()
        assert "cpu" not in backends and "cuda" not in backends
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "\n" not in messages[0]
    assert "torch 2.9.1+cpu is older than 2.10" in messages[0] and "stable-ABI" in messages[0]
    assert "older than 2.10" in _backend._why_not("cpu") and "older than 2.10" in _backend._why_not("cuda")


def test_torch_at_the_target_loads_the_kernels(monkeypatch):
    if not LIBRARIES:
        pytest.skip("the extension is not built")
    _fresh_state(monkeypatch)
    monkeypatch.setattr(_backend, "build_info", lambda: {"torch": "2.14.1", "stable_abi_target": "2.10"})
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert _backend._torch_too_old() is None
    assert _backend.extension_loaded()


def test_cpu_only_torch_keeps_the_cpu_kernels_of_a_cuda_build(monkeypatch):
    if not LIBRARIES:
        pytest.skip("the extension is not built")
    _fresh_state(monkeypatch)
    real_find_spec = _backend.importlib.util.find_spec
    monkeypatch.setattr(_backend.importlib.util, "find_spec",
                        lambda name: object() if name == "ascood_kernels._C_cuda" else real_find_spec(name))
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _backend.extension_loaded()
    assert not _backend.cuda_built()
    assert "cpu" in _backend.available_backends() and "cuda" not in _backend.available_backends()
    assert "CPU-only" in _backend._why_not("cuda") and "CPU kernels are used" in _backend._why_not("cuda")


def test_doctor_reports_build_running_torch_and_target(monkeypatch):
    monkeypatch.setattr(_backend, "build_info", lambda: {"torch": "2.14.1+cu130", "stable_abi_target": "2.10",
                                                         "with_cuda": True})
    line = doctor.environment(torch.device("cpu"))["abi"]
    assert "target torch >= 2.10" in line
    assert "built with torch 2.14.1+cu130" in line
    assert f"running under torch {torch.__version__}" in line
