"""``ascood eval`` and ``ascood detector`` under torchrun on CPU (gloo): each split's images go through the model
once over both processes (shards on disk), i-ODIN scores its images sharded, and the outputs are the numbers one
process writes, cell for cell; a run stopped mid-extraction resumes; two torchrun launches joined by a c10d
rendezvous (``--nnodes 2``, the multi-node setup on one machine) give the same table; a refusal of --out on rank 0
ends both processes."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import types

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from clihelpers import run_cli
from fake_openood import make_tree
from torchrunhelpers import free_port, run_torchrun, start_torchrun

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

# Tiny: 8 px images, batches of 4, shards of 8 rows (2 batches), so every split has several shards. Each run
# keeps its own feature store (by default they would share the run's features/ and the later ones extract nothing).
SCORERS = "msp,knn,mds,iodin"  # knn and mds fit on ID train; i-ODIN needs the images (input gradients)


def _eval_args(ws, out: str) -> list[str]:
    return ["eval", ws.run, "--benchmark", "cifar10", "--data-root", ws.root, "--scorers", SCORERS, "--batch-size", "4",
            "--out", out, "--features", os.path.join(out, "features"), "--shard-rows", "8"]


def _detector_args(ws, out: str) -> list[str]:
    lists = os.path.join(ws.root, "images_classic")
    return ["detector", ws.run, "--id-train", os.path.join(lists, "det_train.txt"),
            "--id-val", os.path.join(lists, "det_val.txt"), "--ood-val", os.path.join(lists, "det_ood_val.txt"),
            "--scorer", "knn", "--tpr", "0.8", "--batch-size", "4", "--out", out, "--features", out + ".features",
            "--shard-rows", "8"]


def _one_process(args) -> subprocess.CompletedProcess:
    # The same single thread as each torchrun worker: the same kernels, so bitwise-equal features.
    res = run_cli(*args, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A fake CIFAR-10 OpenOOD tree, a run trained on it, and the one-process evaluation of that run."""
    tmp = tmp_path_factory.mktemp("evaltorchrun")
    root = make_tree(str(tmp / "data"), benchmarks=["cifar10"], size=8, n_train=24, n_other=10)
    bench = os.path.join(root, "benchmark_imglist", "cifar10")
    for src, dst in (("train_cifar10", "det_train"), ("val_cifar10", "det_val"), ("val_tin", "det_ood_val")):
        # The detector reads image lists relative to their own folder: the same lines, beside the images.
        with open(os.path.join(bench, f"{src}.txt")) as f, \
                open(os.path.join(root, "images_classic", f"{dst}.txt"), "w") as g:
            g.write(f.read())
    run = str(tmp / "run")
    res = run_cli("train", "--benchmark", "cifar10", "--data-root", root, "--out", run, "--epochs", "2",
                  "--batch-size", "8", "--image-size", "8", "--width", "4", "--mean", "0.5,0.5,0.5",
                  "--std", "0.25,0.25,0.25", "--no-progress", "--no-figures", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    w = types.SimpleNamespace(tmp=tmp, root=root, run=run)
    w.one = str(tmp / "one")
    w.one_text = _one_process(_eval_args(w, w.one)).stdout
    return w


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _shard_counts(text: str) -> tuple[list[int], int]:
    """(shards extracted per process, shards reused) from the run's features line."""
    m = re.search(r"shard\(s\) extracted over \d+ process\(es\) \(([\d, ]+)\), (\d+) reused", text)
    assert m, text
    return [int(v) for v in m.group(1).split(",")], int(m.group(2))


# 24 train rows -> 3 shards; id_val, ood_val, id_test and 7 OOD sets of 10 rows -> 2 shards each.
TOTAL_SHARDS = 3 + 10 * 2


def _assert_same_table(ws, out: str) -> None:
    assert _read(os.path.join(out, "results.csv")) == _read(os.path.join(ws.one, "results.csv"))
    assert json.loads(_read(os.path.join(out, "aps.json"))) == json.loads(_read(os.path.join(ws.one, "aps.json")))


def test_eval_two_processes_writes_the_one_process_table(ws):
    out = str(ws.tmp / "two")
    res = run_torchrun(_eval_args(ws, out))
    assert res.returncode == 0, res.stdout
    _assert_same_table(ws, out)
    rows = json.loads(_read(os.path.join(out, "results.json")))["rows"]
    assert {r["scorer"] for r in rows} == {"msp", "knn", "mds", "iodin"}
    # Every shard made once, by one of the two processes, and both took part.
    per_rank, reused = _shard_counts(res.stdout)
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) == TOTAL_SHARDS and reused == 0
    assert len([f for d in os.listdir(os.path.join(out, "features"))
                for f in os.listdir(os.path.join(out, "features", d)) if re.fullmatch(r"shard-\d+\.safetensors", f)]) \
        == TOTAL_SHARDS
    assert res.stdout.count("scorer  group  dataset") == 1  # rank 0 alone prints the table


