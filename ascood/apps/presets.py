"""Per-benchmark presets: the paper's settings for each row of its Table 1, one name away.

    from ascood.apps.presets import PRESETS, resolve
    cfg = resolve("cifar10", explicit={"epochs": 5}, defaults=TRAIN_DEFAULTS)
    cfg.values["lr"], cfg.sources["lr"]        # 0.1, "preset"
    cfg.values["epochs"], cfg.sources["epochs"]  # 5, "flag"

Every value a preset sets can be overridden by an explicit flag; a value
neither set by the preset nor given as a flag keeps the command's default.
:class:`Resolved` records where each value came from ("preset", "flag",
"default", or "derived" when it follows from an overridden value, e.g. the
test-time pre-size from an overridden image size).

Sources: ``/work/shared/paper/benchmarks.md`` and ``reference-facts.md``
(the paper's Sec. 4 and the authors' OpenOOD-fork scripts); every preset
states its own in ``provenance`` (``ascood reproduce --list`` prints them).
CIFAR-10 has two: ``cifar10`` is the fork's train script (saliency-ranked
shuffle, p_inv 0.15), ``cifar10_random`` the run whose result files the fork
publishes (pixels chosen at random, p_inv 0.2); which one produced Table 1
is not settled. imagenet200 is not in the paper: its preset follows OpenOOD
v1.5's ImageNet-200 baseline (ResNet-18 at 224 from scratch, ImageNet
statistics, pre-size 256, 90 epochs, lr 0.1, batch 128) with the paper's
default ASCOOD settings (gradient outliers, p_inv 0.1, alpha 300 -> 30, w
1.0) and SCALE as the scorer; none of these ASCOOD choices is the authors'.
imagenet100 is the paper's Table 3 (DreamOOD's schedule); the fork has no
config for it, so its outlier settings are the paper's defaults, our choice.

``scorer_params`` are passed to the scorers a preset runs: every preset gives
NNGuide the fork's bank, the whole ID training set (``bank="all"``; the fork
removed upstream OpenOOD's subsampling).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Preset", "PRESETS", "PUBLISHED", "Published", "PublishedPerSet", "Resolved", "SCORER_PARAMS",
           "resolve", "get_preset", "TRAIN_KEYS", "EVAL_KEYS",
           "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
           "explicit_dests", "apply_cli_preset", "pretrained_weights_error", "eval_pre_size", "train_steps",
           "add_preset_args", "print_config", "preset_list_text"]

# OpenOOD's fixed normalisation statistics (openood/preprocessors/transform.py: normalization_dict).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# CIFAR-100's are OpenOOD's and the authors' fork's to the 4th digit (they also give ODIN / i-ODIN their std).
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Training augmentations, as :func:`ascood.data.datasets.build_transforms` applies them by image size.
AUG_CIFAR = "random crop (pad 4) + horizontal flip"
AUG_IMAGENET = "RandomResizedCrop + horizontal flip"


def train_steps(n_train: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of one run (the last partial batch is kept, as ascood.data.datasets.make_loader does)."""
    return -(-n_train // batch_size) * epochs


def eval_pre_size(image_size: int) -> int:
    """Test-time resize before the centre crop (what ascood.data.datasets.build_transforms does): the shorter
    side goes to image_size * 256/224 above 64 px (256 for 224, 512 for 448), else to image_size."""
    return int(round(image_size * 256 / 224)) if image_size > 64 else int(image_size)


@dataclass(frozen=True)
class Preset:
    """One benchmark's settings (paper names in the field docs of :class:`ascood.training.trainer.TrainConfig`).

    ``scorer`` is the post-hoc scorer the paper reports for its ASCOOD row;
    ``scorers`` are the scorers ``ascood eval``/``reproduce`` run (each with an
    APS search of its grid on the validation split when it has one).
    ``pretrained``: the backbone is fine-tuned from ImageNet weights, which
    must be given as a local ``--weights`` file (nothing is downloaded).
    """

    name: str
    setting: str  # "conventional", "spurious", "fine-grained" (the paper's grouping)
    num_classes: int
    model: str
    pretrained: bool
    image_size: int
    pre_size: int
    train_aug: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    epochs: int
    lr: float
    batch_size: int
    ood_type: str
    p_inv: float
    alpha_max: float
    alpha_min: float
    w: float
    fc_lr_factor: float
    scorer: str
    scorers: tuple[str, ...]
    weights_hint: str = ""
    notes: str = ""
    #: Pixel ranking of the shuffle outliers (``TrainConfig.shuffle_rank``).
    shuffle_rank: str = "exp"
    #: The OpenOOD benchmark whose tree it reads (default: the preset's name).
    benchmark: str = ""
    #: Where the settings come from (printed by ``ascood reproduce --list``).
    provenance: str = ""
    #: Scorer name -> constructor arguments for the scorers this preset runs.
    scorer_params: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: SCORER_PARAMS)

    @property
    def tree_name(self) -> str:
        return self.benchmark or self.name

    def train_values(self) -> dict[str, Any]:
        """The values ``ascood train`` flags take (argparse dest -> value)."""
        return {"model": self.model, "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "ood_type": self.ood_type,
                "p_inv": self.p_inv, "alpha_max": self.alpha_max, "alpha_min": self.alpha_min, "w": self.w,
                "fc_lr_factor": self.fc_lr_factor, "shuffle_rank": self.shuffle_rank, "head": "zscore",
                "benchmark": self.tree_name}

    def eval_values(self) -> dict[str, Any]:
        """The values ``ascood eval`` flags take."""
        return {"scorers": ",".join(self.scorers), "batch_size": self.batch_size, "benchmark": self.tree_name}

    def params_for(self, scorer: str) -> dict[str, Any]:
        """Constructor arguments of one scorer of this preset (empty for most)."""
        return dict(self.scorer_params.get(scorer, {}))

    def info_values(self) -> dict[str, Any]:
        """Values no flag sets (shown by --print-config; ``pre_size`` is derived again if image_size changes)."""
        return {"pretrained": self.pretrained, "pre_size": self.pre_size, "train_aug": self.train_aug,
                "scorer": self.scorer}


