"""`segcompare data check | prepare | synth` and `segcompare demo`."""

from __future__ import annotations

import argparse
from typing import Optional

from segcompare.cli.args import option


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

    y = data.add_parser(
        "synth",
        help="write a synthetic Cityscapes in the real layout",
        description="Street scenes with labelIds, color, instanceIds and polygons, in the real "
        "folder layout; deterministic for a seed. --video adds leftImg8bit_demoVideo frames.",
    )
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