def test_detector_two_processes_equals_one(ws):
    one, two = str(ws.tmp / "det_one"), str(ws.tmp / "det_two")
    _one_process(_detector_args(ws, one))
    res = run_torchrun(_detector_args(ws, two))
    assert res.returncode == 0, res.stdout
    per_rank, _ = _shard_counts(res.stdout)
    assert len(per_rank) == 2 and min(per_rank) > 0
    a, b = (json.loads(_read(os.path.join(d, "detector.json"))) for d in (one, two))
    assert a["decision"]["threshold"] == b["decision"]["threshold"]
    assert a["provenance"]["scorer_choice"] == b["provenance"]["scorer_choice"]
    for name in ("calibration.safetensors", "scorer.safetensors"):
        ta, tb = load_file(os.path.join(one, name)), load_file(os.path.join(two, name))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert os.path.isdir(two + ".features")


@pytest.mark.slow
def test_eval_stopped_mid_extraction_resumes_with_the_same_table(ws):
    out = str(ws.tmp / "resumed")
    # Test-only fault hook: each process raises after extracting 2 shards.
    first = run_torchrun(_eval_args(ws, out), env={"ASCOOD_TEST_FAIL_AFTER_SHARDS": "2"})
    assert first.returncode != 0
    assert "test-only fault" in first.stdout and not os.path.exists(os.path.join(out, "results.csv"))
    second = run_torchrun(_eval_args(ws, out))
    assert second.returncode == 0, second.stdout
    per_rank, reused = _shard_counts(second.stdout)
    assert reused >= 2 and sum(per_rank) + reused == TOTAL_SHARDS  # resumed: only the missing shards made
    _assert_same_table(ws, out)


@pytest.mark.slow
def test_eval_on_two_nodes_by_c10d_rendezvous_writes_the_same_table(ws):
    out = str(ws.tmp / "nodes")
    port = free_port()
    launches = [start_torchrun(_eval_args(ws, out), nproc=1,
                               launcher=("--nnodes=2", f"--node-rank={i}", "--rdzv-backend=c10d",
                                         f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=ascood-test"))
                for i in (0, 1)]
    texts = []
    for proc in launches:
        try:
            texts.append(proc.communicate(timeout=300)[0])
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in launches] == [0, 0], "\n".join(texts)
    per_rank, _ = _shard_counts("\n".join(texts))
    assert len(per_rank) == 2 and min(per_rank) > 0
    _assert_same_table(ws, out)


def test_a_refused_out_ends_every_process_with_rank0s_status(ws, tmp_path):
    """--out held by another run: rank 0's claim is refused and both processes end at once."""
    from ascood.training.rundir import LOCK_NAME

    out = tmp_path / "busy"
    out.mkdir()
    # Held by a live process of this host (this test), so rank 0's claim is refused.
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": "now", "proc_start": None}))
    alone = run_cli(*_eval_args(ws, str(out)), env={"OMP_NUM_THREADS": "1"})
    assert alone.returncode == 1 and "is in use by another ascood run" in alone.stderr  # one process: status 1
    res = run_torchrun(_eval_args(ws, str(out)), timeout=120)
    assert res.returncode != 0
    assert res.stdout.count("is in use by another ascood run") == 1, res.stdout  # said once, by rank 0
    # Each process ended with the one-process status, unless torchrun stopped it (SIGTERM, -15) once the other
    # had ended: rank 1 learnt rank 0's status at once, neither waited for the other.
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", res.stdout))
    assert "1" in codes.values() and set(codes.values()) <= {"1", "-15"}, res.stdout
    assert not os.path.exists(out / "results.csv")
