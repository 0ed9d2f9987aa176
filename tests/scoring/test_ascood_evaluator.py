"""evaluate(): groups and means, scores computed once, table writers and convention label."""
import csv
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.scoring.metrics import ood_metrics
from ascood.scoring.scorers import MSP, Scorer


class FirstPixel(Scorer):
    """Score = x[:, 0, 0, 0]; counts how many samples it scored."""

    name = "first"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score(self, model, x):
        self.calls += x.shape[0]
        return model(x).argmax(1), x[:, 0, 0, 0].float()


def loader_with_first(values, labels=None):
    x = torch.zeros(len(values), 3, 8, 8)
    x[:, 0, 0, 0] = torch.tensor(values, dtype=torch.float32)
    y = torch.tensor(labels if labels is not None else [-1] * len(values))
    return DataLoader(TensorDataset(x, y), batch_size=3)


def test_groups_means_and_single_pass(tmp_path):
    model = ascood.build_model("small_cnn", 3, width=4).eval()
    id_vals = [0.9, 0.8, 0.7, 0.6]
    sets = {"a": [0.85, 0.5, 0.4, 0.3], "b": [0.1, 0.2], "c": [0.95, 0.0]}
    id_loader = loader_with_first(id_vals, [0, 1, 2, 0])
    ood = {"near": {"a": loader_with_first(sets["a"])}, "far": {"b": loader_with_first(sets["b"]),
                                                                "c": loader_with_first(sets["c"])}}
    scorer = FirstPixel()
    table = ascood.evaluate(model, id_loader, ood, scorers=[scorer, MSP()])
    assert scorer.calls == 4 + 4 + 2 + 2  # ID scored once, each OOD set once
    for name, vals in sets.items():
        ref = ood_metrics(id_vals, vals)
        for k, v in ref.items():
            assert table.get("first", name, k) == pytest.approx(100 * v)
    far_mean = np.mean([100 * ood_metrics(id_vals, sets[n])["auroc"] for n in "bc"])
    assert table.get("first", "far mean", "auroc") == pytest.approx(far_mean)
    assert [r["dataset"] for r in table.rows if r["scorer"] == "first"] == ["a", "near mean", "b", "c", "far mean"]
    acc = 100 * float((model(id_loader.dataset.tensors[0]).argmax(1) == torch.tensor([0, 1, 2, 0])).float().mean())
    assert table.get("msp", "a", "id_acc") == pytest.approx(acc)
    text = str(table)
    assert "OpenOOD convention" in text and "FPR@95" in text
    assert len({len(line) for line in text.splitlines()[1:3]}) == 1  # header and rule aligned
    table.to_csv(tmp_path / "r.csv")
    table.to_json(tmp_path / "r.json")
    lines = open(tmp_path / "r.csv").read().splitlines()
    assert lines[0].startswith("# OpenOOD convention")
    rows = list(csv.DictReader(lines[1:]))
    assert len(rows) == len(table.rows) and float(rows[0]["auroc"]) == pytest.approx(table.rows[0]["auroc"])
    js = json.load(open(tmp_path / "r.json"))
    assert js["convention"] == "openood" and js["scale"] == 100 and len(js["rows"]) == len(table.rows)


def test_odin_convention_and_errors():
    model = ascood.build_model("small_cnn", 3, width=4).eval()
    id_loader = loader_with_first([0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])
    t = ascood.evaluate(model, id_loader, {"a": loader_with_first([0.85, 0.5, 0.4, 0.3])}, scorers=[FirstPixel()],
                        convention="odin")
    assert t.get("first", "a", "fpr95") == pytest.approx(25.0) and "ODIN convention" in str(t)
    with pytest.raises(ValueError, match="id_train_loader"):
        ascood.evaluate(model, id_loader, {"a": id_loader}, scorers=["knn"])
    with pytest.raises(ValueError, match="unique"):
        ascood.evaluate(model, id_loader, {"g": {"a": id_loader}, "a": id_loader})
