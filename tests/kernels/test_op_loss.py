"""ascood_loss forward/backward, every backend against the float64 reference and torch's own losses."""
import math

import pytest
import torch
import torch.nn.functional as F

import ascood_kernels as ak
from backends import combos

from ascood_kernels._compare import LOSS_TOL as L_TOL  # noqa: E402


def torch_loss(zi, y, zo, w):
    """The reference code's formulation: CE + w * KLDivLoss(batchmean) against the uniform target."""
    C = zi.shape[1]
    kl = F.kl_div(F.log_softmax(zo, 1), torch.full_like(zo, 1.0 / C), reduction="batchmean")
    return F.cross_entropy(zi, y) + w * kl


@pytest.mark.parametrize("backend,device,dtype", combos(interp_dtypes=(torch.float32, torch.float64)))
@pytest.mark.parametrize("B,B2,C", [(1, 1, 2), (7, 5, 10), (64, 64, 100), (33, 17, 1000)])
@pytest.mark.parametrize("w", [0.0, 0.1, 1.0, 5.0])
def test_matches_torch(backend, device, dtype, B, B2, C, w):
    zi = (torch.randn(B, C, dtype=torch.float64) * 3).to(device=device, dtype=dtype).requires_grad_()
    zo = (torch.randn(B2, C, dtype=torch.float64) * 3).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, C, (B,), device=device)
    loss = ak.ascood_loss(zi, y, zo, w, backend=backend)
    assert loss.dim() == 0 and loss.dtype == dtype
    gi, go = torch.autograd.grad(loss * 1.7, (zi, zo))
    zi64, zo64 = zi.detach().double().requires_grad_(), zo.detach().double().requires_grad_()
    want = torch_loss(zi64, y, zo64, w)
    wgi, wgo = torch.autograd.grad(want * 1.7, (zi64, zo64))
    torch.testing.assert_close(loss.double(), want, **L_TOL[dtype])
    torch.testing.assert_close(gi.double(), wgi, **L_TOL[dtype])
    torch.testing.assert_close(go.double(), wgo, **L_TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float64,), interp_dtypes=(torch.float64,),
                                                        gpu_dtypes=(torch.float64,)))
def test_gradcheck(backend, device, dtype):
    zi = torch.randn(4, 6, device=device, dtype=dtype, requires_grad=True)
    zo = torch.randn(3, 6, device=device, dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 5, 2, 2], device=device)
    assert torch.autograd.gradcheck(lambda a, b: ak.ascood_loss(a, y, b, 0.7, backend=backend), (zi, zo))


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,)))
def test_proposition_1_and_empty(backend, device, dtype):
    """dL/dz = (p - y)/B + w (p' - 1/C)/B2; an empty outlier batch contributes 0."""
    zi = torch.randn(5, 4, device=device, requires_grad=True)
    zo = torch.randn(5, 4, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0], device=device)
    gi, go = torch.autograd.grad(ak.ascood_loss(zi, y, zo, 2.0, backend=backend), (zi, zo))
    torch.testing.assert_close(gi, (zi.softmax(1) - F.one_hot(y, 4)) / 5)
    torch.testing.assert_close(go, 2.0 * (zo.softmax(1) - 0.25) / 5)
    empty = torch.empty(0, 4, device=device)
    torch.testing.assert_close(ak.ascood_loss(zi, y, empty, 1.0, backend=backend), F.cross_entropy(zi, y))
    assert ak.ascood_loss(empty, y[:0], empty, 1.0, backend=backend).item() == 0.0
    # uniform outlier logits: the KL term vanishes
    assert ak.ascood_loss(empty, y[:0], torch.zeros(3, 4, device=device), 1.0, backend=backend).abs().item() < 1e-6
    assert math.isfinite(ak.ascood_loss(zi * 1e4, y, zo * 1e4, 1.0, backend=backend).item())


@pytest.mark.parametrize("backend,device,dtype", combos(cpu_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,)))
@pytest.mark.parametrize("C", [1, 7, 8, 9, 16, 17, 31, 33])
def test_row_tails_and_specials(backend, device, dtype, C):
    """Row lengths around the vector width (the CPU's AVX2 rows: 8 floats, 2 registers) and
    rows holding +-inf / NaN / huge logits: same loss and gradients as the float64 formula."""
    B, B2 = 6, 5
    zi = (torch.randn(B, C, dtype=torch.float64) * 4)
    zo = (torch.randn(B2, C, dtype=torch.float64) * 4)
    zi[1] *= 3e3  # exp underflows for all but the max
    zo[2] -= 80.0  # every exp(z) underflows without the max shift
    y = torch.randint(0, C, (B,))
    zi32, zo32 = zi.to(device=device, dtype=dtype).requires_grad_(), zo.to(device=device, dtype=dtype).requires_grad_()
    loss = ak.ascood_loss(zi32, y.to(device), zo32, 0.7, backend=backend)
    gi, go = torch.autograd.grad(loss, (zi32, zo32))
    zi64, zo64 = zi.to(dtype).double().requires_grad_(), zo.to(dtype).double().requires_grad_()
    want = torch_loss(zi64, y, zo64, 0.7)
    wgi, wgo = torch.autograd.grad(want, (zi64, zo64))
    torch.testing.assert_close(loss.double().cpu(), want, **L_TOL[dtype])
    torch.testing.assert_close(gi.double().cpu(), wgi, **L_TOL[dtype])
    torch.testing.assert_close(go.double().cpu(), wgo, **L_TOL[dtype])
    # +-inf / NaN rows: lse follows torch.logsumexp (NaN poisons its row, -inf rows give -inf)
    zs = torch.randn(4, C, dtype=dtype)
    zs[0, C // 2] = float("nan")
    zs[1] = -float("inf")
    zs[2, 0] = float("inf")
    zs[3, -1] = -float("inf")
    _, lse_id, lse_ood = _raw(backend)(zs.to(device), torch.zeros(4, dtype=torch.long, device=device),
                                       zs.to(device), 1.0)
    want_lse = torch.logsumexp(zs.double(), 1).float()
    torch.testing.assert_close(lse_id.cpu(), want_lse, equal_nan=True)
    torch.testing.assert_close(lse_ood.cpu(), want_lse, equal_nan=True)


def _raw(backend):
    from ascood_kernels import _backend, reference
    return reference.ascood_loss if backend == "reference" else _backend.op_namespace(backend).ascood_loss
