"""`segcompare models | stats | bench | train | convert | export`: the models themselves."""

from __future__ import annotations

import argparse
from typing import Any

from segcompare.cli.args import (
    _add_model_options,
    _add_overwrite,
    _add_precision_option,
    check_model_size,
    model_names,
    one_model,
    option,
    run_weights_of,
)
from segcompare.precision import PRECISIONS


# --- segcompare models -------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the model names with their parameter counts",
        description="List the 11 variants (SegFormer-B0..B5, HRNetV2-W18-Small-v1/v2, W18, W32, "
        "W48) with their parameter counts, counted on the meta device (nothing is allocated).",
    )  # fmt: skip
    p.add_argument(
        "--num-classes", type=option("--num-classes"),
        default=19, metavar="K", help="classes of the head (19)"
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
        "--size", type=option("--size"),
        default=(1024, 2048), metavar="HxW", help="input HxW (1024x2048)"
    )
    p.add_argument(
        "--num-classes", type=option("--num-classes"),
        default=19, metavar="K", help="classes of the head (19)"
    )
    p.add_argument("--json", metavar="F", help="also write the figures to this JSON file")
    _add_overwrite(p)
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm import tqdm

    from segcompare.stats import format_stats_table, model_stats
    from segcompare.utils import atomic_write_text, check_output

    names = model_names(args.names)
    if args.json is not None:
        check_output(args.json, "--json", (), args.overwrite)
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
        "--size", type=option("--size"),
        default=(1024, 2048), metavar="HxW", help="input HxW (1024x2048)"
    )
    p.add_argument(
        "--batch", type=option("--batch"), default=1, metavar="N", help="images per forward (1)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    _add_precision_option(p)
    p.add_argument("--dtype", choices=PRECISIONS, help="older name of --precision")
    p.add_argument(
        "--threads", type=option("--threads"), default=None, help="CPU threads (default: torch's)"
    )
    p.add_argument(
        "--warmup", type=option("--warmup"), default=2, metavar="N", help="untimed runs first (2)"
    )
    p.add_argument(
        "--iters", type=option("--iters"), default=5, metavar="N", help="timed runs per model (5)"
    )
    p.add_argument(
        "--num-classes", type=option("--num-classes"),
        default=19, metavar="K", help="classes of the head (19)"
    )
    p.add_argument("--no-optimize", action="store_true", help="time the plain eager models")
    p.add_argument(
        "--reference", action="store_true",
        help="add each model's reference as a row: transformers' SegFormer with the same weights, "
        "or for HRNet the eager model (it equals the official code)",
    )
    p.add_argument("--json", metavar="F", help="also write the figures to this JSON file")
    _add_overwrite(p)
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from segcompare import bench
    from segcompare.utils import SegcompareError, atomic_write_text, check_output

    names = model_names(args.names)
    if args.json is not None:
        check_output(args.json, "--json", (), args.overwrite)
    check_model_size(args.size, "--size")
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {p for p in (args.precision, args.dtype) if p}
    if args.amp:
        from segcompare.precision import amp_precision
        from segcompare.utils import select_device

        given.add(amp_precision(select_device(args.device).type))
    if len(given) > 1:
        raise SegcompareError(f"--precision, --dtype and --amp name {' and '.join(sorted(given))}: "
                              "give one")
    precision = given.pop() if given else "fp32"
    rows, meta = bench.bench_models(
        names, args.size, args.batch, args.device, precision, args.warmup, args.iters,
        args.num_classes, optimize=not args.no_optimize, reference=args.reference,
        calib=args.calib, calib_images=args.calib_images,
    )  # fmt: skip
    if args.json:
        atomic_write_text(args.json, json.dumps({"models": rows, "meta": meta}, indent=2) + "\n")
    print(bench.format_table(rows, meta))
    from segcompare.infer.fast import describe_layer_precision

    for name, reports in meta.get("layer_precision", {}).items():
        for report in reports:
            print(f"{name}: {describe_layer_precision(report)}")
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
        "config", metavar="CONFIG", nargs="?",
        help="a recipe file, or the name of a packaged one (segcompare train --list), e.g. "
        "synthcity_segformer_b0; a local file of that name wins",
    )  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the packaged recipes and exit")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, value in YAML (repeatable): --set data.crop_size=[128,128]",
    )
    p.add_argument(
        "--out", metavar="DIR", help="run folder (default: runs/<config name>); a run that fails "
        "before its first output removes the folder if it made it, and its .lock",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in the run folder"
    )
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or mps (default auto: a GPU where "
        "there is one; under torchrun, GPU LOCAL_RANK)",
    )  # fmt: skip
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from segcompare.config import load_config, shipped_recipes
    from segcompare.train import summary_line, train
    from segcompare.utils import SegcompareError, check_output, torchrun_rank_world

    rank, _ = torchrun_rank_world()  # only rank 0 talks
    if args.list:
        for name, path in shipped_recipes().items():
            print(f"{name:<44}{_recipe_title(path)}")
        return 0
    from segcompare.utils import log_to_console

    log_to_console(logging.INFO if rank == 0 else logging.WARNING)
    try:
        if args.config is None:
            raise SegcompareError("name a recipe (a file, or one of `segcompare train --list`)")
        recipe = resolve_recipe(args.config)
        if args.out is not None:
            check_output(args.out, "--out", (recipe,), overwrite=True, folder=True)
        cfg = load_config(recipe, args.set)
        out = args.out or str(Path("runs") / recipe.stem)
        summary = train(cfg, out, resume=args.resume, device=args.device)
    except SegcompareError:
        if rank != 0:
            return 1  # every process fails alike; rank 0 prints the one line
        raise
    if rank == 0:
        print(summary_line(summary))
    return 0


