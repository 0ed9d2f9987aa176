"""argparse value types shared by the CLI and the demo (one-line messages, no tracebacks)."""
from __future__ import annotations

import argparse


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An int >= 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    return _int_at_least(text, 0, "non-negative")


def model_name(text: str) -> str:
    """--model: a built-in backbone name, or torchvision:NAME / timm:NAME (checked when the model is built)."""
    from .models import MODEL_NAMES
    from .wrapping import EXTERNAL_SOURCES

    source, sep, arch = text.partition(":")
    if text in MODEL_NAMES or (sep and source in EXTERNAL_SOURCES and arch):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODEL_NAMES)}, torchvision:NAME or timm:NAME, "
                                     f"got {text!r}")
