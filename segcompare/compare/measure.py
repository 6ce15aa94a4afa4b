"""What the comparison measures, model by model: the metrics of `segcompare eval` on the data set's
classes (any layout: Cityscapes, ADE20K, a folder set; its `ClassTable`) with Boundary IoU,
per-image mIoU and the confusion matrix in the same pass, parameters and GMACs
(`segcompare.stats`), latency and memory (`segcompare.bench`), mIoU under corruptions, and the
hardest images."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from segcompare.data.corrupt import SEVERITIES, corrupt
from segcompare.data.labels import ClassTable
from segcompare.evaluate import InferenceSettings
from segcompare.metrics import BoundaryIoU, image_scores
from segcompare.utils import PathLike, SegcompareError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Datasets the evaluation runs on
# ------------------------------------------------------------------------------------------------


class _Subset:
    """The first `n` samples of a dataset."""

    def __init__(self, dataset: Any, n: Optional[int]) -> None:
        self.dataset = dataset
        self.n = len(dataset) if n is None else min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]

    @property
    def table(self) -> ClassTable:
        return self.dataset.table  # the data set's classes, for `evaluate_model`


class _Corrupted:
    """A raw (uint8) dataset seen through a corruption (None: none), then normalised like the test
    transform. The noise of sample i is drawn with seed i: every model sees the same image."""

    def __init__(self, dataset: Any, kind: Optional[str], severity: int) -> None:
        from segcompare.data.transforms import build_test_transform

        self.dataset, self.kind, self.severity = dataset, kind, severity
        self.transform = build_test_transform()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        image = sample["image"]
        if self.kind is not None:
            image = corrupt(image, self.kind, self.severity, seed=index)
        sample["image"], sample["label"] = self.transform(image, sample["label"])
        return sample

    @property
    def table(self) -> ClassTable:
        return self.dataset.table


def compare_datasets(
    data_root: PathLike,
    split: str,
    max_images: Optional[int],
    corrupt_images: Optional[int],
    layout: Optional[str] = None,
    reduce_zero_label: Optional[bool] = None,
    ignore_index: Optional[int] = None,
) -> tuple[Any, Any, Any]:
    """The split's datasets the comparison reads, in any layout (`layout` None: detected;
    `reduce_zero_label` / `ignore_index`: the data.* keys, as `segcompare eval` takes them): (the
    first `max_images` images, test-transformed as `segcompare eval` reads them (Cityscapes with
    instances, for iIoU), for scoring; the same raw (uint8), for plots; the first
    `corrupt_images` of those raw ones, for the corruptions). None: all images. Each has the
    data set's `table`."""
    from segcompare.data.cityscapes import CityscapesDataset
    from segcompare.data.transforms import build_test_transform
    from segcompare.evaluate import eval_dataset

    scored = eval_dataset(
        data_root, split, build_test_transform(), layout, reduce_zero_label, ignore_index
    )
    dataset = _Subset(scored, max_images)
    raw = _Subset(
        CityscapesDataset(data_root, split, layout=scored.layout,
                          reduce_zero_label=reduce_zero_label, ignore_index=ignore_index),
        max_images,
    )  # fmt: skip
    return dataset, raw, _Subset(raw, corrupt_images)


# ------------------------------------------------------------------------------------------------
# The models
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """Everything measured for one model."""

    name: str  # the variant, as given
    weights: Optional[str]
    label: str  # unique display name
    predictor: Any  # segcompare.infer.Predictor
    results: dict[str, Any] = field(default_factory=dict)  # ConfusionMatrix.compute()
    confusion: Optional[np.ndarray] = None  # C×C pixel counts, rows = ground truth
    image_mats: Optional[np.ndarray] = None  # N×C×(C+2): each image's confusion matrix
    boundary: Optional[BoundaryIoU] = None
    image_miou: list[float] = field(default_factory=list)  # per image, in dataset order
    image_acc: list[float] = field(default_factory=list)  # pixel accuracy per image
    image_names: list[str] = field(default_factory=list)
    # a row of several runs (`--runs`): each run's own ModelRun; this row holds their mean
    seeds: list[ModelRun] = field(default_factory=list)
    uncertainty: dict[str, Any] = field(default_factory=dict)  # `bootstrap_intervals`
    training: Optional[dict[str, Any]] = None  # `segcompare.compare.training.training_of`
    stats: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    robustness: dict[str, Any] = field(default_factory=dict)
    fp32: dict[str, Any] = field(default_factory=dict)  # below fp32: the float32 scores


