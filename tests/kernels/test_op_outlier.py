"""invariant_mask and gradient_outlier, every backend against the float64 reference."""
import math

import pytest
import torch

import ascood_kernels as ak
from ascood_kernels import reference
from backends import TOL, combos, emulation_trim, is_slow

SHAPES = [(1, 1, 1, 1), (5, 3, 17, 19), (8, 3, 32, 32), (2, 3, 224, 224)]
P_FRACTIONS = ["1/n", 0.1, 0.5, 1.0]


def _p(p, shape):
    return 1.0 / math.prod(shape[1:]) if p == "1/n" else p


def _grad(kind, shape, dtype, device):
    if kind == "normal":
        g = torch.randn(shape, dtype=torch.float64)
    elif kind == "ties":  # few distinct magnitudes, many zeros and +-0
        g = torch.randint(-2, 3, shape).to(torch.float64) * 0.5
    else:  # all zeros, half of them negative zeros
        g = torch.zeros(shape, dtype=torch.float64)
        g.view(-1)[::2] = -0.0
    return g.to(device=device, dtype=dtype)


def _expected_outlier(x, g, p, alpha):
    """float64 reference on the exact (widened) stored values, rounded to x's dtype."""
    return reference.gradient_outlier(x.double(), g.double(), p, alpha).to(x.dtype)


@pytest.mark.parametrize("backend,device,dtype", combos())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", P_FRACTIONS, ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_matches_reference(backend, device, dtype, shape, p, kind):
    if is_slow(backend, device) and shape[-1] > 32:
        pytest.skip("interpreter: small shapes only")
    if emulation_trim(backend, dtype, math.prod(shape)):
        pytest.skip("emulation: this shape in float32 only")
    if kind != "normal" and shape[-1] > 32 and dtype != torch.float32:
        pytest.skip("tie patterns at 224 only in float32 (keeps the suite short)")
    p = _p(p, shape)
    x = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    g = _grad(kind, shape, dtype, device)
    alpha = 3.7
    mask = ak.invariant_mask(g, p, backend=backend)
    want_mask = reference.invariant_mask(g.double(), p)  # widening is exact: same order
    assert mask.dtype == torch.bool and mask.shape == g.shape
    assert torch.equal(mask.cpu(), want_mask.cpu())
    out = ak.gradient_outlier(x, g, p, alpha, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.cpu(), _expected_outlier(x, g, p, alpha).cpu(), **TOL[dtype])
    # unselected elements are copied bit for bit
    assert torch.equal(out[~mask].cpu(), x[~mask].cpu())


@pytest.mark.parametrize("backend,device,dtype", combos())
def test_layouts(backend, device, dtype):
    """Channels-last and non-contiguous inputs give the contiguous-input result."""
    shape = (4, 3, 16, 12) if is_slow(backend, device) else (6, 3, 40, 36)
    x = torch.randn(shape, device=device).to(dtype)
    g = torch.randn(shape, device=device).to(dtype)
    want = ak.gradient_outlier(x, g, 0.2, -1.5, backend="reference")
    want_mask = ak.invariant_mask(g, 0.2, backend="reference")
    cl_x, cl_g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    out = ak.gradient_outlier(cl_x, cl_g, 0.2, -1.5, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want, **TOL[dtype])
    # mixed layouts and strided views
    big_g = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2, device=device).to(dtype)
    strided_g = big_g[..., ::2]
    assert not strided_g.is_contiguous()
    out = ak.gradient_outlier(cl_x, strided_g, 0.2, -1.5, backend=backend)
    want = ak.gradient_outlier(x, strided_g.contiguous(), 0.2, -1.5, backend="reference")
    torch.testing.assert_close(out, want, **TOL[dtype])
    assert torch.equal(ak.invariant_mask(cl_g, 0.2, backend=backend), want_mask)
    assert torch.equal(ak.invariant_mask(strided_g, 0.2, backend=backend),
                       ak.invariant_mask(strided_g.contiguous(), 0.2, backend="reference"))


