"""Plain-PyTorch reference implementations: the executable specification.

Every other backend (C++ CPU, CUDA, Triton) is tested against these functions;
docs/OPS.md states the same semantics in prose. They favour clarity over speed
and take no shortcuts on edge cases (ties, NaN, empty batches, layouts).

Conventions shared by all functions here:
* tensors are batch-first; "per sample" reduces over every non-batch dim;
* selection orders elements by :func:`magnitude_keys`, computed from the
  *stored* bits, so the threshold is exact for float16/bfloat16 too.
"""
from __future__ import annotations

import math

import torch

from ._validate import permutation_rows, random_permutation_args

__all__ = [
    "magnitude_keys",
    "count_from_fraction",
    "invariant_mask",
    "gradient_outlier",
    "zscore",
    "zscore_backward",
    "pixel_scores",
    "select_pixels",
    "shuffle_outlier",
    "mix32",
    "random_permutations",
    "iodin_perturb",
    "ascood_loss",
    "ascood_loss_backward",
    "output_memory_format",
]

# (integer view dtype, canonical NaN key) per float dtype. The canonical NaN key
# is above +inf's bits, so NaN ranks as the largest magnitude and all NaNs tie.
_KEY_INFO = {
    torch.float16: (torch.int16, 0x7E00),
    torch.bfloat16: (torch.int16, 0x7FC0),
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FF8000000000000),
}


