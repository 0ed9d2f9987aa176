"""Feature extractors: each maps images (B, C, H, W) float to features (B, m) float.

Every backbone exposes ``feature_dim`` (= m) so :class:`ascood.nets.ASCOODNet`
can size its linear head without a dummy forward pass.

* :class:`ResNet18_32x32`: the CIFAR variant of ResNet-18 (3x3 stem, no max
  pool), the backbone of the paper's CIFAR experiments; m = 512.
* :func:`torchvision_resnet`: torchvision ResNet-18/34/50 for 224x224 inputs
  with the final ``fc`` removed; m = 512 / 512 / 2048. Weights come only from a
  local file (never downloaded).
* :class:`SmallCNN`: three conv blocks + global average pool for tiny images
  (8x8 to 32x32, any channel count); m = ``width * 4``.
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet18_32x32", "SmallCNN", "torchvision_resnet", "load_backbone_weights"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18_32x32(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR): 3x3 stride-1 stem, no max pool.

    ``width`` scales every stage (64 is the standard network; tests use 8).
    Input (B, in_channels, H, W) float; output (B, 8 * width) float, the
    globally average-pooled last stage after ReLU (non-negative, as ReAct,
    ASH and SCALE assume).
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2 ** i
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feature_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)


class SmallCNN(nn.Module):
    """A small conv net for tiny images (8x8 .. 32x32, any channel count).

    conv(width) -> conv(2*width) -> pool -> conv(4*width) -> global average
    pool. Input (B, in_channels, H, W) float with H, W >= 4; output
    (B, 4 * width) float (non-negative, after ReLU).
    """

    def __init__(self, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_channels, width), block(width, 2 * width), nn.MaxPool2d(2),
                                  block(2 * width, 4 * width))
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)


class _TorchvisionFeatures(nn.Module):
    """A torchvision ResNet with its classifier removed: (B, C, H, W) -> (B, m)."""

    def __init__(self, net: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _bare_key(key: str) -> str:
    """Strip wrapper prefixes (DDP's "module.", ASCOODNet's "backbone.", ours "net.")."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "backbone.", "net."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_backbone_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict into the backbone ``module`` (never downloads).

    Accepts a plain torchvision state dict (its ``fc.*`` keys are dropped: the
    head is ours), a dict with a ``"state_dict"``/``"model"`` entry, or a state
    dict saved from an :class:`~ascood.nets.ASCOODNet` or a DDP model (the
    ``backbone.``/``module.`` prefixes are matched away). Loaded with
    ``weights_only=True`` so a file cannot run code.

    Raises FileNotFoundError naming the file, or RuntimeError naming the file
    when it is unreadable or its keys do not fit.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or pickled objects refused by weights_only
        raise RuntimeError(f"cannot read weights file {path}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RuntimeError(f"weights file {path} does not hold a state dict")
    given = {_bare_key(k): v for k, v in state.items() if torch.is_tensor(v)}
    own = {_bare_key(k): k for k in module.state_dict()}
    missing = sorted(set(own) - set(given))
    if missing:
        raise RuntimeError(f"weights file {path} does not fit this backbone: missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
    module.load_state_dict({full: given[bare] for bare, full in own.items()})


def torchvision_resnet(depth: int, in_channels: int = 3, weights: str | os.PathLike | None = None) -> nn.Module:
    """torchvision ResNet-18/34/50 (``depth``) as a feature extractor.

    ``weights``: optional local file path with ImageNet (or other) weights;
    ``None`` keeps the random initialisation. Nothing is ever downloaded.
    A non-3 ``in_channels`` replaces the stem conv (weights for it are then
    not loaded from the file).
    """
    import torchvision

    ctor = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}
    if depth not in ctor:
        raise ValueError(f"torchvision ResNet depth must be 18, 34 or 50, got {depth}")
    net = ctor[depth](weights=None)  # weights=None: torchvision never touches the network
    dim = net.fc.in_features
    net.fc = nn.Identity()
    wrapper = _TorchvisionFeatures(net, dim)
    if weights is not None:
        load_backbone_weights(wrapper, weights)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return wrapper
