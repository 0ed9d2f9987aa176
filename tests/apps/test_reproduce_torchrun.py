"""``torchrun --nproc_per_node=2 -m ascood reproduce`` on CPU (gloo): every run trains data-parallel over both
processes, one table is written under one lock, and a killed reproduction resumes under torchrun."""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch
import torch.distributed as dist

from fake_openood import make_tree
from torchrunhelpers import descendants as _descendants, gone as _gone, kill_all as _kill_all, start_torchrun

# Small enough for a 2-core CI machine: 16 training images, 4 per step per process.
ARGS = ["--epochs", "3", "--model", "small_cnn", "--image-size", "16", "--seeds", "0", "--batch-size", "8",
        "--scorers", "msp", "--no-progress"]


def _torchrun(root: str, out: str):
    return start_torchrun(["reproduce", "cifar10_random", "--data-root", root, "--out", out, *ARGS])


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_reproduce_trains_data_parallel_and_resumes_after_a_kill(tmp_path):
    root = make_tree(str(tmp_path / "data"), benchmarks=["cifar10"])
    out = str(tmp_path / "out")
    ce_done = os.path.join(out, "ce", "seed0", "train_done.json")
    first = _torchrun(root, out)
    try:
        deadline = time.time() + 300
        while not os.path.exists(ce_done):
            if first.poll() is not None:
                pytest.fail(f"torchrun ended (rc {first.returncode}) before the first run finished:\n"
                            f"{first.stdout.read()}")
            assert time.time() < deadline, "the first run did not finish in 300 s"
            time.sleep(0.05)
        workers = _descendants(first.pid)
        _kill_all(first)  # torchrun and both workers, mid-reproduction
    finally:
        if first.poll() is None:
            _kill_all(first)
        first.stdout.close()
    for pid in workers:  # none of them survives to finish the job behind the test's back
        assert _gone(pid), f"worker {pid} still runs 10 s after SIGKILL"
    assert not os.path.exists(os.path.join(out, "table.md"))  # killed during training: nothing evaluated yet
    ce_last = os.path.join(out, "ce", "seed0", "last.pt")
    ck = torch.load(ce_last, weights_only=True)
    assert ck["world_size"] == 2 and set(ck["rng_per_rank"]) == {"0", "1"} and ck["epoch"] == 3
    ce_digest = _digest(ce_last)

    second = _torchrun(root, out)
    try:
        text, _ = second.communicate(timeout=400)
    finally:
        if second.poll() is None:
            _kill_all(second)
    assert second.returncode == 0, text
    assert "ce seed 0: training already finished" in text and "taking over the stale lock" in text
    assert "ascood seed 0: training already finished" not in text  # it was killed mid-training: trained now
    assert text.count("# cifar10_random: measured vs the paper's Table 1") == 1  # rank 0 alone reports
    assert _digest(ce_last) == ce_digest  # not retrained
    ck = torch.load(os.path.join(out, "ascood", "seed0", "last.pt"), weights_only=True)
    assert ck["world_size"] == 2 and set(ck["rng_per_rank"]) == {"0", "1"} and ck["epoch"] == 3
    assert ck["train_config"]["shuffle_rank"] == "random" and ck["train_config"]["p_inv"] == 0.2
    # One table, one set of results (one evaluation per run), and the lock released.
    assert os.path.isfile(os.path.join(out, "table.md")) and not os.path.exists(os.path.join(out, ".ascood.lock"))
    rows = json.load(open(os.path.join(out, "results_per_set.json")))["rows"]
    assert sorted({(r["method"], r["scorer"]) for r in rows}) == [("ascood", "msp"), ("ascood", "scale"),
                                                                 ("ce", "msp")]
    assert len([r for r in rows if r["method"] == "ce" and r["dataset"] == "mnist"]) == 1
    assert json.load(open(os.path.join(out, "config.json")))["processes"] == 2
    table = open(os.path.join(out, "table.md")).read()
    assert "43.67" in table and "(iodin not run)" in table  # the fork's per-set i-ODIN file, i-ODIN not run here
