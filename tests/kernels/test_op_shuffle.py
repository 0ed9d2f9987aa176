"""shuffle_outlier, every backend against the reference (exact: it only moves values)."""
import math

import pytest
import torch

import ascood_kernels as ak
from ascood_kernels import reference
from ascood_kernels.ops.permutations import draw_permutations
from backends import combos, is_slow

SHAPES = [(1, 1, 1, 1), (5, 3, 17, 19), (8, 3, 32, 32), (2, 3, 224, 224)]


def _run(x, sal, p, seed, backend):
    return ak.shuffle_outlier(x, sal, p, torch.Generator(device="cpu").manual_seed(seed), backend=backend)


@pytest.mark.parametrize("backend,device,dtype", combos(cuda=False))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", ["1/n", 0.15, 0.5, 1.0], ids=str)
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_matches_reference(backend, device, dtype, shape, p, kind):
    if is_slow(backend, device) and shape[-1] > 32:
        pytest.skip("interpreter: small shapes only")
    P = math.prod(shape[2:])
    p = 1.0 / P if p == "1/n" else p
    x = torch.randn(shape).to(device=device, dtype=dtype)
    sal = (torch.randn(shape) if kind == "normal" else torch.randint(0, 3, shape).float()).abs()
    sal = sal.to(device=device, dtype=dtype)
    out = _run(x, sal, p, 7, backend)
    npix = int(p * P)
    B, C = shape[:2]
    gen = torch.Generator(device="cpu").manual_seed(7)
    perm = draw_permutations(B, npix, gen, device)
    want = reference.shuffle_outlier(x.double(), sal.double(), p, perm).to(dtype)
    assert torch.equal(out, want)
    # It is a per-sample permutation of whole pixels: the multiset of pixel vectors is unchanged.
    a = out.reshape(B, C, -1).transpose(1, 2).double()
    b = x.reshape(B, C, -1).transpose(1, 2).double()
    for i in range(B):
        assert torch.equal(torch.sort(a[i].sum(1)).values, torch.sort(b[i].sum(1)).values)


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), cuda=False))
def test_per_pixel_saliency_layouts_and_generator(backend, device, dtype):
    x = torch.randn(3, 4, 9, 11, device=device)
    sal = torch.rand(3, 4, 9, 11, device=device)
    pix = sal.double().sum(1)  # per-pixel form; float64 sum gives the same order here
    a = _run(x, sal, 0.3, 1, backend)
    assert torch.equal(a, _run(x, pix, 0.3, 1, backend))
    assert torch.equal(a, _run(x, sal, 0.3, 1, backend))  # same generator state, same output
    assert not torch.equal(a, _run(x, sal, 0.3, 2, backend))
    cl = _run(x.to(memory_format=torch.channels_last), sal.to(memory_format=torch.channels_last), 0.3, 1, backend)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, a)
    # non-selected pixels are untouched
    order = torch.sort(pix.reshape(3, -1), dim=1, descending=True, stable=True).indices
    keep = order[:, int(0.3 * 99):]
    flat_a, flat_x = a.reshape(3, 4, -1), x.reshape(3, 4, -1)
    for b in range(3):
        assert torch.equal(flat_a[b][:, keep[b]], flat_x[b][:, keep[b]])


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), cuda=False))
def test_empty_batch(backend, device, dtype):
    x = torch.empty(0, 3, 4, 4, device=device)
    assert _run(x, x, 0.5, 0, backend).shape == x.shape


def _reference_with_same_perm(x, sal, p, seed):
    B = x.shape[0]
    npix = int(p * math.prod(x.shape[2:]))
    perm = draw_permutations(B, npix, torch.Generator(device="cpu").manual_seed(seed), x.device)
    return reference.shuffle_outlier(x, sal, p, perm)


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32, torch.float64), cuda=False))
@pytest.mark.parametrize("kind", ["all_equal", "signed_zeros", "nan_inf_negative", "two_values", "tiny_range"])
@pytest.mark.parametrize("p", [0.07, 0.5, 1.0], ids=str)
def test_select_edge_cases(backend, device, dtype, kind, p):
    """The radix select of the pixel scores: heavy ties, NaN/inf, negative and signed-zero scores."""
    # Triton: one program per sample up to SMALL_MAX (4096) pixels, chunked programs above:
    # the interpreter runs both (ties and offsets across chunks too).
    shapes = [(3, 2, 13, 11), (2, 1, 73, 61)] if is_slow(backend, device) else [(3, 2, 61, 47)]
    for shape in shapes:
        _check_edge_case(backend, device, dtype, kind, p, shape)


