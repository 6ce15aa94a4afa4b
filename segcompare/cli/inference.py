"""`segcompare eval | predict | video | compare`: running models on images."""

from __future__ import annotations

import argparse
from typing import Any

from segcompare.cli.args import (
    _add_model_options,
    _add_overwrite,
    _add_test_options,
    _inference_settings,
    _model_list,
    _predictor,
    one_model,
    option,
    run_weights_of,
)
from segcompare.cli.data import _add_layout_options, _layout_values


# --- segcompare eval ---------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="Cityscapes metrics (mIoU, iIoU, categories) of a model or of prediction PNGs",
        description="Score a model on a split, or score existing labelIds prediction PNGs "
        "(--pred-dir, from any tool) the same way. The figures equal cityscapesscripts'.",
    )
    _add_model_options(p)
    p.add_argument(
        "--pred-dir", metavar="DIR", help="score the prediction PNGs in DIR instead of a model, "
        "in the data set's own label ids: Cityscapes labelIds (names contain "
        "<city>_<seq>_<frame>), ADE20K 1..150 or a folder set's indices (<image stem>.png)",
    )  # fmt: skip
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="data set folder: Cityscapes, ADE20K or a folder of img_dir/ + ann_dir/")
    _add_layout_options(p)
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument(
        "--batch", type=option("--batch"), default=1, metavar="N", help="images per batch (1)"
    )
    p.add_argument(
        "--workers", type=option("--workers"), default=2, metavar="N", help="loader processes (2)"
    )
    p.add_argument("--json", metavar="F", help="write the results to this JSON file")
    p.add_argument("--save-pred", metavar="DIR",
                   help="also write the predictions (PNGs in the data set's own label ids)")
    p.add_argument(
        "--map-classes", action="store_true", help="score a model whose classes differ from the "
        "data set's by class name (each data-set class must be one of the model's)",
    )  # fmt: skip
    _add_overwrite(p)
    _add_test_options(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import contextlib

    from segcompare.evaluate import run_eval
    from segcompare.infer.fast import describe_layer_precision
    from segcompare.metrics import format_results, write_results
    from segcompare.utils import SegcompareError, check_output, init_distributed, output_folder

    if args.pred_dir and (args.model or args.weights):
        raise SegcompareError("--pred-dir scores existing files: drop --model/--weights")
    if not (args.pred_dir or args.model or args.weights):
        raise SegcompareError(
            "name a model (--model NAME and/or --weights W), or score saved labelIds PNGs with "
            "--pred-dir DIR"
        )
    model = one_model(args.model, "--model")
    weights = run_weights_of(one_model(args.weights, "--weights"), args.checkpoint)
    inputs = (args.data, args.pred_dir, weights)  # no output may be written over one of them
    if args.json is not None:
        check_output(args.json, "--json", inputs, args.overwrite)
    rank, _ = init_distributed()  # under torchrun: each process scores its share of the images
    saved = None  # the --save-pred folder: every process's files, once it is closed
    with contextlib.ExitStack() as stack:
        if args.save_pred is not None:
            saved = stack.enter_context(
                output_folder(args.save_pred, "--save-pred", inputs, args.overwrite)
            )
        if args.pred_dir:
            results = run_eval(args.data, args.split, pred_dir=args.pred_dir,
                               batch_size=args.batch, workers=args.workers,
                               save_pred_dir=args.save_pred, **_layout_values(args))
        else:
            predictor = _predictor(_inference_settings(args), model, weights)
            _official_test_of_the_data(predictor, args)
            classes = predictor.class_table  # the file's classes, where it says what they are
            meta = predictor.describe()
            meta = {"model": meta.pop("model"), "weights": weights, **meta}
            results = run_eval(args.data, args.split, scores=predictor.scores,
                               batch_size=args.batch, workers=args.workers,
                               save_pred_dir=args.save_pred, meta=meta,
                               model_classes=classes.names if classes else None,
                               map_classes=args.map_classes, **_layout_values(args))
            if predictor.precision.reduced:  # below fp32: what each layer ran in, here
                results["layer_precision"] = predictor.layer_precision()
    if rank != 0:
        return 0  # rank 0 holds the summed counts too, and reports
    print(format_results(results))
    for report in results.get("layer_precision", []):
        print(describe_layer_precision(report))
    for p in results["processes"] if results["world_size"] > 1 else []:
        print(f"process {p['rank']}: {p['images']} images in {p['seconds']:.1f} s "
              f"({p['images_per_s'] or 0:.2f}/s)")
    seconds = results["seconds"]
    print(f"{results['num_images']} images in {seconds:.1f} s ({results['images_per_s']:.2f}/s) "
          f"on {results['world_size']} process(es)")
    if saved is not None:
        print(f"wrote {len(saved.written)} prediction PNG(s) to {args.save_pred}")
    if args.json:
        write_results(results, args.json)
        print(f"wrote {args.json}")
    return 0


def _official_test_of_the_data(predictor: Any, args: argparse.Namespace) -> None:
    """The family's official test of the data set's layout (ADE20K: SegFormer's AlignedResize,
    HRNet's 520 test; `variants.Family.tests`), unless --mode says otherwise."""
    from segcompare.data.layouts import detect_layout
    from segcompare.evaluate import test_of_dataset

    dataset = detect_layout(args.data, args.layout).name
    predictor.settings = test_of_dataset(predictor.settings, dataset, keep_mode=bool(args.mode))


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
    _add_model_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--format", default="labelid",
        choices=("trainid", "labelid", "color", "overlay", "logits"),
        help="(default labelid: Cityscapes label ids, written for a 19-class model only; give "
        "trainid for a model of another class count). color and overlay use the Cityscapes "
        "palette for 19 classes, distinct generic colours for any other count",
    )  # fmt: skip
    _add_overwrite(p)
    _add_test_options(p)
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from segcompare.infer import predict_files
    from segcompare.utils import init_distributed

    rank, world = init_distributed()  # under torchrun: each process writes its share
    model, weights = one_model(args.model, "--model"), one_model(args.weights, "--weights")
    predictor = _predictor(_inference_settings(args), model, weights, args.checkpoint)
    written = predict_files(predictor, args.inputs, args.out, args.format, overwrite=args.overwrite)
    count = len(written)
    if world > 1:
        import torch
        import torch.distributed as dist

        total = torch.tensor([count])
        dist.all_reduce(total)  # also waits until every process has written its files
        count = int(total.item())
    if rank == 0:
        print(f"wrote {count} {args.format} file(s) to {args.out}")
        for line in predictor.describe_layers():
            print(line)
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
    _add_model_options(p, repeatable=True)
    p.add_argument("--out", required=True, metavar="F", help="F.gif, or F.mp4 (the video extra)")
    p.add_argument(
        "--fps", type=option("--fps"), default=17.0, help="frames per second (17, Cityscapes')"
    )
    p.add_argument(
        "--every", type=option("--every"), default=1, metavar="K", help="use every K-th frame (1)"
    )
    p.add_argument(
        "--max-frames", type=option("--max-frames"), metavar="N", help="stop after N frames"
    )
    p.add_argument(
        "--max-width", type=option("--max-width"), default=1024, metavar="PX",
        help="draw the panels smaller when all of them together are wider (1024; 0: never); "
        "the models still run at the frame size or --size",
    )  # fmt: skip
    _add_overwrite(p)
    _add_test_options(p)
    p.set_defaults(func=_run_video)


