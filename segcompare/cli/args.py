"""Argument types and the options several subcommands share: sizes, counts, model names, and
the inference options that become one `InferenceSettings`."""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence


# --- argument types shared by several subcommands ----------------------------------------------
# Every number and list an option takes is a row of segcompare.values.RULES, parsed and checked
# by `option(flag)`: the one value rule of the recipes and the Python API too.
def option(flag: str) -> Any:
    """The argparse `type=` of `flag` (e.g. '--fps'): its text parsed and checked by its row."""
    from segcompare.values import cli_type

    return cli_type(flag)


def check_model_size(size: Optional[tuple[int, int]], flag: str) -> None:
    """A model input size given on the command line: large enough for both families."""
    from segcompare.models.variants import check_input_hw

    if size is not None:
        check_input_hw(size, f"{flag} {size[0]}x{size[1]}")


def model_names(values: Sequence[str]) -> list[str]:
    """Check model names against the factory; empty means all of them."""
    from segcompare.models import list_models

    valid = list_models()
    unknown = [v for v in values if v not in valid]
    if unknown:
        from segcompare.utils import SegcompareError

        raise SegcompareError(f"unknown model {unknown[0]!r}; valid names: {', '.join(valid)}")
    return list(values) or valid


# --- segcompare eval / predict / video: options they share -------------------------------------
def _add_test_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument(
        "--mode", choices=("whole", "slide"), help="whole image, or sliding windows (default: "
        "slide, the official test: SegFormer windows 1024x1024 stride 768 at 1024x2048, HRNet "
        "windows of the whole test size; both scaled to other sizes)",
    )  # fmt: skip
    g.add_argument(
        "--scales", type=option("--scales"), metavar="S,S,..",
        help="test scales, averaged (default: 1.0; --aug-test for the official sets)",
    )  # fmt: skip
    g.add_argument("--flip", action="store_true", help="average with the flipped image")
    g.add_argument(
        "--aug-test", action="store_true",
        help="each family's official multi-scale test with flip: SegFormer scales "
        "0.5,0.75,1.0,1.25,1.5,1.75,2.0 (NVlabs tools/test.py), HRNet 0.5,...,1.75 (its README)",
    )  # fmt: skip
    g.add_argument(
        "--size", type=option("--size"), metavar="HxW", help="test size (default: the image's)"
    )
    g.add_argument(
        "--window", type=option("--window"), metavar="HxW", help="slide window at the test size"
    )
    g.add_argument(
        "--stride", type=option("--stride"), metavar="HxW", help="slide stride at the test size"
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    _add_precision_option(g)
    g.add_argument(
        "--no-optimize", action="store_true",
        help="run the eager model instead of prepare_for_inference's rewrite (which gives the "
        "same logits, faster)",
    )  # fmt: skip


def _inference_settings(args: argparse.Namespace) -> Any:
    """The one InferenceSettings value the inference options describe."""
    from segcompare.evaluate import InferenceSettings
    from segcompare.utils import SegcompareError

    check_model_size(args.size, "--size")
    check_model_size(args.window, "--window")
    if args.aug_test and (args.scales or args.flip):
        raise SegcompareError("--aug-test sets each family's own scales and flip: drop --scales "
                              "and --flip, or drop --aug-test")
    return InferenceSettings(
        mode=args.mode or InferenceSettings.mode, scales=tuple(args.scales or (1.0,)),
        flip=args.flip, aug_test=args.aug_test,
        size_hw=args.size, window_hw=args.window, stride_hw=args.stride, device=args.device,
        precision=args.precision or "fp32", amp=args.amp, optimize=not args.no_optimize,
        calib=_calibration(args), calib_images=args.calib_images,
    )  # fmt: skip


def _calibration(args: argparse.Namespace) -> Any:
    """--calib, else for int8 the data set a command scores (eval's and compare's --data: its
    train split's images), else None."""
    if args.calib or args.precision != "int8":
        return args.calib
    return getattr(args, "data", None)


def _add_precision_option(g: Any) -> None:
    """--precision, and --amp (its older alias) on a parser or argument group."""
    from segcompare.precision import PRECISIONS

    g.add_argument(
        "--precision", choices=PRECISIONS, default=None,
        help="what the model computes in (default fp32). int8: HRNet on the CPU, convolutions in "
        "int8 after a calibration (--calib), compiled once per input size (minutes). bf16 on a "
        "CPU: layers oneDNN gets wrong there, and SegFormer layers a probe finds slower in "
        "bf16 there (timed once per input size), run in fp32, and a line says which. compare "
        "also scores each model in fp32 and reports the mIoU change",
    )  # fmt: skip
    g.add_argument(
        "--amp", action="store_true",
        help="alias: --precision bf16 on the CPU, fp16 on a GPU",
    )  # fmt: skip
    g.add_argument(
        "--calib", metavar="DIR",
        help="int8: calibration images, a data set root (its train split) or a folder of images "
        "(default for eval and compare: --data). The statistics are cached per model and size",
    )  # fmt: skip
    g.add_argument(
        "--calib-images", type=option("--calib-images"), default=32, metavar="N",
        help="int8: how many calibration images, spread over the folder (default 32)",
    )  # fmt: skip


def _add_model_options(p: argparse.ArgumentParser, repeatable: bool = False) -> None:
    """--model NAME, --weights W and --checkpoint: one model (`_predictor`) or, `repeatable`,
    several (`_model_list`): each flag repeated or comma-separated, `A,B` always two models."""
    if repeatable:
        p.add_argument("--model", action="append", default=[], metavar="NAME",
                       help="(repeatable, or NAME,NAME)")
        p.add_argument("--weights", action="append", default=[], metavar="W",
                       help="checkpoint, training run folder, model folder or hf://owner/name "
                       "(repeatable, or W,W)")
    else:
        p.add_argument("--model", metavar="NAME", help="model name (default: read from --weights)")
        p.add_argument("--weights", metavar="W",
                       help="checkpoint, training run folder, model folder or hf://owner/name")
    _add_checkpoint_option(p)


def _add_checkpoint_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", choices=("final", "best"), default="final",
        help="for a training run folder given as --weights: its final weights (default, what "
        "the official tests evaluate) or best.safetensors (best val mIoU: optimistic on val)",
    )  # fmt: skip


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (in an --out folder: the last run's)")


def split_list(values: Sequence[str]) -> list[str]:
    """Repeated and comma-separated values -> one list: ['a,b', 'c'] -> ['a', 'b', 'c']."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def one_model(value: Optional[str], flag: str) -> Optional[str]:
    """A single --model / --weights: `A,B` names two models, which this command cannot take."""
    if value is not None and "," in value:
        from segcompare.utils import SegcompareError

        raise SegcompareError(
            f"{flag} {value!r} names {len(split_list([value]))} models; this command runs one "
            "(compare and video take several)"
        )
    return value


def run_weights_of(weights: Optional[str], checkpoint: str = "final") -> Optional[str]:
    """A training run folder -> its final (or `checkpoint`) weights file; anything else as it is."""
    if weights is None or weights.startswith("hf://"):
        return weights
    from segcompare.run_folder import run_weights

    return str(run_weights(weights, checkpoint))


def _model_list(names: Sequence[str], weights: Sequence[str]) -> list[tuple[Any, Any]]:
    """Repeated or comma-separated --model / --weights -> (name or None, weights or None) pairs,
    checked."""
    from segcompare.utils import SegcompareError

    names, weights = split_list(names), split_list(weights)
    if not names and not weights:
        raise SegcompareError("name at least one model: --model NAME --weights W")
    if names and weights and len(names) != len(weights):
        raise SegcompareError(
            f"{len(names)} --model but {len(weights)} --weights: give one --weights per --model"
        )
    model_names(names)
    count = max(len(names), len(weights))
    return list(zip(names or [None] * count, weights or [None] * count))


def _predictor(
    settings: Any, name: Optional[str], weights: Optional[str], checkpoint: str = "final"
) -> Any:
    """Build the model (weights through build_model; a training run folder's `checkpoint`
    weights) and wrap it in a Predictor."""
    import dataclasses
    import logging

    import torch

    from segcompare.infer import Predictor
    from segcompare.models import build_model, family_of
    from segcompare.models.save import num_classes_of
    from segcompare.stats import check_forward_memory
    from segcompare.utils import SegcompareError, select_device

    if name is None and weights is None:
        raise SegcompareError("name a model: --model NAME and/or --weights W")
    torch.manual_seed(0)  # without weights: the same random model every run
    model = build_model(name, weights=run_weights_of(weights, checkpoint))
    device = select_device(settings.device)
    if settings.size_hw and device.type in ("cpu", "cuda"):
        family = dataclasses.replace(settings, family=family_of(model))
        hw = family.model_input_hw(settings.size_hw, largest=True)
        check_forward_memory(model.variant, hw, 1, num_classes_of(model), device,
                             **model.settings)
    if weights is None:
        logging.getLogger("segcompare").warning(
            "no --weights for %s: random weights (seed 0), the predictions mean nothing", name
        )
    return Predictor(model, settings)
