"""One trained model on one OpenOOD benchmark tree: APS on its validation split, then its test sets.

Used by ``ascood eval --data-root`` and by ``ascood reproduce``.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from ..data import datasets as D
from ..data.openood import ResolvedBenchmark
from ..files import write_json
from .evaluator import evaluate
from .plots import score_histograms
from .scorers import FeatureCache, scorer_for_model, sweep
from .store import FeatureStore, StoreFeatureCache

__all__ = ["evaluate_on_benchmark"]


def evaluate_on_benchmark(model, extra: dict, tree: ResolvedBenchmark, scorers: Sequence[str], *, batch_size: int,
                          workers: int = 0, out_dir: str | None = None, progress: bool = True,
                          feature_dir: str | None = None, scorer_params: Mapping[str, Mapping] | None = None,
                          feature_store: FeatureStore | None = None, checkpoint: str | None = None,
                          cache: FeatureCache | None = None):
    """APS on ID val vs OOD val for every scorer with a grid, then ID test vs the near/far OOD sets.

    Every split runs through the model once; all scorers and APS grid points
    share its features (in RAM, or memory-mapped files in ``feature_dir``).

    ``extra``: the checkpoint's ``extra`` (image_size, mean, std).
    ``feature_store``: keep / reuse each split's features there (:mod:`.store`; keyed by ``checkpoint``'s
    sha256 when given, else the model's state dict).
    ``scorer_params``: scorer name -> constructor arguments (a preset's, e.g. NNGuide's bank). ``cache``:
    the feature cache to use instead (e.g. a :class:`~ascood.scoring.distributed.ShardedFeatureCache` under
    torchrun, shared by every rank). Returns
    (:class:`ascood.scoring.evaluator.ResultTable`, aps dict scorer -> {params, val_auroc}).
    Writes results.csv / results.json / aps.json / hist_*.png into ``out_dir``.
    """
    size, mean, std = extra.get("image_size", 32), extra.get("mean", [0.5] * 3), extra.get("std", [0.5] * 3)
    tf = D.build_transforms(size, mean, std, train=False)

    def loader(ds):
        return D.make_loader(ds, batch_size, train=False, workers=workers)

    val_id, val_ood = loader(tree.dataset("id_val", tf)), loader(tree.dataset("ood_val", tf))
    fit_loader = None
    if cache is None:
        cache = FeatureCache(model, feature_dir) if feature_store is None else \
            StoreFeatureCache(model, feature_store, checkpoint=checkpoint, directory=feature_dir)
    objs, aps = {}, {}
    for name in tqdm(list(scorers), desc="APS on the validation split", disable=not progress, leave=False):
        scorer = scorer_for_model(name, [float(s) for s in std], **dict((scorer_params or {}).get(name, {})))
        if scorer.needs_fit and scorer.fit_split == "train" and fit_loader is None:
            fit_loader = loader(tree.dataset("id_train", tf))
        if scorer.default_grid:
            # ReAct's clip value and TempScale's T are fitted on ID val (OpenOOD); KNN, MDS, ... on ID train.
            res = sweep(scorer, model, val_id, val_ood, id_train_loader=fit_loader, id_val_loader=val_id, cache=cache)
            aps[name] = {"params": res.best_params, "val_auroc": 100 * res.best_auroc}
        objs[name] = scorer
    groups = {g: {n: loader(ds) for n, ds in sets.items()} for g, sets in tree.ood_groups(tf).items()}
    if progress:
        print(f"scoring ID test and {sum(len(v) for v in groups.values())} OOD sets with {', '.join(objs)}", flush=True)
    table = evaluate(model, loader(tree.dataset("id_test", tf)), groups, scorers=objs, id_train_loader=fit_loader,
                     id_val_loader=val_id, features=cache)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        table.to_csv(os.path.join(out_dir, "results.csv"))
        table.to_json(os.path.join(out_dir, "results.json"))
        write_json(aps, os.path.join(out_dir, "aps.json"))
        score_histograms(table.scores, out_dir)
    return table, aps
