"""Python-side rules of the CUDA paths, checked without a GPU.

The device checks are faked: ``torch.device("cuda")`` objects need no GPU,
and the "meta" device stands in for "not the host" where a tensor is needed.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import ascood_kernels as ak
from ascood_kernels import _backend, reference
from ascood_kernels.ops.permutations import draw_permutations

CUDA = torch.device("cuda")


def _fake_cuda_build(monkeypatch, *, triton: bool) -> None:
    monkeypatch.setattr(_backend, "cuda_built", lambda: True)
    monkeypatch.setattr(_backend, "triton_loaded", lambda: triton)
    monkeypatch.setitem(_backend._state, "triton_error", "ImportError: no triton (faked)")
    monkeypatch.setitem(_backend._state, "warned", False)
    monkeypatch.delenv("ASCOOD_BACKEND", raising=False)


def test_op_without_cuda_kernel_maps_cuda_to_triton(monkeypatch):
    _fake_cuda_build(monkeypatch, triton=True)
    assert _backend.resolve_without_cuda_kernel("auto", CUDA, "shuffle_outlier") == "triton"
    assert _backend.resolve_without_cuda_kernel("cuda", CUDA, "shuffle_outlier") == "triton"


def test_op_without_cuda_kernel_auto_falls_back_to_reference_with_warning(monkeypatch):
    _fake_cuda_build(monkeypatch, triton=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.resolve_without_cuda_kernel("auto", CUDA, "shuffle_outlier") == "reference"
    assert any("shuffle_outlier has no CUDA C++ kernel" in str(w.message) for w in caught)
    monkeypatch.setenv("ASCOOD_BACKEND", "auto")
    assert _backend.resolve_without_cuda_kernel(None, CUDA, "shuffle_outlier") == "reference"


def test_op_without_cuda_kernel_explicit_cuda_raises(monkeypatch):
    _fake_cuda_build(monkeypatch, triton=False)
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ kernel.*Triton is unavailable"):
        _backend.resolve_without_cuda_kernel("cuda", CUDA, "shuffle_outlier")
    monkeypatch.setenv("ASCOOD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        _backend.resolve_without_cuda_kernel(None, CUDA, "shuffle_outlier")


def test_shuffle_outlier_on_cuda_without_triton_gives_the_reference(monkeypatch):
    # CPU tensors, but dispatch sees "CUDA, extension with CUDA kernels, no Triton".
    _fake_cuda_build(monkeypatch, triton=False)
    monkeypatch.setattr(_backend, "resolve", lambda backend, device: "cuda")
    x = torch.randn(2, 3, 5, 5)
    s = torch.rand(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ak.shuffle_outlier(x, s, 0.4, torch.Generator().manual_seed(3))
    perm = draw_permutations(2, 10, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(out, reference.shuffle_outlier(x, s, 0.4, perm))
    assert not torch.equal(out, x)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_iodin_std_checked_on_host_for_non_cpu_inputs(bad):
    # x on a non-CPU device (meta stands in for CUDA) with a CPU std: the host check still runs.
    x = torch.empty(2, 3, 4, 4, device="meta")
    std = torch.tensor([1.0, bad, 1.0])
    with pytest.raises(ValueError, match="std must be > 0 in every channel"):
        ak.iodin_perturb(x, torch.empty_like(x), 0.01, std)


def test_iodin_std_too_small_for_float32_is_rejected():
    # 1e-50 is > 0 in float64 but 0 in the float32 the kernels divide by.
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="std must be > 0"):
        ak.iodin_perturb(x, torch.randn_like(x), 0.01, torch.tensor([1.0, 1e-50], dtype=torch.float64))
