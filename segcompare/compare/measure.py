"""What the comparison measures, model by model: the Cityscapes metrics of `segcompare eval` with
Boundary IoU, per-image mIoU and the confusion matrix in the same pass, parameters and GMACs
(`segcompare.stats`), latency and memory (`segcompare.bench`), mIoU under corruptions, and the
hardest images."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from segcompare.data.corrupt import SEVERITIES, corrupt
from segcompare.data.labels import NUM_CLASSES
from segcompare.evaluate import InferenceSettings
from segcompare.metrics import BoundaryIoU, image_miou
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


def compare_datasets(
    data_root: PathLike, split: str, max_images: Optional[int], corrupt_images: Optional[int]
) -> tuple[Any, Any, Any]:
    """The split's datasets the comparison reads: (the first `max_images` images, test-transformed
    and with instances, for scoring; the same raw (uint8), for plots; the first `corrupt_images`
    of those raw ones, for the corruptions). None: all images."""
    from segcompare.data.cityscapes import CityscapesDataset
    from segcompare.data.transforms import build_test_transform

    dataset = _Subset(
        CityscapesDataset(data_root, split, transform=build_test_transform(), with_instances=True),
        max_images,
    )
    raw = _Subset(CityscapesDataset(data_root, split), max_images)
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
    boundary: Optional[BoundaryIoU] = None
    image_miou: list[float] = field(default_factory=list)  # per image, in dataset order
    image_names: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    robustness: dict[str, Any] = field(default_factory=dict)
    fp32: dict[str, Any] = field(default_factory=dict)  # with --amp: the float32 scores


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
    models: Sequence[tuple[Optional[str], Optional[PathLike]]], inference: InferenceSettings
) -> list[ModelRun]:
    """Build every model (so that a bad name or file fails before any long step) and wrap each in
    a `Predictor` with `inference`. Weights None: random weights, seed 0, as `segcompare eval`."""
    from segcompare.infer import Predictor
    from segcompare.models import build_model
    from segcompare.models.save import num_classes_of

    resolved = []
    for name, weights in models:
        if name is None and weights is None:
            raise SegcompareError("each model needs a name or weights (or both)")
        torch.manual_seed(0)  # without weights: the random model `segcompare eval` builds
        model = build_model(name, weights=weights)
        classes = num_classes_of(model)
        if classes != NUM_CLASSES:  # evaluate_model would refuse it, after the models before it
            raise SegcompareError(
                f"{weights or name}: the model predicts {classes} classes; the comparison scores "
                f"the {NUM_CLASSES} Cityscapes train classes: compare {NUM_CLASSES}-class models"
            )
        if weights is None:
            log.warning("no weights for %s: random weights (seed 0); figures mean nothing", name)
        resolved.append((model.variant, None if weights is None else str(weights), model))
    labels = _labels([(n, w) for n, w, _ in resolved])
    return [
        ModelRun(name, weights, label, Predictor(model, inference))
        for (name, weights, model), label in zip(resolved, labels)
    ]


# ------------------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------------------


def evaluate_run(
    run: ModelRun, dataset: Any, d: int, progress: bool = True, bar: Any = None
) -> None:
    """Score one model on the (test-transformed) dataset with `segcompare.evaluate.evaluate_model`,
    the function `segcompare eval` uses, and collect in the same pass (its `on_batch`) what the
    report needs on top: confusion matrix, Boundary IoU and per-image mIoU."""
    from segcompare.evaluate import evaluate_model
    from segcompare.metrics import ConfusionMatrix

    cm = ConfusionMatrix()
    run.boundary = BoundaryIoU(d)

    def on_batch(pred: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> None:
        cm.update(pred, labels)
        run.boundary.update(pred, labels)
        run.image_miou += [image_miou(p, t) for p, t in zip(pred, labels)]
        run.image_names += batch["name"]
        if bar is not None:
            bar.update(pred.shape[0])

    run.results = evaluate_model(
        run.predictor.scores, dataset, progress=progress and bar is None, on_batch=on_batch
    )
    run.confusion = cm.mat[:, : cm.num_classes].cpu().numpy()


def evaluate_fp32(run: ModelRun, dataset: Any, progress: bool = True, bar: Any = None) -> None:
    """With mixed precision (`InferenceSettings.amp`): score the same model again in float32,
    otherwise the same way, so the report can say what mixed precision changed
    (`ModelRun.fp32`: the float32 mIoU and category mIoU)."""
    import dataclasses

    from segcompare.evaluate import evaluate_model
    from segcompare.infer import Predictor

    settings = dataclasses.replace(run.predictor.settings, amp=False)
    predictor = Predictor(run.predictor.model, settings)

    def on_batch(pred: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(pred.shape[0])

    results = evaluate_model(
        predictor.scores, dataset, progress=progress and bar is None, on_batch=on_batch
    )
    run.fp32 = {"miou": results["miou"], "category_miou": results["category_miou"]}


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
    amp: bool,
    iters: int,
    warmup: int,
    progress: bool,
) -> dict[str, Any]:
    """Fill `run.bench` (latency, throughput, memory of one batch-1 forward pass at `eval_hw`,
    the models interleaved: `segcompare.bench`); returns the benchmark's metadata. amp: whether
    the predictors autocast (`InferenceSettings.amp`), for the metadata's dtype."""
    from segcompare import bench

    predictor = runs[0].predictor
    x = torch.randn(1, 3, *eval_hw, device=predictor.device)
    candidates = [bench.Candidate(run.label, run.predictor.run_model) for run in runs]
    rows = bench.benchmark(candidates, x, warmup, iters, progress=progress)
    for run, row in zip(runs, rows):
        run.bench = row
    dtype = str(predictor.amp_dtype).replace("torch.", "") + " autocast" if amp else "fp32"
    meta = bench.machine_info(predictor.device, torch.get_num_threads(), dtype)
    meta.update(iters=iters, warmup=warmup, size=list(eval_hw), batch=1)
    return meta