def class_names(run: ModelRun) -> list[str]:
    """The data set's class names, in class order: the keys of the scored results (the
    `ConfusionMatrix` names them by the data set's table)."""
    return list(run.results["per_class"])


def _labels(models: Sequence[tuple[str, Optional[str]]]) -> list[str]:
    """Display names: the variant, plus the weights file's stem where a variant repeats."""
    names = [name for name, _ in models]
    labels = []
    for name, weights in models:
        if names.count(name) > 1:
            stem = Path(weights).stem if weights else "random"
            labels.append(f"{name} ({stem})")
        else:
            labels.append(name)
    for i, label in enumerate(labels):  # still equal (same file name twice): number them
        if labels.count(label) > 1:
            labels[i] = f"{label} #{labels[:i].count(label) + 1}"
    return labels


def build_runs(
    models: Sequence[tuple[Optional[str], Optional[PathLike]]],
    inference: InferenceSettings,
    table: Optional[ClassTable] = None,
    keep_mode: bool = False,
) -> list[ModelRun]:
    """Build every model (so that a bad name or file fails before any long step) and wrap each in
    a `Predictor` with `inference`, run as its family's official test of the data set's layout
    (`evaluate.test_of_dataset`; keep_mode: the inference's mode as given), as `segcompare eval`
    runs it. Weights None: random weights, seed 0, as `segcompare eval`. table: the data set's
    classes (default Cityscapes'); a model trained on other classes is refused (as eval does)."""
    from segcompare.data.labels import CITYSCAPES
    from segcompare.evaluate import match_classes, test_of_dataset
    from segcompare.infer import Predictor
    from segcompare.models import build_model
    from segcompare.models.save import num_classes_of

    table = table or CITYSCAPES
    resolved = []
    for name, weights in models:
        if name is None and weights is None:
            raise SegcompareError("each model needs a name or weights (or both)")
        torch.manual_seed(0)  # without weights: the random model `segcompare eval` builds
        model = build_model(name, weights=weights)
        classes = num_classes_of(model)
        if classes != table.num_classes:  # evaluate_model would refuse it, after the others
            raise SegcompareError(
                f"{weights or name}: the model predicts {classes} classes; the data set "
                f"({table.name}) has {table.num_classes}: compare {table.num_classes}-class models"
            )
        named = getattr(model, "class_table", None)  # the file's classes, where it names them
        match_classes(named.names if named else None, table.names, model=str(weights or name))
        if weights is None:
            log.warning("no weights for %s: random weights (seed 0); figures mean nothing", name)
        resolved.append((model.variant, None if weights is None else str(weights), model))
    labels = _labels([(n, w) for n, w, _ in resolved])
    runs = []
    for (name, weights, model), label in zip(resolved, labels):
        predictor = Predictor(model, inference)
        predictor.settings = test_of_dataset(predictor.settings, table.name, keep_mode)
        runs.append(ModelRun(name, weights, label, predictor))
    return runs


# ------------------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------------------