#: Scorer arguments every preset passes: NNGuide's bank is the whole ID training set, as the authors' fork
#: (it removed upstream OpenOOD's alpha subsampling; benchmarks.md). Read-only: presets share it.
SCORER_PARAMS: Mapping[str, Mapping[str, Any]] = MappingProxyType({"nnguide": MappingProxyType({"bank": "all"})})

_R18_HINT = "torchvision's ImageNet ResNet-18 state dict, e.g. resnet18-f37072fd.pth"
_R34_HINT = "torchvision's ImageNet ResNet-34 state dict, e.g. resnet34-b627a593.pth"
_R50_HINT = "torchvision's ImageNet ResNet-50 state dict, e.g. resnet50-0676ba61.pth"
_FORK = "the authors' OpenOOD fork"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cifar10", "conventional", 10, "resnet18_32x32", False, 32, 32, AUG_CIFAR, CIFAR10_MEAN, CIFAR10_STD,
           100, 0.1, 128, "shuffle", 0.15, 300.0, 30.0, 1.0, 1.0, "scale", ("msp", "scale", "iodin"),
           notes="which CIFAR-10 run produced Table 1 is not settled: cifar10_random is the run whose result "
                 "files the fork publishes",
           provenance=f"{_FORK}'s CIFAR-10 train script: invariant pixel shuffle of the pixels ranked by "
                      "sum_c exp(G_c), p_inv 0.15, w 1"),
    Preset("cifar10_random", "conventional", 10, "resnet18_32x32", False, 32, 32, AUG_CIFAR, CIFAR10_MEAN,
           CIFAR10_STD, 100, 0.1, 128, "shuffle", 0.2, 300.0, 30.0, 1.0, 1.0, "scale", ("msp", "scale", "iodin"),
           shuffle_rank="random", benchmark="cifar10",
           notes="which CIFAR-10 run produced Table 1 is not settled: cifar10 is the fork's train script",
           provenance=f"{_FORK}'s only published ASCOOD CIFAR-10 result files (run folder marked 'random'): "
                      "shuffle of pixels chosen at random, p_inv 0.2, w 1; its i-ODIN file's per-set numbers "
                      "are shown beside the measured i-ODIN ones"),
    Preset("cifar100", "conventional", 100, "resnet18_32x32", False, 32, 32, AUG_CIFAR, CIFAR100_MEAN, CIFAR100_STD,
           100, 0.1, 128, "shuffle", 0.1, 300.0, 30.0, 5.0, 0.05, "scale", ("msp", "scale"),
           provenance=f"{_FORK}'s CIFAR-100 train script: shuffle, p_inv 0.1, w 5, fc_lr_factor 0.05"),
    Preset("imagenet100", "conventional", 100, "resnet34", True, 224, 256, AUG_IMAGENET, IMAGENET_MEAN,
           IMAGENET_STD, 20, 0.0005, 40, "gradient", 0.1, 300.0, 30.0, 1.0, 1.0, "ebo", ("msp", "ebo"), _R34_HINT,
           notes="ID sets: OpenOOD's ImageNet-1K lists filtered to the --class-list classes (ID test: 45 images "
                 "per class, OpenOOD's split of the official val set); the outlier settings are the paper's "
                 "defaults (our choice: the fork holds no ImageNet-100 config). The paper's text also gives "
                 "ASCOOD's SSB-Hard AUROC, 83.91",
           provenance="the paper's Sec. 4 (DreamOOD's setup: ResNet-34 ImageNet-pretrained, 20 epochs, batch 40, "
                      "lr 0.0005) and Table 3 (EBO; iNaturalist, Textures, OpenImage-O); gradient outliers p_inv "
                      "0.1, alpha 300 -> 30, w 1 are our choice"),
    Preset("imagenet200", "conventional", 200, "resnet18", False, 224, 256, AUG_IMAGENET, IMAGENET_MEAN,
           IMAGENET_STD, 90, 0.1, 128, "gradient", 0.1, 300.0, 30.0, 1.0, 1.0, "scale", ("msp", "scale"),
           notes="not in the paper: OpenOOD v1.5's ImageNet-200 baseline schedule with the paper's "
                 "default ASCOOD settings (our choice, not the authors')",
           provenance="OpenOOD v1.5's ImageNet-200 baseline schedule; the ASCOOD settings are the paper's defaults "
                      "(our choice)"),
    # Waterbirds / CelebA: batch 128 is the authors' dataset config (not stated in the paper).
    Preset("waterbirds", "spurious", 2, "resnet18", True, 224, 256, AUG_IMAGENET, IMAGENET_MEAN, IMAGENET_STD,
           30, 0.01, 128, "gradient", 0.1, 300.0, 30.0, 0.1, 1.0, "odin", ("msp", "odin"), _R18_HINT,
           provenance=f"{_FORK}'s Waterbirds script (w 0.1, alpha 300 -> 30; batch 128 its dataset config)"),
    Preset("celeba", "spurious", 2, "resnet18", True, 224, 256, AUG_IMAGENET, IMAGENET_MEAN, IMAGENET_STD,
           30, 0.01, 128, "gaussian", 0.1, 0.1, 0.1, 1.0, 1.0, "odin", ("msp", "odin"), _R18_HINT,
           notes="gaussian outliers alpha 0.1 (the authors' other run: gradient, p_inv 0.05, alpha 50 -> 30)",
           provenance=f"{_FORK}'s CelebA script (gaussian outliers, alpha 0.1)"),
    Preset("cars", "fine-grained", 150, "resnet50", True, 448, 512, AUG_IMAGENET, IMAGENET_MEAN, IMAGENET_STD,
           30, 0.01, 32, "gradient", 0.1, 0.1, 0.1, 1.0, 1.0, "relation", ("msp", "relation"), _R50_HINT,
           provenance=f"the paper's Sec. 4 (ResNet-50 at 448, batch 32) and {_FORK}'s Car script (alpha 0.1)"),
    Preset("aircraft", "fine-grained", 90, "resnet50", True, 448, 512, AUG_IMAGENET, IMAGENET_MEAN, IMAGENET_STD,
           30, 0.01, 32, "gradient", 0.1, 0.1, 0.1, 1.0, 1.0, "nnguide", ("msp", "nnguide"), _R50_HINT,
           provenance=f"the paper's Sec. 4 (ResNet-50 at 448, batch 32) and {_FORK}'s Aircraft script (alpha "
                      "0.1); NNGuide with the fork's whole-training-set bank"),
)}


