"""`segcompare data check | prepare | synth` and `segcompare demo`."""

from __future__ import annotations

import argparse
from typing import Optional

from segcompare.cli.args import _add_overwrite, option, split_list


# --- segcompare data check | prepare | synth ---------------------------------------------------
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="check, prepare, convert or synthesise a data set folder",
        description="check: verify a data set file by file (Cityscapes, ADE20K or a folder of "
        "img_dir/ + ann_dir/); prepare: write the Cityscapes labelTrainIds PNGs and file lists; "
        "convert-masks: colour masks to class indices, value maps; synth: a synthetic set in "
        "any of the three layouts.",
    )  # fmt: skip
    data = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = data.add_parser(
        "check",
        help="verify the layout and decode every file; pixels per class",
        description="A dataset doctor for any layout. Cityscapes: leftImg8bit/ and gtFine/ "
        "(labelIds, color, instanceIds, polygons, labelTrainIds if present). ADE20K and folder: "
        "images and masks paired by name both ways, files that do not decode, sizes that "
        "differ, RGB colour masks, values outside the classes (with pixel counts), binary 0/255 "
        "masks, classes with no pixels in a split. Prints one line per finding, naming the file "
        "and what to do, the pixels per class and split as a table and class_histogram.png; "
        "exit 1 if there is a problem. Masks are read exactly as eval and train read them.",
    )
    c.add_argument("root", metavar="ROOT", help="the data set root")
    _add_layout_options(c)
    c.add_argument("--split", metavar="S[,S]", help="splits to check (default: all present)")
    c.add_argument("--histogram", metavar="PNG",
                   help="also draw the pixels per class and split there (class_histogram.png)")
    _add_overwrite(c)
    c.add_argument(
        "--workers", type=option("--workers"), metavar="N", help="processes (default: all cores)"
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
        "--workers", type=option("--workers"), metavar="N", help="processes (default: all cores)"
    )
    r.add_argument("--overwrite", action="store_true", help="rewrite existing labelTrainIds")
    r.set_defaults(func=_run_data_prepare)

    m = data.add_parser(
        "convert-masks",
        help="write a new root with index masks: RGB colours by the palette, --map OLD:NEW",
        description="Write a new data set root DST from SRC (ADE20K or folder layout): RGB "
        "colour masks become class-index PNGs by the class table's palette (palette.json, or "
        "ADE20K's), --map OLD:NEW value maps apply (e.g. --map 255:1 for binary 0/255 masks), "
        "the images are hard-linked (or copied) and id2label.json / palette.json carried over. "
        "Nothing in SRC changes; a colour not in the palette is named, and nothing is written.",
    )
    m.add_argument("src", metavar="SRC", help="the data set root to read")
    m.add_argument("dst", metavar="DST", help="the new root to write (new or empty, else "
                   "--overwrite)")
    m.add_argument("--map", action="append", default=[], metavar="OLD:NEW",
                   help="map a mask value (repeatable), after colours became indices")
    m.add_argument("--layout", choices=("ade20k", "folder"), help="SRC's layout (detected)")
    m.add_argument("--copy", action="store_true", help="copy the images instead of linking")
    m.add_argument(
        "--overwrite", action="store_true",
        help="write into a DST that is not empty: its files of the same names, and those of the "
        "last conversion into it, are replaced; other files are kept",
    )  # fmt: skip
    m.set_defaults(func=_run_data_convert)

    y = data.add_parser(
        "synth",
        help="write a synthetic Cityscapes in the real layout",
        description="Street scenes with labelIds, color, instanceIds and polygons, in the real "
        "folder layout; deterministic for a seed. --video adds leftImg8bit_demoVideo frames. "
        "--layout ade20k writes the same scenes in ADE20K's layout and ids (classes ADE20K "
        "lacks become 0); --layout folder a --classes K set with its id2label.json.",
    )
    y.add_argument("--layout", default="cityscapes", choices=("cityscapes", "ade20k", "folder"),
                   help="the folder layout to write (cityscapes)")
    y.add_argument("--classes", type=option("--classes"), default=6, metavar="K",
                   help="classes of a --layout folder set, 0 background (6)")
    y.add_argument("out", metavar="OUT", help="the data set root to write")
    y.add_argument(
        "--train", type=option("--train"), default=20, metavar="N", help="train images (20)"
    )
    y.add_argument("--val", type=option("--val"), default=10, metavar="N", help="val images (10)")
    y.add_argument("--test", type=option("--test"), default=0, metavar="N", help="test images (0)")
    y.add_argument(
        "--size", type=option("--size"), default="256x512",
        metavar="HxW", help="image size (256x512)",
    )
    y.add_argument("--seed", type=option("--seed"), default=0, metavar="S", help="random seed (0)")
    y.add_argument(
        "--video", type=option("--video"), default=0, metavar="FRAMES", help="demo video frames"
    )
    y.add_argument(
        "--overwrite", action="store_true",
        help="write into a folder that is not empty: its files of the same names, and those of "
        "the last synthesis into it, are replaced; others are kept",
    )  # fmt: skip
    y.set_defaults(func=_run_data_synth)


def _splits(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("cityscapes", "ade20k", "folder"),
                   help="the data set's layout (default: detected from the folder)")
    p.add_argument("--reduce-zero-label", choices=("true", "false"),
                   help="mask value 0 is ignored and the others move down by one (default: "
                   "the layout's rule, true for ADE20K)")
    p.add_argument("--ignore-index", type=option("--ignore-index"), metavar="V",
                   help="a mask value ignored besides 255 (default: 255 only)")


