"""The `segcompare` command line: argparse subcommands, each a thin call into the package.

    args.py       argument types, the shared inference options (one InferenceSettings)
    models.py     models, stats, bench, train, convert, export
    inference.py  eval, predict, video, compare
    data.py       data check | prepare | synth, demo

Imports of torch and friends happen inside the handlers so that `segcompare --help` is instant.
A `SegcompareError` (a user's error: a file, key or value) raised by a handler is printed as one
line with exit code 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from segcompare import __version__
from segcompare.cli.data import _add_data, _add_demo
from segcompare.cli.inference import _add_compare, _add_eval, _add_predict, _add_video
from segcompare.cli.models import (
    _add_bench,
    _add_convert,
    _add_export,
    _add_models,
    _add_stats,
    _add_train,
)

# Each subcommand registers itself here, in the order `--help` lists them.
_SUBCOMMANDS = [
    _add_demo,
    _add_models,
    _add_data,
    _add_stats,
    _add_bench,
    _add_train,
    _add_convert,
    _add_export,
    _add_eval,
    _add_predict,
    _add_video,
    _add_compare,
]


# The commands that run models forward only: glibc keeps their freed memory for reuse.
_INFERENCE_COMMANDS = {"bench", "eval", "predict", "video", "compare", "export"}


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
    # Tensors of 2 MB and more on transparent huge pages (PyTorch reads this once, when torch
    # loads): without it, CPU inference at 1024x2048 spends up to half its time in page faults
    # (benchmarks/RESULTS.md). Set here, before any handler imports torch; the user's value wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in _INFERENCE_COMMANDS:
        from segcompare.infer.fast import tune_cpu_allocator

        tune_cpu_allocator()  # reuse freed activations rather than fresh pages (see its docstring)
        from segcompare.utils import tune_cuda

        tune_cuda()  # TF32 and cuDNN autotuning where torch sees a GPU
    from segcompare.utils import SegcompareError

    try:
        return int(args.func(args) or 0)
    except SegcompareError as err:
        _say(f"segcompare {args.command}: error: {err}")
        return 1
    except KeyboardInterrupt:
        print(f"segcompare {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        rank = _rank_left_by_a_peer(err)
        if rank is None:
            raise
        # under torchrun, another process stopped on its error (its own one line) and closed its
        # connections while this one waited in a collective: one line here too, not gloo's
        _say(f"segcompare {args.command}: error: process {rank} stopped: another process failed "
             "(see its error line)")
        return 1
    finally:
        _leave_process_group()


def _say(line: str) -> None:
    """Print a one-line error to stderr. Under torchrun, every process writes to the same stream
    and process 0's progress bar leaves its line open (it redraws with a carriage return), so a
    process other than 0 starts its line on a new one: it is never glued to the bar."""
    from segcompare.utils import torchrun_rank_world

    rank, world = torchrun_rank_world()
    print(("\n" if world > 1 and rank != 0 else "") + line, file=sys.stderr)


def _rank_left_by_a_peer(err: RuntimeError) -> Optional[int]:
    """This process's rank if `err` is a collective's failure because another process of the
    group went away (gloo: "Connection closed by peer"; NCCL: a remote error), else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    text = str(err)
    if not any(s in text for s in ("closed by peer", "reset by peer", "remote process exited",
                                   "Broken pipe")):
        return None
    return dist.get_rank()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group that eval or predict joined: a process that exits
    with gloo's threads still running can abort ("terminate called without an active
    exception") after its work is done."""
    dist = sys.modules.get("torch.distributed")  # loaded only if a command used it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
