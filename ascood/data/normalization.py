"""Which input normalisation a training run uses, and why (issue 11, point 8).

The reference normalises every fine-tuned (ImageNet-pretrained) benchmark with
ImageNet's statistics, the ones the pretrained weights were trained with;
statistics estimated from the data are only right for a network trained from
scratch. :func:`choose_normalization` applies that rule; the result is printed
by ``ascood train`` and stored in the checkpoint (``extra["normalization"]``)
and in the model itself (``input_mean`` / ``input_std``).
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATION_SOURCES", "OPENOOD_PREPROCESSING", "choose_normalization",
           "describe", "openood_preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenOOD v1.5's test-time preprocessing per ID dataset (``openood/evaluation_api/preprocessor.py``,
#: ``default_preprocessing_dict``): resize the shorter side to ``pre_size`` (bilinear), centre-crop ``image_size``,
#: normalise with ``mean`` / ``std``. ascood's test transform (:func:`ascood.data.datasets.build_transforms`) is
#: the same for these sizes: Resize(S) + CenterCrop(S) up to 64 px, Resize(round(S * 256 / 224)) + CenterCrop(S)
#: above (224 -> 256). tests/nets/test_openood_checkpoints.py checks the table against OpenOOD's.
OPENOOD_PREPROCESSING: dict[str, dict] = {
    "cifar10": {"pre_size": 32, "image_size": 32, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "cifar100": {"pre_size": 32, "image_size": 32, "mean": (0.5071, 0.4867, 0.4408),
                 "std": (0.2675, 0.2565, 0.2761)},
    "imagenet": {"pre_size": 256, "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "imagenet200": {"pre_size": 256, "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}
#: "given" (--mean/--std), "imagenet" (pretrained weights), "estimated" (from the training data).
NORMALIZATION_SOURCES = ("given", "imagenet", "estimated")


def _imagenet(channels: int) -> tuple[list[float], list[float]]:
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    # A greyscale input to an RGB-pretrained stem: the channel average (documented choice).
    return [sum(IMAGENET_MEAN) / 3] * channels, [sum(IMAGENET_STD) / 3] * channels


def choose_normalization(channels: int, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         pretrained: bool = False,
                         estimate: Callable[[], tuple[Sequence[float], Sequence[float]]] | None = None) -> dict:
    """{"mean", "std", "source"} for a run.

    Given ``mean`` and ``std`` win ("given"); otherwise pretrained backbone
    weights get ImageNet's statistics ("imagenet"); otherwise ``estimate()``
    is called ("estimated"). Giving only one of mean/std is an error, as is a
    wrong number of values or a non-positive std (ValueError naming --mean/--std).
    """
    if (mean is None) != (std is None):
        raise ValueError("--mean and --std must be given together")
    if mean is not None:
        source, m, s = "given", [float(v) for v in mean], [float(v) for v in std]
    elif pretrained:
        source, (m, s) = "imagenet", _imagenet(channels)
    else:
        if estimate is None:
            raise ValueError("no normalisation given and nothing to estimate it from")
        est_m, est_s = estimate()
        source, m, s = "estimated", [float(v) for v in est_m], [float(v) for v in est_s]
    if len(m) != channels or len(s) != channels:
        raise ValueError(f"--mean/--std need {channels} values (one per channel), got {len(m)} and {len(s)}")
    if not all(v > 0 for v in s):
        raise ValueError(f"--std values must be > 0, got {s}")
    return {"mean": m, "std": s, "source": source}


def describe(norm: dict) -> str:
    """One line for the log: 'normalisation: mean [...] std [...] (ImageNet statistics, pretrained weights)'."""
    why = {"given": "given with --mean/--std", "imagenet": "ImageNet statistics, for the pretrained weights",
           "estimated": "estimated from the training data (from scratch)"}[norm["source"]]
    fmt = lambda vs: "[" + ", ".join(f"{v:.4f}" for v in vs) + "]"  # noqa: E731
    return f"normalisation: mean {fmt(norm['mean'])} std {fmt(norm['std'])} ({why})"


def openood_preprocessing(name: str) -> dict:
    """OpenOOD's test preprocessing of ID dataset ``name`` as ascood's record: {"image_size", "mean", "std",
    "channels": 3, "source": "openood:NAME"} (``image_size``: the crop; the resize follows from it, see
    :data:`OPENOOD_PREPROCESSING`). ValueError naming the known datasets for any other name."""
    if name not in OPENOOD_PREPROCESSING:
        raise ValueError(f"no OpenOOD preprocessing for {name!r}; known: {', '.join(OPENOOD_PREPROCESSING)}")
    p = OPENOOD_PREPROCESSING[name]
    return {"image_size": p["image_size"], "mean": list(p["mean"]), "std": list(p["std"]), "channels": 3,
            "source": f"openood:{name}"}