def magnitude_keys(t: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer keys of ``|t|`` taken from the stored bits.

    Clearing the sign bit of an IEEE float gives a non-negative integer that
    orders exactly like the magnitude (``+0 == -0 < subnormal < ... < inf``).
    Every NaN maps to one key above ``+inf``. Returns int64 of ``t``'s shape.
    """
    int_dtype, nan_key = _KEY_INFO[t.dtype]
    bits = t.contiguous().view(int_dtype).to(torch.int64)
    width = torch.iinfo(int_dtype).bits
    keys = bits & ((1 << (width - 1)) - 1)
    return torch.where(torch.isnan(t), torch.full_like(keys, nan_key), keys)


def count_from_fraction(p: float, n: int) -> int:
    """``int(p * n)`` in double precision: the number of selected elements."""
    return int(float(p) * n)


def output_memory_format(t: torch.Tensor) -> torch.memory_format:
    """Memory format of an image op's output (docs/OPS.md, "Layout")."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _kth_largest_key(keys: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) int64 keys -> (B,) the k-th largest key per row (1 <= k <= n)."""
    return keys.sort(dim=1, descending=True).values[:, k - 1]


def invariant_mask(grad: torch.Tensor, p_inv: float) -> torch.Tensor:
    """Bool mask of the top ``int(p_inv * n)`` elements of ``|grad|`` per sample.

    Keeps every element whose magnitude is >= the k-th largest of its sample:
    ties at the threshold are all kept. k = 0 keeps nothing.
    """
    B = grad.shape[0]
    n = grad[0].numel() if B else math.prod(grad.shape[1:])
    k = count_from_fraction(p_inv, n)
    fmt = output_memory_format(grad)
    if B == 0 or k == 0:
        return torch.zeros(grad.shape, dtype=torch.bool, device=grad.device).contiguous(memory_format=fmt)
    keys = magnitude_keys(grad).reshape(B, n)
    threshold = _kth_largest_key(keys, k)
    mask = keys >= threshold[:, None]
    return mask.reshape(grad.shape).contiguous(memory_format=fmt)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gradient_outlier(x: torch.Tensor, grad: torch.Tensor, p_inv: float, alpha: float) -> torch.Tensor:
    """``where(mask, x + alpha * grad, x)`` with ``mask = invariant_mask(grad, p_inv)``.

    The sum is evaluated in float32 (float64 for float64 x) and rounded once to
    x's dtype; unselected elements are copied bit for bit.
    """
    mask = invariant_mask(grad, p_inv)
    acc = _acc_dtype(x.dtype)
    alpha_t = torch.tensor(alpha, dtype=acc)
    moved = (x.to(acc) + alpha_t * grad.to(acc)).to(x.dtype)
    return torch.where(mask, moved, x).contiguous(memory_format=output_memory_format(x))


def zscore(h: torch.Tensor, sigma: float = 0.5, eps: float = 1e-6):
    """Standardise the last dim: ``(h - mean) / (std + eps) * sigma`` (unbiased std).

    Returns ``(out, mean, rstd)``: out in h's dtype; mean and rstd
    (``1 / (std + eps)``) of shape ``h.shape[:-1]`` in float32 (float64 for
    float64 h).
    """
    acc = _acc_dtype(h.dtype)
    ha = h.to(acc)
    if h.numel() == 0:  # no rows: avoid torch's degrees-of-freedom warning
        stats = ha.new_empty(h.shape[:-1])
        return torch.empty_like(h), stats, stats.clone()
    mean = ha.mean(dim=-1)
    std = ha.std(dim=-1, unbiased=True)
    rstd = 1.0 / (std + eps)
    out = ((ha - mean[..., None]) * rstd[..., None] * sigma).to(h.dtype)
    return out, mean, rstd


def zscore_backward(grad_out, h, mean, rstd, sigma: float) -> torch.Tensor:
    """Gradient of :func:`zscore`'s ``out`` w.r.t. ``h`` (docs/OPS.md formula).

    For constant rows (std == 0) the term through the std is taken as 0.
    """
    acc = mean.dtype
    m = h.shape[-1]
    g = grad_out.to(acc) * sigma
    xhat = h.to(acc) - mean[..., None]
    r = rstd[..., None]
    # std is recomputed from xhat (same reduction pass as the dot product in a
    # fused kernel) rather than as 1/rstd - eps, which cancels badly when std << eps.
    std = xhat.pow(2).sum(-1, keepdim=True).div(m - 1).sqrt()
    dot = (g * xhat).sum(-1, keepdim=True)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    through_std = torch.where(std > 0, xhat * dot * r / ((m - 1) * safe_std), torch.zeros_like(xhat))
    dh = r * (g - g.mean(-1, keepdim=True) - through_std)
    return dh.to(h.dtype)


def pixel_scores(saliency: torch.Tensor, x_dim: int) -> torch.Tensor:
    """Per-pixel saliency (B, P) in float64, summed over channels sequentially.

    ``saliency`` is x-shaped (B, C, *spatial) or already per pixel (B, *spatial).
    """
    s = saliency.to(torch.float64)
    if saliency.dim() == x_dim:
        total = s[:, 0]
        for c in range(1, s.shape[1]):
            total = total + s[:, c]
        s = total
    return s.reshape(s.shape[0], -1)


def select_pixels(scores: torch.Tensor, npix: int) -> torch.Tensor:
    """(B, P) float64 -> (B, npix) indices of the npix largest scores, in ascending pixel order.

    Which pixels: the npix largest scores, ties at the threshold to the lower
    pixel index, NaN largest. Their order is the pixel order, so no backend
    sorts the selection: ``perm`` is a uniform random permutation, and any
    fixed order of the selected set gives the same distribution of outputs.
    """
    # NaN sorts as the largest in a descending sort; stable keeps lower indices first on ties.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :npix], dim=1).values


def shuffle_outlier(x: torch.Tensor, saliency: torch.Tensor, p_inv: float, perm: torch.Tensor) -> torch.Tensor:
    """Permute the ``int(p_inv * P)`` most salient pixels of each sample among themselves.

    ``out[b, :, sel[i]] = x[b, :, sel[perm[b, i]]]`` (all channels move
    together), ``sel`` from :func:`select_pixels` (ascending pixel order).
    """
    B, C = x.shape[0], x.shape[1]
    P = math.prod(x.shape[2:])
    npix = count_from_fraction(p_inv, P)
    permutation_rows("perm", perm, B, npix)
    out = x.contiguous().reshape(B, C, P).clone()
    if B and npix:
        sel = select_pixels(pixel_scores(saliency, x.dim()), npix)
        src = torch.gather(sel, 1, perm)
        xf = x.contiguous().reshape(B, C, P)
        moved = torch.gather(xf, 2, src[:, None, :].expand(B, C, npix))
        out.scatter_(2, sel[:, None, :].expand(B, C, npix), moved)
    return out.reshape(x.shape).contiguous(memory_format=output_memory_format(x))


_M32 = 0xFFFFFFFF


def mix32(v: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (C. Wellons' lowbias32, its improved constants).

    ``v``: int64 tensor of values in [0, 2^32); returns the same. Both
    multipliers are below 2^31, so every product with a 32-bit value fits in
    int64: exact in plain PyTorch integer arithmetic.
    """
    v = v ^ (v >> 16)
    v = (v * 0x21F0AAAD) & _M32
    v = v ^ (v >> 15)
    v = (v * 0x735A2D97) & _M32
    return v ^ (v >> 15)


def random_permutations(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """(R,) int64 seeds in [0, 2^32) -> (R, n) int64; row r is a permutation of 0..n-1 drawn from seeds[r].

    Fisher-Yates (Durstenfeld) from the top: ``perm = 0..n-1``; for
    ``i = n-1, ..., 1``: ``u = mix32(mix32(seed) ^ i)``,
    ``j = (u * (i + 1)) >> 32`` (Lemire's multiply-shift: j in [0, i], bias
    below (i + 1) / 2^32), then swap ``perm[i]`` and ``perm[j]``. The draw is
    counter-based: every backend gives the same permutation for one seed,
    and rows are independent (no shared random stream to walk).
    """
    random_permutation_args("seeds", seeds, n)
    R = seeds.shape[0]
    perm = torch.arange(n, device=seeds.device).expand(R, n).clone()
    if R == 0 or n < 2:
        return perm
    rows = torch.arange(R, device=seeds.device)
    base = mix32(seeds)
    for i in range(n - 1, 0, -1):
        j = (mix32(base ^ i) * (i + 1)) >> 32
        at_i = perm[:, i].clone()
        perm[:, i] = perm[rows, j]
        perm[rows, j] = at_i
    return perm


def _topk_by_key_then_index(keys: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) int64 keys -> (B, k) indices of the k largest keys, ties to the lower index."""
    # Stable sort on descending keys keeps lower indices first among equal keys.
    return torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]


def iodin_perturb(x: torch.Tensor, grad: torch.Tensor, eps: float, std, k: int = 1) -> torch.Tensor:
    """Move the k elements of largest |grad| per sample by ``-eps * s / std[c]``.

    ``s = +1 where grad >= 0 else -1`` (ODIN's rule; NaN gives -1); ``c`` is the
    channel (dim 1). ``std`` is a float or a (C,) tensor. k >= n is ODIN.
    """
    B, C = x.shape[0], x.shape[1]
    n = math.prod(x.shape[1:])
    acc = _acc_dtype(x.dtype)
    std_t = torch.as_tensor(std, dtype=acc, device=x.device).expand(C) if not torch.is_tensor(std) or std.dim() == 0 \
        else std.to(device=x.device, dtype=acc)
    xa = x.contiguous().reshape(B, n)
    out = xa.clone()
    if B:
        kk = min(k, n)
        idx = _topk_by_key_then_index(magnitude_keys(grad).reshape(B, n), kk)
        g = torch.gather(grad.contiguous().reshape(B, n), 1, idx)
        sign = torch.where(g >= 0, 1.0, -1.0).to(acc)
        per_sample_channel = idx // (n // C)
        step = torch.tensor(eps, dtype=acc) * sign / std_t[per_sample_channel]
        moved = (torch.gather(xa, 1, idx).to(acc) - step).to(x.dtype)
        out.scatter_(1, idx, moved)
    return out.reshape(x.shape).contiguous(memory_format=output_memory_format(x))


def ascood_loss(id_logits: torch.Tensor, target: torch.Tensor, ood_logits: torch.Tensor, w: float):
    """``CE(id_logits, target) + w * KL(U || softmax(ood_logits))`` ('batchmean' KL).

    Returns ``(loss, lse_id, lse_ood)``; loss is 0-dim in the logits' dtype,
    the per-row log-sum-exps are in float32 (float64 for float64 logits).
    An empty batch contributes 0 to its term.
    """
    acc = _acc_dtype(id_logits.dtype)
    zi, zo = id_logits.to(acc), ood_logits.to(acc)
    C = id_logits.shape[1]
    lse_id = torch.logsumexp(zi, dim=1)
    lse_ood = torch.logsumexp(zo, dim=1)
    ce = (lse_id - zi.gather(1, target[:, None].long())[:, 0]).sum() / max(zi.shape[0], 1)
    kl = (lse_ood - zo.mean(dim=1) - math.log(C)).sum() / max(zo.shape[0], 1)
    loss = (ce + w * kl).to(id_logits.dtype)
    return loss, lse_id, lse_ood


def ascood_loss_backward(grad, id_logits, target, ood_logits, w: float, lse_id, lse_ood):
    """Proposition 1: ``dL/dz = (p - y)/B`` for ID rows, ``w (p' - 1/C)/B2`` for outliers."""
    acc = lse_id.dtype
    C = id_logits.shape[1]
    g = grad.to(acc)
    p = torch.exp(id_logits.to(acc) - lse_id[:, None])
    onehot = torch.nn.functional.one_hot(target.long(), C).to(acc) if id_logits.shape[0] else torch.zeros_like(p)
    d_id = g * (p - onehot) / max(id_logits.shape[0], 1)
    q = torch.exp(ood_logits.to(acc) - lse_ood[:, None])
    d_ood = g * w * (q - 1.0 / C) / max(ood_logits.shape[0], 1)
    return d_id.to(id_logits.dtype), d_ood.to(ood_logits.dtype)
