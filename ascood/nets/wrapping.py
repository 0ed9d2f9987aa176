"""ascood.wrap (module ascood.nets.wrapping): turn an existing torchvision or timm classifier into an :class:`ASCOODNet`.

ASCOOD's z-score head and the feature scorers (SCALE, KNN, ViM, ...) need the
network split into a feature extractor h = f(x) (B, m) and a final linear
layer. :func:`wrap` finds that layer, replaces it by ``nn.Identity`` inside
the model (so everything before it, pooling, flatten, norms, pre-logits
layers, dropout, stays the feature extractor) and puts an
:class:`~ascood.nets.ASCOODNet` head on top, keeping the old weights when
the number of classes is unchanged.

Where the classifier is looked for, in this order:

* timm models (they have ``get_classifier``/``reset_classifier``):
  ``get_classifier()``; the head is removed with ``reset_classifier(0)``,
  after which timm's forward returns the pre-logits feature
  (``forward_head(..., pre_logits=True)``);
* otherwise the attributes :data:`CLASSIFIER_PATHS`: ``fc`` (ResNet, RegNet,
  Wide ResNet), ``classifier`` (DenseNet) or its last element when it is a
  Sequential (MobileNet, EfficientNet, ConvNeXt: their LayerNorm/Flatten stay
  in the extractor), ``head`` (Swin), ``heads.head`` (ViT), ``head.fc``.

:func:`build_external` builds ``torchvision:NAME`` / ``timm:NAME`` models
(never downloading weights; a local ``weights`` file is loaded instead).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .backbones import load_backbone_weights
from .ascoodnet import HEADS, ASCOODNet

__all__ = ["wrap", "split_classifier", "WrappedFeatures", "CLASSIFIER_PATHS", "build_external", "EXTERNAL_SOURCES"]

#: Attribute paths searched for the final linear layer (``[-1]`` = last element of a Sequential).
CLASSIFIER_PATHS = ("fc", "classifier", "classifier[-1]", "head", "heads.head", "head.fc")
EXTERNAL_SOURCES = ("torchvision", "timm")


class WrappedFeatures(nn.Module):
    """A classifier whose final linear layer became ``nn.Identity``: (B, C, H, W) -> (B, m).

    ``net`` is the original model (state-dict keys ``net.*``). Models that return
    a tuple in train mode (Inception/GoogLeNet auxiliary outputs) give their
    first element, the main branch.
    """

    def __init__(self, net: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = int(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, tuple):
            out = out[0]
        if out.dim() != 2 or out.shape[1] != self.feature_dim:
            raise RuntimeError(f"the wrapped model's feature extractor returned shape {tuple(out.shape)}, expected "
                               f"(B, {self.feature_dim}); ascood.wrap cannot split this architecture")
        return out


def _is_timm(model: nn.Module) -> bool:
    return all(callable(getattr(model, a, None)) for a in ("get_classifier", "reset_classifier", "forward_head"))


def _get_path(model: nn.Module, path: str):
    """(parent, key, module) at ``path`` or None; key is an attribute name or -1 (last of a Sequential)."""
    parts = path.replace("[-1]", ".[-1]").split(".")
    parent, obj = None, model
    for part in parts:
        if part == "[-1]":
            if not isinstance(obj, nn.Sequential) or len(obj) == 0:
                return None
            parent, key, obj = obj, -1, obj[-1]
        else:
            nxt = getattr(obj, part, None) if isinstance(obj, nn.Module) else None
            if not isinstance(nxt, nn.Module):
                return None
            parent, key, obj = obj, part, nxt
    return parent, key, obj


def split_classifier(model: nn.Module) -> tuple[nn.Linear, str]:
    """Remove ``model``'s final linear classifier in place; returns (the removed Linear, where it was).

    Afterwards ``model(x)`` returns the (B, m) feature the classifier used to see.
    Raises ValueError (naming what was looked for) when no final nn.Linear is found;
    the model is then left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _is_timm(model):
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            model.reset_classifier(0)  # timm: forward now ends at forward_head(pre_logits=True)
            return head, "get_classifier()"
        raise ValueError(f"timm model {type(model).__name__}: get_classifier() is {type(head).__name__}, "
                         "not an nn.Linear; ascood.wrap needs a final linear classifier")
    for path in CLASSIFIER_PATHS:
        found = _get_path(model, path)
        if found is None or not isinstance(found[2], nn.Linear):
            continue
        parent, key, linear = found
        if key == -1:
            parent[len(parent) - 1] = nn.Identity()
        else:
            setattr(parent, key, nn.Identity())
        return linear, path
    raise ValueError(f"cannot split {type(model).__name__} into features and a linear classifier: looked for an "
                     f"nn.Linear at timm's get_classifier() and at {', '.join(CLASSIFIER_PATHS)}; wrap the "
                     "feature extractor yourself: ASCOODNet(backbone, num_classes, feature_dim=m)")


