"""Triton ``ascood_loss`` and ``ascood_loss_backward`` (docs/OPS.md).

Forward, one launch over the B + B2 rows (program r < B: ID row r, else
outlier row r - B), each a row-wise log-sum-exp in float32 (float64 for
float64 logits): pass 1 the row max, pass 2 sum(exp(z - max)) -- a +-inf max is
shifted by 0 like ``torch.logsumexp``. ID rows store lse and the CE term
``lse - z[target]``; outlier rows store lse and the KL term
``lse - mean(z) - log C``. A second one-program launch reduces the terms
deterministically (no atomics, no host synchronisation):
``loss = sum(CE)/max(B,1) + w * sum(KL)/max(B2,1)`` in the logits' dtype.

A target outside [0, C) trips a device assert (the forward kernel is compiled
with ``debug=True``) and, should asserts be compiled out, gives a NaN loss.

Backward (Proposition 1), one launch over the same rows:
``d_id = grad * (softmax(z) - onehot(y)) / B``,
``d_ood = grad * w * (softmax(z) - 1/C) / B2``, in the logits' dtype, with the
saved lse (softmax = exp(z - lse)).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common as C
from ._common import div_acc, scalar_from_bits, to_acc

__all__ = ["ascood_loss", "ascood_loss_backward"]

#: max classes per block (half for float64); longer rows loop.
MAX_BLOCK_C = 4096
REDUCE_BLOCK = 1024


@triton.jit
def _row_lse(row_ptr, NCLS, BLOCK_C: tl.constexpr, IS64: tl.constexpr):
    """(lse, sum(z)) of one row of NCLS logits, in the accumulation type."""
    cols = tl.arange(0, BLOCK_C)
    mx = tl.full([BLOCK_C], float("-inf"), tl.float64 if IS64 else tl.float32)
    for j in tl.range(0, NCLS, BLOCK_C):
        z = to_acc(tl.load(row_ptr + j + cols, mask=j + cols < NCLS, other=float("-inf")), IS64)
        mx = tl.maximum(mx, z)
    m = tl.max(mx, 0)
    shift = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
    se = tl.zeros([BLOCK_C], dtype=tl.float64 if IS64 else tl.float32)
    sz = tl.zeros([BLOCK_C], dtype=tl.float64 if IS64 else tl.float32)
    for j in tl.range(0, NCLS, BLOCK_C):
        msk = j + cols < NCLS
        z = to_acc(tl.load(row_ptr + j + cols, mask=msk, other=0.0), IS64)
        se += tl.where(msk, tl.exp(z - shift), 0.0)
        sz += z
    lse = tl.log(tl.sum(se, 0)) + shift
    return lse, tl.sum(sz, 0)


@triton.jit(debug=True, do_not_specialize=["B", "NCLS", "logc_bits"])
def _loss_rows_kernel(id_ptr, tgt_ptr, ood_ptr, lse_id_ptr, lse_ood_ptr, term_ptr, B, NCLS, logc_bits,
                      BLOCK_C: tl.constexpr, IS64: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    if r < B:
        lse, _sz = _row_lse(id_ptr + r * NCLS, NCLS, BLOCK_C, IS64)
        t = tl.load(tgt_ptr + r)
        ok = (t >= 0) & (t < NCLS)
        tl.device_assert(ok, "ascood_loss: target out of range [0, C)")
        zt = to_acc(tl.load(id_ptr + r * NCLS + tl.where(ok, t, 0)), IS64)
        zt = tl.where(ok, zt, float("nan"))
        tl.store(lse_id_ptr + r, lse)
        tl.store(term_ptr + r, lse - zt)
    else:
        q = r - B
        lse, sz = _row_lse(ood_ptr + q * NCLS, NCLS, BLOCK_C, IS64)
        logc = scalar_from_bits(logc_bits, IS64)
        mean = div_acc(sz, to_acc(NCLS, IS64), IS64)
        tl.store(lse_ood_ptr + q, lse)
        tl.store(term_ptr + r, (lse - mean) - logc)


@triton.jit(do_not_specialize=["B", "B2", "w_bits"])
def _loss_reduce_kernel(term_ptr, loss_ptr, B, B2, w_bits, BLOCK: tl.constexpr, IS64: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.zeros([BLOCK], dtype=tl.float64 if IS64 else tl.float32)
    for j in tl.range(0, B, BLOCK):
        a += tl.load(term_ptr + j + offs, mask=j + offs < B, other=0.0)
    k = tl.zeros([BLOCK], dtype=tl.float64 if IS64 else tl.float32)
    for j in tl.range(0, B2, BLOCK):
        k += tl.load(term_ptr + B + j + offs, mask=j + offs < B2, other=0.0)
    w = scalar_from_bits(w_bits, IS64)
    ce = div_acc(tl.sum(a, 0), to_acc(tl.maximum(B, 1), IS64), IS64)
    kl = div_acc(tl.sum(k, 0), to_acc(tl.maximum(B2, 1), IS64), IS64)
    loss = ce + w * kl
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["B", "B2", "NCLS", "w_bits", "invc_bits"])
def _loss_bwd_kernel(grad_ptr, id_ptr, tgt_ptr, ood_ptr, lse_id_ptr, lse_ood_ptr, did_ptr, dood_ptr,
                     B, B2, NCLS, w_bits, invc_bits, BLOCK_C: tl.constexpr, IS64: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    g = to_acc(tl.load(grad_ptr), IS64)
    if r < B:
        lse = tl.load(lse_id_ptr + r)
        t = tl.load(tgt_ptr + r)
        nb = to_acc(tl.maximum(B, 1), IS64)
        for j in tl.range(0, NCLS, BLOCK_C):
            msk = j + cols < NCLS
            z = tl.load(id_ptr + r * NCLS + j + cols, mask=msk, other=0.0)
            p = tl.exp(to_acc(z, IS64) - lse)
            y = tl.where(j + cols == t, 1.0, 0.0)
            d = div_acc(g * (p - y), nb, IS64)
            tl.store(did_ptr + r * NCLS + j + cols, d.to(z.dtype), mask=msk)
    else:
        q = r - B
        lse = tl.load(lse_ood_ptr + q)
        w = scalar_from_bits(w_bits, IS64)
        invc = scalar_from_bits(invc_bits, IS64)
        nb2 = to_acc(tl.maximum(B2, 1), IS64)
        gw = g * w
        for j in tl.range(0, NCLS, BLOCK_C):
            msk = j + cols < NCLS
            z = tl.load(ood_ptr + q * NCLS + j + cols, mask=msk, other=0.0)
            p = tl.exp(to_acc(z, IS64) - lse)
            d = div_acc(gw * (p - invc), nb2, IS64)
            tl.store(dood_ptr + q * NCLS + j + cols, d.to(z.dtype), mask=msk)


def _block_c(ncls: int, is64: bool) -> int:
    return min(C.next_pow2(ncls), MAX_BLOCK_C // 2 if is64 else MAX_BLOCK_C)


def _check_args(id_logits, target, ood_logits):
    C.check_device(id_logits, "id_logits")
    C.check(id_logits.dim() == 2 and ood_logits.dim() == 2, "id_logits and ood_logits must be 2-D (B, C)")
    C.check(id_logits.shape[1] == ood_logits.shape[1], "id_logits and ood_logits must have the same C")
    C.check(target.shape == (id_logits.shape[0],), "target must have shape (B,)")
    C.check(id_logits.shape[1] >= 1, "C must be >= 1")


def _launch_fwd(id_logits, target, ood_logits, w, loss, lse_id, lse_ood) -> None:
    _check_args(id_logits, target, ood_logits)
    B, ncls = id_logits.shape
    B2 = ood_logits.shape[0]
    acc = C.acc_dtype(id_logits.dtype)
    is64 = acc == torch.float64
    zi = id_logits.contiguous()
    zo = ood_logits.to(id_logits.dtype).contiguous()
    tgt = target.to(torch.int64).contiguous()
    terms = torch.empty((B + B2,), dtype=acc, device=id_logits.device)
    block_c = _block_c(ncls, is64)
    with C.device_guard(zi):
        if B + B2 > 0:
            wrap_triton(_loss_rows_kernel)[(B + B2,)](
                zi, tgt, zo, lse_id, lse_ood, terms, B, ncls, C.f64_bits(math.log(ncls)),
                BLOCK_C=block_c, IS64=is64, num_warps=C.warps_for(block_c, is64))
        wrap_triton(_loss_reduce_kernel)[(1,)](
            terms, loss, B, B2, C.f64_bits(w), BLOCK=REDUCE_BLOCK, IS64=is64, num_warps=4)


def _launch_bwd(grad, id_logits, target, ood_logits, w, lse_id, lse_ood, d_id, d_ood) -> None:
    _check_args(id_logits, target, ood_logits)
    B, ncls = id_logits.shape
    B2 = ood_logits.shape[0]
    if B + B2 == 0:
        return
    acc = C.acc_dtype(id_logits.dtype)
    is64 = acc == torch.float64
    C.check(grad.numel() == 1, "grad must have one element")
    block_c = _block_c(ncls, is64)
    with C.device_guard(id_logits):
        wrap_triton(_loss_bwd_kernel)[(B + B2,)](
            grad.reshape(()).contiguous(), id_logits.contiguous(), target.to(torch.int64).contiguous(),
            ood_logits.contiguous(), lse_id.to(acc).contiguous(), lse_ood.to(acc).contiguous(), d_id, d_ood,
            B, B2, ncls, C.f64_bits(w), C.f64_bits(1.0 / ncls), BLOCK_C=block_c, IS64=is64,
            num_warps=C.warps_for(block_c, is64))


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op(f"{C.NS}::_interp_ascood_loss", mutates_args=("loss", "lse_id", "lse_ood"))
def _interp_ascood_loss(id_logits: torch.Tensor, target: torch.Tensor, ood_logits: torch.Tensor, w: float,
                        loss: torch.Tensor, lse_id: torch.Tensor, lse_ood: torch.Tensor) -> None:
    _launch_fwd(id_logits, target, ood_logits, w, loss, lse_id, lse_ood)


@torch.library.custom_op(f"{C.NS}::_interp_ascood_loss_backward", mutates_args=("d_id", "d_ood"))
def _interp_ascood_loss_backward(grad: torch.Tensor, id_logits: torch.Tensor, target: torch.Tensor,
                                 ood_logits: torch.Tensor, w: float, lse_id: torch.Tensor, lse_ood: torch.Tensor,
                                 d_id: torch.Tensor, d_ood: torch.Tensor) -> None:
    _launch_bwd(grad, id_logits, target, ood_logits, w, lse_id, lse_ood, d_id, d_ood)


@triton_op(f"{C.NS}::ascood_loss", mutates_args=(),
           schema="(Tensor id_logits, Tensor target, Tensor ood_logits, float w) -> (Tensor, Tensor, Tensor)")
def ascood_loss(id_logits: torch.Tensor, target: torch.Tensor, ood_logits: torch.Tensor, w: float):
    acc = C.acc_dtype(id_logits.dtype)
    dev = id_logits.device
    loss = torch.empty((), dtype=id_logits.dtype, device=dev)
    lse_id = torch.empty((id_logits.shape[0],), dtype=acc, device=dev)
    lse_ood = torch.empty((ood_logits.shape[0],), dtype=acc, device=dev)
    if C.on_interpreter_path(id_logits):
        torch.ops.ascood_triton._interp_ascood_loss(id_logits, target, ood_logits, w, loss, lse_id, lse_ood)
    else:
        _launch_fwd(id_logits, target, ood_logits, w, loss, lse_id, lse_ood)
    return loss, lse_id, lse_ood


@triton_op(f"{C.NS}::ascood_loss_backward", mutates_args=(),
           schema="(Tensor grad, Tensor id_logits, Tensor target, Tensor ood_logits, float w, Tensor lse_id, "
                  "Tensor lse_ood) -> (Tensor, Tensor)")
def ascood_loss_backward(grad: torch.Tensor, id_logits: torch.Tensor, target: torch.Tensor,
                         ood_logits: torch.Tensor, w: float, lse_id: torch.Tensor, lse_ood: torch.Tensor):
    d_id = torch.empty(id_logits.shape, dtype=id_logits.dtype, device=id_logits.device)
    d_ood = torch.empty(ood_logits.shape, dtype=ood_logits.dtype, device=ood_logits.device)
    if C.on_interpreter_path(id_logits):
        torch.ops.ascood_triton._interp_ascood_loss_backward(grad, id_logits, target, ood_logits, w, lse_id,
                                                             lse_ood, d_id, d_ood)
    else:
        _launch_bwd(grad, id_logits, target, ood_logits, w, lse_id, lse_ood, d_id, d_ood)
    return d_id, d_ood