def _layout_values(args: argparse.Namespace) -> dict:
    reduce = None if args.reduce_zero_label is None else args.reduce_zero_label == "true"
    return {"layout": args.layout, "reduce_zero_label": reduce, "ignore_index": args.ignore_index}


def _run_data_check(args: argparse.Namespace) -> int:
    from segcompare.data.cityscapes import check_dataset
    from segcompare.data.doctor import check_layout, histogram_table, plot_histogram
    from segcompare.data.layouts import detect_layout
    from segcompare.utils import check_output

    layout = detect_layout(args.root, args.layout)
    if args.histogram is not None:  # never inside the set (over one of its masks); --overwrite
        check_output(args.histogram, "--histogram", [args.root], args.overwrite, outside=True)
    problems, notes, counts = [], [], {}
    if layout.name == "cityscapes":  # its own files (color, instanceIds, polygons) first
        cs = check_dataset(args.root, _splits(args.split), args.workers)
        problems, notes, counts = cs.problems, cs.notes, cs.counts
    doctor = check_layout(args.root, splits=_splits(args.split), **_layout_values(args))
    if layout.name != "cityscapes":
        problems, counts = doctor.problems, doctor.counts
    for line in problems:
        print(line)
    for line in doctor.warnings:
        print(line)
    if doctor.histogram:
        print(f"\npixels per class ({doctor.table.name}, {doctor.table.num_classes} classes):")
        print(histogram_table(doctor))
        if args.histogram:
            plot_histogram(doctor, args.histogram)
            print(f"wrote {args.histogram}")
    for split, n in counts.items():
        print(f"{split}: {n} images")
    for line in notes:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {args.root}")
        return 1
    print(f"{args.root}: OK ({layout.name} layout)")
    return 0


def _run_data_convert(args: argparse.Namespace) -> int:
    from segcompare.data.doctor import convert_masks
    from segcompare.utils import check_output

    check_output(args.dst, "DST", [args.src], folder=True)  # never SRC or inside it
    counts = convert_masks(args.src, args.dst, args.map, args.layout, args.copy,
                           overwrite=args.overwrite)
    print(f"wrote {args.dst}: {counts['masks']} masks ({counts['colour_masks']} from colours), "
          f"{counts['images']} images {'copied' if args.copy else 'linked'}")
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
    from segcompare.utils import check_output

    check_output(args.out, "OUT", folder=True)  # not empty, not a file
    if args.layout != "cityscapes":
        from segcompare.data.synth.io import make_synthetic_layout
        from segcompare.utils import SegcompareError

        if args.test or args.video:
            raise SegcompareError("--test and --video exist for --layout cityscapes only")
        counts = make_synthetic_layout(
            args.out, args.layout, train=args.train, val=args.val, size=tuple(args.size),
            seed=args.seed, classes=args.classes, progress=True, overwrite=args.overwrite,
        )  # fmt: skip
        print(f"wrote {args.out} ({args.layout} layout): "
              + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        return 0
    counts = make_synthetic_cityscapes(
        args.out, train=args.train, val=args.val, test=args.test, size=args.size, seed=args.seed,
        video_frames=args.video, progress=True, overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
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
        "comparison runs on real data (Cityscapes, ADE20K or a folder set) and real weights; with "
        "--data alone both models are fine-tuned on it briefly (from --init, or from the demo's "
        "synthetic-Cityscapes weights) and compared.",
    )
    p.add_argument("--out", default="segcompare-demo", help="output folder (segcompare-demo)")
    p.add_argument("--fresh", action="store_true", help="recompute every step")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and few iterations (a test)")
    p.add_argument("--cache", help="where the synthetic data set is kept (~/.cache/segcompare)")
    p.add_argument("--data", help="a data set of any layout: compare --weights on it (no "
                   "training), or fine-tune both demo models on it and compare them")
    p.add_argument(
        "--weights", action="append", default=[], metavar="W",
        help="the checkpoints (or run folders) to compare with --data: --weights A --weights B, "
        "or A,B",
    )  # fmt: skip
    p.add_argument(
        "--init", action="append", default=[], metavar="W",
        help="with --data alone: the weights both models are fine-tuned from (SegFormer-B0's, "
        "then HRNet-W18-Small-v1's: --init A,B); default: the demo's synthetic-Cityscapes ones",
    )  # fmt: skip
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import logging
    import time

    from segcompare.demo import run_demo, summary_table
    from segcompare.utils import check_output, log_to_console

    log_to_console(logging.INFO)
    weights, init = split_list(args.weights), split_list(args.init)
    check_output(args.out, "--out", [args.data, *weights, *init], folder=True)
    start = time.time()
    doc = run_demo(
        args.out, fresh=args.fresh, tiny=args.tiny, data=args.data, weights=weights,
        cache=args.cache, init=init,
    )  # fmt: skip
    print(summary_table(doc))
    files = doc["files"]
    print(f"\nreport: {files['report_html']}  (also {files['report_md']}, {files['metrics']})")
    if files["video"]:
        print(f"video:  {files['video']}")
    print(f"done in {(time.time() - start) / 60:.1f} min")
    return 0
