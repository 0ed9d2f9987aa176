"""Triton ``shuffle_outlier`` (docs/OPS.md): radix select and compaction in pixel order; nothing is sorted.

1. Triton: per-pixel score ``s[b, p]`` in float64, the saliency summed over
   channels sequentially (channel 0, then + channel 1, ...: the same bits as
   every other backend; -0 is stored as +0, they tie); a (B, *spatial)
   saliency is just widened.
2. Triton: the exact npix-th largest score per sample (npix = int(p_inv * P))
   by the radix select of the threshold ops (``_common``), on a 64-bit order
   key of the double (NaN largest): 8 histogram passes of 8 bits over
   (B, cdiv(P, CHUNK)) programs, int32 atomics, no host synchronisation.
   Samples of at most SMALL_MAX pixels (CIFAR's 1024) run steps 2 and 3 in
   one program per sample instead (keys in registers, one launch).
3. Triton: per chunk, the number of scores above the threshold ``t`` and equal
   to it; torch (on the device) turns them into per-chunk offsets; then every
   chunk writes its selected pixels, in pixel order, to the (B, npix) ``sel``:
   all scores above ``t`` and the first (npix - #above) equal to ``t`` (ties
   to the lower pixel index). Pixel order is the order docs/OPS.md
   prescribes, so nothing is sorted.
4. Triton: ``out`` starts as a copy of x (in the output layout) and one kernel
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
from ._common import digit_of, pick_digit

__all__ = ["shuffle_outlier", "CHUNK", "SMALL_MAX"]

BLOCK_P = 256
#: samples with at most this many pixels select in one program (keys in registers, one launch).
SMALL_MAX = 4096
#: pixels per program of the select / compaction passes, and their inner block.
CHUNK = 4096
BLOCK = 1024
NPASS = 8  # 8-bit digits of the 64-bit score key


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
    s = tl.where(s == 0.0, 0.0, s)  # -0 ties +0: store one zero
    tl.store(s_ptr + b * P + p, s, mask=valid)


@triton.jit
def _score_key(s):
    """uint64 key ordering like the double s (larger key = ranked first), every NaN largest."""
    bits = s.to(tl.uint64, bitcast=True)
    sign = tl.full([], 1, tl.uint64) << 63
    ones = (sign - 1) | sign  # (no ~ on unsigned: the interpreter rejects it)
    key = tl.where((bits & sign) != 0, bits ^ ones, bits | sign)
    return tl.where(s != s, ones, key)


@triton.jit
def _threshold_from_hist(hist_row, K, NDONE: tl.constexpr):
    """Replay the first NDONE radix passes from this sample's (NPASS, 256) histograms:
    (prefix of the threshold key, rank of the threshold among the keys sharing that prefix)."""
    prefix = tl.full([], 0, tl.uint64)
    k = K
    for i in tl.static_range(NDONE):
        h = tl.load(hist_row + i * 256 + tl.arange(0, 256))
        d, k = pick_digit(h, k)
        prefix = prefix | (d.to(tl.uint64) << ((7 - i) * 8))
    return prefix, k


@triton.jit
def _score_hist_kernel(s_ptr, hist_ptr, P, K, CHUNK: tl.constexpr, BLOCK: tl.constexpr, PASS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    hist_row = hist_ptr + b * (8 * 256)
    prefix, _k = _threshold_from_hist(hist_row, K, PASS)
    SHIFT: tl.constexpr = (7 - PASS) * 8
    counts = tl.zeros([256], dtype=tl.int32)
    for j in tl.range(0, CHUNK, BLOCK):
        p = c * CHUNK + j + tl.arange(0, BLOCK)
        valid = p < P
        key = _score_key(tl.load(s_ptr + b * P + p, mask=valid, other=0.0))
        digit, active = digit_of(key, prefix, SHIFT)
        counts += tl.histogram(digit, 256, mask=valid & active)
    tl.atomic_add(hist_row + PASS * 256 + tl.arange(0, 256), counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _count_kernel(s_ptr, hist_ptr, above_ptr, ties_ptr, P, K, row_stride, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: how many scores are above the threshold and equal to it (row b of the counts at b * row_stride)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t, _k = _threshold_from_hist(hist_ptr + b * (8 * 256), K, 8)
    above = tl.zeros([BLOCK], dtype=tl.int32)
    ties = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.range(0, CHUNK, BLOCK):
        p = c * CHUNK + j + tl.arange(0, BLOCK)
        valid = p < P
        key = _score_key(tl.load(s_ptr + b * P + p, mask=valid, other=0.0))
        above += (valid & (key > t)).to(tl.int32)
        ties += (valid & (key == t)).to(tl.int32)
    tl.store(above_ptr + b * row_stride + c, tl.sum(above, 0))
    tl.store(ties_ptr + b * row_stride + c, tl.sum(ties, 0))


@triton.jit
def _store_selected(sel_i_ptr, b, npix, p, take, pos, ALL: tl.constexpr):
    """Store the pixels marked ``take`` at slot ``pos`` of row b (ALL: every valid pixel at p)."""
    if ALL:
        pos = p.to(tl.int64)
    tl.store(sel_i_ptr + b * npix + pos, p.to(tl.int64), mask=take)


@triton.jit
def _compact_kernel(s_ptr, hist_ptr, above_ptr, ties_ptr, sel_i_ptr, P, K, npix, nchunks,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALL: tl.constexpr):
    """Write this chunk's selected pixels to the sample's row of ``sel``, in pixel order.

    above_ptr / ties_ptr hold the exclusive prefix sums over chunks (int64):
    the selected pixels before this chunk are #above + min(#ties, r), with
    r = K - (#above in the whole sample) the ties that fit.
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if ALL:
        t = tl.full([], 0, tl.uint64)
        r = 0
        above_before = c.to(tl.int64) * CHUNK
        ties_before = above_before * 0
    else:
        t, _k = _threshold_from_hist(hist_ptr + b * (8 * 256), K, 8)
        above_before = tl.load(above_ptr + b * (nchunks + 1) + c)
        ties_before = tl.load(ties_ptr + b * (nchunks + 1) + c)
        r = K - tl.load(above_ptr + b * (nchunks + 1) + nchunks)
    for j in tl.range(0, CHUNK, BLOCK):
        p = c * CHUNK + j + tl.arange(0, BLOCK)
        valid = p < P
        take = valid
        pos = p.to(tl.int64)
        if not ALL:
            key = _score_key(tl.load(s_ptr + b * P + p, mask=valid, other=0.0))
            gt = valid & (key > t)
            tie = valid & (key == t)
            tie_rank = ties_before + tl.cumsum(tie.to(tl.int64), 0) - 1  # 0-based among the sample's ties
            take = gt | (tie & (tie_rank < r))
            before = above_before + tl.minimum(ties_before, r)
            pos = before + tl.cumsum(take.to(tl.int64), 0) - 1
            above_before += tl.sum(gt.to(tl.int64), 0)
            ties_before += tl.sum(tie.to(tl.int64), 0)
        _store_selected(sel_i_ptr, b, npix, p, take, pos, ALL)


@triton.jit
def _select_small_kernel(s_ptr, sel_i_ptr, P, K, npix, BLOCK_N: tl.constexpr, ALL: tl.constexpr):
    """One program per sample (P <= SMALL_MAX): the 8 radix passes on the keys held in
    registers, then the compaction of the selected pixels in pixel order."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_N)
    valid = p < P
    take = valid
    pos = p.to(tl.int64)
    if not ALL:
        key = _score_key(tl.load(s_ptr + b * P + p, mask=valid, other=0.0))
        prefix = tl.full([], 0, tl.uint64)
        k = K
        for i in tl.static_range(8):
            digit, active = digit_of(key, prefix, (7 - i) * 8)
            h = tl.histogram(digit, 256, mask=valid & active)
            d, k = pick_digit(h, k)
            prefix = prefix | (d.to(tl.uint64) << ((7 - i) * 8))
        # prefix = the K-th largest key t; k = how many keys equal to t are in the top K
        gt = valid & (key > prefix)
        tie = valid & (key == prefix)
        take = gt | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= k))
        pos = (tl.cumsum(take.to(tl.int32), 0) - 1).to(tl.int64)
    _store_selected(sel_i_ptr, b, npix, p, take, pos, ALL)


@triton.jit
def _shuffle_move_kernel(x_ptr, out_ptr, sel_ptr, perm_ptr, P, NC, npix, stride_c, stride_p,
                         BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    valid = i < npix
    src_slot = tl.load(perm_ptr + b * npix + i, mask=valid, other=0)
    valid = valid & (src_slot >= 0) & (src_slot < npix)
    dst = tl.load(sel_ptr + b * npix + i, mask=valid, other=0)
    src = tl.load(sel_ptr + b * npix + src_slot, mask=valid, other=0)
    base = b * NC * P
    cc = tl.arange(0, BLOCK_C)
    for c0 in tl.range(0, NC, BLOCK_C):
        ch = (c0 + cc).to(tl.int64)
        m = valid[:, None] & (ch[None, :] < NC)
        v = tl.load(x_ptr + base + src[:, None] * stride_p + ch[None, :] * stride_c, mask=m)
        tl.store(out_ptr + base + dst[:, None] * stride_p + ch[None, :] * stride_c, v, mask=m)


def _select(scores: torch.Tensor, B: int, P: int, npix: int) -> torch.Tensor:
    """(B, npix) int64: the npix best pixels (ties to the lower index, NaN best), in pixel order."""
    chunk = max(BLOCK, CHUNK // BLOCK * BLOCK)  # a multiple of BLOCK: chunks must not overlap
    nchunks = triton.cdiv(P, chunk)
    C.check(nchunks <= C.MAX_GRID_YZ, f"{P} pixels per sample need {nchunks} chunks (> {C.MAX_GRID_YZ})")
    everything = npix == P
    sel = torch.empty((B, npix), dtype=torch.int64, device=scores.device)
    if P <= SMALL_MAX:
        block_n = C.next_pow2(P)
        wrap_triton(_select_small_kernel)[(B,)](scores, sel, P, npix, npix, BLOCK_N=block_n,
                                                ALL=everything, num_warps=C.warps_for(block_n, True))
        return sel
    if everything:
        hist = above = ties = scores  # unused by the kernel
    else:
        hist = torch.zeros((B, NPASS, 256), dtype=torch.int32, device=scores.device)
        for p in range(NPASS):
            wrap_triton(_score_hist_kernel)[(B, nchunks)](scores, hist, P, npix, CHUNK=chunk, BLOCK=BLOCK, PASS=p,
                                                          num_warps=8)
        counts = torch.zeros((2, B, nchunks + 1), dtype=torch.int32, device=scores.device)
        wrap_triton(_count_kernel)[(B, nchunks)](scores, hist, counts[0, :, 1:], counts[1, :, 1:], P, npix,
                                                 nchunks + 1, CHUNK=chunk, BLOCK=BLOCK, num_warps=8)
        # exclusive prefix sums per sample; entry nchunks is the sample's total
        offsets = counts.to(torch.int64).cumsum(2).contiguous()
        above, ties = offsets[0], offsets[1]
    wrap_triton(_compact_kernel)[(B, nchunks)](scores, hist, above, ties, sel, P, npix, npix, nchunks,
                                               CHUNK=chunk, BLOCK=BLOCK, ALL=everything, num_warps=8)
    return sel


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
        sel = _select(scores, B, P, npix)
        wrap_triton(_shuffle_move_kernel)[(B, triton.cdiv(npix, block_i))](
            xs, out, sel, perm_c, P, NC, npix, stride_c, stride_p, BLOCK_I=block_i, BLOCK_C=block_c,
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
