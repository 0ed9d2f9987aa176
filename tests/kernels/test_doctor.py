"""The self-check (python -m ascood_kernels / ascood doctor): pass path and fail paths."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ascood_kernels import _backend, doctor

OPS = {"invariant_mask+gradient_outlier", "zscore", "shuffle_outlier", "iodin_perturb", "ascood_loss",
       "random_permutations"}


def _run_json(capsys, *args):
    rc = doctor.main(["--json", *args])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")
def test_all_backends_pass(capsys):
    rc, report = _run_json(capsys)
    assert rc == 0 and report["ok"] and report["failures"] == 0
    assert "cpu" in report["checked_backends"]
    assert {r["op"] for r in report["results"]} == OPS
    assert {r["dtype"] for r in report["results"] if r["backend"] == "cpu"} == {
        "float32", "float16", "bfloat16", "float64", "int64"}  # int64: random_permutations
    assert report["skipped_backends"].get("cuda")  # no GPU here: skipped with a reason, not failed
    env = report["environment"]
    assert env["torch"] == torch.__version__ and "available_backends" in env


def _wrong(fn, how):
    def wrong(*args):
        if how == "raise":
            raise RuntimeError("kernel exploded")
        out = fn(*args)
        if isinstance(out, tuple):
            return (out[0] * 1.001 + 1e-3, *out[1:])
        return out * 1.001 + 1e-3
    return wrong


@pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")
@pytest.mark.parametrize("op, how", [("zscore", "perturb"), ("gradient_outlier", "perturb"),
                                     ("ascood_loss_backward", "perturb"), ("iodin_perturb", "raise")])
def test_a_wrong_backend_is_reported(monkeypatch, capsys, op, how):
    # One op of the compiled namespace (the cpu backend's kernels; the autograd
    # backwards look theirs up there too) returns a slightly wrong result or raises.
    ns = torch.ops.ascood
    monkeypatch.setattr(ns, op, _wrong(getattr(ns, op), how))
    rc, report = _run_json(capsys, "--backend", "cpu")
    assert rc == 1 and not report["ok"]
    bad = [r for r in report["results"] if not r["ok"]]
    wanted_op = {"zscore": "zscore", "gradient_outlier": "invariant_mask+gradient_outlier",
                 "ascood_loss_backward": "ascood_loss", "iodin_perturb": "iodin_perturb"}[op]
    assert bad and {r["op"] for r in bad} == {wanted_op} and {r["backend"] for r in bad} == {"cpu"}
    if how == "raise":
        assert all("kernel exploded" in r["detail"] for r in bad)
    elif op == "ascood_loss_backward":
        assert all(r["detail"].startswith("d_id") for r in bad)  # forward fine, the backward is not
    # The table says so too.
    assert doctor.main(["--backend", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "did not match the reference" in out


def test_bad_flags(capsys):
    assert doctor.main(["--backend", "metal"]) == 2
    assert "--backend must name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert doctor.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_nothing_to_check_is_not_a_pass(capsys):
    rc, report = _run_json(capsys, "--backend", "cuda", "--device", "cpu")
    assert rc == 2 and report["results"] == [] and "cuda" in report["skipped_backends"]


@pytest.mark.skipif(not _backend.extension_loaded(), reason="C++ extension not built")
def test_ascood_doctor_and_python_m(capsys):
    from ascood.apps.main import main

    assert main(["doctor", "--backend", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    proc = subprocess.run([sys.executable, "-m", "ascood_kernels", "--backend", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "all" in proc.stdout and "checks match the reference" in proc.stdout


def test_cuda_emulated_backend_in_the_table(capsys, record_property):
    """--backend cuda-emulated: the CUDA kernels under the emulation (race check on), in the same table."""
    from ascood_kernels import emulation

    if not emulation.load():
        pytest.skip(f"CUDA emulation unavailable: {emulation.why_not()}")
    rc, report = _run_json(capsys, "--backend", "cuda-emulated")
    assert rc == 0 and report["ok"] and report["checked_backends"] == ["cuda-emulated"], report["results"][:3]
    assert {r["op"] for r in report["results"]} == OPS - {"shuffle_outlier", "random_permutations"}
    assert {r["dtype"] for r in report["results"]} == {"float32", "float16", "bfloat16", "float64"}
    assert any("multi-block" in r["case"] for r in report["results"])
    record_property("emu_cases", len(report["results"]))
    table = doctor._table([doctor.CheckResult(**r) for r in report["results"]])
    assert all(" cuda-emulated " in line for line in table.splitlines()[2:])
    # Not part of the default set (it builds on first use and is slow).
    assert "cuda-emulated" not in doctor.check_backends(torch.device("cpu"))[0]
