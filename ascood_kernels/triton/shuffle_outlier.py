"""Triton ``shuffle_outlier`` (docs/OPS.md) -- a hybrid of Triton kernels and one torch sort.

1. Triton: per-pixel score ``s[b, p]`` in float64, the saliency summed over
   channels sequentially (channel 0, then + channel 1, ...: the same bits as
   every other backend); a (B, *spatial) saliency is just widened.
2. torch (on the tensors' device, no host sync): the selection order
   ``torch.sort(s, dim=1, descending=True, stable=True)`` -- score descending,
   ties by lower pixel index, NaN largest; its first npix = int(p_inv * P)
   indices are ``sel``. A segmented radix sort of float64 keys is what
   ``torch.sort`` already does well, so it is not re-implemented.
3. Triton: ``out`` starts as a copy of x (in the output layout) and one kernel
   moves all channels of each selected pixel, ``out[b, :, sel[i]] =
   x[b, :, sel[perm[b, i]]]`` as (pixels x channels) tiles. Out-of-range perm
   entries are ignored (the wrapper validates perm).

Channels-last 4-D x is handled in its own layout (pixel stride C, channel
stride 1); other inputs are made contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _validate
from . import _common as C

__all__ = ["shuffle_outlier"]

BLOCK_P = 256


@triton.jit
def _widen(v):
    """Exact conversion to float64 (half types via float32: the interpreter only
    converts bfloat16 correctly to float32)."""
    if v.dtype == tl.float64:
        r = v
    else:
        r = v.to(tl.float32).to(tl.float64)
    return r


@triton.jit
def _pixel_score_kernel(sal_ptr, s_ptr, P, CS, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = p < P
    base = sal_ptr + b * CS * P
    s = _widen(tl.load(base + p, mask=valid, other=0.0))
    for c in tl.range(1, CS):
        s = s + _widen(tl.load(base + c * P + p, mask=valid, other=0.0))
    tl.store(s_ptr + b * P + p, s, mask=valid)


@triton.jit
def _shuffle_move_kernel(x_ptr, out_ptr, order_ptr, perm_ptr, P, NC, npix, stride_c, stride_p,
                         BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    valid = i < npix
    src_slot = tl.load(perm_ptr + b * npix + i, mask=valid, other=0)
    valid = valid & (src_slot >= 0) & (src_slot < npix)
    dst = tl.load(order_ptr + b * P + i, mask=valid, other=0)
    src = tl.load(order_ptr + b * P + src_slot, mask=valid, other=0)
    base = b * NC * P
    cc = tl.arange(0, BLOCK_C)
    for c0 in tl.range(0, NC, BLOCK_C):
        ch = (c0 + cc).to(tl.int64)
        m = valid[:, None] & (ch[None, :] < NC)
        v = tl.load(x_ptr + base + src[:, None] * stride_p + ch[None, :] * stride_c, mask=m)
        tl.store(out_ptr + base + dst[:, None] * stride_p + ch[None, :] * stride_c, v, mask=m)


def _launch(x, saliency, p_inv, perm, out) -> None:
    C.check_device(x, "x")
    C.check(x.dim() >= 2, f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    fmt = C.memory_format(x)
    C.check(out.shape == x.shape and out.is_contiguous(memory_format=fmt), "output buffer has the wrong layout")
    B, NC = x.shape[0], x.shape[1]
    P = x[0, 0].numel() if B and NC else 0
    xs = x.contiguous(memory_format=fmt)
    out.copy_(xs)
    npix = int(float(p_inv) * P)
    if B == 0 or NC == 0 or npix == 0:
        return
    C.check(0 < npix <= P, f"npix = int(p_inv * P) = {npix} is outside [0, {P}]")
    C.check(saliency.dim() in (x.dim(), x.dim() - 1), "saliency must have x's shape or (B, *spatial)")
    C.check(tuple(perm.shape) == (B, npix), f"perm must have shape ({B}, {npix}), got {tuple(perm.shape)}")
    _validate.permutation_rows("perm", perm, B, npix)  # a repeated index would duplicate pixels
    C.check(B * NC * P < 2**62 and NC * P < 2**31, "tensor too large")
    sal = saliency.contiguous()
    cs = NC if saliency.dim() == x.dim() else 1
    C.check(sal.numel() == B * cs * P, "saliency has the wrong number of elements")
    perm_c = perm.to(device=x.device, dtype=torch.int64).contiguous()
    if fmt == torch.channels_last:
        stride_c, stride_p = 1, NC
    else:
        stride_c, stride_p = P, 1
    block_c = min(C.next_pow2(NC), 16)
    block_i = max(16, BLOCK_P // block_c)
    with C.device_guard(xs):
        scores = torch.empty((B, P), dtype=torch.float64, device=x.device)
        wrap_triton(_pixel_score_kernel)[(B, triton.cdiv(P, BLOCK_P))](sal, scores, P, cs, BLOCK=BLOCK_P, num_warps=4)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        wrap_triton(_shuffle_move_kernel)[(B, triton.cdiv(npix, block_i))](
            xs, out, order, perm_c, P, NC, npix, stride_c, stride_p, BLOCK_I=block_i, BLOCK_C=block_c,
            num_warps=4)


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op(f"{C.NS}::_interp_shuffle_outlier", mutates_args=("out",))
def _interp_shuffle_outlier(x: torch.Tensor, saliency: torch.Tensor, p_inv: float, perm: torch.Tensor,
                            out: torch.Tensor) -> None:
    _launch(x, saliency, p_inv, perm, out)


@triton_op(f"{C.NS}::shuffle_outlier", mutates_args=(),
           schema="(Tensor x, Tensor saliency, float p_inv, Tensor perm) -> Tensor")
def shuffle_outlier(x: torch.Tensor, saliency: torch.Tensor, p_inv: float, perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=C.memory_format(x))
    if C.on_interpreter_path(x):
        torch.ops.ascood_triton._interp_shuffle_outlier(x, saliency, p_inv, perm, out)
    else:
        _launch(x, saliency, p_inv, perm, out)
    return out