def _reference_code_mask(g, p):
    """The authors' reference code: topk of |G| per sample, scattered into a mask."""
    B = g.shape[0]
    flat = g.abs().reshape(B, -1)
    k = int(p * flat.shape[1])
    idx = flat.topk(k, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).reshape(g.shape)


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,)))
@pytest.mark.parametrize("p", [0.01, 0.1, 0.15, 0.5, 1.0])
def test_mask_equals_reference_code_topk(backend, device, dtype, p):
    shape = (3, 3, 16, 16) if is_slow(backend, device) else (16, 3, 32, 32)
    # tie-free: distinct integers (exact in float32) with random signs, shuffled
    n = math.prod(shape)
    sign = torch.randint(0, 2, (n,)) * 2 - 1
    g = ((torch.randperm(n) + 1) * sign).to(dtype).reshape(shape) / 64
    assert torch.unique(g.abs()).numel() == g.numel()
    g = g.to(device)
    assert torch.equal(ak.invariant_mask(g, p, backend=backend), _reference_code_mask(g, p))


@pytest.mark.parametrize("backend,device,dtype", combos(interp_dtypes=(torch.float32,)))
def test_nan_and_inf(backend, device, dtype):
    """Documented rule: NaN ranks above +inf, both are selected first and propagate."""
    x = torch.randn(3, 2, 5, 5, device=device).to(dtype)
    g = torch.randn(3, 2, 5, 5, device=device).to(dtype) * 0.1
    g[0, 0, 0, 0] = float("nan")
    g[0, 1, 2, 3] = -float("inf")
    g[1, 0, 4, 4] = float("inf")
    g[2].fill_(float("nan"))
    p = 2 / 50  # k = 2 per sample
    mask = ak.invariant_mask(g, p, backend=backend)
    assert mask[0, 0, 0, 0] and mask[0, 1, 2, 3] and int(mask[0].sum()) == 2
    assert mask[1, 0, 4, 4] and int(mask[1].sum()) == 2
    assert bool(mask[2].all())  # all NaN: every element ties at the threshold
    out = ak.gradient_outlier(x, g, p, 1.0, backend=backend)
    assert torch.isnan(out[0, 0, 0, 0]) and out[0, 1, 2, 3] == -float("inf") and out[1, 0, 4, 4] == float("inf")
    assert torch.isnan(out[2]).all()
    assert torch.equal(mask, ak.invariant_mask(g, p, backend="reference"))


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,)))
def test_empty_batch(backend, device, dtype):
    x = torch.empty(0, 3, 8, 8, device=device, dtype=dtype)
    assert ak.invariant_mask(x, 0.1, backend=backend).shape == x.shape
    assert ak.gradient_outlier(x, x, 0.1, 2.0, backend=backend).shape == x.shape


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32, torch.float64), interp_dtypes=(torch.float32,)))
def test_autograd(backend, device, dtype):
    x = torch.randn(4, 3, 6, 5, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 3, 6, 5, device=device, dtype=dtype, requires_grad=True)
    out = ak.gradient_outlier(x, g, 0.3, 2.5, backend=backend)
    up = torch.randn_like(out)
    dx, dg = torch.autograd.grad(out, (x, g), up)
    mask = ak.invariant_mask(g, 0.3, backend="reference")
    torch.testing.assert_close(dx, up, rtol=0, atol=0)
    torch.testing.assert_close(dg, torch.where(mask, up * 2.5, torch.zeros_like(up)), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_backend_rank2_and_rank5(dtype):
    """Any rank >= 2: the reduction is over all non-batch dims."""
    for shape in [(7, 33), (2, 2, 3, 4, 5)]:
        g = torch.randn(shape).to(dtype)
        flat = reference.invariant_mask(g.reshape(shape[0], -1), 0.25)
        for backend in ["reference"] + (["cpu"] if "cpu" in ak.available_backends() else []):
            assert torch.equal(ak.invariant_mask(g, 0.25, backend=backend).reshape(shape[0], -1), flat)
