"""iodin_perturb: the input step of ODIN and i-ODIN (invariant-ODIN)."""
from __future__ import annotations

import torch

from .. import _backend, _validate, reference
from ._common import acc_dtype, empty_image_like, register_fake

__all__ = ["iodin_perturb"]


def iodin_perturb(x: torch.Tensor, grad: torch.Tensor, eps: float, std: float | torch.Tensor = 1.0,
                  k: int = 1, *, backend: str | None = "auto") -> torch.Tensor:
    """Move the ``k`` most salient elements of each sample against the loss gradient.

    ``out = x - eps * s / std[c]`` on the k elements of largest ``|grad|``
    (ties to the lower logical index), ``s = +1 where grad >= 0 else -1``
    (ODIN's rule, so a NaN gradient gives -1), ``c`` the element's channel
    (dim 1). Every other element is copied. ``k >= C*H*W`` is ODIN.

    Args:
        x: (B, C, *) inputs (already normalised), float32/float16/bfloat16/float64.
        grad: d(loss)/dx of ODIN's temperature-scaled CE, same shape/dtype/device.
        eps: step size >= 0 (ODIN's epsilon, e.g. 0.0014).
        std: per-channel normalisation std: a float > 0 or a (C,) tensor of
            positive values, so the step is eps in pixel units.
        k: number of elements moved per sample, >= 1 (i-ODIN default 1).
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        Tensor like x, not differentiable.
    """
    _validate.tensor("x", x)
    _validate.tensor("grad", grad)
    _validate.like("x", x, "grad", grad)
    eps = _validate.non_negative("eps", eps)
    k = _validate.positive_int("k", k, hint=" (any k >= C*H*W moves every element, i.e. ODIN)")
    C = x.shape[1]
    acc = acc_dtype(x.dtype)
    if isinstance(std, torch.Tensor):
        if std.dim() == 0:
            std = std.reshape(1)
        if std.dim() != 1 or std.numel() not in (1, C):
            raise ValueError(f"std must be a float or a tensor of {C} per-channel values, got shape {tuple(std.shape)}")
        if not std.is_floating_point():
            raise TypeError(f"std must be a floating tensor, got {std.dtype}")
        # Checked where the values live: a CPU std is checked on the host whatever x's
        # device; a CUDA std gets a device-side assert (no host synchronisation).
        if not torch.compiler.is_compiling():
            if std.device.type == "cpu":
                if not bool((std.detach().to(acc) > 0).all()):  # in the dtype the kernels use
                    raise ValueError("std must be > 0 in every channel")
            elif std.device.type == "cuda":
                torch._assert_async((std.detach() > 0).all(), "iodin_perturb: std must be > 0 in every channel")
        std_t = std.detach().to(device=x.device, dtype=acc).expand(C).contiguous()
    else:
        std_t = torch.full((C,), _validate.positive("std", std), dtype=acc, device=x.device)
    which = _backend.resolve(backend, x.device, "iodin_perturb", x.dtype)
    x, grad = x.detach(), grad.detach()
    if which == "reference":
        return reference.iodin_perturb(x, grad, eps, std_t, k)
    return _backend.op_namespace(which).iodin_perturb(x, grad, eps, std_t, k)


def _fake_iodin(x, grad, eps, std, k):
    return empty_image_like(x)


register_fake("iodin_perturb", _fake_iodin)
