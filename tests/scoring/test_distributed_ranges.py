"""The row ranges torchrun ranks share out (ascood.scoring.distributed): every row once, whole batches, and scoring
a record range by range gives the whole record's scores."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ascood.scoring.distributed import Ranks, batch_ranges, row_loader
from ascood.scoring.scorers import KNN, MSP, Features, features_scores
from ascood.training.distributed import DistContext


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 31, 64])
@pytest.mark.parametrize("batch", [1, 4, 7])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_batch_ranges_cover_every_row_once_in_whole_batches(n, batch, parts):
    ranges = batch_ranges(n, batch, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert a <= b == c  # contiguous, in order: every row exactly once
    for a, b in ranges:
        assert a % batch == 0 and (b % batch == 0 or b == n)  # whole batches of the one-process loader
    counts = [-(-(b - a) // batch) for a, b in ranges]
    assert max(counts) - min(counts) <= 1


def test_batch_ranges_refuses_bad_arguments():
    for args in ((-1, 4, 2), (8, 0, 2), (8, 4, 0)):
        with pytest.raises(ValueError, match="batch_ranges needs"):
            batch_ranges(*args)


def test_row_loader_yields_the_batches_of_the_whole_loader_there():
    x = torch.arange(22, dtype=torch.float32).reshape(11, 2)
    loader = DataLoader(TensorDataset(x, torch.arange(11)), batch_size=3)
    whole = [b[0] for b in loader]
    got = []
    for a, b in batch_ranges(11, 3, 3):
        got += [batch[0] for batch in row_loader(loader, a, b)]
    assert len(got) == len(whole) and all(torch.equal(g, w) for g, w in zip(got, whole))


@pytest.mark.parametrize("scorer", [MSP(), KNN(K=5)], ids=["msp", "knn"])
def test_scoring_a_record_range_by_range_equals_the_whole(scorer):
    g = torch.Generator().manual_seed(0)
    feats = Features(torch.randn(50, 4, generator=g), torch.randn(50, 6, generator=g), torch.arange(50) % 4)
    if scorer.needs_fit:
        scorer.fit_features(Features(torch.randn(40, 4, generator=g), torch.randn(40, 6, generator=g)))
    pred, score, labels = features_scores(scorer, feats, rows=8)
    parts = [features_scores(scorer, feats, rows=8, start=a, stop=b) for a, b in batch_ranges(50, 8, 3) if b > a]
    assert torch.equal(torch.cat([p[0] for p in parts]), pred)
    assert torch.equal(torch.cat([p[1] for p in parts]), score)  # bitwise: the same 8-row chunks
    assert torch.equal(torch.cat([p[2] for p in parts]), labels)


def test_one_process_ranks_run_the_function_and_pass_errors_through():
    ranks = Ranks(DistContext())
    assert not ranks.enabled and ranks.is_main and ranks.broadcast(3) == 3 and ranks.all_gather(4) == [4]
    assert ranks.together(lambda: 5) == 5
    with pytest.raises(ValueError, match="bad grid point"):
        ranks.together(lambda: (_ for _ in ()).throw(ValueError("bad grid point")))
    assert ranks.device("cpu") == torch.device("cpu")
