"""iodin_perturb, every backend against the float64 reference."""
import math

import pytest
import torch

import ascood_kernels as ak
from ascood_kernels import reference
from backends import TOL, combos, emulation_trim, is_slow

SHAPES = [(1, 1, 1, 1), (5, 3, 17, 19), (8, 3, 32, 32), (2, 3, 224, 224)]


@pytest.mark.parametrize("backend,device,dtype", combos())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [1, 3, 40, "all"], ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_matches_reference(backend, device, dtype, shape, k, kind):
    if is_slow(backend, device) and shape[-1] > 32:
        pytest.skip("interpreter: small shapes only")
    if emulation_trim(backend, dtype, math.prod(shape)):
        pytest.skip("emulation: this shape in float32 only")
    n = math.prod(shape[1:])
    k = n + 5 if k == "all" else k
    x = torch.randn(shape).to(device=device, dtype=dtype)
    g = torch.randn(shape) if kind == "normal" else torch.randint(-1, 2, shape).float()
    g = g.to(device=device, dtype=dtype)
    std = torch.linspace(0.2, 0.3, shape[1])
    out = ak.iodin_perturb(x, g, 0.0014 * 50, std, k, backend=backend)
    want = reference.iodin_perturb(x.double(), g.double(), 0.0014 * 50, std.double(), k).to(dtype)
    torch.testing.assert_close(out, want, **TOL[dtype])
    moved = (out != x).reshape(shape[0], -1).sum(1)
    assert bool((moved <= min(k, n)).all())


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,)))
def test_top1_tie_break_sign_and_float_std(backend, device, dtype):
    x = torch.zeros(2, 3, 4, 4, device=device)
    g = torch.zeros(2, 3, 4, 4, device=device)
    g[0, 1, 2, 2] = -5.0
    g[0, 2, 0, 0] = 5.0  # same magnitude, higher index: loses the tie
    g[1].fill_(float("nan"))  # NaN ranks first; ODIN's sign rule gives -1 -> moves up
    out = ak.iodin_perturb(x, g, 0.1, 0.5, 1, backend=backend)
    assert out[0, 1, 2, 2] == pytest.approx(0.2) and (out[0] != 0).sum() == 1
    assert out[1, 0, 0, 0] == pytest.approx(0.2) and (out[1] != 0).sum() == 1
    odin = ak.iodin_perturb(x, torch.randn_like(x), 0.1, 0.5, 10 ** 6, backend=backend)
    assert bool((odin.abs() == 0.2).all())


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,)))
def test_layouts_and_empty(backend, device, dtype):
    x = torch.randn(3, 3, 8, 10, device=device)
    g = torch.randn(3, 3, 8, 10, device=device)
    want = ak.iodin_perturb(x, g, 0.01, 0.25, 5, backend="reference")
    out = ak.iodin_perturb(x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last),
                           0.01, 0.25, 5, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want, **TOL[dtype])
    e = torch.empty(0, 3, 4, 4, device=device)
    assert ak.iodin_perturb(e, e, 0.01, 1.0, 1, backend=backend).shape == e.shape
    r2 = torch.randn(4, 7, device=device)  # rank 2: channel = dim 1
    torch.testing.assert_close(ak.iodin_perturb(r2, r2, 0.1, torch.arange(1, 8.0), 2, backend=backend),
                               ak.iodin_perturb(r2, r2, 0.1, torch.arange(1, 8.0), 2, backend="reference"))
