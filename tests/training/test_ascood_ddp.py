"""DistributedDataParallel: two CPU processes with gloo train and end with identical weights."""
import json
import os

import pytest
import torch
import torch.distributed as dist

from torchrunhelpers import spawn_gloo as _spawn


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

        import ascood
        from ascood.training.trainer import TrainConfig, Trainer

        g = torch.Generator().manual_seed(0)
        y = torch.arange(32) % 3
        x = torch.randn(32, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        model = ascood.build_model("small_cnn", 3, width=4)
        tr = Trainer(model, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True),
                     TrainConfig(epochs=2, ood_type="gradient", p_inv=0.1, alpha_min=0.5, alpha_max=1.0, lr=0.05,
                                 seed=0), out_dir=os.path.join(tmp, "out"), progress=False)
        assert isinstance(tr.loader.sampler, DistributedSampler) and len(tr.loader) == 4  # 16 samples per rank
        # sync_bn defaults on, but torch's SyncBatchNorm cannot run on CPU tensors: gloo keeps BatchNorm.
        assert tr.config.sync_bn and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in tr.raw_model.modules())
        init = {k: v.clone() for k, v in model.named_parameters()}
        tr.fit()
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.save({"params": params, "init": init, "history": tr.history}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_gloo_processes_agree(tmp_path):
    tmp_path = _spawn(_worker, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert not torch.equal(r0["params"]["fc.weight"], r0["init"]["fc.weight"])  # it trained
    strip = lambda hs: [{k: v for k, v in h.items() if k != "time_s"} for h in hs]
    assert strip(r0["history"]) == strip(r1["history"])  # metrics are all-reduced: every rank reports the same
    assert all(h["loss"] == h["loss"] for h in r0["history"])
    # Only rank 0 wrote, once per epoch: one checkpoint, log with both epochs.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "log.jsonl"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 2 and set(ckpt["rng_per_rank"]) == {"0", "1"}
    assert len(open(out / "log.jsonl").read().splitlines()) == 2
    assert json.load(open(out / "config.json"))["epoch"] == 2


def _criterion_worker(rank: int, world: int, tmp: str) -> None:
    """The README's DDP loop: the user's own DDP wrapper, optimiser and backward, the criterion's loss."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store2", rank=rank, world_size=world)
    try:
        import ascood

        torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
        model = ascood.build_model("small_cnn", 3, width=4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        crit = ascood.ASCOODCriterion(ood_type="gradient", p_inv=0.1, alpha=(1.0, 0.5), w=1.0)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
        y = torch.arange(4) % 3
        x = torch.randn(4, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        for epoch in (1, 2):
            crit.set_epoch(epoch, 2)
            loss = crit(ddp, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.save({"params": params, "ce": crit.last.ce, "alpha": crit.last.alpha},
                   os.path.join(tmp, f"crit{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_criterion_in_a_ddp_loop(tmp_path):
    tmp_path = _spawn(_criterion_worker, tmp_path)
    r0 = torch.load(tmp_path / "crit0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "crit1.pt", weights_only=True)
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k  # gradients were all-reduced through DDP's hooks
    assert r0["alpha"] == r1["alpha"] == 0.5  # last of 2 epochs: exactly alpha_min
    assert not torch.equal(r0["ce"], r1["ce"])  # but each rank saw its own batch
