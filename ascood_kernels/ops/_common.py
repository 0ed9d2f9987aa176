"""Small helpers shared by the op wrappers."""
from __future__ import annotations

import torch

from .. import _backend


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """Output layout of the image ops (docs/OPS.md, "Layout"): channels-last in, channels-last out."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_image_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fake-kernel output with the strides the real kernels produce."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device).contiguous(memory_format=memory_format(t))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# (kind, name, args) of every registration, so a namespace loaded later (the
# test-only cuda-emulated kernels, ascood_kernels.emulation) gets the same.
_REGISTRATIONS: list = []


def register_fake(name: str, fn) -> None:
    """Register ``fn`` as the fake kernel of ``name`` in every compiled namespace.

    Triton ops registered with ``triton_op`` derive their fake kernel by tracing,
    so only namespaces without one get ours.
    """
    _REGISTRATIONS.append(("fake", name, (fn,)))
    for ns in _backend.compiled_namespaces():
        _register_fake_in(ns, name, fn)


def _register_fake_in(ns: str, name: str, fn) -> None:
    qualname = f"{ns}::{name}"
    if ns == "ascood_triton" and _has_fake(qualname):
        return
    torch.library.register_fake(qualname, fn)


def _has_fake(qualname: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta") or \
            torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None
    except Exception:
        return False


def register_autograd(name: str, make_backward, setup_context) -> None:
    """Register autograd for ``name`` in every compiled namespace.

    ``make_backward(ns)`` returns the backward function using namespace ``ns``'s
    kernels, so each backend's backward runs on the same backend.
    """
    _REGISTRATIONS.append(("autograd", name, (make_backward, setup_context)))
    for ns in _backend.compiled_namespaces():
        _register_autograd_in(ns, name, make_backward, setup_context)


def _register_autograd_in(ns: str, name: str, make_backward, setup_context) -> None:
    torch.library.register_autograd(f"{ns}::{name}", make_backward(getattr(torch.ops, ns)),
                                    setup_context=setup_context)


def register_namespace(ns: str) -> None:
    """Give a namespace loaded after import the fake kernels and autograd of the ops it defines."""
    have = getattr(torch.ops, ns)
    for kind, name, args in _REGISTRATIONS:
        if not hasattr(have, name):
            continue
        if kind == "fake":
            _register_fake_in(ns, name, *args)
        else:
            _register_autograd_in(ns, name, *args)
