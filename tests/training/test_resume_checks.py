"""Resume trains exactly what the checkpoint records: every changed hyperparameter is refused (with a list
of what changed), the CLI's `--resume` alone continues with the saved settings, and the messages around
checkpoints name the real problem."""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.training.checkpoint import load_checkpoint, load_model
from ascood.apps.main import main
from ascood.training.trainer import NonFiniteLossError, TrainConfig, Trainer
from clihelpers import TINY_TRAIN, make_class_tree, tree_hashes


def _data(n=24, classes=3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float(), y)


def _loader(ds, batch=8):
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


def _model(classes=3):
    torch.manual_seed(0)
    return ascood.build_model("small_cnn", classes, width=4)


BASE = dict(epochs=3, ood_type="gradient", p_inv=0.2, alpha_min=0.5, alpha_max=1.0, alpha_mode="relative", w=1.0,
            lr=0.05, seed=0)


@pytest.fixture
def saved(tmp_path):
    """A run stopped after its first of three epochs."""
    def stop(trainer, metrics):
        raise KeyboardInterrupt

    tr = Trainer(_model(), _loader(_data()), TrainConfig(**BASE), out_dir=tmp_path, progress=False, callbacks=[stop])
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    return tmp_path


CHANGES = [("lr", 0.01), ("p_inv", 0.3), ("w", 2.0), ("alpha_max", 2.0), ("alpha_min", 0.1), ("seed", 5),
           ("momentum", 0.8), ("weight_decay", 0.0), ("ood_type", "shuffle"), ("alpha_mode", "absolute"),
           ("epochs", 4), ("fc_lr_factor", 0.5), ("nesterov", False), ("saliency_mode", "train")]


@pytest.mark.parametrize("name,value", CHANGES)
def test_each_changed_hyperparameter_is_refused(saved, name, value):
    cfg = TrainConfig(**{**BASE, name: value})
    with pytest.raises(ValueError) as e:
        Trainer(_model(), _loader(_data()), cfg, out_dir=saved, resume=saved, progress=False)
    msg = str(e.value)
    assert f"{name}: {BASE.get(name, getattr(TrainConfig(), name))!r} -> {value!r}" in msg
    assert "another output directory (--out)" in msg


def test_all_changes_are_listed_at_once(saved):
    cfg = TrainConfig(**{**BASE, "lr": 0.01, "w": 3.0, "seed": 1})
    with pytest.raises(ValueError) as e:
        Trainer(_model(), _loader(_data()), cfg, resume=saved, progress=False)
    listed = str(e.value).split("saved there (")[1].split(")")[0].split(", ")
    assert sorted(listed) == ["lr: 0.05 -> 0.01", "seed: 0 -> 1", "w: 1.0 -> 3.0"]


def test_batches_per_epoch_and_model_are_checked(saved):
    with pytest.raises(ValueError, match=r"batches per epoch .*: 3 -> 2"):
        Trainer(_model(), _loader(_data(), batch=12), TrainConfig(**BASE), resume=saved, progress=False)
    with pytest.raises(ValueError, match=r"model num_classes: 3 -> 4"):
        Trainer(_model(4), _loader(_data()), TrainConfig(**BASE), resume=saved, progress=False)


def test_same_settings_resume(saved):
    tr = Trainer(_model(), _loader(_data()), TrainConfig(**BASE), out_dir=saved, resume=saved, progress=False)
    assert tr.epoch == 1
    tr.fit()
    assert load_checkpoint(saved / "last.pt")["epoch"] == 3


def test_state_dict_mismatch_says_what_differs(saved, tmp_path):
    ck = load_checkpoint(saved / "last.pt")
    ck["model_build"]["width"] = 8  # the weights are width 4: a rebuilt model cannot take them
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError) as e:
        load_model(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "does not fit this model" in msg and "shape mismatch" in msg and "in the checkpoint vs" in msg
    assert len(msg.splitlines()) == 1


def test_text_file_as_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("101 not a checkpoint\n")
    with pytest.raises(RuntimeError, match="is not a torch checkpoint file"):
        load_checkpoint(tmp_path / "notes.txt")


def test_non_finite_loss_without_a_checkpoint_says_none_was_written(tmp_path):
    ds = _data(16)
    ds.tensors[0][:] = float("nan")
    tr = Trainer(_model(), _loader(ds), TrainConfig(**BASE), out_dir=tmp_path / "run", progress=False)
    with pytest.raises(NonFiniteLossError) as e:
        tr.fit()
    assert "no checkpoint was written yet" in str(e.value) and "last.pt" not in str(e.value)


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    return make_class_tree(tmp_path_factory.mktemp("cli") / "train")


FLAGS = ["--epochs", "2", "--batch-size", "4", "--image-size", "8", "--width", "4", "--alpha-mode", "relative",
         "--alpha-max", "1", "--alpha-min", "0.5", "--lr", "0.03", "--p-inv", "0.2", "--w", "2", "--seed", "3",
         "--no-progress", "--no-figures"]


def test_cli_resume_without_flags_continues_the_saved_run(tmp_path, cli_data, monkeypatch, capsys):
    full = tmp_path / "full"
    assert main(["train", cli_data, "--out", str(full), *FLAGS]) == 0
    real_save = Trainer.save

    def save_then_kill(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(Trainer, "save", save_then_kill)
    assert main(["train", cli_data, "--out", str(part), *FLAGS]) == 130
    monkeypatch.setattr(Trainer, "save", real_save)
    assert load_checkpoint(part / "last.pt")["epoch"] == 1
    capsys.readouterr()
    # No hyperparameter flags: every one comes from the checkpoint.
    assert main(["train", cli_data, "--out", str(part), "--resume", "--no-progress", "--no-figures"]) == 0
    assert "saved settings" in capsys.readouterr().err
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
    assert b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # the same run as the uninterrupted one
    ca, cb = json.load(open(full / "config.json")), json.load(open(part / "config.json"))
    assert ca["train_config"] == cb["train_config"] and ca["model_build"] == cb["model_build"]
    assert cb["train_config"]["lr"] == 0.03 and cb["extra"]["batch_size"] == 4


def test_cli_resume_with_a_changed_flag_is_refused_and_changes_nothing(tmp_path, cli_data, capsys):
    out = tmp_path / "run"
    assert main(["train", cli_data, "--out", str(out), *FLAGS]) == 0
    before = tree_hashes(out)
    capsys.readouterr()
    rc = main(["train", cli_data, "--out", str(out), "--resume", "--lr", "0.1", "--w", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "(lr: 0.03 -> 0.1)" in err  # --w 2 equals the saved value: not listed
    assert "another output directory (--out)" in err and "Traceback" not in err
    assert tree_hashes(out) == before


def test_cli_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("training epochs (default 100", "SGD learning rate (default 0.1", "(default 300.0",
                   "(default 30.0"):
        assert needle in out, needle