@dataclass(frozen=True)
class PublishedPerSet:
    """Published per-OOD-set numbers (FPR@95, AUROC x100) of some methods, with their scorer and source."""

    source: str
    scorer: Mapping[str, str]  # method ("ce", "ascood") -> scorer name
    values: Mapping[str, Mapping[str, tuple[float, float]]]  # method -> OOD set -> (FPR@95, AUROC)
    id_acc: Mapping[str, float] = field(default_factory=dict)  # method -> ID accuracy of that source


@dataclass(frozen=True)
class Published:
    """The paper's numbers for one preset (x100, OpenOOD convention; (mean, std over 3 runs), std None when
    the paper gives none).

    ``target``: what the number is measured on: "near" = the single near
    set (spurious / fine-grained OOD); "conventional" = the mean over the
    conventional sets of the paper's Sec. 4 (:data:`ascood.data.openood.CONVENTIONAL_SETS`: for CIFAR
    MNIST, SVHN, iSUN, Textures, Places365 -- no near set). ``source``: the
    paper's table. ``per_set``: per-set numbers printed beside the measured ones.
    """

    target: str
    msp_fpr95: tuple[float, float | None]
    msp_auroc: tuple[float, float | None]
    ascood_fpr95: tuple[float, float | None]
    ascood_auroc: tuple[float, float | None]
    acc_ce: float
    acc_ascood: float
    source: str = "Table 1"
    per_set: PublishedPerSet | None = None


