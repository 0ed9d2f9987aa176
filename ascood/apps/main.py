"""Command line: ``ascood train | eval | detector | predict | export | reproduce | demo | bench | doctor``
(also ``python -m ascood``).

    ascood train data/train --out runs/mine --epochs 30
    ascood eval runs/mine/last.pt --id data/test --ood far=data/ood_images --train data/train
    ascood detector runs/mine --id-val data/val --ood-val data/ood_val --out det/
    ascood predict det/ photos/ --out preds.csv
    ascood export det/ --format onnx

Each command is a module of its own with its parser next to its code
(:mod:`.train`, :mod:`.evaluate`, :mod:`.reproduce`, :mod:`.tools`); this one
only dispatches. Argument errors exit with status 2 and one line on stderr;
runtime errors (missing or corrupt files, a non-finite loss) exit 1 with one
line (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import checks
from .argtypes import OneLineParser

__all__ = ["main", "build_parser"]

CLIError = checks.InputError  # a user-facing error: printed as one line, exit status 2
#: Under torchrun, how long a process whose peer failed waits before it ends (see :func:`_main`).
PEER_GRACE_S = 2.0


def build_parser() -> argparse.ArgumentParser:
    """The whole ``ascood`` parser (every command's flags)."""
    from . import detector, evaluate, export, predict, reproduce, tools, train

    parser = OneLineParser(prog="ascood",
                           description="ASCOOD out-of-distribution detection: train, evaluate, deploy (detector, predict, "
                                       "export), demo, bench.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    detector.add_parser(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    reproduce.add_parser(sub)
    tools.add_parsers(sub)
    return parser


def _commands() -> dict:
    from . import detector, evaluate, export, predict, reproduce, tools, train

    return {"train": train.run, "eval": evaluate.run, "detector": detector.run, "predict": predict.run,
            "export": export.run, "reproduce": lambda args: reproduce.cmd(args, args.argv),
            "demo": tools.run_demo, "bench": tools.run_bench, "doctor": tools.run_doctor}


def _parse(argv: list[str]) -> argparse.Namespace:
    from .tools import PASS_THROUGH

    head = 1 if argv[:1] == ["--debug"] else 0
    if len(argv) > head and argv[head] in PASS_THROUGH:
        # Everything after demo/bench/doctor is passed through untouched (argparse would eat "-k", "--help", ...).
        return argparse.Namespace(command=argv[head], args=argv[head + 1:], debug=bool(head))
    return build_parser().parse_args(argv)


def check_backend_variable() -> None:
    """``ASCOOD_BACKEND`` (the ops' default backend) is checked before any work, naming the variable."""
    import os

    value = os.environ.get("ASCOOD_BACKEND")
    if not value:
        return
    from ascood_kernels import BACKENDS

    if value not in BACKENDS:
        raise CLIError(f"environment variable ASCOOD_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")


def error_text(err: BaseException) -> str:
    """The whole message of ``err``; for an error raised in a DataLoader worker, the original error's message
    (torch wraps it as "Caught X in DataLoader worker process N" + the worker's traceback)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name, sep, rest = last.partition(": ")
        if sep and name.replace(".", "").replace("_", "").isalnum():
            return rest  # "ascood.data.datasets.DataError: cannot read image ..." -> the message alone
        return last
    return text or type(err).__name__


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command in ("train", "eval", "reproduce", "demo"):
        check_backend_variable()
    if args.command in ("train", "eval") and (args.preset or getattr(args, "print_config", False)):
        from .presets import apply_cli_preset, print_config

        apply_cli_preset(args, argv, build_parser)
        if getattr(args, "print_config", False):
            print_config(args)
            return 0
    return _commands()[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ascood`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # Ctrl-C at any point, start-up imports included, ends with one line
        return _main(argv)
    except KeyboardInterrupt:
        print("ascood: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    args = _parse(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    args.argv = argv
    if args.command == "train":  # which flags were typed: on --resume the others come from the checkpoint
        args.explicit = checks.explicit_dests(build_parser, argv)
    try:
        with checks.one_line_warnings(args.command):
            return _run(args, argv)
    except CLIError as err:
        print(f"ascood {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one clear message for users; --debug for the traceback
        if getattr(err, "peer_failed", False):  # torchrun: another rank failed and reports it; exit with its status
            import time

            # A moment for that rank to print its message: torchrun stops every process once one has ended
            # with an error, and this one would otherwise often end first.
            time.sleep(PEER_GRACE_S)
            return err.status
        if args.debug:
            raise
        if getattr(err, "user_facing", False):  # e.g. every missing piece of a data tree
            print(f"ascood {args.command}: error: {error_text(err)}", file=sys.stderr)
            return 2
        # The whole message: the file and the detail are often on its later lines.
        print(f"ascood {args.command}: error: {error_text(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
