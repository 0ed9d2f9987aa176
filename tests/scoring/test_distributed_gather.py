"""ShardedFeatureCache over 2 gloo processes returns, row for row, what one process computes: the stored features
(extracted shard by shard, missing[r::2] per rank), i-ODIN's scores (contiguous batch ranges) and KNN's scores
from the features (contiguous 1024-row chunks, here 8-row ones), each gathered in row order. AUROC and the
other table metrics do not depend on the order of the scores, so the order is checked here, element-wise."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import ascood.scoring.distributed as D
import ascood.scoring.scorers.features as F
from ascood.nets.registry import build_model
from ascood.scoring.distributed import Ranks, ShardedFeatureCache
from ascood.scoring.scorers import IODIN, KNN, extract_features, features_scores
from ascood.scoring.scorers.features import model_image_scores
from ascood.scoring.store import FeatureStore
from ascood.training.distributed import DistContext
from torchrunhelpers import spawn_gloo

N, BATCH, SHARD = 23, 3, 6  # 4 shards (the last short), 8 batches (the last short): ranks get unequal parts


def _setup():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, width=4).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, 8, 8, generator=g), torch.arange(N) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    return model, loader


def _scorers():
    return IODIN(temperature=10, eps=0.01, std=[0.5, 0.5, 0.5]), KNN(K=3)


def _outputs(cache, model, loader) -> dict:
    iodin, knn = _scorers()
    pred, score, labels = cache.image_scores(iodin, model, loader)
    feats = cache.get(loader)
    knn.fit_features(feats)
    kpred, kscore, klabels = cache.record_scores(knn, feats)
    return {"iodin_pred": pred, "iodin_score": score, "iodin_labels": labels, "logits": torch.as_tensor(
        feats.logit_rows(0, N)), "features": feats.feature_rows(0, N), "labels": feats.labels,
        "knn_pred": kpred, "knn_score": kscore, "knn_labels": klabels}


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        F.SCORE_ROWS = 8  # several chunks of scoring rows for 23 rows (the default is 1024; score_rows reads it)
        model, loader = _setup()
        ranks = Ranks(DistContext(rank, world, rank))
        cache = ShardedFeatureCache(model, FeatureStore(os.path.join(tmp, "store"), shard_rows=SHARD,
                                                        log=lambda m: None), ranks)
        out = _outputs(cache, model, loader)
        out["extracted"] = torch.tensor(cache.extracted)
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_gather_every_row_in_order(tmp_path):
    folder = spawn_gloo(_worker, tmp_path)
    model, loader = _setup()
    iodin, knn = _scorers()
    pred, score, labels = model_image_scores(iodin, model, loader)  # one process, the plain loop
    feats = extract_features(model, loader)  # one pass over the whole loader
    knn.fit_features(feats)
    kpred, kscore, klabels = features_scores(knn, feats, rows=8)
    ref = {"iodin_pred": pred, "iodin_score": score, "iodin_labels": labels, "logits": feats.logits,
           "features": feats.features, "labels": feats.labels, "knn_pred": kpred, "knn_score": kscore,
           "knn_labels": klabels}
    runs = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(int(r["extracted"]) for r in runs) == [2, 2]  # 4 shards, each made once, by one rank
    for r in runs:
        for key, want in ref.items():
            assert torch.equal(r[key], want), key
    assert not torch.equal(ref["iodin_score"], ref["iodin_score"].flip(0))  # the order is visible