_CIFAR10_TABLE1 = ((29.94, 1.32), (91.06, 0.35), (7.69, 0.29), (98.32, 0.07), 95.06, 94.95)

# benchmarks.md, "Published numbers". imagenet200 has none.
PUBLISHED: dict[str, Published] = {
    "aircraft": Published("near", (63.79, 5.71), (80.53, 1.61), (47.94, 5.38), (89.75, 1.01), 87.85, 89.61),
    "cars": Published("near", (58.17, 0.99), (87.12, 0.16), (40.76, 1.13), (91.86, 0.20), 92.73, 94.20),
    "waterbirds": Published("near", (60.41, 1.52), (77.18, 0.66), (11.37, 0.42), (97.48, 0.10), 93.72, 93.59),
    "celeba": Published("near", (56.00, 2.73), (82.53, 1.19), (42.62, 0.76), (86.50, 0.89), 96.72, 96.58),
    "cifar100": Published("conventional", (57.49, 0.85), (78.48, 0.42), (29.90, 0.76), (91.35, 0.13), 77.25, 76.63),
    "cifar10": Published("conventional", *_CIFAR10_TABLE1),
    # Table 1's CIFAR-10 row (which run made it is not settled) and the fork's published i-ODIN result file.
    "cifar10_random": Published("conventional", *_CIFAR10_TABLE1, per_set=PublishedPerSet(
        "the fork's published result file of the 'random' run (i-ODIN)", {"ascood": "iodin"},
        {"ascood": {"cifar100": (43.67, 89.80), "tin": (28.39, 92.63), "mnist": (9.21, 97.75),
                    "svhn": (12.08, 96.94), "texture": (13.10, 97.08), "places365": (24.58, 93.48)}},
        {"ascood": 95.00})),
    # Table 3: the average over iNaturalist, Textures, OpenImage-O; no std in the paper.
    "imagenet100": Published("conventional", (41.24, None), (88.80, None), (23.12, None), (94.02, None), 87.33,
                             87.27, source="Table 3", per_set=PublishedPerSet(
        "the paper's Table 3", {"ce": "msp", "ascood": "ebo"},
        {"ce": {"inaturalist": (21.09, 94.87), "textures": (62.82, 83.45), "openimage_o": (39.82, 88.08)},
         "ascood": {"inaturalist": (18.11, 95.73), "textures": (25.20, 94.40), "openimage_o": (26.04, 91.95)}})),
}

TRAIN_KEYS = tuple(next(iter(PRESETS.values())).train_values())
EVAL_KEYS = tuple(next(iter(PRESETS.values())).eval_values())


