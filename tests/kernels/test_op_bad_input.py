"""Bad input raises a clear error naming the argument; nothing crashes the process."""
import pytest
import torch

import ascood_kernels as ak
from backends import combos

BACKENDS = combos(cpu_dtypes=(torch.float32,), interp_dtypes=(torch.float32,), gpu_dtypes=(torch.float32,))


@pytest.mark.parametrize("backend,device,dtype", BACKENDS)
class TestBadInput:
    def test_p_inv_range(self, backend, device, dtype):
        x = torch.randn(2, 3, 4, 4, device=device)
        for p in (0.0, -0.1, 1.01, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="p_inv"):
                ak.gradient_outlier(x, x, p, 1.0, backend=backend)
            with pytest.raises(ValueError, match="p_inv"):
                ak.invariant_mask(x, p, backend=backend)
            with pytest.raises(ValueError, match="p_inv"):
                ak.shuffle_outlier(x, x, p, backend=backend)
        with pytest.raises(TypeError, match="p_inv"):
            ak.invariant_mask(x, "0.1", backend=backend)

    def test_shape_device_dtype_mismatch(self, backend, device, dtype):
        x = torch.randn(2, 3, 4, 4, device=device)
        with pytest.raises(ValueError, match="grad must have the shape of x"):
            ak.gradient_outlier(x, x[:, :2], 0.1, 1.0, backend=backend)
        with pytest.raises(TypeError, match="grad must have x's dtype"):
            ak.gradient_outlier(x, x.double(), 0.1, 1.0, backend=backend)
        with pytest.raises(TypeError, match="grad must have x's dtype"):
            ak.iodin_perturb(x, x.half(), 0.1, 1.0, backend=backend)
        with pytest.raises(ValueError, match="saliency must have x's shape"):
            ak.shuffle_outlier(x, x[:, :, :2], 0.1, backend=backend)
        if device == "cpu" and torch.cuda.is_available():
            with pytest.raises(ValueError, match="device"):
                ak.gradient_outlier(x, x.cuda(), 0.1, 1.0, backend=backend)

    def test_device_mismatch_meta(self, backend, device, dtype):
        x = torch.randn(2, 3, 4, 4, device=device)
        with pytest.raises(ValueError, match="grad must be on x's device"):
            ak.gradient_outlier(x, torch.empty_like(x, device="meta"), 0.1, 1.0, backend=backend)

    def test_integer_and_complex_tensors(self, backend, device, dtype):
        for bad in (torch.ones(2, 3, 4, 4, dtype=torch.int64, device=device),
                    torch.ones(2, 3, 4, 4, dtype=torch.complex64, device=device),
                    torch.ones(2, 3, 4, 4, dtype=torch.bool, device=device)):
            with pytest.raises(TypeError, match="grad must have dtype in"):
                ak.invariant_mask(bad, 0.1, backend=backend)
            with pytest.raises(TypeError, match="x must have dtype in"):
                ak.gradient_outlier(bad, bad, 0.1, 1.0, backend=backend)
            with pytest.raises(TypeError, match="h must have dtype in"):
                ak.zscore(bad.reshape(2, -1), backend=backend)
            with pytest.raises(TypeError, match="id_logits must have dtype in"):
                ak.ascood_loss(bad.reshape(2, -1), torch.zeros(2, dtype=torch.long), bad.reshape(2, -1), 1.0,
                               backend=backend)
        with pytest.raises(TypeError, match="grad must be a torch.Tensor"):
            ak.invariant_mask([[1.0, 2.0]], 0.1, backend=backend)

    def test_rank(self, backend, device, dtype):
        v = torch.randn(5, device=device)
        with pytest.raises(ValueError, match="grad must have rank >= 2"):
            ak.invariant_mask(v, 0.5, backend=backend)
        with pytest.raises(ValueError, match="x must have rank >= 2"):
            ak.gradient_outlier(v, v, 0.5, 1.0, backend=backend)
        with pytest.raises(ValueError, match="x must have rank >= 3"):
            ak.shuffle_outlier(v.reshape(1, 5), v.reshape(1, 5), 0.5, backend=backend)
        with pytest.raises(ValueError, match=">= 2 features"):
            ak.zscore(torch.randn(4, 1, device=device), backend=backend)
        with pytest.raises(ValueError, match="id_logits must be"):
            ak.ascood_loss(torch.randn(2, 3, 4, device=device), torch.zeros(2, dtype=torch.long, device=device),
                           torch.randn(2, 3, device=device), 1.0, backend=backend)

    def test_zscore_sigma_eps(self, backend, device, dtype):
        h = torch.randn(3, 8, device=device)
        for sigma in (0.0, -1.0):
            with pytest.raises(ValueError, match="sigma must be > 0"):
                ak.zscore(h, sigma, backend=backend)
        with pytest.raises(ValueError, match="eps must be >= 0"):
            ak.zscore(h, 0.5, -1e-6, backend=backend)
        with pytest.raises(TypeError, match="sigma must be a real number"):
            ak.zscore(h, torch.tensor(0.5), backend=backend)

    def test_iodin_k_and_std(self, backend, device, dtype):
        x = torch.randn(2, 3, 4, 4, device=device)
        for k in (0, -3):
            with pytest.raises(ValueError, match="k must be >= 1"):
                ak.iodin_perturb(x, x, 0.01, 1.0, k, backend=backend)
        with pytest.raises(TypeError, match="k must be an int"):
            ak.iodin_perturb(x, x, 0.01, 1.0, 1.5, backend=backend)
        with pytest.raises(ValueError, match="std must be a float or a tensor of 3"):
            ak.iodin_perturb(x, x, 0.01, torch.ones(4), 1, backend=backend)
        with pytest.raises(ValueError, match="std must be > 0"):
            ak.iodin_perturb(x, x, 0.01, 0.0, 1, backend=backend)
        with pytest.raises(ValueError, match="std must be > 0"):
            ak.iodin_perturb(x, x, 0.01, torch.tensor([1.0, 0.0, 1.0]), 1, backend=backend)
        with pytest.raises(ValueError, match="eps must be >= 0"):
            ak.iodin_perturb(x, x, -0.01, 1.0, 1, backend=backend)

    def test_loss_arguments(self, backend, device, dtype):
        zi, zo = torch.randn(4, 5, device=device), torch.randn(3, 5, device=device)
        y = torch.tensor([0, 1, 2, 3], device=device)
        with pytest.raises(ValueError, match=r"ood_logits must be \(B2, 5\)"):
            ak.ascood_loss(zi, y, torch.randn(3, 6, device=device), 1.0, backend=backend)
        with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
            ak.ascood_loss(zi, y[:3], zo, 1.0, backend=backend)
        with pytest.raises(TypeError, match="target must be an int64"):
            ak.ascood_loss(zi, y.float(), zo, 1.0, backend=backend)
        with pytest.raises(ValueError, match="w must be >= 0"):
            ak.ascood_loss(zi, y, zo, -1.0, backend=backend)
        if device == "cpu":
            with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 5\)"):
                ak.ascood_loss(zi, torch.tensor([0, 1, 2, 5]), zo, 1.0, backend=backend)

    def test_generator_type(self, backend, device, dtype):
        x = torch.randn(2, 3, 4, 4, device=device)
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            ak.shuffle_outlier(x, x, 0.5, generator=123, backend=backend)


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="C++ extension not built")
def test_direct_op_calls_are_checked_in_cpp():
    """torch.ops.ascood.* skip the Python checks: the C++ TORCH_CHECKs must still refuse bad input."""
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="p_inv"):
        torch.ops.ascood.invariant_mask(x, 0.0)
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.ascood.gradient_outlier(x, x[:, :1], 0.1, 1.0)
    with pytest.raises(RuntimeError, match="sigma"):
        torch.ops.ascood.zscore(x.reshape(2, -1), -1.0, 0.0)
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.ascood.iodin_perturb(x, x, 0.1, torch.ones(3), 0)
    with pytest.raises(RuntimeError, match="std"):
        torch.ops.ascood.iodin_perturb(x, x, 0.1, torch.ones(2), 1)
    with pytest.raises(RuntimeError, match="perm"):
        torch.ops.ascood.shuffle_outlier(x, x, 0.5, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="target"):
        torch.ops.ascood.ascood_loss(x.reshape(2, -1), torch.tensor([0, 99]), x.reshape(2, -1), 1.0)