def resolve_recipe(text: str) -> Any:
    """A recipe argument -> its file: a local file (also NAME.yaml for a bare NAME) wins, and says
    so when a packaged recipe has that name; else the packaged recipe of that name (a bare name,
    NAME.yaml or configs/NAME.yaml outside a checkout); else a SegcompareError naming both."""
    import logging
    import os
    from pathlib import Path

    from segcompare.config import shipped_recipes
    from segcompare.utils import SegcompareError

    log = logging.getLogger("segcompare")
    if not text.strip():
        raise SegcompareError("recipe: an empty name; give a file or a packaged recipe's name")
    path = Path(text)
    name = path.name.removesuffix(".yaml")
    shipped = shipped_recipes()
    local = next((p for p in (path, path.with_name(path.name + ".yaml")) if p.is_file()), None)
    if local is not None:
        if name in shipped and not os.path.samefile(local, shipped[name]):
            log.info("recipe: using the local file %s, not the packaged %s of the same name",
                     local, name)
        return local
    if name in shipped and len(path.parts) <= (2 if path.parent.name == "configs" else 1):
        log.info("recipe: %s is not a file here; using the packaged recipe %s", text, name)
        return shipped[name]
    raise SegcompareError(
        f"recipe {text}: no such file, and no packaged recipe of that name (segcompare train "
        "--list names them)"
    )


def _recipe_title(path: Any) -> str:
    """A recipe's first comment line, shortened: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("# ").split(":")[0]
            return title if len(title) <= 70 else title[:67] + "..."
    return ""


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
        type=option("--num-classes"),
        metavar="K",
        help="classes (default: SRC's; another K keeps all but the classifier, initialised)",
    )
    p.add_argument(
        "--backbone-only",
        action="store_true",
        help="load only the backbone, the head stays initialised (mmseg SegFormer files need it)",
    )
    _add_overwrite(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import contextlib
    import logging

    from segcompare.models.save import HF_FILES, convert_checkpoint
    from segcompare.utils import SegcompareError, check_output, log_to_console, output_folder

    log_to_console(logging.WARNING)
    if not args.src.strip():
        raise SegcompareError("SRC: an empty path; name the checkpoint")
    if args.dst.endswith(".safetensors"):
        check_output(args.dst, "DST", [args.src], args.overwrite)
        held = contextlib.nullcontext()
    else:  # a HuggingFace directory: its three files
        held = output_folder(args.dst, "DST", [args.src], args.overwrite, HF_FILES)
    with held:
        summary = convert_checkpoint(
            args.src, args.dst, args.model, args.num_classes, backbone_only=args.backbone_only
        )
    print(summary)
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
    _add_model_options(p)
    p.add_argument("--format", choices=("onnx",), default="onnx", help="(default onnx)")
    p.add_argument(
        "--size", type=option("--size"), default=(1024, 2048), metavar="HxW",
        help="input size the graph is traced at (default 1024x2048)",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=option("--batch"), default=1, metavar="N", help="traced batch size (1)"
    )
    p.add_argument("--dynamic", action="store_true", help="batch, height and width left free")
    p.add_argument("--opset", type=option("--opset"), default=17, metavar="N",
                   help="ONNX opset (default 17, the oldest with LayerNormalization)")
    _add_overwrite(p)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import logging

    import torch

    from segcompare.export import check_onnx, check_opset, export_onnx
    from segcompare.models import build_model
    from segcompare.models.save import num_classes_of
    from segcompare.stats import check_forward_memory
    from segcompare.utils import SegcompareError, check_output

    name = one_model(args.model, "--model")
    weights = run_weights_of(one_model(args.weights, "--weights"), args.checkpoint)
    if name is None and weights is None:
        raise SegcompareError("name a model: --model NAME and/or --weights W")
    check_output(args.out, "OUT", [weights], args.overwrite)
    check_model_size(args.size, "--size")
    check_opset(args.opset)
    torch.manual_seed(0)
    model = build_model(name, weights=weights).eval()
    check_forward_memory(
        model.variant, args.size, args.batch, num_classes_of(model), **model.settings
    )
    if weights is None:
        logging.getLogger("segcompare").warning("no --weights for %s: random weights", name)
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
