"""Triton ``zscore`` forward and ``zscore_backward`` (docs/OPS.md).

Rows are all leading indices of ``h`` (m = h.size(-1) >= 2). Statistics are
accumulated in float32 (float64 for float64 h); mean and rstd = 1/(std + eps)
(unbiased std, two-pass: mean first, then the squared deviations) are saved
for the backward, which recomputes std from xhat = h - mean in the same
reduction pass as sum(g) and sum(g * xhat) (g = grad_out * sigma):

    dh = rstd * (g - mean(g) - xhat * sum(g * xhat) * rstd / ((m - 1) * std)),

the last term being 0 when std == 0 (constant rows).

Kernels: when a row fits in one block (m <= TILE, TILE/2 for float64) each program handles
ROWS rows as a (ROWS, BLOCK_M) tile held in registers (one read, one write);
longer rows get one program each and loop over the row in BLOCK_M chunks
(3 reads in the forward, 2 in the backward). Divisions and square roots are IEEE-rounded
(``tl.div_rn``/``tl.sqrt_rn`` for float32, see ``_common.div_acc``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common as C
from ._common import div_acc, scalar_from_bits, sqrt_acc, to_acc

__all__ = ["zscore", "zscore_backward", "TILE"]

#: rows up to this length (half for float64) are processed as register tiles;
#: also the elements per program of the tiled path and the chunk of long rows.
#: (8 warps, <= 16 values per thread: no register spills on sm_90 per ptxas.)
TILE = 4096


@triton.jit(do_not_specialize=["m", "sigma_bits", "eps_bits"])
def _zscore_fwd_tile_kernel(h_ptr, out_ptr, mean_ptr, rstd_ptr, rows, m, sigma_bits, eps_bits,
                            ROWS: tl.constexpr, BLOCK_M: tl.constexpr, IS64: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_M)
    rmask = r < rows
    mask = rmask[:, None] & (cols[None, :] < m)
    offs = r[:, None] * m + cols[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    ha = to_acc(h, IS64)
    sigma = scalar_from_bits(sigma_bits, IS64)
    eps = scalar_from_bits(eps_bits, IS64)
    mf = to_acc(m, IS64)
    mean = div_acc(tl.sum(ha, 1), mf, IS64)
    xhat = tl.where(mask, ha - mean[:, None], 0.0)
    var = div_acc(tl.sum(xhat * xhat, 1), mf - 1.0, IS64)
    std = sqrt_acc(var, IS64)
    rstd = div_acc(tl.full(std.shape, 1.0, std.dtype), std + eps, IS64)
    out = (xhat * rstd[:, None]) * sigma
    tl.store(out_ptr + offs, out.to(h.dtype), mask=mask)
    tl.store(mean_ptr + r, mean, mask=rmask)
    tl.store(rstd_ptr + r, rstd, mask=rmask)


@triton.jit(do_not_specialize=["m", "sigma_bits", "eps_bits"])
def _zscore_fwd_loop_kernel(h_ptr, out_ptr, mean_ptr, rstd_ptr, m, sigma_bits, eps_bits,
                            BLOCK_M: tl.constexpr, IS64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = h_ptr + row * m
    cols = tl.arange(0, BLOCK_M)
    mf = to_acc(m, IS64)
    s = tl.zeros([BLOCK_M], dtype=tl.float64 if IS64 else tl.float32)
    for j in tl.range(0, m, BLOCK_M):
        msk = j + cols < m
        s += to_acc(tl.load(base + j + cols, mask=msk, other=0.0), IS64)
    mean = div_acc(tl.sum(s, 0), mf, IS64)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float64 if IS64 else tl.float32)
    for j in tl.range(0, m, BLOCK_M):
        msk = j + cols < m
        d = tl.where(msk, to_acc(tl.load(base + j + cols, mask=msk, other=0.0), IS64) - mean, 0.0)
        s2 += d * d
    std = sqrt_acc(div_acc(tl.sum(s2, 0), mf - 1.0, IS64), IS64)
    sigma = scalar_from_bits(sigma_bits, IS64)
    eps = scalar_from_bits(eps_bits, IS64)
    rstd = div_acc(tl.full(std.shape, 1.0, std.dtype), std + eps, IS64)
    for j in tl.range(0, m, BLOCK_M):
        msk = j + cols < m
        h = tl.load(base + j + cols, mask=msk, other=0.0)
        out = ((to_acc(h, IS64) - mean) * rstd) * sigma
        tl.store(out_ptr + row * m + j + cols, out.to(h.dtype), mask=msk)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit(do_not_specialize=["m", "sigma_bits"])
def _zscore_bwd_tile_kernel(go_ptr, h_ptr, mean_ptr, rstd_ptr, dh_ptr, rows, m, sigma_bits,
                            ROWS: tl.constexpr, BLOCK_M: tl.constexpr, IS64: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_M)
    rmask = r < rows
    mask = rmask[:, None] & (cols[None, :] < m)
    offs = r[:, None] * m + cols[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    sigma = scalar_from_bits(sigma_bits, IS64)
    g = tl.where(mask, to_acc(tl.load(go_ptr + offs, mask=mask, other=0.0), IS64) * sigma, 0.0)
    mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
    xhat = tl.where(mask, to_acc(h, IS64) - mean[:, None], 0.0)
    mf = to_acc(m, IS64)
    mean_g = div_acc(tl.sum(g, 1), mf, IS64)
    dot = tl.sum(g * xhat, 1)
    std = sqrt_acc(div_acc(tl.sum(xhat * xhat, 1), mf - 1.0, IS64), IS64)
    pos = std > 0
    denom = tl.where(pos, (mf - 1.0) * std, 1.0)
    through = div_acc((xhat * dot[:, None]) * rstd[:, None], denom[:, None], IS64)
    through = tl.where(pos[:, None], through, 0.0)
    dh = rstd[:, None] * ((g - mean_g[:, None]) - through)
    tl.store(dh_ptr + offs, dh.to(h.dtype), mask=mask)


@triton.jit(do_not_specialize=["m", "sigma_bits"])
def _zscore_bwd_loop_kernel(go_ptr, h_ptr, mean_ptr, rstd_ptr, dh_ptr, m, sigma_bits,
                            BLOCK_M: tl.constexpr, IS64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_M)
    sigma = scalar_from_bits(sigma_bits, IS64)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    mf = to_acc(m, IS64)
    sg = tl.zeros([BLOCK_M], dtype=tl.float64 if IS64 else tl.float32)
    sgx = tl.zeros([BLOCK_M], dtype=tl.float64 if IS64 else tl.float32)
    sxx = tl.zeros([BLOCK_M], dtype=tl.float64 if IS64 else tl.float32)
    for j in tl.range(0, m, BLOCK_M):
        msk = j + cols < m
        off = row * m + j + cols
        g = tl.where(msk, to_acc(tl.load(go_ptr + off, mask=msk, other=0.0), IS64) * sigma, 0.0)
        xhat = tl.where(msk, to_acc(tl.load(h_ptr + off, mask=msk, other=0.0), IS64) - mean, 0.0)
        sg += g
        sgx += g * xhat
        sxx += xhat * xhat
    mean_g = div_acc(tl.sum(sg, 0), mf, IS64)
    dot = tl.sum(sgx, 0)
    std = sqrt_acc(div_acc(tl.sum(sxx, 0), mf - 1.0, IS64), IS64)
    pos = std > 0
    denom = tl.where(pos, (mf - 1.0) * std, 1.0)
    for j in tl.range(0, m, BLOCK_M):
        msk = j + cols < m
        off = row * m + j + cols
        h = tl.load(h_ptr + off, mask=msk, other=0.0)
        g = to_acc(tl.load(go_ptr + off, mask=msk, other=0.0), IS64) * sigma
        xhat = to_acc(h, IS64) - mean
        through = tl.where(pos, div_acc((xhat * dot) * rstd, denom, IS64), 0.0)
        dh = rstd * ((g - mean_g) - through)
        tl.store(dh_ptr + off, dh.to(h.dtype), mask=msk)


def _tile(is64: bool) -> int:
    return TILE // 2 if is64 else TILE


def _tile_rows(block_m: int, is64: bool) -> int:
    return max(1, min(64, _tile(is64) // block_m))


def _launch_fwd(h, sigma, eps, out, mean, rstd) -> None:
    C.check_device(h, "h")
    m = h.shape[-1]
    C.check(m >= 2, f"h needs >= 2 features in its last dim, got shape {tuple(h.shape)}")
    rows = h.numel() // m if m else 0
    if rows == 0:
        return
    hc = h.contiguous()
    is64 = h.dtype == torch.float64
    sb, eb = C.f64_bits(sigma), C.f64_bits(eps)
    with C.device_guard(hc):
        _launch_rows(_zscore_fwd_tile_kernel, _zscore_fwd_loop_kernel, (hc, out, mean, rstd), (sb, eb), rows, m, is64)


def _launch_rows(tile_kernel, loop_kernel, tensors, scalars, rows: int, m: int, is64: bool) -> None:
    """Rows that fit one tile: several rows per program; longer rows: one looping program per row."""
    if m <= _tile(is64):
        block_m = C.next_pow2(m)
        nrows = _tile_rows(block_m, is64)
        wrap_triton(tile_kernel)[(triton.cdiv(rows, nrows),)](
            *tensors, rows, m, *scalars, ROWS=nrows, BLOCK_M=block_m, IS64=is64,
            num_warps=C.warps_for(nrows * block_m, is64))
    else:
        wrap_triton(loop_kernel)[(rows,)](*tensors, m, *scalars, BLOCK_M=_tile(is64), IS64=is64, num_warps=8)


def _launch_bwd(grad_out, h, mean, rstd, sigma, dh) -> None:
    C.check_device(h, "h")
    m = h.shape[-1]
    C.check(grad_out.shape == h.shape, f"grad_out shape {tuple(grad_out.shape)} != h shape {tuple(h.shape)}")
    rows = h.numel() // m if m else 0
    C.check(mean.numel() == rows and rstd.numel() == rows, "mean/rstd must have h.shape[:-1]")
    if rows == 0:
        return
    acc = C.acc_dtype(h.dtype)
    hc, goc = h.contiguous(), grad_out.to(h.dtype).contiguous()
    mc, rc = mean.to(acc).contiguous(), rstd.to(acc).contiguous()
    is64 = h.dtype == torch.float64
    sb = C.f64_bits(sigma)
    with C.device_guard(hc):
        _launch_rows(_zscore_bwd_tile_kernel, _zscore_bwd_loop_kernel, (goc, hc, mc, rc, dh), (sb,), rows, m, is64)


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op(f"{C.NS}::_interp_zscore", mutates_args=("out", "mean", "rstd"))
def _interp_zscore(h: torch.Tensor, sigma: float, eps: float, out: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> None:
    _launch_fwd(h, sigma, eps, out, mean, rstd)


@torch.library.custom_op(f"{C.NS}::_interp_zscore_backward", mutates_args=("dh",))
def _interp_zscore_backward(grad_out: torch.Tensor, h: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                            sigma: float, dh: torch.Tensor) -> None:
    _launch_bwd(grad_out, h, mean, rstd, sigma, dh)


@triton_op(f"{C.NS}::zscore", mutates_args=(),
           schema="(Tensor h, float sigma, float eps) -> (Tensor, Tensor, Tensor)")
def zscore(h: torch.Tensor, sigma: float, eps: float):
    acc = C.acc_dtype(h.dtype)
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    mean = torch.empty(h.shape[:-1], dtype=acc, device=h.device)
    rstd = torch.empty(h.shape[:-1], dtype=acc, device=h.device)
    if C.on_interpreter_path(h):
        torch.ops.ascood_triton._interp_zscore(h, sigma, eps, out, mean, rstd)
    else:
        _launch_fwd(h, sigma, eps, out, mean, rstd)
    return out, mean, rstd


@triton_op(f"{C.NS}::zscore_backward", mutates_args=(),
           schema="(Tensor grad_out, Tensor h, Tensor mean, Tensor rstd, float sigma) -> Tensor")
def zscore_backward(grad_out: torch.Tensor, h: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    sigma: float) -> torch.Tensor:
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if C.on_interpreter_path(h):
        torch.ops.ascood_triton._interp_zscore_backward(grad_out, h, mean, rstd, sigma, dh)
    else:
        _launch_bwd(grad_out, h, mean, rstd, sigma, dh)
    return dh
