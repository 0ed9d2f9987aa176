"""``ascood.evaluate``: scores once per (model, dataset, scorer), metrics per OOD set, group means.

    table = ascood.evaluate(model, id_test_loader,
                            {"near": {"cifar100": l1, "tin": l2}, "far": {"svhn": l3}},
                            scorers=["msp", "scale", "react", ascood.scoring.scorers.KNN(K=50)],
                            id_train_loader=train_loader,   # KNN, MDS, ViM, ... fit here
                            id_val_loader=val_loader)       # ReAct, TempScale fit here (as OpenOOD)
    print(table); table.to_csv("results.csv"); table.to_json("results.json")
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..files import atomic_write_text
from .metrics import CONVENTION_TEXT, CONVENTIONS, ood_metrics
from .scorers import MSP, FeatureCache, Scorer, get_scorer, loader_scores
from .scorers.sweep import fit_scorer

__all__ = ["evaluate", "ResultTable", "ScoreCache", "flatten_ood_loaders", "DEFAULT_SCORERS"]

DEFAULT_SCORERS = ("msp", "mls", "ebo")
METRIC_KEYS = ("fpr95", "auroc", "aupr_in", "aupr_out")
HEADERS = {"model": "model", "scorer": "scorer", "group": "group", "dataset": "dataset", "fpr95": "FPR@95",
           "auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "id_acc": "ID-Acc",
           "scorer_id_acc": "Scorer-ID-Acc"}
#: The clean forward's ID accuracy is computed once per evaluation under this cache key (or reused from "msp").
CLEAN_KEY = "__clean_forward__"


def flatten_ood_loaders(ood_loaders: Mapping) -> list[tuple[str | None, str, object]]:
    """{"a": loader} or {"near": {"a": loader}, ...} -> [(group or None, name, loader), ...]."""
    if not isinstance(ood_loaders, Mapping) or not ood_loaders:
        raise ValueError("ood_loaders must be a non-empty dict of name -> loader (or group -> {name: loader})")
    out = []
    for key, value in ood_loaders.items():
        if isinstance(value, Mapping):
            if not value:
                raise ValueError(f"OOD group {key!r} is empty")
            out.extend((str(key), str(name), loader) for name, loader in value.items())
        else:
            out.append((None, str(key), value))
    names = [n for _, n, _ in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"OOD set names must be unique, repeated: {sorted(dupes)}")
    return out


class ScoreCache:
    """(scorer key, dataset name) -> (pred, score, label); each pair is computed once.

    ``features``: the :class:`~ascood.scoring.scorers.FeatureCache` the scores
    are computed from (one model pass per split for every feature scorer).
    """

    def __init__(self, features: FeatureCache | None = None) -> None:
        self._data: dict[tuple[str, str], tuple] = {}
        self.features = features

    def get(self, scorer_key: str, scorer: Scorer, model: nn.Module, dataset: str, loader):
        key = (scorer_key, dataset)
        if key not in self._data:
            if self.features is None:
                self.features = FeatureCache(model)
            try:
                self._data[key] = loader_scores(scorer, model, loader, self.features)
            except ValueError as err:
                if str(err) == "loader is empty":  # say which set
                    raise ValueError(f"{'ID test' if dataset == 'ID' else 'OOD'} set {dataset!r} yields no "
                                     "batches (its loader is empty)") from None
                raise
        return self._data[key]

    def scores(self, scorer_key: str, dataset: str) -> np.ndarray:
        return self._data[(scorer_key, dataset)][1].numpy()

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class ResultTable:
    """Evaluation rows (metrics x100) with aligned printing and CSV/JSON writers.

    ``rows``: dicts with model, scorer, group, dataset, fpr95, auroc, aupr_in,
    aupr_out, id_acc, scorer_id_acc; group-mean rows have dataset "<group>
    mean" (or "mean"). ``id_acc`` is the accuracy of the model's clean
    forward on ID test, the same for every scorer (OpenOOD's ACC);
    ``scorer_id_acc`` that of the scorer's own prediction (ODIN / i-ODIN
    predict on the perturbed input, so theirs can differ).
    ``scores``: {scorer: {dataset: np.ndarray}} raw scores, ID set under "ID".
    """

    rows: list[dict]
    convention: str
    scores: dict = field(default_factory=dict)
    id_name: str = "ID"

    @property
    def convention_text(self) -> str:
        return CONVENTION_TEXT[self.convention]

    def get(self, scorer: str, dataset: str, metric: str) -> float:
        for r in self.rows:
            if r["scorer"] == scorer and r["dataset"] == dataset:
                return r[metric]
        raise KeyError(f"no row for scorer={scorer!r}, dataset={dataset!r}")

    def to_csv(self, path: str | os.PathLike) -> None:
        """CSV with one row per (scorer, OOD set / group mean); a comment line names the convention."""
        f = io.StringIO(newline="")
        f.write(f"# {self.convention_text}; metrics x100\n")
        writer = csv.DictWriter(f, fieldnames=list(HEADERS))
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in HEADERS})
        atomic_write_text(f.getvalue(), path)

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(json.dumps({"convention": self.convention, "convention_text": self.convention_text,
                                      "scale": 100, "rows": self.rows}, indent=2), path)

    def format(self) -> str:
        """Aligned text table; the first line names the convention."""
        # The scorer's own-prediction accuracy is shown only where it differs from the clean one (ODIN, i-ODIN).
        cols = [k for k in HEADERS if (k != "model" or any(r.get("model") for r in self.rows))
                and (k != "scorer_id_acc" or any(r.get(k) != r.get("id_acc") for r in self.rows))]
        cells = [[HEADERS[c] for c in cols]]
        for r in self.rows:
            cells.append([f"{r[c]:.2f}" if isinstance(r.get(c), float)
                          else ("n/a" if c in ("id_acc", "scorer_id_acc") else "") if r.get(c) is None else str(r[c])
                          for c in cols])
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        numeric = {c for c in cols if c in METRIC_KEYS or c in ("id_acc", "scorer_id_acc")}
        lines = [f"[{self.convention_text}; metrics x100]"]
        for j, row in enumerate(cells):
            parts = [cell.rjust(w) if cols[i] in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(parts).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _resolve_scorers(scorers) -> list[tuple[str, Scorer]]:
    if scorers is None:
        scorers = DEFAULT_SCORERS
    if isinstance(scorers, (str, Scorer)):
        scorers = [scorers]
    if isinstance(scorers, Mapping):
        items = [(str(k), v if isinstance(v, Scorer) else get_scorer(v)) for k, v in scorers.items()]
    else:
        items = []
        for s in scorers:
            obj = get_scorer(s) if isinstance(s, str) else s
            if not isinstance(obj, Scorer):
                raise TypeError(f"scorers must be names or Scorer instances, got {type(obj).__name__}")
            items.append((obj.name, obj))
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"scorer names must be unique (pass a dict name -> scorer to use one twice): {keys}")
    return items


def _accuracy(pred: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    """Accuracy x100 over the labelled ID samples only; unlabelled ID data (label -1) gives None (n/a), not 0."""
    if labels is None:
        return None
    labelled = labels >= 0
    if not bool(labelled.any()):
        return None
    return float((pred[labelled] == labels[labelled]).double().mean() * 100)


@torch.no_grad()
def evaluate(model: nn.Module, id_loader, ood_loaders: Mapping, scorers: Sequence | Mapping | None = None,
             id_train_loader=None, *, id_val_loader=None, convention: str = "openood",
             model_name: str | None = None, cache: ScoreCache | None = None,
             features: FeatureCache | None = None) -> ResultTable:
    """Evaluate OOD detection of ``model`` with each scorer.

    Args:
        model: the classifier (put in eval mode here).
        id_loader: ID test loader, (x, y) batches (labels give ID accuracy).
        ood_loaders: {name: loader} or {group: {name: loader}} (e.g. "near"/"far");
            group means are added per group (one "mean" row for ungrouped sets
            when there are several).
        scorers: names (see :data:`ascood.scoring.scorers.SCORERS`), Scorer instances,
            or a dict label -> scorer; default MSP, MLS, EBO.
        id_train_loader: ID training data for scorers that fit statistics
            (KNN, MDS, ViM, ...); an error names the scorer if it is missing.
        id_val_loader: ID validation data for the scorers OpenOOD fits there
            (ReAct's clip percentile, TempScale's T; ``fit_split == "val"``).
        convention: "openood" (default, the paper's) or "odin".
        model_name: optional label stored in every row.
        cache: a :class:`ScoreCache` to share scores across calls.
        features: a :class:`~ascood.scoring.scorers.FeatureCache` shared with
            :func:`~ascood.scoring.scorers.sweep` (each split then runs through
            the model once for all scorers); default: one for this call. Any
            loader may also be a :class:`~ascood.scoring.scorers.Features` record.

    Returns:
        :class:`ResultTable` (metrics x100).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    items = _resolve_scorers(scorers)
    sets = flatten_ood_loaders(ood_loaders)
    if any(name == "ID" for _, name, _ in sets):
        raise ValueError("'ID' is reserved for the ID test set; rename that OOD set")
    cache = cache if cache is not None else ScoreCache(features)
    if cache.features is None:
        cache.features = features if features is not None else FeatureCache(model)
    if model is not None:
        model.eval()
    # OpenOOD's ACC is always the clean forward's argmax, whatever the scorer: one pass (MSP's, which is
    # argmax z(x)), shared with an "msp" scorer of this evaluation when there is one.
    clean_key = next((k for k, s in items if type(s) is MSP), CLEAN_KEY)
    clean_pred, _, clean_labels = cache.get(clean_key, MSP(), model, "ID", id_loader)
    clean_acc = _accuracy(clean_pred, clean_labels)
    rows: list[dict] = []
    raw_scores: dict = {}
    for key, scorer in items:
        if scorer.needs_fit and not scorer.fitted:
            fit_data = scorer.fit_loader(id_train_loader, id_val_loader)
            with torch.enable_grad():
                fit_scorer(scorer, model, fit_data, cache.features)
        pred, s_id, labels = cache.get(key, scorer, model, "ID", id_loader)
        acc, own_acc = clean_acc, _accuracy(pred, labels)
        raw_scores[key] = {"ID": s_id.numpy()}
        per_group: dict[str | None, list[dict]] = {}  # insertion order = order of first appearance
        for group, name, loader in sets:
            _, s_ood, _ = cache.get(key, scorer, model, name, loader)
            raw_scores[key][name] = s_ood.numpy()
            m = {k: v * 100 for k, v in ood_metrics(s_id, s_ood, convention).items()}
            per_group.setdefault(group, []).append(
                {"model": model_name, "scorer": key, "group": group, "dataset": name, **m, "id_acc": acc,
                 "scorer_id_acc": own_acc})
        for group, group_rows in per_group.items():
            rows.extend(group_rows)
            if group is None and len(group_rows) < 2:
                continue
            mean = {k: float(np.mean([r[k] for r in group_rows])) for k in METRIC_KEYS}
            rows.append({"model": model_name, "scorer": key, "group": group,
                         "dataset": f"{group} mean" if group else "mean", **mean, "id_acc": acc,
                         "scorer_id_acc": own_acc})
    return ResultTable(rows, convention, raw_scores)
