"""Backend discovery and per-call dispatch.

Backends:
  ``reference``  plain PyTorch (ascood_kernels.reference), the specification;
  ``cpu``        C++/OpenMP kernels of the compiled extension
                 ``ascood_kernels._C`` (CPU tensors);
  ``cuda``       CUDA C++ kernels, the library ``ascood_kernels._C_cuda``
                 (CUDA tensors). Both are built on the LibTorch stable ABI
                 and load under any torch >= the version they target
                 (:func:`stable_abi_target`); the CPU kernels load even
                 where the CUDA library cannot (a CPU-only torch);
  ``triton``     Triton kernels (CUDA tensors; CPU tensors only under the
                 Triton interpreter, ``TRITON_INTERPRET=1``, used by CI);
  ``cuda-emulated``  the CUDA kernels' sources built for the host and run on
                 CPU tensors under an emulation of the CUDA execution model
                 (tests and the self-check; :mod:`ascood_kernels.emulation`,
                 built on first request; only the ops with CUDA kernels).
``auto`` picks cuda > triton on CUDA tensors and cpu on CPU tensors, and
falls back to reference (with one warning saying why) only when nothing
compiled can run. On CUDA tensors the kernel ``auto`` picks is checked
against the reference on its first use (:mod:`ascood_kernels._first_use`);
one that does not match is replaced by the next choice. ``ASCOOD_BACKEND``
sets the default for calls that pass ``backend=None``/``"auto"``. Under
``torch.compile`` the choice is made while the op is traced, outside the graph.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton", "cuda-emulated")

#: Every op of the schema (csrc/ops.cpp); each compiled namespace must hold all of them.
OP_NAMES = ("invariant_mask", "gradient_outlier", "zscore", "zscore_backward", "shuffle_outlier",
            "iodin_perturb", "ascood_loss", "ascood_loss_backward")

_state: dict = {}


def build_info() -> dict | None:
    """What the compiled kernels were built with (setup.py writes it), or None when unknown."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def stable_abi_target() -> str | None:
    """The lowest torch (``"2.10"``) the compiled kernels run under (their TORCH_TARGET_VERSION), or None."""
    return (build_info() or {}).get("stable_abi_target")


