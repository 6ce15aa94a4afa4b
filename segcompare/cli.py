"""The `segcompare` command line: argparse subcommands, each a thin call into the package.

Imports of torch and friends happen inside the handlers so that `segcompare --help` is instant.
A `SegcompareError` (a user's error: a file, key or value) raised by a handler is printed as one
line with exit code 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from segcompare import __version__


# --- argument types shared by several subcommands ----------------------------------------------
def size_hw(text: str) -> tuple[int, int]:
    """'HxW' (e.g. 1024x2048) -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW, e.g. 1024x2048") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


def at_least(low: int) -> Any:
    """An argparse type: an integer of at least `low` (the flag is named by argparse)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


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


# --- segcompare models -------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the model names with their parameter counts",
        description="List the 11 variants (SegFormer-B0..B5, HRNetV2-W18-Small-v1/v2, W18, W32, "
        "W48) with their parameter counts, counted on the meta device (nothing is allocated).",
    )  # fmt: skip
    p.add_argument(
        "--num-classes", type=at_least(1), default=19, metavar="K", help="classes of the head (19)"
    )
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


# --- segcompare stats --------------------------------------------------------------------------
def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats", help="parameters, GMACs, layer counts, depth and activation memory of models",
        description="Count parameters, multiply-adds (attention included), layers, depth and "
        "activation memory of each model at an input size, on the meta device: nothing is "
        "allocated or timed (for timings: segcompare bench).",
    )  # fmt: skip
    p.add_argument("names", nargs="*", metavar="NAME", help="model names (default: all)")
    p.add_argument(
        "--size", type=size_hw, default=(1024, 2048), metavar="HxW", help="input HxW (1024x2048)"
    )
    p.add_argument(
        "--num-classes", type=at_least(1), default=19, metavar="K", help="classes of the head (19)"
    )
    p.add_argument("--json", metavar="F", help="also write the figures to this JSON file")
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm import tqdm

    from segcompare.stats import format_stats_table, model_stats
    from segcompare.utils import atomic_write_text

    names = model_names(args.names)
    check_model_size(args.size, "--size")
    rows = [
        model_stats(n, args.size, args.num_classes) for n in tqdm(names, desc="stats", leave=False)
    ]
    meta = {"torch": torch.__version__, "device": "meta (counted, not timed)"}
    if args.json:
        doc = {"models": rows, "size": list(args.size), "meta": meta}
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
    print(format_stats_table(rows, args.size))
    return 0


# --- segcompare bench --------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="latency, throughput and memory, models side by side",
        description="Time untrained models (random weights: the speed does not depend on them) "
        "interleaved in one process after warm-up, through prepare_for_inference unless "
        "--no-optimize; memory is the peak of the tensors one forward pass creates.",
    )  # fmt: skip
    p.add_argument("names", nargs="+", metavar="NAME", help="model names")
    p.add_argument(
        "--size", type=size_hw, default=(1024, 2048), metavar="HxW", help="input HxW (1024x2048)"
    )
    p.add_argument(
        "--batch", type=at_least(1), default=1, metavar="N", help="images per forward (1)"
    )
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default cpu)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="(default fp32)"
    )
    p.add_argument(
        "--threads", type=at_least(1), default=None, help="CPU threads (default: torch's)"
    )
    p.add_argument(
        "--warmup", type=at_least(0), default=2, metavar="N", help="untimed runs first (2)"
    )
    p.add_argument(
        "--iters", type=at_least(1), default=5, metavar="N", help="timed runs per model (5)"
    )
    p.add_argument(
        "--num-classes", type=at_least(1), default=19, metavar="K", help="classes of the head (19)"
    )
    p.add_argument("--no-optimize", action="store_true", help="time the plain eager models")
    p.add_argument(
        "--reference", action="store_true",
        help="add each model's reference as a row: transformers' SegFormer with the same weights, "
        "or for HRNet the eager model (it equals the official code)",
    )
    p.add_argument("--json", metavar="F", help="also write the figures to this JSON file")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from segcompare import bench
    from segcompare.utils import atomic_write_text

    names = model_names(args.names)
    check_model_size(args.size, "--size")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, meta = bench.bench_models(
        names, args.size, args.batch, args.device, args.dtype, args.warmup, args.iters,
        args.num_classes, optimize=not args.no_optimize, reference=args.reference,
    )  # fmt: skip
    if args.json:
        atomic_write_text(args.json, json.dumps({"models": rows, "meta": meta}, indent=2) + "\n")
    print(bench.format_table(rows, meta))
    return 0


# --- segcompare train --------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a recipe in configs/ (under torchrun for several processes)",
        description="Train a model from a YAML recipe. Several processes: "
        "torchrun --nproc-per-node N -m segcompare train CONFIG ...",
    )
    p.add_argument(
        "config", metavar="CONFIG", help="a recipe, e.g. configs/synthcity_segformer_b0.yaml"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, value in YAML (repeatable): --set data.crop_size=[128,128]",
    )
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<config name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in the run folder"
    )
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import logging
    import os
    from pathlib import Path

    from segcompare.config import load_config
    from segcompare.train import summary_line, train
    from segcompare.utils import SegcompareError

    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; only rank 0 talks
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        cfg = load_config(args.config, args.set)
        out = args.out or str(Path("runs") / Path(args.config).stem)
        summary = train(cfg, out, resume=args.resume)
    except SegcompareError:
        if rank != 0:
            return 1  # every process fails alike; rank 0 prints the one line
        raise
    if rank == 0:
        print(summary_line(summary))
    return 0


# --- segcompare convert ------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (official, HuggingFace, mmseg, ...) to ours or to HuggingFace",
        description="Convert any supported checkpoint (file, HuggingFace directory or hub id "
        "hf://owner/name; the "
        "format is read from its keys) to our safetensors with metadata (DST ending in "
        ".safetensors) or to a HuggingFace directory: config.json + model.safetensors (any other "
        "DST; SegFormer only).",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint, HuggingFace folder or hf://owner/name")
    p.add_argument("dst", metavar="DST", help="out.safetensors, or a directory for HuggingFace")
    p.add_argument("--model", metavar="NAME", help="variant (default: read from SRC's keys)")
    p.add_argument(
        "--num-classes",
        type=at_least(1),
        metavar="K",
        help="classes (default: SRC's; another K keeps all but the classifier, initialised)",
    )
    p.add_argument(
        "--backbone-only",
        action="store_true",
        help="load only the backbone, the head stays initialised (mmseg SegFormer files need it)",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import logging

    from segcompare.models.save import convert_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(
        convert_checkpoint(
            args.src, args.dst, args.model, args.num_classes, backbone_only=args.backbone_only
        )
    )
    return 0


# --- segcompare eval / predict / video: options they share -------------------------------------
def _scales(text: str) -> tuple[float, ...]:
    """'0.5,0.75,1.0' -> (0.5, 0.75, 1.0)."""
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales {text!r} are not numbers like 0.5,1.0") from None
    if not scales or min(scales) <= 0:
        raise argparse.ArgumentTypeError(f"scales {text!r} must be positive")
    return scales


def _add_test_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument(
        "--mode", choices=("whole", "slide"), help="whole image, or sliding windows (default: "
        "slide, the official test: SegFormer windows 1024x1024 stride 768 at 1024x2048, HRNet "
        "windows of the whole test size; both scaled to other sizes)",
    )  # fmt: skip
    g.add_argument(
        "--scales", type=_scales, metavar="S,S,..",
        help="test scales, averaged (default: 1.0; --aug-test for the official sets)",
    )  # fmt: skip
    g.add_argument("--flip", action="store_true", help="average with the flipped image")
    g.add_argument(
        "--aug-test", action="store_true",
        help="each family's official multi-scale test with flip: SegFormer scales "
        "0.5,0.75,1.0,1.25,1.5,1.75,2.0 (NVlabs tools/test.py), HRNet 0.5,...,1.75 (its README)",
    )  # fmt: skip
    g.add_argument("--size", type=size_hw, metavar="HxW", help="test size (default: the image's)")
    g.add_argument("--window", type=size_hw, metavar="HxW", help="slide window at the test size")
    g.add_argument("--stride", type=size_hw, metavar="HxW", help="slide stride at the test size")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    g.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
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
        amp=args.amp, optimize=not args.no_optimize,
    )  # fmt: skip


def _model_list(names: Sequence[str], weights: Sequence[str]) -> list[tuple[Any, Any]]:
    """Repeated --model / --weights -> (name or None, weights or None) pairs, checked."""
    from segcompare.utils import SegcompareError

    if not names and not weights:
        raise SegcompareError("name at least one model: --model NAME --weights W")
    if names and weights and len(names) != len(weights):
        raise SegcompareError(
            f"{len(names)} --model but {len(weights)} --weights: give one --weights per --model"
        )
    model_names(names)
    count = max(len(names), len(weights))
    return list(zip(names or [None] * count, weights or [None] * count))


def _predictor(settings: Any, name: Optional[str], weights: Optional[str]) -> Any:
    """Build the model (weights through build_model) and wrap it in a Predictor."""
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
    model = build_model(name, weights=weights)
    if settings.size_hw and select_device(settings.device).type == "cpu":
        family = dataclasses.replace(settings, family=family_of(model))
        hw = family.model_input_hw(settings.size_hw, largest=True)
        check_forward_memory(model.variant, hw, 1, num_classes_of(model), **model.settings)
    if weights is None:
        logging.getLogger("segcompare").warning(
            "no --weights for %s: random weights (seed 0), the predictions mean nothing", name
        )
    return Predictor(model, settings)


# --- segcompare eval ---------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="Cityscapes metrics (mIoU, iIoU, categories) of a model or of prediction PNGs",
        description="Score a model on a split, or score existing labelIds prediction PNGs "
        "(--pred-dir, from any tool) the same way. The figures equal cityscapesscripts'.",
    )
    p.add_argument("--model", metavar="NAME", help="model name (default: read from --weights)")
    p.add_argument("--weights", metavar="W", help="checkpoint, model folder or hf://owner/name")
    p.add_argument(
        "--pred-dir", metavar="DIR", help="score the labelIds PNGs in DIR instead of a model "
        "(file names contain <city>_<seq>_<frame>)",
    )  # fmt: skip
    p.add_argument("--data", required=True, metavar="ROOT", help="Cityscapes root folder")
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="images per batch (1)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="loader processes (2)")
    p.add_argument("--json", metavar="F", help="write the results to this JSON file")
    p.add_argument("--save-pred", metavar="DIR", help="also write the predictions (labelIds PNGs)")
    _add_test_options(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from segcompare.evaluate import run_eval
    from segcompare.metrics import format_results, write_results
    from segcompare.utils import SegcompareError, init_distributed

    if args.pred_dir and (args.model or args.weights):
        raise SegcompareError("--pred-dir scores existing files: drop --model/--weights")
    if not (args.pred_dir or args.model or args.weights):
        raise SegcompareError(
            "name a model (--model NAME and/or --weights W), or score saved labelIds PNGs with "
            "--pred-dir DIR"
        )
    rank, _ = init_distributed()  # under torchrun: each process scores its share of the images
    if args.pred_dir:
        results = run_eval(args.data, args.split, pred_dir=args.pred_dir, batch_size=args.batch,
                           workers=args.workers, save_pred_dir=args.save_pred)
    else:
        predictor = _predictor(_inference_settings(args), args.model, args.weights)
        meta = predictor.describe()
        meta = {"model": meta.pop("model"), "weights": args.weights, **meta}
        results = run_eval(args.data, args.split, scores=predictor.scores, batch_size=args.batch,
                           workers=args.workers, save_pred_dir=args.save_pred, meta=meta)
    if rank != 0:
        return 0  # rank 0 holds the summed counts too, and reports
    print(format_results(results))
    for p in results["processes"] if results["world_size"] > 1 else []:
        print(f"process {p['rank']}: {p['images']} images in {p['seconds']:.1f} s "
              f"({p['images_per_s'] or 0:.2f}/s)")
    seconds = results["seconds"]
    print(f"{results['num_images']} images in {seconds:.1f} s ({results['images_per_s']:.2f}/s) "
          f"on {results['world_size']} process(es)")
    if args.json:
        write_results(results, args.json)
        print(f"wrote {args.json}")
    return 0


# --- segcompare predict ------------------------------------------------------------------------
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images and write labelIds / trainIds / colour / overlay PNGs or logits",
        description="Segment image files, folders (recursively) or glob patterns and write one "
        "file per image under --out, named after it. labelid PNGs are what the Cityscapes test "
        "server takes; logits are float16 C×H×W .npy.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--model", metavar="NAME", help="model name (default: read from --weights)")
    p.add_argument("--weights", metavar="W", help="checkpoint, model folder or hf://owner/name")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--format", default="labelid",
        choices=("trainid", "labelid", "color", "overlay", "logits"), help="(default labelid)",
    )  # fmt: skip
    _add_test_options(p)
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from segcompare.infer import predict_files
    from segcompare.utils import init_distributed

    rank, world = init_distributed()  # under torchrun: each process writes its share
    predictor = _predictor(_inference_settings(args), args.model, args.weights)
    written = predict_files(predictor, args.inputs, args.out, args.format)
    count = len(written)
    if world > 1:
        import torch
        import torch.distributed as dist

        total = torch.tensor([count])
        dist.all_reduce(total)  # also waits until every process has written its files
        count = int(total.item())
    if rank == 0:
        print(f"wrote {count} {args.format} file(s) to {args.out}")
    return 0


# --- segcompare video --------------------------------------------------------------------------
def _add_video(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "video",
        help="side-by-side video (GIF or MP4) of one or more models on a frame sequence",
        description="Run every --model on each frame and write input | model 1 | model 2 ... "
        "side by side, each panel titled with the model and its latency, with a class legend. "
        "Give --weights once per --model, in the same order. Frames: a folder of images "
        "(e.g. leftImg8bit/demoVideo/stuttgart_00) or a video file (needs the video extra).",
    )
    p.add_argument(
        "source", metavar="FRAMES_DIR_OR_VIDEO", help="a folder of frames or a video file"
    )
    p.add_argument("--model", action="append", default=[], metavar="NAME", help="(repeatable)")
    p.add_argument("--weights", action="append", default=[], metavar="W", help="(repeatable)")
    p.add_argument("--out", required=True, metavar="F", help="F.gif, or F.mp4 (the video extra)")
    p.add_argument("--fps", type=float, default=17.0, help="frames per second (17, Cityscapes')")
    p.add_argument("--every", type=int, default=1, metavar="K", help="use every K-th frame (1)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    p.add_argument(
        "--max-width", type=int, default=1024, metavar="PX",
        help="draw the panels smaller when all of them together are wider (1024; 0: never); "
        "the models still run at the frame size or --size",
    )  # fmt: skip
    _add_test_options(p)
    p.set_defaults(func=_run_video)


def _run_video(args: argparse.Namespace) -> int:
    from segcompare.infer import render_video
    from segcompare.utils import SegcompareError

    models = _model_list(args.model, args.weights)
    if args.fps <= 0 or (args.max_frames is not None and args.max_frames < 1):
        raise SegcompareError("--fps must be positive and --max-frames at least 1")
    if args.max_width < 0:
        raise SegcompareError("--max-width must be 0 (never shrink) or a width in pixels")
    settings = _inference_settings(args)
    predictors = [_predictor(settings, n, w) for n, w in models]
    # --size is the test size; the panels are drawn at it, or smaller to fit --max-width
    frames = render_video(
        predictors, args.source, args.out, args.fps, args.size, args.every, args.max_frames,
        max_width=args.max_width or None,
    )
    print(f"wrote {args.out}: {frames} frames, {len(predictors)} model(s)")
    return 0


# --- segcompare export ------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model (prepared for inference) to ONNX",
        description="Write the model, with prepare_for_inference's rewrites, as an ONNX graph: "
        "input `images` Nx3xHxW normalised, output `logits` NxCx(H/4)x(W/4). Checked with "
        "onnxruntime against PyTorch when it is installed (pip install segcompare[onnx]).",
    )
    p.add_argument("out", metavar="OUT", help="the .onnx file to write")
    p.add_argument("--model", metavar="NAME", help="model name (default: read from --weights)")
    p.add_argument("--weights", metavar="W", help="checkpoint, model folder or hf://owner/name")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="(default onnx)")
    p.add_argument(
        "--size", type=size_hw, default=(1024, 2048), metavar="HxW",
        help="input size the graph is traced at (default 1024x2048)",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=at_least(1), default=1, metavar="N", help="traced batch size (1)"
    )
    p.add_argument("--dynamic", action="store_true", help="batch, height and width left free")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import logging

    import torch

    from segcompare.export import check_onnx, check_opset, export_onnx
    from segcompare.models import build_model
    from segcompare.models.save import num_classes_of
    from segcompare.stats import check_forward_memory
    from segcompare.utils import SegcompareError

    if args.model is None and args.weights is None:
        raise SegcompareError("name a model: --model NAME and/or --weights W")
    check_model_size(args.size, "--size")
    check_opset(args.opset)
    torch.manual_seed(0)
    model = build_model(args.model, weights=args.weights).eval()
    check_forward_memory(
        model.variant, args.size, args.batch, num_classes_of(model), **model.settings
    )
    if args.weights is None:
        logging.getLogger("segcompare").warning(
            "no --weights for %s: random weights (seed 0)", args.model
        )
    path = export_onnx(model, args.out, args.size, args.dynamic, args.batch, args.opset)
    size_mb = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({size_mb:.1f} MB, {model.variant}, input {args.batch}x3x"
        f"{args.size[0]}x{args.size[1]}{', dynamic N/H/W' if args.dynamic else ''})"
    )
    diff = check_onnx(path, model, args.size, args.batch)
    if diff is not None:
        print(f"onnxruntime vs PyTorch: max |logit difference| {diff:.2e}")
    return 0


# --- segcompare data check | prepare | synth ---------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="check, prepare or synthesise a Cityscapes folder",
        description="check: verify a Cityscapes folder file by file; prepare: write the "
        "labelTrainIds PNGs and file lists training needs; synth: write a synthetic Cityscapes "
        "in the real layout.",
    )  # fmt: skip
    data = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = data.add_parser(
        "check",
        help="verify the layout and decode every file",
        description="Verify leftImg8bit/ and gtFine/ (labelIds, color, instanceIds, and "
        "labelTrainIds if present): names, counts per split, sizes, unknown ids, unreadable "
        "or truncated PNGs. Prints one line per problem, naming the file; exit 1 if any.",
    )
    c.add_argument("root", metavar="ROOT", help="the Cityscapes root (leftImg8bit/, gtFine/)")
    c.add_argument("--split", metavar="S[,S]", help="splits to check (default: all present)")
    c.add_argument(
        "--workers", type=at_least(0), metavar="N", help="processes (default: all cores)"
    )
    c.set_defaults(func=_run_data_check)

    r = data.add_parser(
        "prepare",
        help="write *_gtFine_labelTrainIds.png and the file lists",
        description="Write *_labelTrainIds.png beside every *_labelIds.png (as cityscapesscripts' "
        "createTrainIdLabelImgs), skipping files already done, and ROOT/lists/<split>.lst.",
    )
    r.add_argument("root", metavar="ROOT", help="the Cityscapes root (leftImg8bit/, gtFine/)")
    r.add_argument("--split", metavar="S[,S]", help="splits to prepare (default: all present)")
    r.add_argument(
        "--workers", type=at_least(0), metavar="N", help="processes (default: all cores)"
    )
    r.add_argument("--overwrite", action="store_true", help="rewrite existing labelTrainIds")
    r.set_defaults(func=_run_data_prepare)

    y = data.add_parser(
        "synth",
        help="write a synthetic Cityscapes in the real layout",
        description="Street scenes with labelIds, color, instanceIds and polygons, in the real "
        "folder layout; deterministic for a seed. --video adds leftImg8bit_demoVideo frames.",
    )
    y.add_argument("out", metavar="OUT", help="the data set root to write")
    y.add_argument("--train", type=int, default=20, metavar="N", help="train images (20)")
    y.add_argument("--val", type=int, default=10, metavar="N", help="val images (10)")
    y.add_argument("--test", type=int, default=0, metavar="N", help="test images (0)")
    y.add_argument("--size", default="256x512", metavar="HxW", help="image size (256x512)")
    y.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (0)")
    y.add_argument("--video", type=int, default=0, metavar="FRAMES", help="demo video frames")
    y.add_argument(
        "--overwrite", action="store_true",
        help="write into a folder that is not empty (files of the same name are replaced)",
    )  # fmt: skip
    y.set_defaults(func=_run_data_synth)


def _splits(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _run_data_check(args: argparse.Namespace) -> int:
    from segcompare.data.cityscapes import check_dataset

    report = check_dataset(args.root, _splits(args.split), args.workers)
    for line in report.problems:
        print(line)
    for split, n in report.counts.items():
        print(f"{split}: {n} images")
    for line in report.notes:
        print(line)
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {args.root}")
        return 1
    print(f"{args.root}: OK")
    return 0


def _run_data_prepare(args: argparse.Namespace) -> int:
    from segcompare.data.cityscapes import prepare_dataset

    report = prepare_dataset(args.root, _splits(args.split), args.workers,
                             overwrite=args.overwrite)
    for line in report.problems:
        print(line)
    print(f"labelTrainIds: {report.written} written, {report.skipped} already there")
    for path in report.lists:
        print(f"wrote {path}")
    return 1 if report.problems else 0


def _run_data_synth(args: argparse.Namespace) -> int:
    from segcompare.data.synth import make_synthetic_cityscapes
    from segcompare.utils import SegcompareError

    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise SegcompareError(f"--size {args.size!r}: expected HxW, e.g. 256x512") from None
    if min(args.train, args.val, args.test, args.video) < 0:
        raise SegcompareError("--train, --val, --test and --video must not be negative")
    counts = make_synthetic_cityscapes(
        args.out, train=args.train, val=args.val, test=args.test, size=(h, w), seed=args.seed,
        video_frames=args.video, progress=True, overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return 0


# --- segcompare compare ------------------------------------------------------------------------
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="evaluate, count and time several models; write metrics.json and an HTML report",
        description="Run evaluation, stats and bench for each --model and write into --out: "
        "metrics.json, report.md, a self-contained report.html and the plots as PNG files. "
        "Give --weights once per --model, in the same order (or only --weights: the model "
        "names come from the files).",
    )
    p.add_argument("--model", action="append", default=[], metavar="NAME", help="(repeatable)")
    p.add_argument("--weights", action="append", default=[], metavar="W", help="(repeatable)")
    p.add_argument("--data", required=True, metavar="ROOT", help="Cityscapes root folder")
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("--out", default="compare", metavar="DIR", help="report folder (compare)")
    p.add_argument(
        "--images", type=int, default=4, metavar="K", help="hardest images shown (4; 0: none)"
    )
    p.add_argument(
        "--corrupt", metavar="LIST", default="",
        help="also mIoU under corruptions at 3 severities: noise,blur,jpeg,brightness (or all)",
    )  # fmt: skip
    p.add_argument("--max-images", type=int, metavar="N", help="score only the first N images")
    p.add_argument(
        "--corrupt-images", type=int, metavar="N", help="corruptions on the first N images only"
    )
    p.add_argument("--bench-iters", type=int, default=3, metavar="N", help="timed runs (3)")
    p.add_argument("--bench-warmup", type=int, default=1, metavar="N", help="warm-up runs (1)")
    p.add_argument(
        "--boundary-frac", type=float, default=None, metavar="F",
        help="Boundary IoU band as a fraction of the image diagonal (0.005; the paper: 0.02)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", choices=("final", "best"), default="final",
        help="for a training run folder given as --weights: its final weights (default, what "
        "the official tests evaluate) or best.safetensors (best val mIoU: optimistic on val)",
    )  # fmt: skip
    _add_test_options(p)
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    import logging

    from segcompare.compare import CompareSpec, run_compare
    from segcompare.data.corrupt import parse_corruptions
    from segcompare.metrics import BOUNDARY_FRAC
    from segcompare.utils import SegcompareError, torchrun_rank_world

    rank, world = torchrun_rank_world()
    if world > 1:  # its latencies, per-image figures and plots are one process's measurements
        if rank != 0:
            return 1  # every process fails alike; rank 0 prints the one line
        raise SegcompareError(
            f"compare runs in one process, not under torchrun (WORLD_SIZE={world}); for the "
            "figures on several processes run `torchrun ... -m segcompare eval` per model"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notices
    models = _model_list(args.model, args.weights)
    for flag in ("max_images", "corrupt_images"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SegcompareError(f"--{flag.replace('_', '-')} must be at least 1")
    frac = BOUNDARY_FRAC if args.boundary_frac is None else args.boundary_frac
    if not 0 < frac < 1:
        raise SegcompareError(f"--boundary-frac must be in (0, 1), got {frac}")
    doc = run_compare(CompareSpec(
        models, args.data, args.split, args.out, images=args.images,
        corruptions=parse_corruptions(args.corrupt), inference=_inference_settings(args),
        max_images=args.max_images, corrupt_images=args.corrupt_images,
        bench_iters=args.bench_iters, bench_warmup=args.bench_warmup, boundary_frac=frac,
        checkpoint=args.checkpoint,
    ))  # fmt: skip
    print(f"{'model':<24}{'mIoU':>7}{'B-IoU':>7}{'GMACs':>10}{'ms':>9}")
    for m in doc["models"]:
        print(
            f"{m['label']:<24}{100 * m['miou']:>7.1f}{100 * m['boundary_iou']:>7.1f}"
            f"{m['gmacs']:>10.4g}{m['latency_ms']:>9.1f}"
        )
    print(f"wrote {args.out}/report.html, report.md, metrics.json")
    return 0


# --- segcompare demo ---------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the built-in synthetic Cityscapes: train SegFormer-B0 and "
        "HRNet-W18-Small-v1, evaluate, compare, render the side-by-side video",
        description="Synthesise a Cityscapes-layout data set (cached), train SegFormer-B0 and "
        "HRNet-W18-Small-v1 with configs/synthcity_*.yaml, compare their final weights "
        "(report.html, metrics.json) and render the side-by-side GIF. Each step is skipped when "
        "its output exists, so a rerun takes seconds. With --data and --weights the same "
        "comparison runs on real Cityscapes and real weights.",
    )
    p.add_argument("--out", default="segcompare-demo", help="output folder (segcompare-demo)")
    p.add_argument("--fresh", action="store_true", help="recompute every step")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and few iterations (a test)")
    p.add_argument("--cache", help="where the synthetic data set is kept (~/.cache/segcompare)")
    p.add_argument("--data", help="a real Cityscapes root: compare --weights on it, no training")
    p.add_argument("--weights", help="comma-separated checkpoints to compare with --data")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import logging
    import time

    from segcompare.demo import run_demo, summary_table

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notices
    start = time.time()
    weights = [w for w in (args.weights or "").split(",") if w]
    doc = run_demo(
        args.out, fresh=args.fresh, tiny=args.tiny, data=args.data, weights=weights,
        cache=args.cache,
    )  # fmt: skip
    print(summary_table(doc))
    files = doc["files"]
    print(f"\nreport: {files['report_html']}  (also {files['report_md']}, {files['metrics']})")
    if files["video"]:
        print(f"video:  {files['video']}")
    print(f"done in {(time.time() - start) / 60:.1f} min")
    return 0


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
    from segcompare.utils import SegcompareError

    try:
        return int(args.func(args) or 0)
    except SegcompareError as err:
        print(f"segcompare {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"segcompare {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
