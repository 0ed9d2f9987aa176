"""Op registration: opcheck on every op, torch.compile(fullgraph=True), backend discovery."""
import os
import warnings

import pytest
import torch

import ascood_kernels as ak
from ascood_kernels import _backend
from backends import HAS_CUDA, INTERPRETED


def _op_args(device, dtype=torch.float32):
    """(op name, args) for every op of the schema, backward ops included."""
    x = torch.randn(3, 2, 5, 6, device=device, dtype=dtype)
    g = torch.randn(3, 2, 5, 6, device=device, dtype=dtype)
    h = torch.randn(4, 9, device=device, dtype=dtype)
    zi, zo = torch.randn(4, 5, device=device, dtype=dtype), torch.randn(3, 5, device=device, dtype=dtype)
    y = torch.tensor([0, 4, 2, 1], device=device)
    perm = torch.rand(3, 9, device=device).argsort(1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, rstd = h.to(acc).mean(1), 1 / (h.to(acc).std(1) + 1e-6)
    lse_i, lse_o = zi.to(acc).logsumexp(1), zo.to(acc).logsumexp(1)
    return [
        ("invariant_mask", (g, 0.2)),
        ("gradient_outlier", (x.requires_grad_(), g.requires_grad_(), 0.2, 1.5)),
        ("zscore", (h.requires_grad_(), 0.5, 1e-6)),
        ("zscore_backward", (torch.randn_like(h), h.detach(), mean, rstd, 0.5)),
        ("shuffle_outlier", (x.detach(), g.detach().abs(), 0.3, perm)),
        ("iodin_perturb", (x.detach(), g.detach(), 0.01, torch.full((2,), 0.5, device=device), 2)),
        ("ascood_loss", (zi.requires_grad_(), y, zo.requires_grad_(), 0.5)),
        ("ascood_loss_backward", (torch.tensor(1.0, device=device, dtype=dtype), zi.detach(), y, zo.detach(), 0.5,
                                  lse_i, lse_o)),
    ]


def _namespaces():
    out = []
    for ns, device in [("ascood", "cpu"), ("ascood", "cuda"), ("ascood_triton", "cpu"), ("ascood_triton", "cuda")]:
        reason = None
        if ns == "ascood_triton" and device == "cpu" and not INTERPRETED:
            reason = "Triton on CPU tensors needs TRITON_INTERPRET=1"
        elif device == "cuda" and not HAS_CUDA:
            reason = "needs a CUDA device (none here)"
        elif ns == "ascood" and not _backend.extension_loaded():
            reason = "C++ extension not built"
        elif ns == "ascood" and device == "cuda" and not _backend.cuda_built():
            reason = "extension built without CUDA kernels"
        elif ns == "ascood_triton" and not _backend.triton_loaded():
            reason = "triton kernels unavailable"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(ns, device, marks=marks, id=f"{ns}-{device}"))
    # The CUDA kernels under the emulation (their own namespace, CPU tensors).
    from ascood_kernels import emulation

    reason = None if emulation.load() else f"CUDA emulation unavailable: {emulation.why_not()}"
    out.append(pytest.param(emulation.NAMESPACE, "cpu", marks=[pytest.mark.skip(reason=reason)] if reason else [],
                            id=f"{emulation.NAMESPACE}-cpu"))
    return out


OP_NAMES = [name for name, _ in _op_args("cpu")]


@pytest.mark.parametrize("ns,device", _namespaces())
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(ns, device, name):
    if (ns == "ascood" and device == "cuda" or ns == "ascood_emu") and name == "shuffle_outlier":
        pytest.skip("shuffle_outlier has no CUDA C++ kernel (Triton serves CUDA tensors)")
    args = dict(_op_args(device))[name]
    torch.library.opcheck(getattr(getattr(torch.ops, ns), name).default, args)


@pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_half_precision_cpu(dtype):
    for name, args in _op_args("cpu", dtype):
        torch.library.opcheck(getattr(torch.ops.ascood, name).default, args)