def evaluate_run(
    run: ModelRun, dataset: Any, d: int, progress: bool = True, bar: Any = None
) -> None:
    """Score one model on the (test-transformed) dataset with `segcompare.evaluate.evaluate_model`,
    the function `segcompare eval` uses, into a confusion matrix that keeps each image's own
    counts (for per-image figures and the bootstrap), and collect in the same pass (its
    `on_batch`) Boundary IoU and the image names."""
    from segcompare.evaluate import evaluate_model
    from segcompare.metrics import ConfusionMatrix

    cm = ConfusionMatrix(dataset.table, per_image=True)  # the data set's classes
    run.boundary = BoundaryIoU(d, cm.num_classes)

    def on_batch(pred: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> None:
        run.boundary.update(pred, labels)
        run.image_names += batch["name"]
        if bar is not None:
            bar.update(pred.shape[0])

    run.results = evaluate_model(
        run.predictor.scores, dataset, progress=progress and bar is None, on_batch=on_batch,
        confusion=cm,
    )
    run.confusion = cm.mat[:, : cm.num_classes].cpu().numpy()
    run.image_mats = cm.image_matrices()
    miou, acc = image_scores(run.image_mats)
    run.image_miou, run.image_acc = miou.tolist(), acc.tolist()


def evaluate_fp32(run: ModelRun, dataset: Any, progress: bool = True, bar: Any = None) -> None:
    """Below float32 (`InferenceSettings.precision`): score the same model again in float32,
    otherwise the same way, so the report can say what the lower precision changed
    (`ModelRun.fp32`: the float32 mIoU and category mIoU)."""
    import dataclasses

    from segcompare.evaluate import evaluate_model
    from segcompare.infer import Predictor

    settings = dataclasses.replace(run.predictor.settings, precision="fp32")
    predictor = Predictor(run.predictor.model, settings)

    def on_batch(pred: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(pred.shape[0])

    results = evaluate_model(
        predictor.scores, dataset, progress=progress and bar is None, on_batch=on_batch
    )
    run.fp32 = {"miou": results["miou"], "category_miou": results.get("category_miou")}


def evaluate_corruptions(
    runs: Sequence[ModelRun],
    raw_dataset: Any,
    corruptions: Sequence[str],
    subset: bool = False,
    progress: bool = True,
) -> None:
    """mIoU of every model under every corruption at SEVERITIES, on `raw_dataset` (uint8 images).

    Fills `run.robustness` = {"severities", "clean_miou", "miou": {kind: [per severity]},
    "mean_miou" (over corruptions and severities), "relative_miou" (mean_miou / clean_miou)}.
    subset: `raw_dataset` holds fewer images than `run.results` was measured on; the clean mIoU
    is then measured again on these images, so that every figure compares the same images.
    """
    from tqdm import tqdm

    from segcompare.evaluate import evaluate_model

    if not corruptions:
        return
    levels: list[tuple[Optional[str], int]] = [(k, s) for k in corruptions for s in SEVERITIES]
    if subset:
        levels.insert(0, (None, 0))
    for run in runs:
        run.robustness = {
            "severities": list(SEVERITIES),
            "clean_miou": None if subset else run.results["miou"],
            "miou": {},
        }
    total = len(runs) * len(levels) * len(raw_dataset)
    with tqdm(total=total, desc="corruptions", unit="img", disable=not progress) as bar:

        def count(pred: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> None:
            bar.update(pred.shape[0])

        for kind, severity in levels:
            dataset = _Corrupted(raw_dataset, kind, severity)
            for run in runs:
                bar.set_postfix_str(f"{kind or 'clean'} {severity} {run.label}")
                scores = run.predictor.scores
                miou = evaluate_model(scores, dataset, progress=False, on_batch=count)["miou"]
                if kind is None:
                    run.robustness["clean_miou"] = miou
                else:
                    run.robustness["miou"].setdefault(kind, []).append(miou)
    for run in runs:
        values = [v for per in run.robustness["miou"].values() for v in per]
        mean = float(np.nanmean(values)) if values else float("nan")
        clean = run.robustness["clean_miou"]
        run.robustness["mean_miou"] = mean
        run.robustness["relative_miou"] = mean / clean if clean else float("nan")


def hardest_images(runs: Sequence[ModelRun], k: int) -> list[int]:
    """Indices of the k images with the lowest per-image mIoU averaged over the models."""
    if k <= 0 or not runs:
        return []
    scores = np.array([run.image_miou for run in runs], dtype=np.float64)  # M×N
    mean = np.nanmean(np.where(np.isnan(scores), np.inf, scores), axis=0)
    order = np.argsort(mean, kind="stable")
    return [int(i) for i in order[:k]]


# ------------------------------------------------------------------------------------------------
# Size and speed
# ------------------------------------------------------------------------------------------------


def measure_stats(runs: Sequence[ModelRun], eval_hw: tuple[int, int], progress: bool) -> None:
    """Fill `run.stats`: parameters and GMACs (`segcompare.stats`) at `eval_hw`."""
    from tqdm import tqdm

    from segcompare import stats
    from segcompare.models import build_model
    from segcompare.models.save import num_classes_of

    for run in tqdm(runs, desc="stats", disable=not progress, leave=False):
        model = run.predictor.model
        num_classes = num_classes_of(model)
        run.stats = stats.model_stats(run.name, eval_hw, num_classes, **model.settings)
        # model_stats rounds to 0.01 GMACs; a tiny model at a tiny size needs the exact figure.
        with torch.device("meta"):
            meta_model = build_model(run.name, num_classes=num_classes, **model.settings)
        run.stats["gmacs"] = float(f"{stats.count_macs(meta_model, eval_hw)['gmacs']:.4g}")


def measure_speed(
    runs: Sequence[ModelRun],
    eval_hw: tuple[int, int],
    iters: int,
    warmup: int,
    progress: bool,
) -> dict[str, Any]:
    """Fill `run.bench` (latency, throughput, memory of one batch-1 forward pass at `eval_hw`,
    the models interleaved: `segcompare.bench`); returns the benchmark's metadata, whose dtype
    is the predictors' precision."""
    from segcompare import bench

    predictor = runs[0].predictor
    x = torch.randn(1, 3, *eval_hw, device=predictor.device)
    candidates = [bench.Candidate(run.label, run.predictor.run_model) for run in runs]
    rows = bench.benchmark(candidates, x, warmup, iters, progress=progress)
    for run, row in zip(runs, rows):
        run.bench = row
    dtype = predictor.precision.name
    meta = bench.machine_info(predictor.device, torch.get_num_threads(), dtype)
    meta.update(iters=iters, warmup=warmup, size=list(eval_hw), batch=1)
    return meta


def most_different_images(runs: Sequence[ModelRun], k: int, skip: Sequence[int] = ()) -> list[int]:
    """Indices of the k images where the models' per-image mIoU spreads the most (best minus
    worst model), leaving out `skip` (the hardest images, shown already). Needs two models."""
    if k <= 0 or len(runs) < 2:
        return []
    scores = np.array([run.image_miou for run in runs], dtype=np.float64)  # M×N
    spread = np.nan_to_num(scores.max(0) - scores.min(0), nan=-1.0)
    order = [int(i) for i in np.argsort(-spread, kind="stable") if int(i) not in set(skip)]
    return order[:k]


# ------------------------------------------------------------------------------------------------
# Several runs of one model (seeds) as one row
# ------------------------------------------------------------------------------------------------


def _mean_of(values: Sequence[Any]) -> Any:
    """The mean of same-shaped results (dicts of floats, nested): floats by their mean over the
    values that are not NaN; anything else (counts, lists) as the first one has it."""
    first = values[0]
    if isinstance(first, dict):
        return {key: _mean_of([v[key] for v in values]) for key in first}
    if isinstance(first, float):
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else float("nan")
    return first


def merge_seeds(label: str, members: Sequence[ModelRun]) -> ModelRun:
    """One row for several runs of one model (`compare --runs`): its figures are the mean over the
    runs (accuracy, per class, per image); speed, size, Boundary IoU, corruptions and the
    gallery's predictions are the first run's (the runs share the architecture). `row.seeds`
    keeps each run."""
    import dataclasses

    if len({run.name for run in members}) > 1:
        raise SegcompareError(
            f"--runs {label}: the runs are of different models "
            f"({', '.join(sorted({run.name for run in members}))}); a row is one model's seeds"
        )
    first = members[0]
    return dataclasses.replace(
        first,
        label=label,
        results=_mean_of([run.results for run in members]),
        image_miou=np.mean([run.image_miou for run in members], 0).tolist(),
        image_acc=np.mean([run.image_acc for run in members], 0).tolist(),
        seeds=list(members),
    )


# ------------------------------------------------------------------------------------------------
# Uncertainty
# ------------------------------------------------------------------------------------------------


def bootstrap_intervals(
    runs: Sequence[ModelRun], resamples: int, seed: int
) -> list[dict[str, Any]]:
    """The paired bootstrap over the evaluated images (`segcompare.metrics`): every model scored
    on the same `resamples` draws. Fills `run.uncertainty` ({"miou_ci", "mean_acc_ci", "iou_ci":
    {class: [lo, hi]}, "iou_diff_ci": {class: the interval of IoU minus the first model's}}) and
    returns every pairwise mIoU difference ({"a", "b", "diff", "ci", "verdict"}). resamples 0:
    nothing (empty intervals, no pairs)."""
    from segcompare.metrics import bootstrap_draws, bootstrap_scores, interval, pairwise_differences

    if resamples <= 0 or not runs:
        return []
    draws = bootstrap_draws(len(runs[0].image_miou), resamples, seed)
    samples = []
    for run in runs:
        members = run.seeds or [run]
        samples.append(bootstrap_scores([m.image_mats for m in members], draws))

    names = class_names(runs[0])

    def pairs(ci: np.ndarray) -> dict[str, list[float]]:  # 2×C -> {class: [lo, hi]}
        return {name: [float(ci[0, c]), float(ci[1, c])] for c, name in enumerate(names)}

    for run, s in zip(runs, samples):
        run.uncertainty = {
            "resamples": resamples,
            "seed": seed,
            "miou_ci": interval(s["miou"]).tolist(),
            "mean_acc_ci": interval(s["mean_acc"]).tolist(),
            "iou_ci": pairs(interval(s["iou"])),
        }
        if run is not runs[0]:
            run.uncertainty["iou_diff_ci"] = pairs(interval(s["iou"] - samples[0]["iou"]))
    return pairwise_differences(
        [run.label for run in runs], [run.results["miou"] for run in runs],
        [s["miou"] for s in samples],
    )


def pareto_front(runs: Sequence[ModelRun]) -> list[str]:
    """Labels of the models no other model beats on both mIoU (higher) and latency (lower): the
    accuracy-latency Pareto front, fastest first."""
    points = [(run.bench.get("latency_ms"), run.results["miou"], run.label) for run in runs]
    points = [p for p in points if p[0] is not None and not math.isnan(p[1])]
    front = []
    for lat, miou, label in points:
        beaten = any(
            (lat2 <= lat and miou2 >= miou) and (lat2 < lat or miou2 > miou)
            for lat2, miou2, _ in points
        )
        if not beaten:
            front.append((lat, label))
    return [label for _, label in sorted(front)]


# ------------------------------------------------------------------------------------------------
# Training: what a run folder's log says
# ------------------------------------------------------------------------------------------------


def training_of(weights: Optional[str]) -> Optional[dict[str, Any]]:
    """The training side of weights that come from a `segcompare train` run folder
    (final/best.safetensors beside log.jsonl and config.yaml), else None:

    {"iterations", "wall_s", "images_per_s", "peak_memory_mb", "device", "batch_size",
     "curves": {"iter", "loss", "lr"}, "val": {"iter", "miou"}}

    Runs whose log predates the cost fields (`segcompare.train` writes them in its summary
    record) get what the log allows: images/s from the logged time per iteration, peak memory
    from the logged memory, wall time from the summary's minutes; None for the rest."""
    import json

    import yaml

    from segcompare.run_folder import RUN_WEIGHTS

    if weights is None or Path(weights).name not in RUN_WEIGHTS.values():
        return None
    folder = Path(weights).parent
    log_path, config_path = folder / "log.jsonl", folder / "config.yaml"
    if not (log_path.is_file() and config_path.is_file()):
        return None
    try:
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise SegcompareError(f"{folder}: cannot read the training log: {err}") from None
    steps = [r for r in records if "loss" in r and "iter" in r]
    vals = [r for r in records if "val_mIoU" in r and "summary" not in r]
    summary = next((r for r in reversed(records) if "summary" in r), {})
    batch = (config.get("train") or {}).get("batch_size")
    per_iter = [r["time_per_iter"] for r in steps if r.get("time_per_iter")]
    images_per_s = summary.get("images_per_s")
    if images_per_s is None and per_iter and batch:
        images_per_s = batch / float(np.mean(per_iter))
    memory = [r["memory_mb"] for r in steps if r.get("memory_mb") is not None]
    wall_s = summary.get("wall_s")
    if wall_s is None and summary.get("minutes") is not None:
        wall_s = 60 * summary["minutes"]
    return {
        "iterations": summary.get("iter", steps[-1]["iter"] if steps else None),
        "wall_s": wall_s,
        "images_per_s": images_per_s,
        "peak_memory_mb": summary.get("peak_memory_mb", max(memory) if memory else None),
        "device": summary.get("device"),
        "batch_size": batch,
        "curves": {"iter": [r["iter"] for r in steps], "loss": [r["loss"] for r in steps],
                   "lr": [r["lr"] for r in steps]},
        "val": {"iter": [r["iter"] for r in vals], "miou": [r["val_mIoU"] for r in vals]},
    }  # fmt: skip
