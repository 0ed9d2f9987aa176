"""argparse value types and the parser class shared by every command (one-line messages, no tracebacks)."""
from __future__ import annotations

import argparse
import math
import os
import re

__all__ = ["OneLineParser", "positive_int", "non_negative_int", "fraction", "non_negative", "positive", "finite",
           "floats", "named_path", "model_name", "device_name", "existing_dir"]


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) so scripts see a single clear message; exit status 2.

    Long options must be typed in full: ``--epoch 3`` is an error, not ``--epochs 3`` (argparse's
    abbreviations would silently take a typo for another flag).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    # ASCII decimal only: int() also reads "1_0" as 10 and other scripts' digits, a silent misreading of a typo.
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        raise argparse.ArgumentTypeError(f"expected a {what} integer (decimal digits), got {text!r}")
    v = int(text)
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An int >= 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    return _int_at_least(text, 0, "non-negative")


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return v


def positive(text: str) -> float:
    """A finite number > 0."""
    v = non_negative(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return v


def finite(text: str) -> float:
    """Any finite number."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return v


def floats(text: str) -> list[float]:
    """Comma-separated numbers."""
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def named_path(text: str) -> tuple[str, str]:
    """NAME=PATH, or PATH (named after its last component)."""
    if "=" not in text:
        return os.path.basename(os.path.normpath(text)) or text, text
    name, path = text.split("=", 1)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def model_name(text: str) -> str:
    """--model: a built-in backbone name, or torchvision:NAME / timm:NAME (checked when the model is built)."""
    from ..nets.registry import MODEL_NAMES
    from ..nets.wrapping import EXTERNAL_SOURCES

    source, sep, arch = text.partition(":")
    if text in MODEL_NAMES or (sep and source in EXTERNAL_SOURCES and arch):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODEL_NAMES)}, torchvision:NAME or timm:NAME, "
                                     f"got {text!r}")


def device_name(text: str) -> str:
    """--device: cpu, cuda or cuda:N, checked against this machine (torch's own message names no flag).

    The wording is :func:`ascood.deploy.inputs.device_problem`'s, which ``Detector(device=...)`` shares."""
    from ..deploy.inputs import device_problem

    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r} (device type {dev.type!r} "
                                         "is not supported)")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine (use cpu)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def existing_dir(text: str) -> str:
    """A path that is an existing folder (as typed)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected an existing folder, got {text!r}"
                                         + (" (a file)" if os.path.exists(text) else " (not found)"))
    return text