def _major_minor(version: str) -> tuple[int, int]:
    """(2, 13) of "2.13.0+cpu" (what the stable-ABI target compares: PyTorch keeps a minor's ABI in later ones)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _torch_too_old() -> str | None:
    """Why this torch cannot run the compiled kernels (older than their stable-ABI target), or None."""
    target = stable_abi_target()
    if target is None:
        return None
    if _major_minor(torch.__version__) >= _major_minor(target):
        return None
    return (f"torch {torch.__version__} is older than {target}, the LibTorch stable-ABI version the compiled kernels "
            f"target; upgrade torch to >= {target} to use them")


def _load_extension() -> None:
    if "ext" in _state:
        return
    _state["cuda_version"] = -1
    too_old = _torch_too_old()
    if too_old is not None:
        # Loading would fail on a missing stable-ABI symbol; say why instead, once, in one line.
        _state.update(ext=False, ext_error=too_old, cuda_error=too_old)
        _warn_reference(too_old)
        return
    try:
        importlib.import_module("ascood_kernels._C")
        _state["ext"] = True
        _state["ext_error"] = None
    except (ImportError, OSError) as err:  # not built, or its library cannot load
        _state["ext"] = False
        _state["ext_error"] = f"{type(err).__name__}: {err}"
        _state["cuda_error"] = _state["ext_error"]
        return
    _load_cuda_library()


def _load_cuda_library() -> None:
    """Import ``ascood_kernels._C_cuda`` (after ``_C``, which defines the ops it implements) when it was built."""
    if importlib.util.find_spec("ascood_kernels._C_cuda") is None:
        _state["cuda_error"] = "the extension was built without CUDA (rebuild with USE_CUDA=1 and a CUDA toolkit)"
        return
    if torch.version.cuda is None:
        _state["cuda_error"] = (f"torch {torch.__version__} is CPU-only, so the CUDA kernels (ascood_kernels._C_cuda) "
                                "cannot load; the CPU kernels are used")
        return
    try:
        module = importlib.import_module("ascood_kernels._C_cuda")
    except (ImportError, OSError) as err:
        _state["cuda_error"] = f"{type(err).__name__}: {err}"
        return
    _state["cuda_version"] = int(module.CUDA_VERSION)
    _state["cuda_error"] = None


def _load_triton() -> None:
    if "triton" in _state:
        return
    try:
        importlib.import_module("ascood_kernels.triton")
        missing = [name for name in OP_NAMES if not hasattr(torch.ops.ascood_triton, name)]
        if missing:
            raise ImportError(f"ascood_kernels.triton does not register {', '.join(missing)}")
        _state["triton"] = True
        _state["triton_error"] = None
    except Exception as err:  # triton missing, or a triton/torch mismatch
        _state["triton"] = False
        _state["triton_error"] = f"{type(err).__name__}: {err}"


def extension_loaded() -> bool:
    """True when ``ascood_kernels._C`` (the C++ CPU kernels) imported."""
    _load_extension()
    return _state["ext"]


def cuda_built() -> bool:
    """True when the CUDA kernels (``ascood_kernels._C_cuda``) loaded (a GPU need not be present)."""
    _load_extension()
    return _state["cuda_version"] >= 0


def triton_loaded() -> bool:
    _load_triton()
    return _state["triton"]


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """Backends that loaded in this process, in preference order.

    ``cuda`` is listed when the extension holds the CUDA kernels, even on a
    machine without a GPU; ``triton`` when the Triton kernels imported.
    """
    names = []
    if cuda_built():
        names.append("cuda")
    if triton_loaded():
        names.append("triton")
    if extension_loaded():
        names.append("cpu")
    names.append("reference")
    return names


def _why_not(backend: str) -> str:
    if backend == "triton":
        return _state.get("triton_error") or "unknown reason"
    if backend == "cpu":
        return _state.get("ext_error") or "unknown reason"
    if not extension_loaded():
        return _state.get("ext_error") or "unknown reason"
    return _state.get("cuda_error") or "unknown reason"


def _warn_reference(reason: str) -> None:
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"ascood_kernels: falling back to the slow reference backend: {reason}", RuntimeWarning,
                      stacklevel=4)


def _gpu_candidates(device: torch.device) -> list[str] | None:
    """The compiled backends ``auto`` may pick on ``device`` when it is a GPU, best first ([]: none); else None.

    The one place where ``auto`` tells a GPU: tests replace it to route CPU
    tensors through the GPU branch to the emulated CUDA kernels.
    """
    if device.type != "cuda":
        return None
    return [name for name, ok in (("cuda", cuda_built()), ("triton", triton_loaded())) if ok]


# Both resolvers are constants to torch.compile (assume_constant_result): Dynamo calls them natively
# while it traces, so their locks, first-use probes and warnings never enter a graph (they cannot be
# traced, and would break fullgraph=True); a compiled graph keeps the backend chosen when it was traced.
@torch.compiler.assume_constant_result
def resolve(backend: str | None, device: torch.device, op: str | None = None,
            dtype: torch.dtype | None = None) -> str:
    """The concrete backend for a call of ``op`` on ``device`` (raises on impossible requests).

    With ``op`` and ``dtype`` given, an ``auto`` choice on CUDA tensors goes
    through the first-use check (:func:`ascood_kernels._first_use.choose`).
    Under ``torch.compile`` it runs before the graph is built, not in it.
    """
    if backend is None or backend == "auto":
        backend = os.environ.get("ASCOOD_BACKEND", "auto") or "auto"
        source = "ASCOOD_BACKEND"
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        candidates = _gpu_candidates(device)
        if candidates is not None:
            if candidates:
                if op is None or dtype is None:
                    return candidates[0]
                from . import _first_use

                return _first_use.choose(op, device, dtype, candidates)
            _warn_reference(f"no CUDA kernels built and Triton unavailable ({_why_not('triton')})")
            return "reference"
        if device.type == "cpu" and extension_loaded():
            return "cpu"
        _warn_reference(f"the C++ extension is not available ({_why_not('cpu')})"
                        if device.type == "cpu" else f"no compiled kernels for device {device}")
        return "reference"
    if backend == "reference":
        return backend
    if backend == "cpu":
        if not extension_loaded():
            raise RuntimeError(f"backend 'cpu' is not built: {_why_not('cpu')}")
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    elif backend == "cuda":
        if not cuda_built():
            raise RuntimeError(f"backend 'cuda' is not built: {_why_not('cuda')}")
        if not on_cuda:
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    elif backend == "cuda-emulated":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cuda-emulated' runs the CUDA kernels on CPU tensors, got tensors on {device}")
        from . import emulation

        if not emulation.load():
            raise RuntimeError(f"backend 'cuda-emulated' is not available: {emulation.why_not()}")
    elif backend == "triton":
        if not triton_loaded():
            raise RuntimeError(f"backend 'triton' is not available: {_why_not('triton')}")
        if not on_cuda and not (device.type == "cpu" and triton_interpreter()):
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")
    return backend


@torch.compiler.assume_constant_result
def resolve_without_cuda_kernel(backend: str | None, device: torch.device, op: str) -> str:
    """:func:`resolve` for an op that has no CUDA C++ kernel (only Triton on GPUs).

    The CUDA choice maps to Triton. Without Triton the backend rules apply:
    an ``auto`` request (or ``ASCOOD_BACKEND=auto``) falls back to the
    reference with the one-time warning; an explicit ``"cuda"`` request
    cannot be met and raises.
    """
    which = resolve(backend, device)
    if which == "cuda-emulated":
        raise RuntimeError(f"backend 'cuda-emulated': {op} has no CUDA C++ kernel to emulate")
    if which != "cuda":
        return which
    if triton_loaded():
        return "triton"
    requested = backend if backend not in (None, "auto") else (os.environ.get("ASCOOD_BACKEND", "auto") or "auto")
    if requested == "auto":
        _warn_reference(f"{op} has no CUDA C++ kernel and Triton is unavailable ({_why_not('triton')})")
        return "reference"
    raise RuntimeError(f"backend 'cuda': {op} has no CUDA C++ kernel (it runs Triton on CUDA tensors) and Triton "
                       f"is unavailable ({_why_not('triton')}); use backend='auto' or 'reference'")


def op_namespace(backend: str):
    """``torch.ops`` namespace that holds ``backend``'s kernels."""
    if backend == "triton":
        return torch.ops.ascood_triton
    if backend == "cuda-emulated":
        from .emulation import NAMESPACE

        return getattr(torch.ops, NAMESPACE)
    return torch.ops.ascood


def compiled_namespaces() -> list[str]:
    """Namespaces whose ops exist in this process (for fake/autograd registration)."""
    names = []
    if extension_loaded():
        names.append("ascood")
    if triton_loaded():
        names.append("ascood_triton")
    return names