def _run_video(args: argparse.Namespace) -> int:
    from segcompare.infer import render_video
    from segcompare.utils import check_output, torchrun_rank_world

    models = _model_list(args.model, args.weights)
    models = [(n, run_weights_of(w, args.checkpoint)) for n, w in models]
    check_output(args.out, "--out", [args.source, *(w for _, w in models)], args.overwrite)
    rank, _ = torchrun_rank_world()
    if rank != 0:  # under torchrun: one video, rendered once, by process 0
        return 0
    settings = _inference_settings(args)
    predictors = [_predictor(settings, n, w) for n, w in models]  # run folders resolved above
    # --size is the test size; the panels are drawn at it, or smaller to fit --max-width
    frames = render_video(
        predictors, args.source, args.out, args.fps, args.size, args.every, args.max_frames,
        max_width=args.max_width or None,
    )
    print(f"wrote {args.out}: {frames} frames, {len(predictors)} model(s)")
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
    _add_model_options(p, repeatable=True)
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="data set folder: Cityscapes, ADE20K or a folder of img_dir/ + ann_dir/")
    _add_layout_options(p)
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("--out", default="compare", metavar="DIR", help="report folder (compare)")
    p.add_argument(
        "--images", type=option("--images"),
        default=4, metavar="K", help="hardest images shown (4; 0: none)"
    )
    p.add_argument(
        "--corrupt", metavar="LIST", default="",
        help="also mIoU under corruptions at 3 severities: noise,blur,jpeg,brightness (or all)",
    )  # fmt: skip
    p.add_argument(
        "--max-images", type=option("--max-images"),
        metavar="N", help="score only the first N images",
    )
    p.add_argument(
        "--corrupt-images", type=option("--corrupt-images"),
        metavar="N", help="corruptions on the first N images only"
    )
    p.add_argument(
        "--bench-iters", type=option("--bench-iters"), default=3, metavar="N", help="timed runs (3)"
    )
    p.add_argument(
        "--bench-warmup", type=option("--bench-warmup"), default=1,
        metavar="N", help="warm-up runs (1)",
    )
    p.add_argument(
        "--boundary-frac", type=option("--boundary-frac"), default=None, metavar="F",
        help="Boundary IoU band as a fraction of the image diagonal (0.005; the paper: 0.02)",
    )  # fmt: skip
    _add_overwrite(p)
    p.add_argument(
        "--runs", action="append", default=[], metavar="W1,W2,...",
        help="several runs of one model (seeds; weights files or run folders, comma-separated) "
        "as one row: mean ± std over the runs; give a --label for each --runs (repeatable)",
    )  # fmt: skip
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="the row name of the --runs in the same position (repeatable)")
    p.add_argument(
        "--bootstrap", type=option("--bootstrap"), default=None, metavar="N",
        help="resamples of the paired bootstrap over images that gives every accuracy figure "
        "its 95%% interval and each pair of models a verdict (1000; 0: off)",
    )  # fmt: skip
    _add_test_options(p)
    p.set_defaults(func=_run_compare)