def wrap(model: nn.Module, num_classes: int | None = None, head: str = "zscore", sigma: float = 0.5) -> ASCOODNet:
    """An :class:`ASCOODNet` around an existing classification model.

    Args:
        model: a torchvision or timm classifier (or any model whose final layer is an
            nn.Linear at one of :data:`CLASSIFIER_PATHS`). It is changed in place
            (its classifier becomes nn.Identity) and becomes the network's backbone;
            pass ``copy.deepcopy(model)`` to keep the original.
        num_classes: number of ID classes; None keeps the model's. When it is
            unchanged the old classifier's weights are copied into the new head
            (with ``head="zscore"`` that head then sees standardised features, so
            fine-tune, as the paper does); otherwise the head is newly initialised.
        head: "zscore" (ASCOOD) or "linear".
        sigma: scale of the standardised feature.

    Returns:
        ASCOODNet with ``backbone`` = :class:`WrappedFeatures` (m = the old
        classifier's in_features) and ``fc`` = the new (B, m) -> (B, num_classes) head,
        on the old classifier's device and dtype.
    """
    # Arguments are checked before the model is touched, so a bad call leaves it as it was.
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"num_classes must be an int >= 2 or None, got {num_classes!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    linear, _ = split_classifier(model)
    m, old_classes = linear.in_features, linear.out_features
    num_classes = old_classes if num_classes is None else num_classes
    net = ASCOODNet(WrappedFeatures(model, m), num_classes, sigma=sigma, head=head)
    net.fc.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if num_classes == old_classes:
        with torch.no_grad():
            net.fc.weight.copy_(linear.weight)
            if linear.bias is not None:
                net.fc.bias.copy_(linear.bias)
            else:
                net.fc.bias.zero_()
    return net


def _construct(source: str, arch: str, model_kwargs: dict) -> nn.Module:
    """An untrained ``source`` model ``arch`` (nothing is downloaded)."""
    if source == "torchvision":
        import torchvision

        try:
            ctor = torchvision.models.get_model_builder(arch)
        except ValueError as err:
            raise ValueError(f"unknown torchvision model {arch!r} (torchvision.models.list_models() lists them)") \
                from err
        return ctor(weights=None, **model_kwargs)
    try:
        import timm
    except ImportError as err:
        raise ValueError("timm models need the optional timm package: pip install 'ascood[timm]'") from err
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} (timm.list_models() lists them)")
    return timm.create_model(arch, pretrained=False, **model_kwargs)


def build_external(name: str, num_classes: int, head: str = "zscore", sigma: float = 0.5,
                   weights: str | os.PathLike | None = None, model_kwargs: dict | None = None) -> ASCOODNet:
    """:func:`wrap` of a ``"torchvision:ARCH"`` or ``"timm:ARCH"`` model built without downloads.

    ``weights``: a local state dict of the *whole original model* (classifier
    included; bare, or under "state_dict"/"model"; "module." prefixes are
    matched away), loaded with ``weights_only=True`` before wrapping, so its
    classifier is kept when ``num_classes`` equals the file's. ``model_kwargs``
    go to the constructor (e.g. ``{"image_size": 64}`` for torchvision ViT).
    """
    source, sep, arch = name.partition(":")
    if not sep or source not in EXTERNAL_SOURCES or not arch:
        raise ValueError(f"external model names look like torchvision:ARCH or timm:ARCH, got {name!r}")
    model = _construct(source, arch, dict(model_kwargs or {}))
    if weights is not None:
        load_backbone_weights(model, weights)
    return wrap(model, num_classes, head=head, sigma=sigma)