def get_preset(name: str) -> Preset:
    """A preset by name; ValueError listing the known ones otherwise."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]


@dataclass
class Resolved:
    """Resolved configuration: ``values[key]`` and where it came from, ``sources[key]``."""

    preset: str | None
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def format(self) -> str:
        """``key  value  source`` lines, sorted by key."""
        width = max((len(k) for k in self.values), default=0)
        head = f"resolved configuration (preset: {self.preset or 'none'}; source: flag > preset > default)"
        lines = [head] + [f"  {k.ljust(width)}  {_show(self.values[k])}  [{self.sources[k]}]"
                          for k in sorted(self.values)]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"preset": self.preset, "values": self.values, "sources": self.sources}


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    return str(v)


def resolve(preset: str | Preset | None, explicit: Mapping[str, Any], defaults: Mapping[str, Any],
            keys: Sequence[str] = TRAIN_KEYS, info: bool = True) -> Resolved:
    """Explicit flags > preset values > defaults, with the source of every value.

    Args:
        preset: a preset name, a :class:`Preset`, or None (defaults and flags only).
        explicit: the values the user gave (only those keys).
        defaults: the command's defaults (every key that has one).
        keys: which preset values apply (:data:`TRAIN_KEYS` or :data:`EVAL_KEYS`).
        info: also resolve the preset's informational values (pre_size,
            pretrained, train_aug, scorer), re-deriving them from overridden flags.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    from_preset: dict[str, Any] = {}
    if p is not None:
        allv = {**p.train_values(), **p.eval_values()}
        from_preset = {k: allv[k] for k in keys if k in allv}
    out = Resolved(p.name if p else None)
    for key in dict.fromkeys([*defaults, *from_preset, *explicit]):
        if key in explicit:
            out.values[key], out.sources[key] = explicit[key], "flag"
        elif key in from_preset:
            out.values[key], out.sources[key] = from_preset[key], "preset"
        else:
            out.values[key], out.sources[key] = defaults.get(key), "default"
    if info and "image_size" in out.values:
        size = out.values["image_size"]
        out.values["pre_size"] = eval_pre_size(size)
        out.sources["pre_size"] = "preset" if p is not None and out.sources["image_size"] == "preset" else "derived"
        out.values["train_aug"] = AUG_CIFAR if size <= 64 else AUG_IMAGENET
        out.sources["train_aug"] = out.sources["pre_size"]
        if p is not None:
            # A preset's pretrained backbone applies only to the preset's own backbone.
            same_model = out.sources.get("model") == "preset"
            out.values["pretrained"] = p.pretrained and same_model
            out.sources["pretrained"] = "preset" if same_model else "derived"
            out.values["scorer"], out.sources["scorer"] = p.scorer, "preset"
    return out


def pretrained_weights_error(resolved: Resolved, weights: str | None, flag: str = "--weights") -> str | None:
    """The error text when a preset fine-tunes a pretrained backbone but no local weights file is given."""
    if not resolved.values.get("pretrained") or weights:
        return None
    p = get_preset(resolved.preset)
    return (f"preset {p.name} fine-tunes an ImageNet-pretrained {p.model}: pass {flag} FILE, a local copy of "
            f"{p.weights_hint} (nothing is ever downloaded), or override --model to train another backbone "
            "from scratch")


# -- argparse glue (the CLI calls these; keeps cli.py thin) ---------------------------------------------------
from .checks import explicit_dests  # noqa: E402  (one definition of "which flags were typed")


def command_defaults(parser_factory: Callable[[], argparse.ArgumentParser], command: str) -> dict[str, Any]:
    """argparse defaults of one subcommand (dest -> default)."""
    parser = parser_factory()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices[command]
            return {a.dest: a.default for a in sub._actions if a.default is not argparse.SUPPRESS}
    raise KeyError(command)


