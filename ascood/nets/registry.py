"""The model registry: one place that maps a backbone name to a builder.

``build_model("resnet18_32x32", 10)`` builds a built-in backbone with ASCOOD's
head; ``"torchvision:ARCH"`` / ``"timm:ARCH"`` go through :func:`ascood.wrap`.
Checkpoints store the arguments (``model.build_args``) so they can be rebuilt.
"""
from __future__ import annotations

import os
from typing import Sequence

from torch import nn

from .ascoodnet import ASCOODNet, check_normalization
from .backbones import ResNet18_32x32, SmallCNN, load_backbone_weights, torchvision_resnet
from .wrapping import build_external

__all__ = ["build_model", "MODEL_NAMES"]

MODEL_NAMES = ("resnet18_32x32", "resnet18", "resnet34", "resnet50", "small_cnn")


def build_model(name: str, num_classes: int, in_channels: int = 3, head: str = "zscore", sigma: float = 0.5,
                weights: str | os.PathLike | None = None, width: int | None = None,
                input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
                model_kwargs: dict | None = None) -> ASCOODNet:
    """Build an :class:`ASCOODNet` by backbone name.

    Args:
        name: one of :data:`MODEL_NAMES`: "resnet18_32x32" (CIFAR variant,
            32x32 inputs), "resnet18"/"resnet34"/"resnet50" (torchvision, 224x224),
            "small_cnn" (tiny images, 8x8..32x32); or "torchvision:ARCH" /
            "timm:ARCH", any classifier of those libraries, split by
            :func:`ascood.wrap` (``weights`` then holds the whole original
            model's state dict; 3 input channels).
        num_classes: number of ID classes.
        in_channels: image channels (1 for grey, 3 for RGB, ...).
        head: "zscore" (ASCOOD), "linear" (baseline) or "l2" (Table 6 ablation).
        sigma: the standardised feature's scale.
        weights: optional local file with backbone weights (torchvision or an
            ASCOODNet/ascood checkpoint); loaded with ``weights_only=True``;
            never downloaded. For a full ascood checkpoint use
            :func:`ascood.training.checkpoint.load_model` instead (it restores the head too).
        width: channel width override (resnet18_32x32 default 64, small_cnn 16).
        input_mean, input_std: the inputs' per-channel normalisation (stored
            with the model and its checkpoints; ODIN / i-ODIN read input_std).
        model_kwargs: constructor arguments of a "torchvision:"/"timm:" model
            (JSON-able, e.g. ``{"image_size": 64}``; stored for rebuilding).
    """
    input_mean, input_std = check_normalization(input_mean, input_std)
    if input_mean is not None and len(input_mean) != in_channels:
        raise ValueError(f"input_mean/input_std need {in_channels} values (in_channels), got {len(input_mean)}")
    norm = {"input_mean": input_mean, "input_std": input_std}
    # Recorded on the model so checkpoints can rebuild it (weights come from the state dict).
    build_args = {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels), "head": head,
                  "sigma": float(sigma), "width": width, **norm}
    if ":" in name:
        if in_channels != 3 or width is not None:
            raise ValueError(f"{name}: external models take 3 input channels and no width override")
        model = build_external(name, num_classes, head=head, sigma=sigma, weights=weights, model_kwargs=model_kwargs)
        model.input_mean, model.input_std = input_mean, input_std
        model.build_args = {**build_args, "model_kwargs": dict(model_kwargs or {})}
        return model
    if model_kwargs:
        raise ValueError("model_kwargs applies only to torchvision:/timm: models")
    if name == "resnet18_32x32":
        backbone: nn.Module = ResNet18_32x32(in_channels, width or 64)
    elif name == "small_cnn":
        backbone = SmallCNN(in_channels, width or 16)
    elif name in ("resnet18", "resnet34", "resnet50"):
        if width is not None:
            raise ValueError("width applies only to resnet18_32x32 and small_cnn")
        model = ASCOODNet(torchvision_resnet(int(name[6:]), in_channels, weights), num_classes, sigma, head, **norm)
        model.build_args = build_args
        return model
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}, "
                         "torchvision:ARCH or timm:ARCH")
    if weights is not None:
        load_backbone_weights(backbone, weights)
    model = ASCOODNet(backbone, num_classes, sigma, head, **norm)
    model.build_args = build_args
    return model
