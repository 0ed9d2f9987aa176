"""zscore forward/backward, every backend against the float64 reference."""
import pytest
import torch

import ascood_kernels as ak
from ascood_kernels import _backend, reference
from backends import TOL, combos, is_slow

SHAPES = [(1, 2), (7, 33), (64, 512), (3, 5, 100), (16, 2048)]

# zscore divides by the std, so low-precision inputs lose a little more than one rounding
from ascood_kernels._compare import ZSCORE_TOL as Z_TOL  # noqa: E402


@pytest.mark.parametrize("backend,device,dtype", combos(interp_dtypes=(torch.float32, torch.float64)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sigma,eps", [(0.5, 1e-6), (2.0, 0.0), (1.0, 0.1)])
def test_forward_backward_match_reference(backend, device, dtype, shape, sigma, eps):
    if is_slow(backend, device) and shape[0] * shape[-1] > 16 * 512:
        pytest.skip("interpreter: small shapes only")
    h = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(device=device, dtype=dtype).requires_grad_()
    up = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    out = ak.zscore(h, sigma, eps, backend=backend)
    (dh,) = torch.autograd.grad(out, h, up)
    h64 = h.detach().double().requires_grad_()
    want = reference.zscore(h64, sigma, eps)[0]
    (want_dh,) = torch.autograd.grad(want, h64, up.double())
    assert out.dtype == dtype and dh.dtype == dtype
    torch.testing.assert_close(out.double(), want, **Z_TOL[dtype])
    torch.testing.assert_close(dh.double(), want_dh, **Z_TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", combos(interp_dtypes=(torch.float32,)))
def test_statistics_and_norm(backend, device, dtype):
    """Proposition 2: ||h~|| = sigma * sqrt(m - 1) (eps -> 0); saved stats are mean and 1/(std+eps)."""
    h = torch.randn(9, 40, device=device).to(dtype)
    ns = None if backend == "reference" else _backend.op_namespace(backend)
    out = ak.zscore(h, 0.7, 0.0, backend=backend)
    torch.testing.assert_close(out.float().norm(dim=1), torch.full((9,), 0.7 * 39 ** 0.5, device=device),
                               rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=0)
    if ns is not None:
        _, mean, rstd = ns.zscore(h, 0.7, 1e-3)
        h_acc = h.double() if dtype == torch.float64 else h.float()  # statistics live in the accumulation dtype
        torch.testing.assert_close(mean, h_acc.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rstd, 1 / (h_acc.std(1) + 1e-3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", combos(interp_dtypes=(torch.float32,)))
def test_constant_rows(backend, device, dtype):
    """A constant row maps to 0 with a finite gradient (the std term is taken as 0).

    eps = 0.01 keeps the gradient (~1/eps for such a row) inside float16's range.
    """
    h = torch.randn(4, 10, device=device).to(dtype)
    h[1] = 3.0
    h.requires_grad_()
    out = ak.zscore(h, 0.5, 0.01, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    (dh,) = torch.autograd.grad(out, h, torch.randn_like(out))
    assert torch.isfinite(dh).all()
    want = reference.zscore_backward(torch.ones_like(h.detach()), h.detach(), *reference.zscore(h.detach(), 0.5, 0.01)[1:], 0.5)
    # shifting a row leaves the output unchanged, so each row of dh sums to ~0
    d = dh.double()
    assert bool((d.sum(1).abs() <= 0.02 * d.abs().sum(1) + 1e-9).all())
    assert torch.isfinite(want).all()


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float64,), interp_dtypes=(torch.float64,),
                                                        gpu_dtypes=(torch.float64,)))
def test_gradcheck(backend, device, dtype):
    h = torch.randn(5, 13, device=device, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ak.zscore(t, 0.5, 1e-6, backend=backend), (h,))


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,)))
def test_empty_and_noncontiguous(backend, device, dtype):
    assert ak.zscore(torch.empty(0, 8, device=device), backend=backend).shape == (0, 8)
    h = torch.randn(12, 6, device=device).t()  # (6, 12), non-contiguous
    torch.testing.assert_close(ak.zscore(h, backend=backend), reference.zscore(h.contiguous())[0], **Z_TOL[dtype])
