"""``outlier_loss="vos"``: VOS / Dream-OOD's logistic energy loss, as OpenOOD's ASCOOD trainer (``kl_div: False``).

* one full step equals OpenOOD's on the same network, batch, outliers and head (fixture
  ``tests/fixtures/vos_step/vos_step.npz``, made by ``make_vos_fixture.py`` from OpenOOD's own trainer code);
* the loss against its formula written out in plain torch, and its gradients (gradcheck, float64);
* bad input named; the head in checkpoints (``criterion`` key, ``vos_head.*``), restored on resume, a
  resume with another --outlier-loss refused, and absent from the model that scoring and export read.
"""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ascood
from ascood.training.checkpoint import CheckpointError, load_checkpoint, load_model
from ascood.training.criterion import ASCOODCriterion
from ascood.training.losses import OUTLIER_LOSSES, EnergyLogisticHead, outlier_loss, vos_energy_loss
from ascood.training.trainer import TrainConfig, Trainer

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vos_step", "vos_step.npz")
HEAD_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")


# --- one step against OpenOOD -----------------------------------------------------------------------------
class _Body(nn.Module):
    """The fixture's backbone (conv, BatchNorm, ReLU, global average pool) as ascood's feature extractor."""

    feature_dim = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def _fixture():
    with np.load(FIXTURE, allow_pickle=False) as f:
        data = {k: torch.from_numpy(f[k].copy()) for k in f.files if k != "meta_json"}
        meta = json.loads(bytes(f["meta_json"]).decode())
    return data, meta


def _net_state(data, prefix):
    """The fixture's conv/bn/fc tensors under ascood's ASCOODNet names (backbone.*, fc.*)."""
    out = {}
    for k, v in data.items():
        if k.startswith(prefix) and not k.startswith(prefix + "vos_head."):
            name = k[len(prefix):]
            out[name if name.startswith("fc.") else "backbone." + name] = v
    return out


