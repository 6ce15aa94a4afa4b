"""The `segcompare` command line: argparse subcommands, each a thin call into the package.

Imports of torch and friends happen inside the handlers so that `segcompare --help` is instant.
A `SegcompareError` or `ValueError` raised by a handler is printed as one line with exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from segcompare import __version__


# --- segcompare models -------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model names with their parameter counts")
    p.add_argument("--num-classes", type=int, default=19)
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    import torch

    from segcompare.models import build_model, count_parameters, list_models

    print(f"{'model':<22}{'parameters':>14}")
    for name in list_models():
        with torch.device("meta"):
            model = build_model(name, num_classes=args.num_classes)
        print(f"{name:<22}{count_parameters(model):>14,}")
    return 0


# Each subcommand registers itself here, in the order `--help` lists them.
_SUBCOMMANDS = [
    _add_models,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segcompare",
        description="Train, evaluate, run and compare HRNetV2 and SegFormer on Cityscapes.",
    )
    parser.add_argument("--version", action="version", version=f"segcompare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from segcompare.utils import SegcompareError

    try:
        return int(args.func(args) or 0)
    except (SegcompareError, ValueError, FileNotFoundError) as err:
        print(f"segcompare {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"segcompare {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
