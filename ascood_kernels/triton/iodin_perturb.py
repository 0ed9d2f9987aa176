"""Triton ``iodin_perturb`` (docs/OPS.md): move the top-k |grad| elements per sample.

Selection: per sample, the min(k, n) elements with the largest magnitude key,
ties broken by lower *logical* (NCHW) index. It runs the same exact radix
select as ``outlier`` to get the k-th largest key ``t`` and ``r``, the number of
elements equal to ``t`` that belong to the top k; an element is selected when
``key > t``, or ``key == t`` and fewer than ``r`` earlier (logical order)
elements have key ``t``. So any k works, with no sort; k >= n is ODIN (every
element, no selection pass at all).

Step: ``out = x - (grad >= 0 ? eps : -eps) / std[c]`` in float32 (float64 for
float64 x; IEEE division), rounded once; other elements copied bit-exactly.

Paths (host choice from n):

* n <= SMALL_MAX (4096): one program per sample, whole row in registers; tie ranks by
  ``tl.cumsum``. One launch.
* larger rows: NPASS histogram passes over (B, cdiv(n, CHUNK)) programs (global
  int32 histograms, atomics), one pass storing each chunk's count of
  threshold ties, then the apply pass (each program sums the tie counts of the
  chunks before it, then ranks its own ties block by block in logical order).
  NPASS + 2 launches, no host synchronisation.

Channels-last 4-D inputs are read and written in place of their layout: the
kernels walk logical indices and address memory as ``p * C + c``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common as C
from ._common import div_acc, magnitude_key, scalar_from_bits, select_from_hist, select_in_block, to_acc, zero_key

__all__ = ["iodin_perturb", "SMALL_MAX", "CHUNK"]

#: rows up to this many elements use the one-program-per-sample kernel (8 warps:
#: larger register tiles spill on sm_90, mostly for channels-last addressing).
SMALL_MAX = 4096
CHUNK = 4096
BLOCK = 1024


@triton.jit
def _mem_offset(i, P, NC, CL: tl.constexpr):
    """Memory offset within a sample of logical index i (= c * P + p)."""
    if CL:
        o = (i % P) * NC + i // P
    else:
        o = i
    return o


@triton.jit
def _step(x, g, std_ptr, i, P, eps, valid, IS64: tl.constexpr):
    c = i // P
    sd = tl.load(std_ptr + c, mask=valid, other=1.0)
    signed = tl.where(g >= 0, eps, -eps)
    return (to_acc(x, IS64) - div_acc(signed, sd, IS64)).to(x.dtype)


@triton.jit(do_not_specialize=["eps_bits"])
def _iodin_small_kernel(x_ptr, g_ptr, std_ptr, out_ptr, n, P, NC, K, eps_bits,
                        BLOCK_N: tl.constexpr, KIND: tl.constexpr, NPASS: tl.constexpr,
                        CL: tl.constexpr, ALL: tl.constexpr):
    IS64: tl.constexpr = KIND == 3
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_N)
    valid = i < n
    offs = b * n + _mem_offset(i, P, NC, CL)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    if ALL:
        sel = valid
    else:
        key = magnitude_key(g, KIND)
        t, r = select_in_block(key, valid, K, KIND, NPASS)
        tie = valid & (key == t)
        rank = tl.cumsum(tie.to(tl.int32), 0)
        sel = valid & ((key > t) | (tie & (rank <= r)))
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    eps = scalar_from_bits(eps_bits, IS64)
    moved = _step(x, g, std_ptr, i, P, eps, valid, IS64)
    tl.store(out_ptr + offs, tl.where(sel, moved, x), mask=valid)


@triton.jit
def _tie_count_kernel(g_ptr, hist_ptr, ties_ptr, n, P, NC, K, nchunks,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
                      NPASS: tl.constexpr, CL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t, _r = select_from_hist(hist_ptr + b * (NPASS * 256), K, NPASS, KIND, NPASS)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.range(0, CHUNK, BLOCK):
        i = c * CHUNK + j + tl.arange(0, BLOCK)
        valid = i < n
        g = tl.load(g_ptr + b * n + _mem_offset(i, P, NC, CL), mask=valid, other=0.0)
        cnt += (valid & (magnitude_key(g, KIND) == t)).to(tl.int32)
    tl.store(ties_ptr + b * nchunks + c, tl.sum(cnt, 0))


@triton.jit(do_not_specialize=["eps_bits"])
def _iodin_apply_kernel(x_ptr, g_ptr, std_ptr, out_ptr, hist_ptr, ties_ptr, n, P, NC, K, eps_bits,
                        nchunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
                        NPASS: tl.constexpr, CL: tl.constexpr, ALL: tl.constexpr):
    IS64: tl.constexpr = KIND == 3
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    eps = scalar_from_bits(eps_bits, IS64)
    if ALL:
        t = zero_key(KIND)
        r = 0
        before = 0
    else:
        t, r = select_from_hist(hist_ptr + b * (NPASS * 256), K, NPASS, KIND, NPASS)
        # ties of this sample in the chunks before this one (logical order)
        prev = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.range(0, c, BLOCK):
            jj = j + tl.arange(0, BLOCK)
            prev += tl.load(ties_ptr + b * nchunks + jj, mask=jj < c, other=0)
        before = tl.sum(prev, 0)
    for j in tl.range(0, CHUNK, BLOCK):
        i = c * CHUNK + j + tl.arange(0, BLOCK)
        valid = i < n
        offs = b * n + _mem_offset(i, P, NC, CL)
        g = tl.load(g_ptr + offs, mask=valid, other=0.0)
        if ALL:
            sel = valid
        else:
            key = magnitude_key(g, KIND)
            tie = valid & (key == t)
            rank = before + tl.cumsum(tie.to(tl.int32), 0)
            sel = valid & ((key > t) | (tie & (rank <= r)))
            before += tl.sum(tie.to(tl.int32), 0)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0)
        moved = _step(x, g, std_ptr, i, P, eps, valid, IS64)
        tl.store(out_ptr + offs, tl.where(sel, moved, x), mask=valid)


def _launch(x, grad, eps, std, k, out) -> None:
    C.check_device(x, "x")
    C.check(x.dim() >= 2, f"x must be (B, C, ...), got shape {tuple(x.shape)}")
    C.check(grad.shape == x.shape, "grad must have x's shape")
    fmt = C.memory_format(x)
    C.check(out.shape == x.shape and out.is_contiguous(memory_format=fmt), "output buffer has the wrong layout")
    B, NC = x.shape[0], x.shape[1]
    n = x[0].numel() if B else 0
    if B == 0 or n == 0:
        return
    C.check(k >= 1, f"k must be >= 1, got {k}")
    C.check(n < 2**31, "samples must have < 2**31 elements")
    P = n // NC
    kk = min(int(k), n)
    acc = C.acc_dtype(x.dtype)
    std_t = std.to(device=x.device, dtype=acc).expand(NC).contiguous()
    xs = x.contiguous(memory_format=fmt)
    g = grad.contiguous(memory_format=fmt)
    kind = C.KEY_KIND[g.dtype]
    npass = C.KEY_PASSES[kind]
    everything = kk == n
    cl = fmt == torch.channels_last
    eb = C.f64_bits(eps)
    with C.device_guard(xs):
        if n <= SMALL_MAX:
            block_n = C.next_pow2(n)
            wrap_triton(_iodin_small_kernel)[(B,)](
                xs, g, std_t, out, n, P, NC, kk, eb, BLOCK_N=block_n, KIND=kind, NPASS=npass,
                CL=cl, ALL=everything, num_warps=min(8, C.warps_for(block_n, kind == 3)))
            return
        chunk = max(BLOCK, CHUNK // BLOCK * BLOCK)  # a multiple of BLOCK: chunks must not overlap
        nchunks = triton.cdiv(n, chunk)
        C.check(nchunks <= C.MAX_GRID_YZ, f"{n} elements per sample need {nchunks} chunks (> {C.MAX_GRID_YZ})")
        if everything:
            hist = ties = g  # unused by the kernel
        else:
            hist = C.launch_radix_passes(g, B, n, kk, chunk, BLOCK)
            ties = torch.empty((B, nchunks), dtype=torch.int32, device=x.device)
            wrap_triton(_tie_count_kernel)[(B, nchunks)](
                g, hist, ties, n, P, NC, kk, nchunks, CHUNK=chunk, BLOCK=BLOCK, KIND=kind, NPASS=npass,
                CL=cl, num_warps=8)
        wrap_triton(_iodin_apply_kernel)[(B, nchunks)](
            xs, g, std_t, out, hist, ties, n, P, NC, kk, eb, nchunks, CHUNK=chunk, BLOCK=BLOCK,
            KIND=kind, NPASS=npass, CL=cl, ALL=everything, num_warps=8)


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op(f"{C.NS}::_interp_iodin_perturb", mutates_args=("out",))
def _interp_iodin_perturb(x: torch.Tensor, grad: torch.Tensor, eps: float, std: torch.Tensor, k: int,
                          out: torch.Tensor) -> None:
    _launch(x, grad, eps, std, k, out)


@triton_op(f"{C.NS}::iodin_perturb", mutates_args=(),
           schema="(Tensor x, Tensor grad, float eps, Tensor std, int k) -> Tensor")
def iodin_perturb(x: torch.Tensor, grad: torch.Tensor, eps: float, std: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=C.memory_format(x))
    if C.on_interpreter_path(x):
        torch.ops.ascood_triton._interp_iodin_perturb(x, grad, eps, std, k, out)
    else:
        _launch(x, grad, eps, std, k, out)
    return out