def test_one_step_equals_openood_ascood_trainer():
    """OpenOOD's ASCOODTrainer (kl_div False) vs ascood's Trainer: same loss terms, same tensors after one SGD
    step of network and head, same learning rates. Both sides get OpenOOD's outliers (the saliency pass is
    compared separately below). Tolerances: the z-score is ascood's fused op vs OpenOOD's plain torch, so
    float32 rounding differs (observed up to ~1e-7); 2e-6 absolute / 1e-5 relative bounds it with margin."""
    data, meta = _fixture()
    assert meta["source"] == "Jingkang50/OpenOOD" and len(meta["commit"]) == 40 and meta["settings"]["kl_div"] is False
    s = meta["settings"]
    model = ascood.ASCOODNet(_Body(), 3, sigma=s["sigma"], head="zscore")
    model.load_state_dict(_net_state(data, "init."))
    x, y, x_ood = data["x"], data["y"], data["x_ood"]
    cfg = TrainConfig(epochs=s["num_epochs"], ood_type="gradient", p_inv=s["p_inv"], alpha_min=s["alpha"],
                      alpha_max=s["alpha"], w=s["w"], lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"],
                      weight_decay=s["weight_decay"], fc_lr_factor=s["fc_lr_factor"], outlier_loss="vos", seed=0)
    tr = Trainer(model, DataLoader(TensorDataset(x, y), batch_size=len(y)), cfg, device="cpu", progress=False)
    tr.criterion.vos_head.load_state_dict({k: data[f"init.vos_head.{k}"] for k in HEAD_KEYS})
    # OpenOOD's optimiser: head in the first (backbone) group, fc alone in the second.
    head_ids = {id(p) for p in tr.criterion.parameters()}
    assert head_ids <= {id(p) for p in tr.optimizer.param_groups[0]["params"]}
    assert [id(p) for p in tr.optimizer.param_groups[1]["params"]] == [id(model.fc.weight), id(model.fc.bias)]
    torch.testing.assert_close(torch.tensor([g["lr"] for g in tr.optimizer.param_groups], dtype=torch.float64),
                               data["lr_before"], rtol=1e-12, atol=0)

    # Our own saliency pass gives OpenOOD's outliers (to float32 rounding of the saliency).
    ours = tr.criterion.outliers(model, x, y, s["alpha"])
    torch.testing.assert_close(ours, x_ood, rtol=1e-5, atol=1e-5)

    tr.criterion.outliers = lambda *a, **k: x_ood.clone()  # the same outlier batch on both sides
    loss, _ = tr.train_step(x, y, s["alpha"])
    parts = tr.criterion.last
    torch.testing.assert_close(parts.ce, data["id_loss"], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(parts.kl, data["ood_loss"], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(loss, data["id_loss"] + s["w"] * data["ood_loss"], rtol=1e-6, atol=2e-6)
    after = _net_state(data, "after.")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
    for k in HEAD_KEYS:
        torch.testing.assert_close(tr.criterion.vos_head.state_dict()[k], data[f"after.vos_head.{k}"], rtol=1e-5,
                                   atol=2e-6, msg=lambda m: f"vos_head.{k}: {m}")
        assert not torch.equal(data[f"after.vos_head.{k}"], data[f"init.vos_head.{k}"])  # the head did move
    torch.testing.assert_close(torch.tensor([g["lr"] for g in tr.optimizer.param_groups], dtype=torch.float64),
                               data["lr_after"], rtol=1e-12, atol=0)


# --- the formula, gradients -------------------------------------------------------------------------------
def _head(seed=0, dtype=torch.float32, hidden=16):
    torch.manual_seed(seed)
    return EnergyLogisticHead(hidden).to(dtype)


def _vos_by_hand(id_logits, ood_logits, head, y, w):
    """CE(id) + w * mean over all rows of -log softmax(g(s))_t, s = log sum_k exp z_k, t = 1 (ID) / 0 (outlier)."""
    def lse(a):
        m = a.max(1, keepdim=True).values
        return (m + (a - m).exp().sum(1, keepdim=True).log())[:, 0]

    ce = (lse(id_logits) - id_logits[torch.arange(len(y)), y]).mean()
    s = torch.cat([lse(id_logits), lse(ood_logits)])
    w1, b1, w2, b2 = (head.state_dict()[k] for k in HEAD_KEYS)
    out = torch.relu(s[:, None] * w1[:, 0] + b1) @ w2.T + b2  # (N, 2)
    t = torch.cat([torch.ones(len(id_logits)), torch.zeros(len(ood_logits))]).long()
    nll = lse(out) - out[torch.arange(len(t)), t]
    return ce + w * nll.mean()


@pytest.mark.parametrize("b_ood", [3, 7])
def test_vos_loss_equals_its_formula(b_ood):
    g = torch.Generator().manual_seed(b_ood)
    id_logits, ood_logits = torch.randn(5, 4, generator=g) * 3, torch.randn(b_ood, 4, generator=g) * 3
    y = torch.randint(0, 4, (5,), generator=g)
    head = _head(b_ood)
    got = outlier_loss(id_logits, y, ood_logits, 0.7, kind="vos", vos_head=head)
    want = _vos_by_hand(id_logits.double(), ood_logits.double(), head.double(), y, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and got.dim() == 0
    # No outliers (or w = 0): plain cross-entropy, the head unused.
    ce = nn.functional.cross_entropy(id_logits, y)
    torch.testing.assert_close(outlier_loss(id_logits, y, ood_logits[:0], 0.7, kind="vos", vos_head=head), ce)
    torch.testing.assert_close(outlier_loss(id_logits, y, ood_logits, 0.0, kind="vos", vos_head=head), ce)


def test_vos_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    id_logits = (torch.randn(4, 3, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ood_logits = (torch.randn(5, 3, generator=g, dtype=torch.float64) * 2).requires_grad_()
    head = _head(1, torch.float64, hidden=8)
    assert torch.autograd.gradcheck(lambda a, b: vos_energy_loss(a, b, head), (id_logits, ood_logits))
    names = [f"{k}" for k in HEAD_KEYS]
    params = tuple(head.state_dict()[k].clone().requires_grad_() for k in names)

    class Functional(nn.Module):  # the head as a function of given tensors, so gradcheck can vary them
        def __init__(self, tensors):
            super().__init__()
            self.tensors = tensors
            self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # sets the dtype the loss uses

        def forward(self, s):
            return torch.func.functional_call(head, dict(zip(names, self.tensors)), (s,))

    def f(*ps):
        return vos_energy_loss(id_logits.detach(), ood_logits.detach(), Functional(ps))

    assert torch.autograd.gradcheck(f, params)


def test_criterion_trains_the_head_with_the_model():
    torch.manual_seed(0)
    model = ascood.build_model("small_cnn", 3, width=4)
    crit = ASCOODCriterion(alpha=1.0, outlier_loss="vos")
    assert len(crit.parameters()) == 4 and set(crit.state_dict()) == {f"vos_head.{k}" for k in HEAD_KEYS}
    x, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(4) % 3
    parts = crit.forward_with_parts(model, x, y)
    parts.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crit.parameters())
    assert model.fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        want = vos_energy_loss(parts.id_logits, parts.ood_logits, crit.vos_head)
    torch.testing.assert_close(parts.kl, want)
    torch.testing.assert_close(parts.loss.detach(), parts.ce + want)
    assert ASCOODCriterion(outlier_loss="kl").parameters() == [] and ASCOODCriterion().state_dict() == {}


# --- bad input ------------------------------------------------------------------------------------------
def test_bad_outlier_loss_and_head_are_named(tmp_path):
    assert OUTLIER_LOSSES == ("kl", "energy", "vos")
    with pytest.raises(ValueError, match=r"outlier_loss must be one of kl, energy, vos, got 'vso'"):
        ASCOODCriterion(outlier_loss="vso")
    with pytest.raises(ValueError, match=r"outlier_loss must be one of kl, energy, vos, got 'VOS'"):
        TrainConfig(outlier_loss="VOS").validate()
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="outlier_loss 'vos' needs vos_head"):
        outlier_loss(z, torch.tensor([0, 1]), z, 1.0, kind="vos")
    with pytest.raises(TypeError, match="logistic head"):
        vos_energy_loss(z, z, lambda s: s)
    with pytest.raises(ValueError, match=r"\(B, K\) and \(B', K\)"):
        vos_energy_loss(z, torch.randn(2, 4), _head())
    with pytest.raises(ValueError, match="hidden must be an int >= 1"):
        EnergyLogisticHead(0)
    crit = ASCOODCriterion(alpha=1.0, outlier_loss="vos").to("meta")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"logistic head is on meta.*crit.to\('cpu'\)"):
        crit(ascood.build_model("small_cnn", 3, width=4), torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"missing vos_head.2.bias"):
        ASCOODCriterion(outlier_loss="vos").load_state_dict(
            {f"vos_head.{k}": v for k, v in _head(hidden=512).state_dict().items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"unexpected vos_head.0.weight"):
        ASCOODCriterion(outlier_loss="kl").load_state_dict({"vos_head.0.weight": torch.zeros(512, 1)})
    with pytest.raises(ValueError, match=r"shape of vos_head.0.weight \(4, 1\) \(expected \(512, 1\)\)"):
        ASCOODCriterion(outlier_loss="vos").load_state_dict(
            {f"vos_head.{k}": v for k, v in _head(hidden=4).state_dict().items()})


def test_cli_refuses_an_unknown_outlier_loss_and_trains_vos(tmp_path, capsys):
    from ascood.apps.main import build_parser

    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["train", "somewhere", "--out", "x", "--outlier-loss", "vso"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "--outlier-loss" in msg and "'vso'" in msg and "'vos'" in msg
    assert build_parser().parse_args(["train", "d", "--out", "x", "--outlier-loss", "vos"]).outlier_loss == "vos"

    from clihelpers import TINY_TRAIN, make_class_tree, run_cli

    data = make_class_tree(tmp_path / "data")
    r = run_cli("train", data, "--out", tmp_path / "run", "--outlier-loss", "vos", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["train_config"]["outlier_loss"] == "vos"
    assert sorted(ckpt["criterion"]) == sorted(f"vos_head.{k}" for k in HEAD_KEYS)
    assert ckpt["criterion"]["vos_head.0.weight"].shape == (512, 1)


# --- checkpoints and resume -----------------------------------------------------------------------------
def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float(), y)


def _run(out, epochs, kill_after=None, resume=None, model_seed=0, outlier_loss="vos"):
    torch.manual_seed(model_seed)
    model = ascood.build_model("small_cnn", 3, width=4)

    def killer(trainer, metrics):
        if kill_after is not None and trainer.epoch == kill_after:
            raise KeyboardInterrupt("simulated kill")

    cfg = TrainConfig(epochs=epochs, ood_type="gradient", p_inv=0.2, alpha_min=0.5, alpha_max=1.0, lr=0.05, seed=0,
                      outlier_loss=outlier_loss)
    tr = Trainer(model, DataLoader(_data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)),
                 cfg, out_dir=out, resume=resume, progress=False, callbacks=[killer])
    try:
        tr.fit()
    except KeyboardInterrupt:
        pass
    return tr


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    full = _run(tmp_path / "a", 3)
    _run(tmp_path / "b", 3, kill_after=1)
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["epoch"] == 1 and sorted(ckpt["criterion"]) == sorted(f"vos_head.{k}" for k in HEAD_KEYS)
    assert not any("vos" in k for k in ckpt["model"])  # the network's weights alone
    torch.manual_seed(1234)  # another model and head init: resume must restore both
    resumed = _run(tmp_path / "b", 3, resume=tmp_path / "b", model_seed=99)
    for (k, v), (_, w) in zip(full.raw_model.state_dict().items(), resumed.raw_model.state_dict().items()):
        assert torch.equal(v, w), k
    for k, v in full.criterion.state_dict().items():
        assert torch.equal(v, resumed.criterion.state_dict()[k]), k
    last = load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in full.criterion.state_dict().items():
        assert torch.equal(last["criterion"][k], v), k
    # Scoring and deployment read the network alone: load_model rebuilds it strictly from "model".
    model, _ = load_model(tmp_path / "b" / "last.pt")
    x = _data(4)[:][0]
    full.raw_model.eval()
    torch.testing.assert_close(model(x), full.raw_model(x))


def test_resume_with_another_outlier_loss_or_a_broken_head_is_refused(tmp_path):
    _run(tmp_path, 2, kill_after=1)
    with pytest.raises(ValueError, match=r"cannot resume .*outlier_loss: 'vos' -> 'kl'"):
        _run(tmp_path, 2, resume=tmp_path, outlier_loss="kl")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["criterion"]["vos_head.2.weight"]
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"'criterion' entry .*missing vos_head.2.weight"):
        _run(tmp_path / "c", 2, resume=tmp_path / "edited.pt")


# --- DDP ------------------------------------------------------------------------------------------------
def _vos_ddp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # a different model and VOS head per rank: rank 0's must be used everywhere
        model = ascood.build_model("small_cnn", 3, width=4)
        tr = Trainer(model, DataLoader(_data(32), batch_size=4, shuffle=True),
                     TrainConfig(epochs=1, ood_type="gradient", p_inv=0.1, alpha_min=0.5, alpha_max=1.0, lr=0.05,
                                 seed=0, outlier_loss="vos"), progress=False)
        init = {k: v.clone() for k, v in tr.criterion.state_dict().items()}
        tr.fit()
        torch.save({"head": {k: v.clone() for k, v in tr.criterion.state_dict().items()}, "init": init,
                    "fc": model.fc.weight.detach().clone()}, os.path.join(tmp, f"vos{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vos_head_stays_the_same_on_every_ddp_rank(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    from test_ascood_ddp import _spawn

    folder = _spawn(_vos_ddp_worker, tmp_path)
    r0, r1 = (torch.load(folder / f"vos{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["init"].items():
        assert torch.equal(v, r1["init"][k]), k  # broadcast from rank 0 at start
        assert torch.equal(r0["head"][k], r1["head"][k]), k  # averaged gradients keep them equal
        assert not torch.equal(r0["head"][k], v), k  # and it trained
    assert torch.equal(r0["fc"], r1["fc"])
