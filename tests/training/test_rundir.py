"""Output directories: the lock (second run refused, stale lock taken over, released on errors), early
checks of --out, removal of a killed writer's temporaries, the umask, and a full disk."""
import errno
import glob
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from ascood.files import atomic_write
from ascood.training import checkpoint as ckpt_mod
from ascood.apps.main import main
from ascood.training.rundir import LOCK_NAME, OutputDirError, claim_output_dir, read_lock
from clihelpers import ROOT, TINY_TRAIN, make_class_tree


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_class_tree(tmp_path_factory.mktemp("d") / "train")


def _holder(out_dir, then="sleep"):
    """A subprocess that claims ``out_dir`` and then sleeps (or is killed by the test)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from ascood.training.rundir import claim_output_dir
        with claim_output_dir({str(out_dir)!r}):
            print("claimed", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def test_second_run_on_a_locked_out_dir_stops_at_once(tmp_path, data, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        assert read_lock(out)["pid"] == holder.pid
        rc = main(["train", data, "--out", str(out), *TINY_TRAIN])
        err = capsys.readouterr().err
        assert rc == 1 and "--out" in err and f"pid {holder.pid}" in err and "in use" in err
        assert not (out / "last.pt").exists()  # no work was done
        rc = main(["eval", "/no/such.pt", "--id", data, "--ood", data, "--out", str(out)])
        assert rc == 2  # (missing checkpoint is checked first; the lock case for eval follows below)
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, data, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_lock(out)["pid"] == holder.pid  # the kill left the lock behind
    assert main(["train", data, "--out", str(out), *TINY_TRAIN]) == 0
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and str(holder.pid) in err
    assert not (out / LOCK_NAME).exists()  # released at the end of the run


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere.example", "started": "then"}')
    with pytest.raises(OutputDirError, match="pid 1 on elsewhere.example.*delete"):
        with claim_output_dir(out):
            pass


def test_lock_is_released_on_exceptions_and_ctrl_c(tmp_path):
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with claim_output_dir(tmp_path / "r"):
                assert read_lock(tmp_path / "r")["pid"] == os.getpid()
                assert read_lock(tmp_path / "r")["host"] == socket.gethostname()
                raise exc
        assert not (tmp_path / "r" / LOCK_NAME).exists()


def test_nested_claim_in_one_process_keeps_the_lock(tmp_path):
    with claim_output_dir(tmp_path / "r"):
        with claim_output_dir(tmp_path / "r"):  # the CLI claims, then the trainer inside it
            pass
        assert (tmp_path / "r" / LOCK_NAME).exists()
    assert not (tmp_path / "r" / LOCK_NAME).exists()


def test_eval_out_is_locked_too(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(["train", data, "--out", str(run), *TINY_TRAIN]) == 0
    res = tmp_path / "res"
    holder = _holder(res)
    try:
        rc = main(["eval", str(run / "last.pt"), "--id", data, "--ood", data, "--scorers", "msp", "--out", str(res)])
        err = capsys.readouterr().err
        assert rc == 1 and "--out" in err and f"pid {holder.pid}" in err
        assert not (res / "results.csv").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_bad_out_fails_before_any_work(tmp_path, data, capsys, monkeypatch, command):
    import ascood.data.datasets as D
    import ascood.scoring.evaluator as E

    blocked = tmp_path / "file"
    blocked.write_text("x")
    run = tmp_path / "run"
    if command == "eval":
        assert main(["train", data, "--out", str(run), *TINY_TRAIN]) == 0
        capsys.readouterr()
    # Any data read (train) or scoring (eval) after this point would be work done before the check.
    monkeypatch.setattr(D, "dataset_from_path", lambda *a, **k: pytest.fail("data read before --out was checked"))
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: pytest.fail("evaluated before --out was checked"))
    head = (["train", data] + TINY_TRAIN) if command == "train" else \
        ["eval", str(run / "last.pt"), "--id", data, "--ood", data, "--scorers", "msp"]
    for out, needle in ((blocked, "is an existing file"), ("/proc/ascood-no-such/out", "cannot create"),
                        ("/proc/self", "not writable")):
        rc = main([*head, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and f"--out {out}" in err and needle in err, err


def test_output_that_is_a_directory_is_refused(tmp_path, data, capsys):
    (tmp_path / "run" / "config.json").mkdir(parents=True)
    assert main(["train", data, "--out", str(tmp_path / "run"), *TINY_TRAIN]) == 1
    assert "config.json is a directory" in capsys.readouterr().err


def test_killed_write_leaves_a_temporary_that_the_next_run_removes(tmp_path, data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # A real atomic_save of a large checkpoint, killed (SIGKILL) while it writes the temp file.
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        import torch
        from ascood.training import checkpoint
        real = torch.save
        def slow_save(obj, f):
            f.write(b"x" * 1_000_000)
            f.flush()
            print("writing", flush=True)
            time.sleep(120)
        checkpoint.torch.save = slow_save
        checkpoint.atomic_save({{"w": torch.zeros(10)}}, {str(out / "last.pt")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = glob.glob(str(out / "last.pt.ascood.*.tmp"))
    assert len(left) == 1 and os.path.getsize(left[0]) == 1_000_000
    legacy = out / "log.jsonl.ab12cd_3.tmp"  # what earlier versions left behind
    legacy.write_text("partial")
    keep = out / "notes.tmp"  # not the atomic writer's: never touched
    keep.write_text("mine")
    assert main(["train", data, "--out", str(out), *TINY_TRAIN]) == 0
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    assert not glob.glob(str(out / "*.ascood.*.tmp")) and not legacy.exists()
    assert keep.read_text() == "mine" and (out / "last.pt").is_file()


def test_failed_write_removes_its_temporary(tmp_path):
    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "last.pt", boom)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt_mod.atomic_save({"a": torch.zeros(2)}, tmp_path / "last.pt")
        ckpt_mod.write_json({"a": 1}, tmp_path / "config.json")
        ckpt_mod.atomic_write_text("x\n", tmp_path / "log.jsonl")
        assert ckpt_mod.current_umask() == umask
    finally:
        os.umask(old)
    for name in ("last.pt", "config.json", "log.jsonl"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    def save_on_full_disk(obj, f):
        # What torch.save does on a full disk: the file's OSError surfaces wrapped in a RuntimeError.
        try:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt_mod.torch, "save", save_on_full_disk)
    target = tmp_path / "last.pt"
    with pytest.raises(OSError) as e:
        ckpt_mod.atomic_save({"a": 1}, target)
    assert e.value.errno == errno.ENOSPC and f"no space left writing {target}" in str(e.value)
    assert os.listdir(tmp_path) == []
