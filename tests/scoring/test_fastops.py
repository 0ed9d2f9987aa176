"""The scorers' fast paths (ascood/scoring/scorers/fastops.py and their users) against the plain formulas.

Random odd shapes, float32 and float64, with the rows the fast paths hand back to the plain formula
(ties, NaN, inf, overflowing or near one-hot logits) mixed in.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ascood.scoring.scorers import Features, LinearHead, get_scorer
from ascood.scoring.scorers.distance import _pinvh_eig, pinvh, topk_similarity, _Bank
from ascood.scoring.scorers.fastops import (all_finite, argmax_rows, logsumexp_rows, matmul, neg_entropy_rows,
                                            softmax_plogp64, sort_desc, to_float64, top_values)

SHAPES = [(1, 1), (7, 3), (33, 17), (129, 101), (300, 1000)]
DTYPES = [torch.float32, torch.float64]


def _logits(shape, dtype, seed, special=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 40).to(dtype)
    if special and shape[0] >= 7 and shape[1] >= 3:
        z[0, 1] = z[0, 0] = z[0].max()  # a tie at the maximum
        z[1, 2] = float("nan")
        z[2, 0] = float("inf")
        z[3] = float("-inf")
        z[4, 1] = float("-inf")
        z[5] += 150  # exp overflows float32 unshifted
        z[6] -= 200  # every exp underflows unshifted
    return z


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_is_torch_argmax(shape, dtype):
    z = _logits(shape, dtype, 1)
    z[:, :: 2] = z[:, :1].clone()  # many ties: the first maximum wins in both
    assert torch.equal(argmax_rows(z), z.argmax(1))
    z[:, -1] = float("inf")
    assert torch.equal(argmax_rows(z), z.argmax(1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_rows_is_torch_logsumexp(shape, dtype):
    z = _logits(shape, dtype, 2)
    got, want = logsumexp_rows(z), torch.logsumexp(z, 1)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
    exact = torch.logsumexp(z.double(), 1)  # and as close to the exact value as torch's own
    ok = torch.isfinite(exact)
    assert (got.double() - exact)[ok].abs().max() <= 4 * (want.double() - exact)[ok].abs().max() + 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_neg_entropy_rows_is_the_float64_formula(shape):
    z = _logits(shape, torch.float32, 3)
    if shape[0] >= 10:
        z[7] = torch.linspace(0, -500, shape[1])  # one-hot-like: entropy ~0, from the float64 path
        z[8] = 0  # uniform: -log C
        z[9, : shape[1] // 2] = z[9].max()  # many tied maxima
    got = neg_entropy_rows(z)
    logp = torch.log_softmax(z.double(), 1)
    plain = (logp.exp() * logp).sum(1)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isnan(got), torch.isnan(plain))
    # Where the float64 formula itself is exact (|H| >= 1e-6: its log(1 + r) loses r below 1e-16), equal to
    # float32 rounding; below, the fast path is the more exact one (log1p), checked against a log1p form.
    big = plain.abs() >= 1e-6
    torch.testing.assert_close(got.double()[big], plain[big], rtol=2e-6, atol=0)
    d = z.double() - z.double().amax(1, keepdim=True)
    e = d.exp()
    top = d == 0
    n0 = top.sum(1)
    r = e.masked_fill(top, 0.0).sum(1)  # the other classes' mass, no n0 + r rounding
    exact = (e * d).sum(1) / (n0 + r) - n0.double().log() - torch.log1p(r / n0)
    small = ~big & torch.isfinite(plain) & (plain.abs() >= 1e-12)
    torch.testing.assert_close(got.double()[small], exact[small], rtol=1e-5, atol=0)
    tiny = torch.isfinite(plain) & (plain.abs() < 1e-20)
    torch.testing.assert_close(got[tiny], plain[tiny].float(), rtol=0, atol=0)  # the plain formula's own


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_plogp64_is_the_float64_formula(shape):
    z = _logits(shape, torch.float32, 4)
    e, s, plogp = softmax_plogp64(z)
    logp = torch.log_softmax(z.double(), 1)
    torch.testing.assert_close(e / s[:, None], logp.exp(), rtol=1e-12, atol=1e-300, equal_nan=True)
    want = (logp.exp() * logp).sum(1)
    torch.testing.assert_close(plogp, want, rtol=1e-10, atol=1e-13, equal_nan=True)


@pytest.mark.parametrize("n,k", [(1, 1), (17, 3), (512, 51), (512, 77), (2000, 7), (4096, 300)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_top_values_is_the_topk_multiset(n, k, dtype):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(9, n, generator=g).relu().to(dtype)  # ReLU: many tied zeros
    if n > 3:
        x[1, 2] = float("nan")
        x[2, :] = 1.0
    got = top_values(x, k)
    assert got.shape == (9, k)
    torch.testing.assert_close(sort_desc(got), x.topk(k, 1).values, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_sort_desc_is_torch_sort(shape):
    x = _logits(shape, torch.float32, 5)
    torch.testing.assert_close(sort_desc(x), x.sort(1, descending=True).values, rtol=0, atol=0, equal_nan=True)


def test_all_finite_is_isfinite_all_even_when_the_sum_overflows():
    a = torch.full((64, 33), 3e38)  # finite elements whose float32 sum overflows: the exact check decides
    assert all_finite(a) and bool(torch.isfinite(a).all())
    for bad in (float("nan"), float("inf"), float("-inf")):
        b = torch.randn(65, 31)
        b[40, 3] = bad
        assert not all_finite(b) and not all_finite(b.double())
    assert all_finite(torch.randn(5, 4)) and all_finite(torch.empty(0, 3)) and all_finite(torch.arange(4))


@pytest.mark.parametrize("shape", SHAPES)
def test_to_float64_and_matmul_are_torch_s(shape):
    x = _logits(shape, torch.float32, 6, special=False)
    assert torch.equal(to_float64(x), x.double()) and to_float64(x).dtype == torch.float64
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        a = x.to(dtype)
        w = torch.randn(shape[1], 13, dtype=dtype)
        torch.testing.assert_close(matmul(a, w), a @ w, rtol=tol, atol=tol * shape[1])
        torch.testing.assert_close(matmul(a, w.T.contiguous().T), a @ w, rtol=tol, atol=tol * shape[1])


def test_pinvh_cholesky_path_equals_the_eigendecomposition():
    g = torch.Generator().manual_seed(7)
    for m in (1, 5, 64):
        a = torch.randn(3 * m + 4, m, generator=g, dtype=torch.float64)
        cov = a.T @ a / a.shape[0]
        torch.testing.assert_close(pinvh(cov), _pinvh_eig(cov), rtol=1e-9, atol=1e-12)
    # Ill-conditioned (cond 1e15 > 1 / (m eps)) and singular: the eigendecomposition's cutoff decides.
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    for w in ([1, 1, 1, 1, 1, 1e-15], [1, 2, 3, 4, 5, 0]):
        cov = (q * torch.tensor(w, dtype=torch.float64)) @ q.T
        torch.testing.assert_close(pinvh(cov), _pinvh_eig(cov), rtol=0, atol=0)


def test_topk_similarity_is_sorted_topk_over_bank_blocks():
    g = torch.Generator().manual_seed(8)
    bank_rows = torch.randn(1000, 24, generator=g)
    q = torch.randn(37, 24, generator=g)
    want = (q @ bank_rows.T).topk(50, 1).values
    for chunk in (64, 1000):
        bank = _Bank(1000, 24, lambda s, e: bank_rows[s:e], max_device_mb=0 if chunk == 64 else 1e3, chunk=chunk)
        torch.testing.assert_close(topk_similarity(q, bank, 50), want, rtol=1e-5, atol=1e-5)


# --- the scorers' formulas: fast path against the plain one ---------------------------------------------
def _plain_energy(z):
    return torch.logsumexp(z, 1)


@pytest.mark.parametrize("variant", ["b", "p", "s"])
@pytest.mark.parametrize("ties", [False, True])
def test_ash_mask_path_equals_topk_scatter(variant, ties):
    from ascood.scoring.scorers.shaping import _top_k_mask

    g = torch.Generator().manual_seed(9)
    h = torch.randn(41, 131, generator=g).relu()  # about half zeros
    # 85th percentile: the 20 kept are positive and distinct (the mask path); 30th: 92 kept, more than the
    # positives, so the k-th value is a tied 0 (topk's own choice of the tied entries, as before).
    percentile = 30 if ties else 85
    k = 131 - int(np.round(131 * percentile / 100.0))
    assert (_top_k_mask(h, k) is None) == ties
    W, b = torch.randn(11, 131, generator=g), torch.randn(11, generator=g)
    got = get_scorer("ash", percentile=percentile, variant=variant).score_features(h @ W.T + b, h,
                                                                                   head=LinearHead(W, b))
    vals, idx = h.topk(k, 1)
    s1 = h.sum(1, keepdim=True)
    if variant == "b":
        vals = (s1 / k).expand_as(vals)
    elif variant == "s":
        vals = vals * torch.exp(s1 / vals.sum(1, keepdim=True))
    shaped = torch.zeros_like(h).scatter_(1, idx, vals)
    torch.testing.assert_close(got, _plain_energy(shaped @ W.T + b), rtol=1e-5, atol=1e-5)


def test_scale_and_gen_equal_their_topk_formulas():
    g = torch.Generator().manual_seed(10)
    h = torch.randn(53, 257, generator=g).relu()
    W, b = torch.randn(7, 257, generator=g) * 0.1, torch.randn(7, generator=g)
    z = h @ W.T + b
    k = 257 - int(np.round(257 * 0.65))
    shaped = h * torch.exp(h.sum(1, keepdim=True) / h.topk(k, 1).values.sum(1, keepdim=True))
    got = get_scorer("scale", percentile=65).score_features(z, h, head=LinearHead(W, b))
    torch.testing.assert_close(got, _plain_energy(shaped @ W.T + b), rtol=1e-5, atol=1e-5)
    zz = torch.randn(61, 233, generator=g) * 4
    for gamma, M in ((0.1, 5), (2.0, 100), (0.5, 233), (1.0, 1000)):
        p = torch.softmax(zz, 1)
        top = p.topk(min(M, 233), 1).values
        want = -(top.pow(gamma) * (1 - top).pow(gamma)).sum(1)
        torch.testing.assert_close(get_scorer("gen", gamma=gamma, M=M).score_features(zz), want, rtol=2e-5, atol=1e-7)


def test_klm_and_entropy_scorers_equal_the_float64_formulas():
    g = torch.Generator().manual_seed(11)
    val = torch.randn(300, 13, generator=g) * 3
    sc = get_scorer("klm").fit_features(Features(val))
    z = torch.randn(77, 13, generator=g) * 5
    logp = torch.log_softmax(z.double(), 1)
    p = logp.exp()
    log_d = sc.dists.log().nan_to_num(neginf=torch.finfo(torch.float64).min)
    want = -((p * logp).sum(1, keepdim=True) - p @ log_d.T).amin(1)
    torch.testing.assert_close(sc.score_features(z).double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("space", ["raw", "head"])
def test_vim_float32_scores_equal_the_float64_formula(space):
    g = torch.Generator().manual_seed(12)
    m, c = 48, 9
    centres = torch.rand(c, m, generator=g) * 2
    y = torch.arange(600) % c
    h = (centres[y] + torch.randn(600, m, generator=g)).relu()
    W, b = torch.randn(c, m, generator=g) * 0.3, torch.randn(c, generator=g) * 5
    mu, sd = h.mean(0), h.std(0)
    head = LinearHead(W, b, (lambda x: (x - mu) / sd) if space == "head" else None)
    sc = get_scorer("vim", dim=16, feature_space=space).fit_features(Features(head.logits(h), h, y, head))
    q = (centres[torch.arange(70) % c] + torch.randn(70, m, generator=g) * 1.5).relu()
    x = head.to_space(q, "head" if space == "head" else "raw").double()
    z = x @ sc.W.T + sc.b
    want = torch.logsumexp(z, 1) - torch.linalg.norm((x - sc.u) @ sc.NS, dim=1) * sc.alpha
    torch.testing.assert_close(sc.score_features(head.logits(q), q).double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (300, 129)])
def test_row_dot_equals_the_plain_formula(dtype, shape):
    from ascood.scoring.scorers.fastops import row_dot

    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    a, b = torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)
    want = (a.double() * b.double()).sum(1)
    got = row_dot(a, b)
    assert got.dtype == dtype and got.shape == (shape[0],)
    tol = 1e-5 * shape[1] ** 0.5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # A tensor that needs autograd takes torch's path (numpy cannot see it) with the same numbers.
    torch.testing.assert_close(row_dot(a.requires_grad_(), b).detach().double(), want, rtol=tol, atol=tol)
