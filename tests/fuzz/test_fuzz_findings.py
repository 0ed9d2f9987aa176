"""The smallest examples the fuzzers found, kept as plain tests (each failed before its fix; docs/FUZZING.md)."""
from __future__ import annotations

import io
import os

import pytest
import torch

from ascood.data.openood import _LineNamedDataset, read_image_list
from ascood.training.checkpoint import CheckpointError, load_model
from ascood.training.trainer import TrainConfig, Trainer
from test_fuzz_checkpoints import BASE, _loader, _model, run  # noqa: F401 (run: a fixture)
from test_fuzz_image_lists import BAD_IMAGE, root  # noqa: F401 (root: a fixture)


def test_openood_list_check_reports_a_non_utf8_list(root):  # noqa: F811
    path = os.path.join(root, "latin1.txt")
    with open(path, "wb") as f:
        f.write(b"\xe1.png 0\n")
    check = read_image_list(path, os.path.join(root, "images"), None)
    assert check.entries == 0 and len(check.errors) == 1
    assert check.errors[0].startswith(f"{path} is not a text image list")


@pytest.mark.parametrize("brk", ["\x0b", "\x0c", "\u2028"])
def test_openood_read_error_names_the_line_across_odd_line_breaks(root, brk):  # noqa: F811
    path = os.path.join(root, "odd-breaks.txt")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(brk.join(["a.png 0", "a.png 1", f"{BAD_IMAGE} 2"]) + "\n")
    ds = _LineNamedDataset(path, os.path.join(root, "images"), None)
    with pytest.raises(Exception, match=rf"{path}:3: cannot read image"):
        ds[2]


def _edited(run, tmp_path, change) -> str:  # noqa: F811
    ckpt = torch.load(io.BytesIO(run[1]), weights_only=True)
    change(ckpt)
    path = str(tmp_path / "edited.pt")
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("build", [[], {"name": "small_cnn"}, {"name": "nope", "num_classes": 3},
                                   {"name": "small_cnn", "num_classes": 3, "colour": 1}])
def test_load_model_names_the_file_for_a_bad_build_record(run, tmp_path, build):  # noqa: F811
    path = _edited(run, tmp_path, lambda c: c.update(model_build=build))
    with pytest.raises(CheckpointError, match=path):
        load_model(path)


def test_load_model_names_the_file_for_weights_that_are_not_a_state_dict(run, tmp_path):  # noqa: F811
    path = _edited(run, tmp_path, lambda c: c.update(model=[1, 2]))
    with pytest.raises(CheckpointError, match=path):
        load_model(path)


def _delete_weight_decay(c):
    del c["optimizer"]["param_groups"][0]["weight_decay"]


def _scalar_momentum(c):
    c["optimizer"]["state"][0]["momentum_buffer"] = torch.tensor(0.0)


def _numpy_rng_overflow(c):
    c["rng"]["numpy"][1] = [5035388871541835] * 624


def _scheduler_base_lrs(c):
    c["scheduler"]["base_lrs"] = torch.tensor(0.0)


@pytest.mark.parametrize("change", [
    lambda c: c.pop("optimizer"), lambda c: c.pop("scheduler"), lambda c: c["rng"].pop("torch"),
    lambda c: c.update(epoch=0.0), lambda c: c.update(epoch=99), lambda c: c.update(history="abc"),
    _delete_weight_decay, _scalar_momentum, _numpy_rng_overflow, _scheduler_base_lrs,
    lambda c: c["optimizer"]["param_groups"].append(dict(c["optimizer"]["param_groups"][0])),
])
def test_resume_names_the_file_for_a_malformed_training_state(run, tmp_path, change):  # noqa: F811
    path = _edited(run, tmp_path, change)
    numpy_state = __import__("numpy").random.get_state()[1].copy()
    with pytest.raises(CheckpointError, match=rf"cannot resume {path}: its .* is malformed"):
        Trainer(_model(), _loader(), TrainConfig(**BASE), resume=path, progress=False)
    # a state that failed half-way is undone: numpy's global RNG is the one from before
    assert (__import__("numpy").random.get_state()[1] == numpy_state).all()