def _run_groups(runs: list[str], labels: list[str]) -> list[tuple[str, list[str]]]:
    """--runs W1,W2 ... --label NAME ... -> (label, weights) pairs, in order."""
    from segcompare.utils import SegcompareError

    if len(runs) != len(labels):
        raise SegcompareError(
            f"{len(runs)} --runs but {len(labels)} --label: give one --label per --runs"
        )
    groups = []
    for value, label in zip(runs, labels):
        weights = [w for w in value.split(",") if w]
        if not weights:
            raise SegcompareError(f"--runs {value!r} (--label {label}): no weights file given")
        groups.append((label, weights))
    return groups


def _run_compare(args: argparse.Namespace) -> int:
    import logging

    from segcompare.compare import CompareSpec, miou_text, pairwise_lines, run_compare
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
    from segcompare.utils import log_to_console

    log_to_console(logging.INFO)
    groups = _run_groups(args.runs, args.label)
    models = _model_list(args.model, args.weights) if not groups or args.model or args.weights \
        else []
    frac = BOUNDARY_FRAC if args.boundary_frac is None else args.boundary_frac
    doc = run_compare(CompareSpec(
        models, args.data, args.split, args.out, images=args.images,
        corruptions=parse_corruptions(args.corrupt), inference=_inference_settings(args),
        max_images=args.max_images, corrupt_images=args.corrupt_images,
        bench_iters=args.bench_iters, bench_warmup=args.bench_warmup, boundary_frac=frac,
        checkpoint=args.checkpoint, runs=groups, overwrite=args.overwrite,
        **({} if args.bootstrap is None else {"bootstrap": args.bootstrap}),
        keep_mode=bool(args.mode), **_layout_values(args),
    ))  # fmt: skip
    # tables in percent, GMACs with two decimals (metrics.json keeps fractions)
    print(f"{'model':<24}{'mIoU % (95% interval)':>24}{'B-IoU %':>9}{'GMACs':>10}{'ms':>9}")
    for m in doc["models"]:
        print(
            f"{m['label']:<24}{miou_text(m):>24}{100 * m['boundary_iou']:>9.1f}"
            f"{m['gmacs']:>10.2f}{m['latency_ms']:>9.1f}"
        )
    for line in pairwise_lines(doc):
        print(line)
    print(f"wrote {args.out}/report.html, report.md, metrics.json, per_image.csv")
    return 0
