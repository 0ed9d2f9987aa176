"""Models: shapes, the z-score head (Proposition 2), backbones, local weights only."""
import math

import pytest
import torch

import ascood
from ascood.nets.backbones import load_backbone_weights


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 5)])
def test_small_cnn_any_size_and_channels(size, channels):
    model = ascood.build_model("small_cnn", 7, in_channels=channels, width=4).eval()
    logits, h = model(torch.randn(2, channels, size, size), return_features=True)
    assert logits.shape == (2, 7) and h.shape == (2, 16)


def test_zscore_head_matches_formula_and_norm():
    model = ascood.build_model("small_cnn", 3, width=4, sigma=0.5).eval()
    x = torch.randn(4, 3, 8, 8)
    logits, h = model(x, return_features=True)
    h_t = (h - h.mean(1, keepdim=True)) / (h.std(1, keepdim=True) + 1e-6) * 0.5
    torch.testing.assert_close(model.standardize(h), h_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, model.fc(h_t), rtol=1e-5, atol=1e-5)
    # Proposition 2: ||h~|| = sigma * sqrt(m - 1).
    torch.testing.assert_close(h_t.norm(dim=1), torch.full((4,), 0.5 * math.sqrt(15)), rtol=1e-4, atol=1e-4)
    lin = ascood.build_model("small_cnn", 3, width=4, head="linear").eval()
    z, hl = lin(x, return_features=True)
    torch.testing.assert_close(z, lin.fc(hl))


def test_resnet18_32x32_and_gradients():
    model = ascood.build_model("resnet18_32x32", 10, width=4)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and model.feature_dim == 32
    out.sum().backward()
    assert model.backbone.conv1.weight.grad is not None


def test_torchvision_resnet_local_weights(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = ascood.build_model("resnet18", 5, weights=tmp_path / "r18.pth").eval()
    assert model.feature_dim == 512
    torch.testing.assert_close(model.backbone.net.conv1.weight, src.conv1.weight)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ascood.build_model("resnet18", 5, weights=tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="bad.pth"):
        ascood.build_model("resnet18", 5, weights=tmp_path / "bad.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match="does not fit"):
        ascood.build_model("resnet50", 5, weights=tmp_path / "wrong.pth")


def test_weights_from_an_ascood_model(tmp_path):
    a = ascood.build_model("small_cnn", 3, width=4)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b = ascood.build_model("small_cnn", 3, width=4, weights=tmp_path / "a.pt")
    for k, v in a.backbone.state_dict().items():
        assert torch.equal(v, b.backbone.state_dict()[k])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        ascood.build_model("vgg", 3)
    with pytest.raises(ValueError, match="head"):
        ascood.build_model("small_cnn", 3, head="cosine")
    with pytest.raises(ValueError, match="feature_dim"):
        ascood.ASCOODNet(torch.nn.Identity(), 3)
