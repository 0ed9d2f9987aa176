"""OpenOOD's "APS" mode: pick a scorer's hyperparameters by AUROC on a validation ID/OOD split.

Never pass the test split here: the point of APS is that the hyperparameters
are chosen without looking at the sets the final numbers are reported on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..metrics import ood_metrics
from .base import Scorer, iterate_loader, model_device

__all__ = ["SweepResult", "sweep", "loader_scores"]


@dataclass
class SweepResult:
    """Best hyperparameters, their validation AUROC (fraction), and every trial (params, auroc)."""

    best_params: dict
    best_auroc: float
    trials: list[tuple[dict, float]] = field(default_factory=list)


def loader_scores(scorer: Scorer, model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pred, score, label) of a whole loader on the CPU; label None when the loader has none."""
    device = model_device(model)
    preds, scores, labels = [], [], []
    model.eval()
    for x, y in iterate_loader(loader, device):
        pred, score = scorer.score(model, x)
        preds.append(pred.detach().cpu())
        scores.append(score.detach().float().cpu())
        if y is not None:
            labels.append(y.long().cpu())
    if not scores:
        raise ValueError("loader is empty")
    return torch.cat(preds), torch.cat(scores), (torch.cat(labels) if labels else None)


def sweep(scorer: Scorer, model: nn.Module, val_id_loader, val_ood_loader, *, grid: dict[str, list] | None = None,
          id_train_loader=None, id_val_loader=None) -> SweepResult:
    """Try every combination of ``grid`` (default: the scorer's ``default_grid``); keep the best.

    Scorers that fit statistics fit on ``id_train_loader`` or, for those
    fitted on ID validation data (``fit_split == "val"``: ReAct, TempScale),
    on ``id_val_loader`` (default: ``val_id_loader``, the APS ID split, which
    is OpenOOD's ID val). The scorer is left set to the best combination (and
    fitted for it). Ties keep the earlier combination. Returns a
    :class:`SweepResult`.
    """
    if id_val_loader is None:
        id_val_loader = val_id_loader
    if grid is not None:
        saved, scorer.default_grid = scorer.default_grid, grid
        combos = scorer.grid()
        scorer.default_grid = saved
    else:
        combos = scorer.grid()
    if not combos or combos == [{}]:
        raise ValueError(f"{scorer.name} has no hyperparameters to sweep")
    trials, best = [], None
    rejected: list[str] = []  # why each skipped combination was invalid (for the error if none is valid)
    for params in combos:
        try:
            scorer.set_params(**params)
        except ValueError as err:
            rejected.append(f"{params}: {err}")
            continue  # e.g. ViM dim >= feature size: not a valid point of this grid
        if scorer.needs_fit and not scorer.fitted:
            fit_data = scorer.fit_loader(id_train_loader, id_val_loader)
            try:
                with torch.enable_grad():
                    scorer.fit(model, fit_data)
            except ValueError as err:
                rejected.append(f"{params}: {err}")
                continue
        try:
            _, s_id, _ = loader_scores(scorer, model, val_id_loader)
            _, s_ood, _ = loader_scores(scorer, model, val_ood_loader)
        except ValueError as err:
            rejected.append(f"{params}: {err}")
            continue  # e.g. K larger than the bank
        auroc = ood_metrics(s_id, s_ood)["auroc"]
        trials.append((dict(params), auroc))
        if best is None or auroc > best[1]:
            best = (dict(params), auroc)
    if best is None:
        shown = "; ".join(rejected[:3]) + (f"; ... ({len(rejected) - 3} more)" if len(rejected) > 3 else "")
        raise ValueError(f"no valid hyperparameter combination for {scorer.name} among {len(combos)}: {shown}")
    scorer.set_params(**best[0])
    if scorer.needs_fit and not scorer.fitted:
        with torch.enable_grad():
            scorer.fit(model, scorer.fit_loader(id_train_loader, id_val_loader))
    return SweepResult(best[0], best[1], trials)