def _check_edge_case(backend, device, dtype, kind, p, shape):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if kind == "all_equal":
        sal = torch.full(shape, 0.25, dtype=torch.float64)
    elif kind == "signed_zeros":
        sal = torch.where(torch.rand(shape) < 0.5, -0.0, 0.0).double()
        sal[:, :, ::5] = 1.0
    elif kind == "nan_inf_negative":
        sal = torch.randn(shape, dtype=torch.float64)
        flat = sal.view(-1)
        flat[torch.randperm(flat.numel())[:flat.numel() // 20]] = float("nan")
        flat[torch.randperm(flat.numel())[:flat.numel() // 50]] = float("inf")
        flat[torch.randperm(flat.numel())[:flat.numel() // 50]] = -float("inf")
    elif kind == "two_values":
        sal = torch.randint(0, 2, shape).double()
    else:  # distinct scores within a few ulps: many radix levels share their digits
        sal = 1.0 + torch.randint(0, 64, shape).double() * 2.0 ** -52
    x, sal = x.to(device), sal.to(device=device, dtype=dtype)
    out = _run(x, sal, p, 3, backend)
    assert torch.equal(out, _reference_with_same_perm(x, sal, p, 3)), shape


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), cuda=False))
@pytest.mark.parametrize("x_cl,s_cl", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("sal_dtype", [torch.float64, torch.bfloat16])
def test_mixed_layouts_and_saliency_dtype(backend, device, dtype, x_cl, s_cl, sal_dtype):
    x = torch.randn(4, 3, 10, 14, device=device)
    sal = torch.randn(4, 3, 10, 14, device=device).abs().to(sal_dtype)
    want = _reference_with_same_perm(x, sal, 0.3, 5)
    xi = x.to(memory_format=torch.channels_last) if x_cl else x
    si = sal.to(memory_format=torch.channels_last) if s_cl else sal
    out = _run(xi, si, 0.3, 5, backend)
    assert torch.equal(out, want)
    assert out.is_contiguous(memory_format=torch.channels_last if x_cl else torch.contiguous_format)
    # per-pixel (B, H, W) saliency with either layout of x
    pix = sal.double().sum(1)
    assert torch.equal(_run(xi, pix, 0.3, 5, backend), _reference_with_same_perm(x, pix, 0.3, 5))
    # a non-contiguous (strided) x is read through a copy
    wide = torch.randn(4, 3, 10, 28, device=device)[..., ::2]
    assert torch.equal(_run(wide, sal, 0.3, 5, backend), _reference_with_same_perm(wide, sal, 0.3, 5))


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32, torch.float64), cuda=False))
def test_selection_is_in_pixel_order_worked_example(backend, device, dtype):
    """docs/OPS.md by hand: sel is the selected pixels in ascending pixel order, out[sel[i]] = x[sel[perm[i]]]."""
    x = torch.tensor([[[10.0, 11.0, 12.0, 13.0, 14.0, 15.0]], [[20.0, 21.0, 22.0, 23.0, 24.0, 25.0]]])
    x = torch.stack([x[:, 0], -x[:, 0]], 1).to(device=device, dtype=dtype)  # (2, 2, 6): channels move together
    sal = torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0, 2.0], [0.0, 9.0, 9.0, 1.0, 9.0, 8.0]], device=device)
    perm = torch.tensor([[1, 2, 0], [2, 0, 1]], device=device)
    # sample 0: sel = [0, 2, 4]; sample 1: the top 3 are pixels 1, 2, 4 (ties of 9) -> sel = [1, 2, 4]
    want0 = [12.0, 11.0, 14.0, 13.0, 10.0, 15.0]
    want1 = [20.0, 24.0, 21.0, 23.0, 22.0, 25.0]
    want = torch.tensor([want0, want1], dtype=dtype, device=device)
    out = _backend_op(backend)(x, sal, 0.5, perm)
    assert torch.equal(out[:, 0], want) and torch.equal(out[:, 1], -want)


def _backend_op(backend):
    if backend == "reference":
        return reference.shuffle_outlier
    return getattr(torch.ops, "ascood_triton" if backend == "triton" else "ascood").shuffle_outlier


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), cuda=False))
def test_kernel_takes_any_permutation(backend, device, dtype):
    """The kernels apply whatever valid perm they are given (not only the wrapper's draw)."""
    x = torch.randn(3, 3, 12, 10, device=device)
    sal = torch.randn(3, 3, 12, 10, device=device)
    npix = int(0.4 * 120)
    for perm in (torch.rand(3, npix).argsort(1), torch.arange(npix).flip(0).expand(3, npix).contiguous(),
                 torch.arange(npix).expand(3, npix).contiguous()):
        perm = perm.to(device)
        assert torch.equal(_backend_op(backend)(x, sal, 0.4, perm), reference.shuffle_outlier(x, sal, 0.4, perm))
    identity = torch.arange(npix, device=device).expand(3, npix).contiguous()
    assert torch.equal(_backend_op(backend)(x, sal, 0.4, identity), x)
