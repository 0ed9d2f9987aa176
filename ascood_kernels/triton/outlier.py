"""Triton ``invariant_mask`` and ``gradient_outlier`` (docs/OPS.md).

Per sample, the threshold is the exact k-th largest magnitude key
(k = int(p_inv * n) in Python double) found by a radix select over the key
bits, 8-bit digits from the top (4 passes for float32, 2 for float16/bfloat16,
8 for float64), followed by the masked add ``out = key >= t ? x + alpha*g : x``
(ties at the threshold all kept).

Two paths, chosen on the host from n alone:

* small rows (n <= SMALL_MAX): one program per sample holds the whole row in
  registers, runs every radix pass with ``tl.histogram`` and writes the output:
  one launch.
* large rows: grid (B, cdiv(n, CHUNK)) programs per pass; each histograms its
  chunk and adds the 256 counts to a per-sample global int32 histogram with
  atomics; every program of the next pass (and of the final masked-add pass)
  replays the previous passes' digit choices from those histograms itself.
  NPASS + 1 launches, no host synchronisation, batch 1 still fills the GPU.

The selected set does not depend on element order, so the kernels work on the
memory order of x's layout (channels-last inputs are processed without a
transposing copy; grad is made contiguous in x's layout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common as C
from ._common import magnitude_key, mul_rn, scalar_from_bits, select_from_hist, select_in_block, to_acc, zero_key

__all__ = ["invariant_mask", "gradient_outlier", "SMALL_MAX", "CHUNK"]

#: rows up to this many elements use the one-program-per-sample kernel.
SMALL_MAX = 8192
#: elements per program in the multi-program path (and the inner block size).
CHUNK = 4096
BLOCK = 1024


@triton.jit(do_not_specialize=["alpha_bits"])
def _outlier_small_kernel(x_ptr, g_ptr, out_ptr, n, K, alpha_bits,
                          BLOCK_N: tl.constexpr, KIND: tl.constexpr, NPASS: tl.constexpr,
                          WITH_X: tl.constexpr, ALL: tl.constexpr, EXACT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < n
    base = b * n
    g = tl.load(g_ptr + base + offs, mask=valid, other=0.0)
    if ALL:
        sel = valid
    else:
        key = magnitude_key(g, KIND)
        t, _r = select_in_block(key, valid, K, KIND, NPASS)
        sel = valid & (key >= t)
    if WITH_X:
        x = tl.load(x_ptr + base + offs, mask=valid, other=0.0)
        alpha = scalar_from_bits(alpha_bits, KIND == 3)
        moved = (to_acc(x, KIND == 3) + mul_rn(alpha, to_acc(g, KIND == 3), EXACT)).to(x.dtype)
        tl.store(out_ptr + base + offs, tl.where(sel, moved, x), mask=valid)
    else:
        tl.store(out_ptr + base + offs, sel, mask=valid)


@triton.jit(do_not_specialize=["alpha_bits"])
def _outlier_apply_kernel(x_ptr, g_ptr, out_ptr, hist_ptr, n, K, alpha_bits,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
                          NPASS: tl.constexpr, WITH_X: tl.constexpr, ALL: tl.constexpr,
                          EXACT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if ALL:
        t = zero_key(KIND)
    else:
        t, _r = select_from_hist(hist_ptr + b * (NPASS * 256), K, NPASS, KIND, NPASS)
    base = b * n
    alpha = scalar_from_bits(alpha_bits, KIND == 3)
    for j in tl.range(0, CHUNK, BLOCK):
        offs = c * CHUNK + j + tl.arange(0, BLOCK)
        valid = offs < n
        g = tl.load(g_ptr + base + offs, mask=valid, other=0.0)
        sel = valid & (magnitude_key(g, KIND) >= t)
        if WITH_X:
            x = tl.load(x_ptr + base + offs, mask=valid, other=0.0)
            moved = (to_acc(x, KIND == 3) + mul_rn(alpha, to_acc(g, KIND == 3), EXACT)).to(x.dtype)
            tl.store(out_ptr + base + offs, tl.where(sel, moved, x), mask=valid)
        else:
            tl.store(out_ptr + base + offs, sel, mask=valid)


def _launch(x, grad: torch.Tensor, p_inv: float, alpha: float, out: torch.Tensor) -> None:
    """Fill ``out`` (preallocated in the output layout) with the mask (x is None) or the outlier."""
    with_x = x is not None
    C.check_device(grad, "grad")
    fmt = C.memory_format(x if with_x else grad)
    B = grad.shape[0]
    n = grad[0].numel() if B else 0
    C.check(out.shape == grad.shape and out.is_contiguous(memory_format=fmt), "output buffer has the wrong layout")
    if B == 0 or n == 0:
        return
    k = int(float(p_inv) * n)
    C.check(0 <= k <= n, f"k = int(p_inv * n) = {k} is outside [0, {n}] (p_inv must be in (0, 1])")
    C.check(B * n < 2**62 and n < 2**31, "tensor too large")
    if k == 0:
        if with_x:
            out.copy_(x)
        else:
            out.zero_()
        return
    g = grad.contiguous(memory_format=fmt)
    xs = x.contiguous(memory_format=fmt) if with_x else g
    kind = C.KEY_KIND[g.dtype]
    npass = C.KEY_PASSES[kind]
    everything = k == n
    alpha_bits = C.f64_bits(alpha)
    exact = g.is_cuda
    with C.device_guard(g):
        if n <= SMALL_MAX:
            block_n = C.next_pow2(n)
            wrap_triton(_outlier_small_kernel)[(B,)](
                xs, g, out, n, k, alpha_bits, BLOCK_N=block_n, KIND=kind, NPASS=npass,
                WITH_X=with_x, ALL=everything, EXACT=exact, num_warps=C.warps_for(block_n, kind == 3))
            return
        chunk = max(BLOCK, CHUNK // BLOCK * BLOCK)  # a multiple of BLOCK: chunks must not overlap
        nchunks = triton.cdiv(n, chunk)
        C.check(nchunks <= C.MAX_GRID_YZ, f"{n} elements per sample need {nchunks} chunks (> {C.MAX_GRID_YZ})")
        if everything:
            hist = g  # unused by the kernel
        else:
            hist = C.launch_radix_passes(g, B, n, k, chunk, BLOCK)
        wrap_triton(_outlier_apply_kernel)[(B, nchunks)](
            xs, g, out, hist, n, k, alpha_bits, CHUNK=chunk, BLOCK=BLOCK, KIND=kind, NPASS=npass,
            WITH_X=with_x, ALL=everything, EXACT=exact, num_warps=8)


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op(f"{C.NS}::_interp_invariant_mask", mutates_args=("out",))
def _interp_invariant_mask(grad: torch.Tensor, p_inv: float, out: torch.Tensor) -> None:
    _launch(None, grad, p_inv, 0.0, out)


@torch.library.custom_op(f"{C.NS}::_interp_gradient_outlier", mutates_args=("out",))
def _interp_gradient_outlier(x: torch.Tensor, grad: torch.Tensor, p_inv: float, alpha: float,
                             out: torch.Tensor) -> None:
    _launch(x, grad, p_inv, alpha, out)


@triton_op(f"{C.NS}::invariant_mask", mutates_args=(),
           schema="(Tensor grad, float p_inv) -> Tensor")
def invariant_mask(grad: torch.Tensor, p_inv: float) -> torch.Tensor:
    out = torch.empty(grad.shape, dtype=torch.bool, device=grad.device).contiguous(
        memory_format=C.memory_format(grad))
    if C.on_interpreter_path(grad):
        torch.ops.ascood_triton._interp_invariant_mask(grad, p_inv, out)
    else:
        _launch(None, grad, p_inv, 0.0, out)
    return out


@triton_op(f"{C.NS}::gradient_outlier", mutates_args=(),
           schema="(Tensor x, Tensor grad, float p_inv, float alpha) -> Tensor")
def gradient_outlier(x: torch.Tensor, grad: torch.Tensor, p_inv: float, alpha: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=C.memory_format(x))
    if C.on_interpreter_path(x):
        torch.ops.ascood_triton._interp_gradient_outlier(x, grad, p_inv, alpha, out)
    else:
        _launch(x, grad, p_inv, alpha, out)
    return out
