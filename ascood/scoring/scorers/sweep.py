"""OpenOOD's "APS" mode: pick a scorer's hyperparameters by AUROC on a validation ID/OOD split.

Never pass the test split here: the point of APS is that the hyperparameters
are chosen without looking at the sets the final numbers are reported on.

Each split is run through the model once (:class:`~.features.FeatureCache`)
and every grid point fits and scores from those features; only scorers that
need the images (ODIN, i-ODIN) run the model per grid point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..metrics import ood_metrics
from .base import Scorer
from .features import FeatureCache, Features, model_image_scores

__all__ = ["SweepResult", "sweep", "loader_scores", "fit_scorer"]


@dataclass
class SweepResult:
    """Best hyperparameters, their validation AUROC (fraction), and every trial (params, auroc)."""

    best_params: dict
    best_auroc: float
    trials: list[tuple[dict, float]] = field(default_factory=list)


def loader_scores(scorer: Scorer, model: nn.Module | None, loader, cache: FeatureCache | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pred, score, label) of a whole loader (or :class:`~.features.Features` record) on the CPU.

    A scorer that works on features scores the split's cached features
    (extracted through ``cache``, or once here without one); the others run
    the model batch by batch. label is None when the loader has none.
    """
    if scorer.supports_features:
        cache = cache if cache is not None else FeatureCache(model)
        return cache.record_scores(scorer, cache.get(loader, scorer.record_extras()))
    if isinstance(loader, Features):
        raise TypeError(f"{scorer.name} needs the model and the images: pass a loader, not cached Features")
    if cache is not None:
        return cache.image_scores(scorer, model, loader)  # a sharded cache shares the batches over ranks
    return model_image_scores(scorer, model, loader)


def fit_scorer(scorer: Scorer, model: nn.Module | None, data, cache: FeatureCache | None = None) -> Scorer:
    """Fit ``scorer`` on a loader or record: from the (cached) features, or ``fit(model, data)`` for a
    subclass that implements only that."""
    if type(scorer).fit is not Scorer.fit and type(scorer)._fit is Scorer._fit:
        if isinstance(data, Features):
            raise TypeError(f"{type(scorer).__name__} implements fit(model, loader) only: pass a loader")
        return scorer.fit(model, data)
    cache = cache if cache is not None else FeatureCache(model)
    return scorer.fit_features(cache.get(data, scorer.record_extras()))


def sweep(scorer: Scorer, model: nn.Module | None, val_id_loader, val_ood_loader, *,
          grid: dict[str, list] | None = None, id_train_loader=None, id_val_loader=None,
          cache: FeatureCache | None = None) -> SweepResult:
    """Try every combination of ``grid`` (default: the scorer's ``default_grid``); keep the best.

    Scorers that fit statistics fit on ``id_train_loader`` or, for those
    fitted on ID validation data (``fit_split == "val"``: ReAct, TempScale,
    KL-Matching), on ``id_val_loader`` (default: ``val_id_loader``, the APS ID
    split, which is OpenOOD's ID val). Loaders may be
    :class:`~.features.Features` records. ``cache``: share extracted features
    with later calls (:func:`ascood.evaluate` takes the same cache); by
    default each split is extracted once for this sweep. The scorer is left
    set to the best combination (and fitted for it). Ties keep the earlier
    combination. Returns a :class:`SweepResult`.
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
    cache = cache if cache is not None else FeatureCache(model)
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
                    fit_scorer(scorer, model, fit_data, cache)
            except ValueError as err:
                rejected.append(f"{params}: {err}")
                continue
        try:
            _, s_id, _ = loader_scores(scorer, model, val_id_loader, cache)
            _, s_ood, _ = loader_scores(scorer, model, val_ood_loader, cache)
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
            fit_scorer(scorer, model, scorer.fit_loader(id_train_loader, id_val_loader), cache)
    return SweepResult(best[0], best[1], trials)
