"""`run_compare(spec)`: measure every model of a `CompareSpec` and write the report."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from segcompare.compare.measure import (
    ModelRun,
    bootstrap_intervals,
    build_runs,
    compare_datasets,
    evaluate_corruptions,
    evaluate_fp32,
    evaluate_run,
    hardest_images,
    measure_speed,
    measure_stats,
    merge_seeds,
    most_different_images,
    pareto_front,
    training_of,
)
from segcompare.compare.plots import draw_plots
from segcompare.compare.report import model_entry, write_per_image_csv, write_report
from segcompare.data.corrupt import CORRUPTION_LEVELS, CORRUPTIONS, SEVERITIES
from segcompare.evaluate import InferenceSettings
from segcompare.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    BOUNDARY_FRAC,
    CONFIDENCE,
    boundary_width,
    results_to_json,
)
from segcompare.run_folder import run_weights
from segcompare.utils import PathLike, SegcompareError, atomic_write_text, output_folder
from segcompare.values import check


@dataclass(frozen=True)
class CompareSpec:
    """What to compare and how: one value, built once (by the CLI from its options).

    models: (name, weights) pairs; name None reads the variant from the weights file, weights
        None gives random weights (seed 0, as `segcompare eval` does without --weights).
    data_root / split: the data set folder and split the models are scored on, in any layout
        (Cityscapes, ADE20K, a folder set: `segcompare.data.layouts`); layout None: detected.
        reduce_zero_label / ignore_index: the data.* keys of a folder set (None: the layout's).
        Class names, class count, ignore index and colours are the data set's `ClassTable`.
    out_dir: the report folder.
    images: K, the number of hardest images shown (0: none).
    corruptions: corruption names (`CORRUPTIONS`), each measured at `SEVERITIES`.
    inference: how every model runs (as `segcompare eval` takes it; the default is eval's, so the
        figures equal `segcompare eval`'s; its `optimize` also decides whether the models are
        timed through `prepare_for_inference`).
    max_images / corrupt_images: score only the first N images of the split (None: all).
    bench_iters / bench_warmup: timed and warm-up forward passes per model, at the eval size.
    boundary_frac: the Boundary IoU band as a fraction of the image diagonal.
    progress: show progress bars.
    checkpoint: which weights of a training run folder given as weights: 'final' (what the
        official tests evaluate) or 'best' (best val mIoU: chosen on val, so optimistic there).
    overwrite: replace an earlier report in out_dir (all of its files; without it, refused).
    runs: (label, weights files) pairs, each several runs of one model (seeds) shown as one row
        under that label, after `models`: the mean over the runs, ± their standard deviation.
    bootstrap / bootstrap_seed: resamples of the paired bootstrap over images that gives every
        accuracy figure its 95 % interval (0: none), and the seed of its draws.
    keep_mode: run every model in `inference.mode` (--mode given); by default each runs its
        family's official test of the data set's layout, as `segcompare eval` does.
    """

    models: tuple[tuple[Optional[str], Optional[PathLike]], ...]
    data_root: PathLike
    split: str = "val"
    out_dir: PathLike = "compare"
    images: int = 4
    corruptions: tuple[str, ...] = ()
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    max_images: Optional[int] = None
    corrupt_images: Optional[int] = None
    bench_iters: int = 3
    bench_warmup: int = 1
    boundary_frac: float = BOUNDARY_FRAC
    progress: bool = True
    checkpoint: str = "final"
    overwrite: bool = False
    runs: tuple[tuple[str, tuple[PathLike, ...]], ...] = ()
    bootstrap: int = BOOTSTRAP_RESAMPLES
    bootstrap_seed: int = BOOTSTRAP_SEED
    layout: Optional[str] = None
    reduce_zero_label: Optional[bool] = None
    ignore_index: Optional[int] = None
    keep_mode: bool = False

    def __post_init__(self) -> None:
        # Lists are welcome; a frozen value holds tuples.
        object.__setattr__(self, "models", tuple(tuple(m) for m in self.models))
        object.__setattr__(self, "runs", tuple((lb, tuple(ws)) for lb, ws in self.runs))
        object.__setattr__(self, "corruptions", tuple(self.corruptions))
        if not self.models and not self.runs:
            raise SegcompareError("compare needs at least one model")
        check("--bootstrap", self.bootstrap, name="bootstrap")  # its row of values.RULES
        for label, weights in self.runs:
            if not label or not weights:
                raise SegcompareError(f"--runs {label!r}: give a label and weights files")
        if self.images < 0 or self.bench_iters < 1 or self.bench_warmup < 0:
            raise SegcompareError("--images and --bench-warmup must be >= 0, --bench-iters >= 1")
        for kind in self.corruptions:
            if kind not in CORRUPTION_LEVELS:
                raise SegcompareError(
                    f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}"
                )


def run_compare(spec: CompareSpec) -> dict[str, Any]:
    """Evaluate, count and time every model of `spec` and write into `spec.out_dir`:
    metrics.json, report.md and report.html, and the plots as PNG files. Returns the
    metrics.json document."""
    out = Path(spec.out_dir) if str(spec.out_dir).strip() else spec.out_dir
    # a training run folder -> its final (or best) weights file, which the report names
    models = [
        (name, w if not w or str(w).startswith("hf://") else run_weights(w, spec.checkpoint))
        for name, w in spec.models
    ]  # (a hub id stays a string: Path() would fold its "//")
    inputs = [spec.data_root, *(w for _, w in models)]
    # locked while written; an earlier report here is replaced (all of it) only with overwrite
    with output_folder(out, "--out", inputs, spec.overwrite, REPORT_FILES):
        return _compare(spec, Path(out), models)


REPORT_FILES = ("report.html", "report.md", "metrics.json", "per_image.csv")


def _compare(spec: CompareSpec, out: Path, models: list) -> dict[str, Any]:
    from tqdm import tqdm

    dataset, raw, corrupt_set = compare_datasets(
        spec.data_root, spec.split, spec.max_images, spec.corrupt_images, spec.layout,
        spec.reduce_zero_label, spec.ignore_index,
    )
    table = dataset.table  # the data set's classes: names, count, ignore index, colours
    label_hw = tuple(raw[0]["label"].shape)  # predictions are scored at the label size
    eval_hw = spec.inference.size_hw or label_hw  # the size the models run at
    d = boundary_width(label_hw, spec.boundary_frac)
    groups = [[run_weights(w, spec.checkpoint) for w in ws] for _, ws in spec.runs]
    built = build_runs(models, spec.inference, table, spec.keep_mode) if models else []
    if groups:  # every model is built before the first is evaluated: a bad file fails early
        members = build_runs([(None, w) for ws in groups for w in ws], spec.inference, table,
                             spec.keep_mode)
        labels = [f"{label} run {k + 1}" for (label, _), ws in zip(spec.runs, groups)
                  for k in range(len(ws))]  # fmt: skip
        for member, label in zip(members, labels):
            member.label = label
        built += members

    for run in built:
        with tqdm(total=len(dataset), desc=f"eval {run.label}", unit="img",
                  disable=not spec.progress) as bar:
            evaluate_run(run, dataset, d, spec.progress, bar)
        run.training = training_of(run.weights)
    runs = _rows(spec, built, len(models))
    if spec.inference.precision != "fp32":  # what it changed: each model again in float32
        for run in runs:
            with tqdm(total=len(dataset), desc=f"eval fp32 {run.label}", unit="img",
                      disable=not spec.progress) as bar:
                evaluate_fp32(run, dataset, spec.progress, bar)
    boot_start = time.perf_counter()
    pairwise = bootstrap_intervals(runs, spec.bootstrap, spec.bootstrap_seed)
    boot_s = time.perf_counter() - boot_start
    measure_stats(runs, eval_hw, spec.progress)
    bench_meta = measure_speed(runs, eval_hw, spec.bench_iters,
                               spec.bench_warmup, spec.progress)  # fmt: skip
    subset = len(corrupt_set) < len(dataset)
    evaluate_corruptions(runs, corrupt_set, spec.corruptions, subset, spec.progress)
    hardest = hardest_images(runs, spec.images)
    different = most_different_images(runs, spec.images, hardest)

    meta = _meta(spec, runs, eval_hw, d, bench_meta, len(corrupt_set))
    meta["bootstrap"]["seconds"] = round(boot_s, 4)
    doc: dict[str, Any] = {
        "models": [model_entry(run) for run in runs],
        "data": str(spec.data_root),
        "split": spec.split,
        "classes": table.to_json(),  # the data set's class table: names, colours, ignore, ids
        "num_images": len(dataset),
        "pairwise": pairwise,
        "pareto_front": pareto_front(runs),
        "hardest": [runs[0].image_names[i] for i in hardest],
        "most_different": [runs[0].image_names[i] for i in different],
        "meta": meta,
    }
    device_type = runs[0].predictor.device.type
    files = draw_plots(runs, out, raw, hardest, different, doc["pareto_front"], d, eval_hw,
                       device_type, spec.progress, table)  # fmt: skip
    files["per_image"] = write_per_image_csv(out / "per_image.csv", runs).name
    write_report(out, runs, doc, files)
    atomic_write_text(out / "metrics.json", results_to_json(doc))
    return doc


def _rows(spec: CompareSpec, built: list[ModelRun], singles: int) -> list[ModelRun]:
    """The report's rows: each model of `spec.models`, then each `--runs` group merged into one
    row (`merge_seeds`) under its label; labels must differ."""
    rows = built[:singles]
    start = singles
    for label, weights in spec.runs:
        rows.append(merge_seeds(label, built[start : start + len(weights)]))
        start += len(weights)
    labels = [run.label for run in rows]
    for label in labels:
        if labels.count(label) > 1:
            raise SegcompareError(f"two rows of the comparison are called {label!r}: "
                                  "give each --runs group a label of its own")  # fmt: skip
    return rows


def _meta(
    spec: CompareSpec,
    runs: list[ModelRun],
    eval_hw: tuple[int, int],
    d: int,
    bench_meta: dict[str, Any],
    corrupt_images: int,
) -> dict[str, Any]:
    """metrics.json's "meta": versions, sizes, settings, the benchmark's machine."""
    from segcompare import __version__
    from segcompare.models import family_of

    corruptions = list(spec.corruptions)
    return {
        "segcompare": __version__,
        "torch": torch.__version__,
        "device": str(runs[0].predictor.device),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "eval_size": list(eval_hw),
        # as given; each model ran its family's official test of the data set unless keep_mode
        "inference": {**spec.inference.describe(), "dataset": runs[0].predictor.settings.dataset,
                      "official_test": not spec.keep_mode,
                      # int8: the calibration images really used (no more than there are)
                      **{k: v for k, v in runs[0].predictor.describe().items()
                         if k in ("calib", "calib_images")}},
        "tests": {run.label: run.predictor.settings.describe() for run in runs},
        "bench": bench_meta,
        "stats_size": list(eval_hw),
        "boundary": {"d_px": d, "frac": spec.boundary_frac},
        "robustness": {"corruptions": corruptions, "severities": list(SEVERITIES),
                       "num_images": corrupt_images if corruptions else 0},
        "families": {run.label: family_of(run.name) for run in runs},
        "bootstrap": {"resamples": spec.bootstrap, "seed": spec.bootstrap_seed,
                      "confidence": CONFIDENCE, "unit": "image"},
    }  # fmt: skip