def apply_cli_preset(args: argparse.Namespace, argv: Sequence[str],
                     parser_factory: Callable[[], argparse.ArgumentParser]) -> Resolved:
    """Resolve ``args.preset`` against the flags given in ``argv``; write the values back into ``args``.

    Raises ValueError for an unknown preset. ``args.resolved`` gets the :class:`Resolved`.
    """
    keys = TRAIN_KEYS if args.command == "train" else EVAL_KEYS
    explicit_names = explicit_dests(parser_factory, argv)
    defaults = command_defaults(parser_factory, args.command)
    # Every option of the command is shown (not only those a preset sets), so --print-config is the whole run.
    hidden = {"command", "debug", "print_config", "preset", "help"}
    explicit = {k: getattr(args, k) for k in explicit_names if k not in hidden}
    shown_defaults = {k: v for k, v in defaults.items() if k not in hidden}
    resolved = resolve(args.preset, explicit, shown_defaults, keys=keys, info=args.command == "train")
    for key, value in resolved.values.items():
        if hasattr(args, key):
            setattr(args, key, value)
    args.resolved = resolved
    return resolved


def preset_table_rows() -> list[list[str]]:
    """Rows of the README's preset table (also printed by ``ascood reproduce --list``)."""
    rows = []
    for p in PRESETS.values():
        alpha = f"{p.alpha_max:g}" if p.alpha_max == p.alpha_min else f"{p.alpha_max:g} -> {p.alpha_min:g}"
        norm = "ImageNet" if p.mean == IMAGENET_MEAN else f"OpenOOD {p.tree_name}"
        outliers = f"{p.ood_type} ({p.shuffle_rank})" if p.ood_type == "shuffle" else p.ood_type
        rows.append([p.name, f"{p.model}{' (pretrained)' if p.pretrained else ''}", f"{p.image_size} ({p.pre_size})",
                     norm, str(p.epochs), f"{p.lr:g}", str(p.batch_size), outliers,
                     f"{p.p_inv:g}" if p.ood_type in ("gradient", "shuffle") else "-", alpha if p.ood_type != "shuffle" else "-",
                     f"{p.w:g}", f"{p.fc_lr_factor:g}", p.scorer, ",".join(p.scorers)])
    return rows


def preset_list_text() -> str:
    """What ``ascood reproduce --list`` prints: the preset table, then each preset's provenance and notes."""
    rows = [PRESET_TABLE_HEADER, *preset_table_rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(PRESET_TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "Provenance:"]
    for p in PRESETS.values():
        pub = PUBLISHED.get(p.name)
        published = f"published: the paper's {pub.source}" if pub else "no published numbers"
        lines.append(f"  {p.name}: {p.provenance}; {published}"
                     + (f"; per set: {pub.per_set.source}" if pub and pub.per_set else "")
                     + (f". Note: {p.notes}" if p.notes else ""))
    return "\n".join(lines)


PRESET_TABLE_HEADER = ["preset", "backbone", "size (test pre-size)", "normalisation", "epochs", "lr", "batch",
                       "outliers", "p_inv", "alpha", "w", "fc_lr_factor", "reported scorer", "scorers run"]


def add_benchmark_args(p: argparse.ArgumentParser, command: str) -> None:
    """--preset/--print-config and the OpenOOD tree's flags (``ascood train`` and ``ascood eval``)."""
    from .common_args import add_tree_args

    add_preset_args(p, command)
    add_tree_args(p)


def add_preset_args(p, command: str) -> None:
    """--preset (and for train --print-config) on an argparse parser."""
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="the paper's settings for a benchmark (backbone, size, normalisation, schedule, outliers, "
                        "w, scorers, ...); every flag given explicitly overrides the preset")
    if command == "train":
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration and the source of each value (preset, flag, default, "
                            "derived) and exit; with --data-root also the number of training steps")


def print_config(args) -> None:
    """What ``--print-config`` prints (resolves the data tree first when --data-root is given)."""
    resolved: Resolved = args.resolved
    print(resolved.format())
    if getattr(args, "data_root", None):
        from .common_args import tree_from_args

        tree = tree_from_args(args)
        n = tree.size("id_train")
        steps = train_steps(n, args.batch_size, args.epochs)
        print(f"data: {tree.benchmark.name} under {tree.root}: {n} train images -> {steps} training steps "
              f"({steps // args.epochs} per epoch x {args.epochs} epochs)")
        if tree.skipped:
            print("skipped (missing): " + ", ".join(tree.skipped_names()))