def _train_step(x, g, h, y, backend):
    """Every public op in one function, as a user's training loop would call them."""
    x_out = ak.gradient_outlier(x, g, 0.1, 2.0, backend=backend)
    mask = ak.invariant_mask(g, 0.1, backend=backend)
    shuffled = ak.shuffle_outlier(x, g.abs(), 0.2, backend=backend)
    perturbed = ak.iodin_perturb(x, g, 0.01, 0.5, 1, backend=backend)
    feats = ak.zscore(h, 0.5, 1e-6, backend=backend)
    logits = feats @ torch.ones(h.shape[1], 5, device=h.device) * torch.linspace(-1, 1, 5, device=h.device)
    loss = ak.ascood_loss(logits[: y.shape[0]], y, logits[y.shape[0]:], 1.0, backend=backend)
    return loss, x_out, mask, shuffled.shape, perturbed


def _compile_cases():
    out = [pytest.param("cpu", "cpu", marks=[pytest.mark.skipif(not _backend.extension_loaded(),
                                                                 reason="C++ extension not built")]),
           pytest.param("triton", "cpu", marks=[pytest.mark.skipif(not (INTERPRETED and _backend.triton_loaded()),
                                                                    reason="needs Triton's interpreter")])]
    for backend in ("cuda", "triton"):
        out.append(pytest.param(backend, "cuda", marks=[pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
                                                        pytest.mark.gpu]))
    return out


@pytest.mark.parametrize("backend,device", _compile_cases())
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    x = torch.randn(4, 3, 8, 8, device=device)
    g = torch.randn(4, 3, 8, 8, device=device)
    h = torch.randn(6, 16, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 4], device=device)
    compiled = torch.compile(_train_step, fullgraph=True)
    loss, x_out, mask, shape, perturbed = compiled(x, g, h, y, backend)
    want = _train_step(x, g, h, y, backend)
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(x_out, want[1])
    assert torch.equal(mask, want[2]) and shape == x.shape
    torch.testing.assert_close(perturbed, want[4])
    (dh,) = torch.autograd.grad(loss, h)
    (want_dh,) = torch.autograd.grad(want[0], h)
    torch.testing.assert_close(dh, want_dh)


def test_available_backends_reports_what_loaded():
    names = ak.available_backends()
    assert names[-1] == "reference"
    assert ("cpu" in names) == _backend.extension_loaded()
    assert ("cuda" in names) == _backend.cuda_built()
    assert ("triton" in names) == _backend.triton_loaded()


def test_unknown_backend_name():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.gradient_outlier(x, x, 0.5, 1.0, backend="tpu")
    os.environ["ASCOOD_BACKEND"] = "fast"
    try:
        with pytest.raises(ValueError, match="ASCOOD_BACKEND must be one of"):
            ak.zscore(x)
    finally:
        del os.environ["ASCOOD_BACKEND"]


def test_env_var_selects_backend(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setenv("ASCOOD_BACKEND", "reference")
    assert _backend.resolve(None, x.device) == "reference"
    assert _backend.resolve("auto", x.device) == "reference"


@pytest.mark.skipif(_backend.cuda_built(), reason="this machine's extension has CUDA kernels")
def test_backend_not_built_is_clear_error():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not built"):
        ak.zscore(x, backend="cuda")


@pytest.mark.skipif(not _backend.cuda_built(), reason="extension built without CUDA kernels")
def test_cuda_backend_on_cpu_tensors_is_clear_error():
    assert "cuda" in ak.available_backends()
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        ak.zscore(x, backend="cuda")


@pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")
def test_cpu_backend_on_cuda_tensors_is_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cpu' needs CPU tensors"):
        _backend.resolve("cpu", torch.device("cuda"))


def test_triton_on_cpu_without_interpreter(monkeypatch):
    if not _backend.triton_loaded():
        pytest.skip("triton kernels unavailable")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
        _backend.resolve("triton", torch.device("cpu"))


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setitem(_backend._state, "ext", False)
    monkeypatch.setitem(_backend._state, "ext_error", "ImportError: test")
    monkeypatch.setitem(_backend._state, "warned", False)
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ak.zscore(x)
        ak.zscore(x)
    msgs = [str(w.message) for w in caught if "reference backend" in str(w.message)]
    assert len(msgs) == 1 and "ImportError: test" in msgs[0]


@pytest.mark.skipif(not INTERPRETED, reason="only meaningful without a GPU")
def test_auto_on_cpu_prefers_compiled_cpu():
    expected = "cpu" if _backend.extension_loaded() else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _backend.resolve("auto", torch.device("cpu")) == expected
