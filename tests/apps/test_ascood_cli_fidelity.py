"""CLI side of issue 11: defaults stated in --help, --val / best.pt and eval's checkpoint choice,
normalisation source (ImageNet with --weights, estimated from scratch), ablation flags."""
import json
import os
from functools import partial

import numpy as np
import pytest
import torch

import ascood
from ascood.training.checkpoint import load_checkpoint
from ascood.apps.main import main
from ascood.training.model_selection import resolve_checkpoint
from ascood.data.normalization import IMAGENET_MEAN, IMAGENET_STD, choose_normalization
from clihelpers import write_images

_images = partial(write_images, size=10)  # same tiny image folders as the CLI's end-to-end test


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for split, seed in (("train", 0), ("val", 2), ("test", 1)):
        _images(root / split / "red", 6, (220, 30, 30), seed=seed)
        _images(root / split / "green", 6, (30, 220, 30), seed=seed + 10)
    _images(root / "ood", 6, (128, 128, 128), seed=5)
    return root


TRAIN = ["--epochs", "2", "--batch-size", "6", "--image-size", "10", "--width", "4", "--alpha-max", "1",
         "--alpha-min", "0.5", "--lr", "0.05", "--no-progress", "--no-figures"]


def test_train_help_states_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("default 1e-6", "paper's numbers are fp32", "Table 5", "Table 6", "Sec. D.3", "--no-sync-bn",
                   "exp(G_c)", "best.pt", "ImageNet", "last epoch uses exactly alpha_min", "Liu et al"):
        assert needle in text, needle


def test_val_best_checkpoint_and_eval_choice(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(data / "train"), "--val", str(data / "val"), "--out", str(out), *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert "estimated from the training data" in printed and "best checkpoint:" in printed
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all("val_acc" in r for r in log)
    best = load_checkpoint(out / "best.pt")
    accs = [r["val_acc"] for r in log]
    assert best["epoch"] == len(accs) - int(np.argmax(accs[::-1]))  # the latest epoch with the best val acc
    assert best["extra"]["normalization"]["source"] == "estimated"
    assert best["model_build"]["input_std"] == pytest.approx(best["extra"]["normalization"]["std"])
    assert resolve_checkpoint(out) == str(out / "best.pt")
    assert resolve_checkpoint(out, "last") == str(out / "last.pt")
    ev = ["--id", str(data / "test"), "--far", f"grey={data / 'ood'}", "--scorers", "msp,odin,react",
          "--val", str(data / "val"), "--batch-size", "6"]
    assert main(["eval", str(out), *ev]) == 0
    assert f"scoring checkpoint {out / 'best.pt'}" in capsys.readouterr().out
    assert main(["eval", str(out), "--which", "last", *ev]) == 0
    assert f"scoring checkpoint {out / 'last.pt'}" in capsys.readouterr().out
    assert main(["eval", str(out / "last.pt"), "--which", "best", *ev]) == 2
    assert "--which best needs a run directory" in capsys.readouterr().err
    # react without ID validation data: told to pass --val.
    assert main(["eval", str(out), "--id", str(data / "test"), "--far", f"grey={data / 'ood'}",
                 "--scorers", "react"]) == 2
    assert "--val" in capsys.readouterr().err


def test_pretrained_weights_get_imagenet_statistics(data, tmp_path, capsys):
    torch.manual_seed(0)
    src = ascood.build_model("small_cnn", 2, width=4)
    weights = tmp_path / "w.pt"
    torch.save(src.state_dict(), weights)
    out = tmp_path / "ft"
    assert main(["train", str(data / "train"), "--weights", str(weights), "--out", str(out), *TRAIN]) == 0
    assert "ImageNet statistics" in capsys.readouterr().out
    ck = load_checkpoint(out / "last.pt")
    assert ck["extra"]["normalization"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                            "source": "imagenet"}
    assert ck["model_build"]["input_mean"] == pytest.approx(IMAGENET_MEAN)


def test_choose_normalization_rules():
    never = lambda: pytest.fail("must not estimate")  # noqa: E731
    assert choose_normalization(3, mean=[0.1] * 3, std=[0.2] * 3, pretrained=True, estimate=never)["source"] == "given"
    assert choose_normalization(3, pretrained=True, estimate=never)["std"] == list(IMAGENET_STD)
    est = choose_normalization(3, estimate=lambda: ([0.3] * 3, [0.4] * 3))
    assert est == {"mean": [0.3] * 3, "std": [0.4] * 3, "source": "estimated"}
    with pytest.raises(ValueError, match="together"):
        choose_normalization(3, mean=[0.1] * 3)
    with pytest.raises(ValueError, match="3 values"):
        choose_normalization(3, mean=[0.1], std=[0.2])


def test_ablation_flags(data, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["train", str(data / "train"), "--out", str(out), *TRAIN[:-4], "--alpha-max", "-1", "--alpha-min",
            "-0.5", "--head", "l2", "--outlier-loss", "energy", "--saliency-target", "prob", "--min-lr", "1e-4",
            "--no-progress", "--no-figures", "--no-sync-bn"]
    assert main(args) == 0
    cfg = json.load(open(out / "config.json"))
    tc = cfg["train_config"]
    assert (tc["alpha_max"], tc["alpha_min"], tc["outlier_loss"], tc["saliency_target"], tc["min_lr"],
            tc["sync_bn"], tc["amp"]) == (-1.0, -0.5, "energy", "prob", 1e-4, False, False)
    assert cfg["model_build"]["head"] == "l2"
    capsys.readouterr()
    assert main(["train", str(data / "train"), "--out", str(tmp_path / "bad"), "--alpha-max", "300",
                 "--alpha-min", "-30"]) == 2
    assert "same sign" in capsys.readouterr().err
