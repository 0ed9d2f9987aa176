"""ID accuracy is the clean forward's for every scorer (OpenOOD's ACC), also for ODIN / i-ODIN, whose own
prediction on the perturbed input stays in a column of its own."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ascood.scoring.evaluator import evaluate
from ascood.scoring.scorers import IODIN, MSP, ODIN


class Bump(nn.Module):
    """s = sum of the input; logits (1 - (s - 1)^2, 0.5). At s = 0.5 class 0 wins and its logit grows with s,
    so the ODIN step (towards a higher class-0 probability) raises s; a large step overshoots past s = 1.7
    where class 1 wins: the perturbed prediction flips while the clean one does not."""

    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([1 - (s - 1) ** 2, torch.full_like(s, 0.5)], 1)


def test_odin_and_iodin_report_the_clean_accuracy():
    g = torch.Generator().manual_seed(0)
    x = 0.125 + 0.001 * torch.randn(8, 1, 2, 2, generator=g)  # s ~ 0.5: clean prediction 0
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    ood = torch.randn(8, 1, 2, 2, generator=g)
    minus_one = torch.full((8,), -1)
    model = Bump()
    with torch.no_grad():
        clean = 100 * (model(x).argmax(1) == y).double().mean().item()  # 75.0, independent of the scorers
    # ODIN moves each of the 4 elements by eps (std 1): s -> 0.5 + 4 * 2.5; i-ODIN one element: s -> 3.0.
    scorers = {"msp": MSP(), "odin": ODIN(temperature=1.0, eps=2.5, std=1.0),
               "iodin": IODIN(temperature=1.0, eps=2.5, std=1.0, k=1)}
    table = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=3), {"o": DataLoader(TensorDataset(ood, minus_one),
                     batch_size=4)}, scorers=scorers)
    for name in ("msp", "odin", "iodin"):
        assert table.get(name, "o", "id_acc") == clean == 75.0
    # Their own (perturbed-input) prediction is class 1 everywhere: 2 of 8 right.
    assert table.get("odin", "o", "scorer_id_acc") == table.get("iodin", "o", "scorer_id_acc") == 25.0
    assert table.get("msp", "o", "scorer_id_acc") == 75.0
    text = table.format()
    assert "Scorer-ID-Acc" in text and "ID-Acc" in text
