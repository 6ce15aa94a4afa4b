"""The comparison report: several models on one split, side by side, in numbers and pictures.

    run_compare([("segformer-b0", "b0.safetensors"), ("hrnet-w18-small-v2", "w18s.safetensors")],
                data_root="data/cityscapes", split="val", out_dir="compare", images=4,
                corrupt=["noise", "blur", "jpeg", "brightness"])

writes into `out_dir`:

- `metrics.json`: per model the Cityscapes metrics of `segcompare eval` (the same function
  computes them: `segcompare.evaluate.evaluate_model`), Boundary IoU, parameters and GMACs
  (`segcompare.stats`), latency, throughput and memory (`segcompare.bench`), and mIoU under
  corruptions;
- `report.md` with the plots beside it as PNG files, and `report.html`, the same report with the
  plots embedded (base64), which opens offline in any browser.

What the report measures beyond `segcompare eval`:

- Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
  Evaluation", CVPR 2021): IoU restricted to the pixels within d of each class's contour, in the
  ground truth and in the prediction alike (`BoundaryIoU`);
- the K hardest images (lowest per-image mIoU averaged over the models) with every model's
  prediction and a map of where the models disagree;
- row-normalised confusion matrices;
- mIoU under four corruptions of the input at three severities (`corrupt`), the ImageNet-C
  levels 1, 3 and 5 of Hendrycks & Dietterich (ICLR 2019), as the SegFormer paper's robustness
  study (Cityscapes-C) used them.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import logging
import math
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segcompare.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, colorize
from segcompare.evaluate import InferenceSettings
from segcompare.utils import PathLike, SegcompareError, atomic_path, atomic_write_text

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Boundary IoU
# ------------------------------------------------------------------------------------------------

# Band half-width d as a fraction of the image diagonal. Cheng et al. use 2% (46 px on a
# 1024×2048 Cityscapes image, which covers most of a pedestrian); we use 0.5%: 11 px at
# 1024×2048, about three output pixels of the 1/4-resolution heads, 1 px (the minimum) on a
# 64×128 image: a band "a few pixels around label edges", where sharp and blurry edges differ.
BOUNDARY_FRAC = 0.005


def boundary_width(hw: Sequence[int], frac: float = BOUNDARY_FRAC) -> int:
    """d in pixels for an image of size `hw` (H, W): `frac` of its diagonal, at least 1."""
    return max(1, round(frac * math.hypot(hw[0], hw[1])))


def boundary_band(labels: torch.Tensor, d: int) -> torch.Tensor:
    """N×H×W (or H×W) labels -> bool mask of the pixels within d of a contour of their own region.

    A pixel is in its region's band when its (2d+1)×(2d+1) window holds another label: for each
    class c, `band & (labels == c)` is the mask of c minus its erosion by that square, as the
    official boundary-iou-api computes it (d iterations of a 3×3 erosion, i.e. chessboard
    distance <= d). The image frame is not a contour (the API pads with background and counts
    it; on a full-frame semantic map that adds a band where nothing is hard to segment).
    """
    if d < 1:
        raise ValueError(f"boundary width must be at least 1 pixel, got {d}")
    x = labels.float().unsqueeze(-3)  # N×1×H×W; max_pool2d pads with -inf: the frame is neutral
    k = 2 * d + 1
    hi = F.max_pool2d(x, k, stride=1, padding=d)
    lo = -F.max_pool2d(-x, k, stride=1, padding=d)
    return (hi != lo).squeeze(-3)


class BoundaryIoU:
    """Accumulates Boundary IoU per class over any number of images.

    For class c with ground-truth mask G and predicted mask P (Cheng et al. 2021, eq. 2):

        Boundary IoU = |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|

    where G_d and P_d are the pixels within d of the contours of G and P. As mIoU, the counts are
    summed over the dataset before dividing, pixels whose ground truth is 'ignore' are left out,
    and the mean is over the classes whose union is not empty.
    """

    def __init__(self, d: int, num_classes: int = NUM_CLASSES) -> None:
        self.d = d
        self.num_classes = num_classes
        self.intersection = torch.zeros(num_classes, dtype=torch.int64)
        self.union = torch.zeros(num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: N×H×W (or H×W) train ids; target 255 = ignore."""
        pred, target = torch.as_tensor(pred).long(), torch.as_tensor(target).long()
        target = target.to(pred.device)
        c = self.num_classes
        valid = (target >= 0) & (target < c)
        g = boundary_band(target, self.d) & valid  # G_d ∩ G, for every class at once
        p = boundary_band(pred, self.d) & valid & (pred >= 0) & (pred < c)
        both = g & p & (pred == target)
        inter = torch.bincount(target[both], minlength=c)[:c]
        g_count = torch.bincount(target[g], minlength=c)[:c]
        p_count = torch.bincount(pred[p], minlength=c)[:c]
        self.intersection += inter.cpu()
        self.union += (g_count + p_count - inter).cpu()

    def per_class(self) -> np.ndarray:
        """Boundary IoU per class; NaN where the class is in neither band."""
        inter, union = self.intersection.numpy(), self.union.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / np.maximum(union, 1), np.nan)

    def mean(self) -> float:
        values = self.per_class()
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")


def boundary_iou(
    pred: torch.Tensor, target: torch.Tensor, d: int, num_classes: int = NUM_CLASSES
) -> float:
    """Mean Boundary IoU of one prediction (H×W or N×H×W train ids) against its label."""
    acc = BoundaryIoU(d, num_classes)
    acc.update(pred, target)
    return acc.mean()


def image_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> float:
    """mIoU of one image (H×W train ids): over the classes in its label or its prediction."""
    pred, target = torch.as_tensor(pred).long(), torch.as_tensor(target).long().to(pred.device)
    valid = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    idx = target[valid] * num_classes + pred[valid]
    mat = torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)
    tp = mat.diag().double()
    union = mat.sum(0) + mat.sum(1) - mat.diag()
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


# ------------------------------------------------------------------------------------------------
# Corruptions
# ------------------------------------------------------------------------------------------------

# The ImageNet-C parameters of levels 1..5 (hendrycks/robustness, ImageNet-C/create_c/
# make_imagenet_c.py); the report uses levels SEVERITIES. Noise: std of Gaussian noise on [0, 1];
# blur: Gaussian sigma in pixels (kept in pixels, as the Cityscapes-C benchmark the SegFormer paper
# uses kept them); jpeg: JPEG quality; brightness: added to V of HSV on [0, 1].
CORRUPTION_LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "blur": (1, 2, 3, 4, 6),
    "jpeg": (25, 18, 15, 10, 7),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
}
CORRUPTIONS = tuple(CORRUPTION_LEVELS)
SEVERITIES = (1, 3, 5)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of H×W×3 float32, kernel truncated at 4 sigma, edges replicated
    (skimage.filters.gaussian's defaults, which ImageNet-C calls)."""
    radius = max(1, math.ceil(4 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # 1×3×H×W
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x[0].permute(1, 2, 0).numpy()


def _brighten(image: np.ndarray, amount: float) -> np.ndarray:
    """Add `amount` to V of HSV (on [0, 1]) and clip: with hue and saturation fixed, RGB scales
    by V'/V; a black pixel (V = 0, saturation 0) becomes grey V'."""
    v = image.max(axis=2, keepdims=True)
    v_new = np.minimum(v + amount, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(v > 0, image * (v_new / np.where(v > 0, v, 1.0)), v_new)
    return scaled


def corrupt(image: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """H×W×3 uint8 RGB -> the same image under corruption `kind` at ImageNet-C level `severity`
    (1..5), H×W×3 uint8. Deterministic: the noise is drawn from `np.random.default_rng(seed)`."""
    if kind not in CORRUPTION_LEVELS:
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5 (ImageNet-C levels), got {severity}")
    c = CORRUPTION_LEVELS[kind][severity - 1]
    if kind == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as im:
            return np.array(im.convert("RGB"))
    x = image.astype(np.float32) / 255.0
    if kind == "noise":
        rng = np.random.default_rng(seed)
        x = x + rng.normal(0.0, c, size=x.shape).astype(np.float32)
    elif kind == "blur":
        x = _gaussian_blur(x, float(c))
    else:  # brightness
        x = _brighten(x, float(c))
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def parse_corruptions(text: str) -> list[str]:
    """'noise,blur' -> ['noise', 'blur']; 'all' -> every corruption; unknown names are an error."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTION_LEVELS]
    if unknown:
        raise SegcompareError(
            f"unknown corruption {unknown[0]!r}; valid: {', '.join(CORRUPTIONS)} or all"
        )
    return list(dict.fromkeys(names))


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


class _Recording:
    """Passes a dataset through and remembers the labels and names it handed out, in order.

    `evaluate_model` gives its `scores_fn` only the images; with workers=0 its loader reads a
    batch's samples just before it calls `scores_fn` on them, so `scores_fn` can take the labels
    of its batch from this queue and see each (prediction, label) pair once, in the same pass.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.queue: deque[tuple[str, torch.Tensor]] = deque()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        self.queue.append((sample["name"], torch.as_tensor(sample["label"])))
        return sample

    def take(self, n: int) -> tuple[list[str], torch.Tensor]:
        if len(self.queue) < n:
            raise RuntimeError("evaluation read fewer samples than it scored (workers must be 0)")
        items = [self.queue.popleft() for _ in range(n)]
        return [name for name, _ in items], torch.stack([label for _, label in items])


# ------------------------------------------------------------------------------------------------
# One model's evaluation
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


def evaluate_run(
    run: ModelRun, dataset: Any, d: int, progress: bool = True, bar: Any = None
) -> None:
    """Score one model on the (test-transformed) dataset with `segcompare.evaluate.evaluate_model`,
    the function `segcompare eval` uses, and collect in the same pass what the report needs on
    top: confusion matrix, Boundary IoU and per-image mIoU."""
    from segcompare.evaluate import ConfusionMatrix, evaluate_model

    recording = _Recording(dataset)
    cm = ConfusionMatrix()
    run.boundary = BoundaryIoU(d)

    def scores(images: torch.Tensor) -> torch.Tensor:
        out = run.predictor.scores(images)
        names, labels = recording.take(images.shape[0])
        pred = out.argmax(1)
        labels = labels.to(pred.device)
        if pred.shape == labels.shape:  # else evaluate_model raises its own error next
            cm.update(pred, labels)
            run.boundary.update(pred, labels)
            run.image_miou += [image_miou(p, t) for p, t in zip(pred, labels)]
            run.image_names += names
        if bar is not None:
            bar.update(images.shape[0])
        return out

    run.results = evaluate_model(scores, recording, workers=0, progress=progress and bar is None)
    run.confusion = cm.mat[:, : cm.num_classes].cpu().numpy()


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
    total = len(runs) * len(levels) * len(raw_dataset)
    with tqdm(total=total, desc="corruptions", unit="img", disable=not progress) as bar:
        for run in runs:
            run.robustness = {
                "severities": list(SEVERITIES),
                "clean_miou": None if subset else run.results["miou"],
                "miou": {},
            }
        for kind, severity in levels:
            dataset = _Corrupted(raw_dataset, kind, severity)
            for run in runs:
                bar.set_postfix_str(f"{kind or 'clean'} {severity} {run.label}")

                def scores(images: torch.Tensor, run: ModelRun = run) -> torch.Tensor:
                    bar.update(images.shape[0])
                    return run.predictor.scores(images)

                miou = evaluate_model(scores, dataset, workers=0, progress=False)["miou"]
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
# Plots (matplotlib, Agg canvas; imported here only)
# ------------------------------------------------------------------------------------------------

# One colour per model, in order (matplotlib's tab10); families keep their marker in scatters.
_MARKERS = {"segformer": "o", "hrnet": "s"}
NO_WINNER_GREY = 200.0  # disagreement map: the models disagree and no single one is right


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _save(fig: Any, path: Path, dpi: int = 100) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _nan_to_zero(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(a), 0.0, a)


def _grouped_bars(ax: Any, names: Sequence[str], series: Sequence[Sequence[float]],
                  labels: Sequence[str], colors: Sequence[Any]) -> None:
    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(len(names))
    for i, (values, label, color) in enumerate(zip(series, labels, colors)):
        ax.bar(x + (i - (n - 1) / 2) * width, _nan_to_zero(values), width, label=label,
               color=color)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def plot_per_class(runs: Sequence[ModelRun], path: Path) -> Path:
    """Per-class IoU, one bar per model."""
    fig = _figure(12, 4.2)
    ax = fig.add_subplot()
    series = [[run.results["per_class"][c]["iou"] for c in CLASS_NAMES] for run in runs]
    _grouped_bars(ax, CLASS_NAMES, series, [r.label for r in runs], _colors(len(runs)))
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("Per-class IoU")
    ax.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def plot_per_class_difference(runs: Sequence[ModelRun], path: Path) -> Path:
    """IoU of each model minus the first model's, per class: where each model wins."""
    fig = _figure(12, 4.2)
    ax = fig.add_subplot()
    base = np.array([runs[0].results["per_class"][c]["iou"] for c in CLASS_NAMES])
    others = runs[1:]
    series = [
        np.array([run.results["per_class"][c]["iou"] for c in CLASS_NAMES]) - base
        for run in others
    ]
    if len(others) == 1:  # two models: colour each bar by the winner
        diff = _nan_to_zero(series[0])
        c0, c1 = _colors(2)
        x = np.arange(len(CLASS_NAMES))
        ax.bar(x, diff, 0.7, color=[c1 if v >= 0 else c0 for v in diff])
        ax.set_xticks(x, CLASS_NAMES, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(CLASS_NAMES) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c1, label=f"{others[0].label} better"),
                           Patch(color=c0, label=f"{runs[0].label} better")],
                  loc="upper right", fontsize=9)
    else:
        _grouped_bars(ax, CLASS_NAMES, series, [r.label for r in others], _colors(len(runs))[1:])
        ax.legend(loc="upper right", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.8)
    lim = max(0.05, float(np.nanmax(np.abs(np.concatenate(series)))) * 1.15
              if np.isfinite(np.concatenate(series)).any() else 0.05)
    ax.set_ylim(-lim, lim)
    ax.set_ylabel(f"IoU − IoU of {runs[0].label}")
    ax.set_title(f"Per-class IoU difference against {runs[0].label} (above 0: that model wins)")
    return _save(fig, path)


def plot_scatter(runs: Sequence[ModelRun], x_key: str, x_label: str, path: Path) -> Path:
    """mIoU against a cost (GMACs or latency), one labelled point per model."""
    from segcompare.models import model_family

    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    xs = [float(run.stats.get(x_key) or run.bench.get(x_key) or float("nan")) for run in runs]
    ys = [100 * run.results["miou"] for run in runs]
    for run, x, y, color in zip(runs, xs, ys, _colors(len(runs))):
        ax.scatter([x], [y], s=70, color=color, marker=_MARKERS[model_family(run.name)],
                   label=run.label, zorder=3)
        ax.annotate(run.label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9)
    finite = [x for x in xs if math.isfinite(x) and x > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.margins(0.25)
    ax.set_title(f"mIoU vs {x_label.split(' (')[0]}  (up and left is better)")
    return _save(fig, path)


def plot_boundary(runs: Sequence[ModelRun], d: int, path: Path) -> Path:
    """Left: mIoU and Boundary IoU per model; right: Boundary IoU per class."""
    fig = _figure(14, 4.2)
    left, right = fig.subplots(1, 2, width_ratios=[1, 4])
    x = np.arange(len(runs))
    colors = _colors(len(runs))
    left.bar(x - 0.2, [100 * r.results["miou"] for r in runs], 0.4, color=colors, alpha=0.45,
             label="mIoU")
    left.bar(x + 0.2, [100 * r.boundary.mean() for r in runs], 0.4, color=colors,
             label="Boundary IoU", hatch="//", edgecolor="white")
    left.set_xticks(x, [r.label for r in runs], rotation=30, ha="right")
    left.set_ylabel("%")
    left.set_ylim(0, 100)
    left.legend(fontsize=8, loc="upper right")
    left.set_title("whole masks vs edges")
    left.grid(axis="y", alpha=0.3)
    series = [r.boundary.per_class() for r in runs]
    _grouped_bars(right, CLASS_NAMES, series, [r.label for r in runs], colors)
    right.set_ylim(0, 1)
    right.set_ylabel("Boundary IoU")
    right.set_title(f"Boundary IoU per class (band d = {d} px)")
    right.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def plot_confusion(run: ModelRun, path: Path) -> Path:
    """Row-normalised confusion matrix (rows: ground truth; each row sums to 1)."""
    mat = run.confusion.astype(np.float64)
    rows = mat.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, mat / np.maximum(rows, 1), np.nan)
    fig = _figure(7.5, 6.6)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    n = len(CLASS_NAMES)
    ax.set_xticks(range(n), CLASS_NAMES, rotation=90, fontsize=8)
    ax.set_yticks(range(n), CLASS_NAMES, fontsize=8)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            if np.isfinite(v) and v >= 0.1:
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v > 0.6 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{run.label}: confusion (row-normalised, %)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return _save(fig, path)


def plot_robustness(runs: Sequence[ModelRun], path: Path) -> Path:
    """mIoU against severity (0 = clean) for each corruption, a line per model."""
    kinds = list(runs[0].robustness["miou"])
    fig = _figure(3.4 * len(kinds) + 0.6, 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    levels = [0, *SEVERITIES]
    for ax, kind in zip(axes, kinds):
        for run, color in zip(runs, _colors(len(runs))):
            ys = [run.robustness["clean_miou"], *run.robustness["miou"][kind]]
            ax.plot(levels, [100 * v for v in ys], marker="o", color=color, label=run.label)
        ax.set_xticks(levels, ["clean", *map(str, SEVERITIES)])
        ax.set_title(kind)
        ax.set_xlabel("severity (ImageNet-C level)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    axes[-1].legend(fontsize=8)
    return _save(fig, path)


def _thumb(array: np.ndarray, width: int, nearest: bool) -> np.ndarray:
    """Resize an H×W(×3) uint8 image to `width` columns (no upscaling)."""
    from PIL import Image

    h, w = array.shape[:2]
    if w <= width:
        return array
    size = (width, max(1, round(h * width / w)))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize(size, resample))


def disagreement_map(
    image: np.ndarray, label: np.ndarray, preds: Sequence[np.ndarray], colors: Sequence[Any]
) -> np.ndarray:
    """H×W×3 uint8: the image dimmed where all models agree; where they disagree, the colour of
    the one model that is right, or light grey when no single model is. With one model: its
    errors (ignored pixels excepted) in grey."""
    out = (image.astype(np.float32).mean(2, keepdims=True) * 0.35).repeat(3, 2)
    stack = np.stack(preds)  # M×H×W
    if len(preds) == 1:
        out[(stack[0] != label) & (label != IGNORE_INDEX)] = NO_WINNER_GREY
        return out.round().astype(np.uint8)
    disagree = (stack != stack[0]).any(0)
    right = stack == label[None]
    n_right = right.sum(0)
    out[disagree] = NO_WINNER_GREY
    for m, color in enumerate(colors):
        only = disagree & right[m] & (n_right == 1)
        out[only] = np.array(color[:3]) * 255.0
    return out.round().astype(np.uint8)


def plot_hardest(
    runs: Sequence[ModelRun], raw_dataset: Any, indices: Sequence[int], path: Path,
    progress: bool = True,
) -> Path:
    """A row per image: image | ground truth | each model | where they disagree."""
    from matplotlib.patches import Patch
    from tqdm import tqdm

    cols = 3 + len(runs)
    panel_w, dpi = 3.6, 120  # inches, dots per inch: 432-px panels
    width = round(panel_w * dpi)
    sample0 = raw_dataset[indices[0]]
    h0, w0 = sample0["label"].shape
    panel_h = panel_w * h0 / w0
    fig = _figure(panel_w * cols, (panel_h + 0.5) * len(indices) + 0.8)
    axes = np.array(fig.subplots(len(indices), cols, squeeze=False))
    colors = _colors(len(runs))
    for row, index in enumerate(tqdm(indices, desc="hardest images", disable=not progress)):
        sample = sample0 if row == 0 else raw_dataset[index]
        image, label = sample["image"], sample["label"]
        preds = [run.predictor.predict(image) for run in runs]
        panels = [_thumb(image, width, False), _thumb(colorize(label), width, True)]
        panels += [_thumb(colorize(p), width, True) for p in preds]
        panels.append(_thumb(disagreement_map(image, label, preds, colors), width, True))
        titles = [sample["name"], "ground truth"]
        titles += [f"{run.label}: {100 * run.image_miou[index]:.1f}% mIoU" for run in runs]
        titles.append("where they disagree" if len(runs) > 1 else "errors")
        for ax, panel, title in zip(axes[row], panels, titles):
            ax.imshow(panel, interpolation="antialiased" if ax is axes[row][0] else "nearest")
            ax.set_title(title, fontsize=12)
            ax.set_axis_off()
    grey = np.full(3, NO_WINNER_GREY / 255)
    if len(runs) > 1:
        handles = [Patch(color=c, label=f"only {r.label} right") for r, c in zip(runs, colors)]
        handles.append(Patch(color=grey, label="no single model right"))
    else:
        handles = [Patch(color=grey, label="wrong")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=12)
    fig.suptitle("Hardest images: lowest per-image mIoU, averaged over the models", fontsize=14)
    return _save(fig, path, dpi)


# ------------------------------------------------------------------------------------------------
# Report text: one list of sections, rendered as Markdown and as self-contained HTML
# ------------------------------------------------------------------------------------------------


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: Optional[tuple[list[str], list[list[str]]]] = None  # header, rows
    numeric_table: bool = True  # right-align every column but the first
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def _pct(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}"


def _num(value: Optional[float], fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _gmacs(value: Optional[float]) -> str:
    return _num(value, ".3g" if value is not None and value < 10 else ".1f")


def describe_inference(inference: dict[str, Any]) -> str:
    """The inference settings of metrics.json's meta in words."""
    mode = {"slide": "sliding windows (the official test)", "whole": "whole-image"}
    size = inference.get("size")
    words = [
        f"{mode.get(inference['mode'], inference['mode'])} inference",
        f"at {size[0]}x{size[1]}" if size else "at each image's own size",
        ("scale " if len(inference["scales"]) == 1 else "scales ")
        + ", ".join(f"{v:g}" for v in inference["scales"]),
    ]
    if inference.get("window"):
        words.append(f"window {inference['window'][0]}x{inference['window'][1]}")
    if inference.get("stride"):
        words.append(f"stride {inference['stride'][0]}x{inference['stride'][1]}")
    if inference.get("amp"):
        words.append("mixed precision")
    if inference.get("flip"):
        words.append("with flip")
    words.append("through prepare_for_inference" if inference.get("optimize") else "eager model")
    return ", ".join(words)


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.table:
            header, rows = s.table
            out.append("| " + " | ".join(header) + " |")
            rest = "---:" if s.numeric_table else "---"
            out.append("| " + " | ".join(["---"] + [rest] * (len(header) - 1)) + " |")
            out += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("")
        for name, caption in s.images:
            out += [f"![{caption}]({name})", ""]
    return "\n".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 1em 2em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
p { max-width: 60em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child, table.text td { text-align: left; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.images { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.images figure { flex: 1 1 600px; }
"""


def _inline_code(escaped: str) -> str:
    """`text` (Markdown inline code) -> <code>text</code>, in already escaped HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(title: str, sections: Sequence[Section], image_dir: Path) -> str:
    """A self-contained page: the plots as data: URIs, the style inline, no external reference."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for s in sections:
        out.append(f"<h2>{esc(s.title)}</h2>")
        out += [f"<p>{_inline_code(esc(p))}</p>" for p in s.paragraphs]
        if s.table:
            header, rows = s.table
            out.append("<table>" if s.numeric_table else '<table class="text">')
            out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
        if s.images:
            out.append('<div class="images">')
            for name, caption in s.images:
                data = base64.b64encode((image_dir / name).read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                    f"<figcaption>{esc(caption)}</figcaption></figure>"
                )
            out.append("</div>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# metrics.json
# ------------------------------------------------------------------------------------------------


def model_entry(run: ModelRun) -> dict[str, Any]:
    """One model's entry of metrics.json (fractions in [0, 1])."""
    r = run.results
    return {
        "name": run.name,
        "label": run.label,  # unique display name: the name, plus the weights' stem if repeated
        "weights": run.weights,
        "miou": r["miou"],
        "miiou": r["miiou"],
        "category_miou": r["category_miou"],
        "pixel_acc": r["pixel_acc"],
        "boundary_iou": run.boundary.mean() if run.boundary else float("nan"),
        "per_class": r["per_class"],
        "boundary_iou_per_class": dict(zip(CLASS_NAMES, run.boundary.per_class().tolist()))
        if run.boundary
        else {},
        "parameters": run.stats.get("parameters"),
        "gmacs": run.stats.get("gmacs"),
        "latency_ms": run.bench.get("latency_ms"),
        "images_per_s": run.bench.get("images_per_s"),
        "memory_mb": run.bench.get("memory_mb"),
        "robustness": run.robustness,
    }


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_")


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


def build_sections(
    runs: Sequence[ModelRun], doc: dict[str, Any], files: dict[str, Any]
) -> list[Section]:
    """The report's sections, from the measured runs and the plot file names."""
    meta = doc["meta"]
    h, w = meta["eval_size"]
    bench_meta = meta.get("bench", {})
    sections: list[Section] = []

    header = ["model", "mIoU", "iIoU", "cat. mIoU", "pixel acc.", "Boundary IoU",
              "params (M)", "GMACs", "latency ms", "images/s", "memory MB"]
    if any(run.robustness for run in runs):
        header += ["corrupted mIoU", "rel. robustness"]
    rows = []
    for run in runs:
        r = run.results
        row = [
            run.label, _pct(r["miou"]), _pct(r["miiou"]), _pct(r["category_miou"]),
            _pct(r["pixel_acc"]), _pct(run.boundary.mean()),
            _num(run.stats["parameters"] / 1e6, ".2f"), _gmacs(run.stats["gmacs"]),
            _num(run.bench.get("latency_ms"), ".1f"), _num(run.bench.get("images_per_s"), ".2f"),
            _num(run.bench.get("memory_mb"), ".0f"),
        ]  # fmt: skip
        if len(header) > 11:
            rb = run.robustness
            row += [_pct(rb.get("mean_miou")), _num(rb.get("relative_miou"), ".2f")]
        rows.append(row)
    sections.append(Section(
        "Summary",
        [
            f"{doc['num_images']} images of {doc['data']} ({doc['split']}), {h}x{w} (H×W), "
            f"evaluated on {meta['device']} with {describe_inference(meta['inference'])}. IoU "
            "figures in %, as cityscapesscripts computes them (the same code as "
            f"`segcompare eval`). GMACs and latency are for one forward pass at {h}x{w}, batch 1 "
            f"({bench_meta.get('iters')} timed runs after {bench_meta.get('warmup')} warm-up, "
            f"median; {bench_meta.get('gpu') or bench_meta.get('cpu')}, "
            f"{bench_meta.get('threads')} threads).",
        ],
        (header, rows),
    ))  # fmt: skip
    sections.append(Section(
        "Which model? Accuracy against cost",
        ["Each point is a model (circles SegFormer, squares HRNet). A model up and to the left "
         "of another is both more accurate and cheaper."],
        images=[(files["miou_vs_gmacs"], "mIoU against GMACs"),
                (files["miou_vs_latency"], "mIoU against latency")],
    ))  # fmt: skip
    sections.append(Section(
        "Per-class IoU",
        images=[(files["per_class"], "Per-class IoU of every model")],
    ))
    if "per_class_diff" in files:
        sections.append(Section(
            "Where each model wins",
            [f"IoU of each model minus the IoU of {runs[0].label}, per class."],
            images=[(files["per_class_diff"], "Per-class IoU difference")],
        ))
    d = meta["boundary"]["d_px"]
    sections.append(Section(
        "Boundary IoU: are the edges sharp?",
        [
            "Boundary IoU (Cheng et al., CVPR 2021) is the IoU of each class restricted to the "
            f"pixels within d = {d} px of that class's contour, in the ground truth and in the "
            "prediction: |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|, summed over the "
            "images, averaged over classes. It ignores the easy interiors that dominate mIoU, "
            "so it shows whether a model's higher-resolution features (HRNet keeps a 1/4 "
            "branch all the way; SegFormer fuses 1/4 to 1/32) give sharper edges. "
            f"d is {100 * meta['boundary']['frac']:.1f}% of the image diagonal (the paper uses "
            "2%, 46 px at 1024×2048, wider than most objects); the image frame is not a "
            "contour; ground-truth 'ignore' pixels are left out.",
        ],
        images=[(files["boundary"], "mIoU and Boundary IoU per model; Boundary IoU per class")],
    ))
    if "hardest" in files:
        sections.append(Section(
            f"The {len(doc['hardest'])} hardest images",
            [
                "The images with the lowest per-image mIoU averaged over the models, with each "
                "model's prediction (title: its per-image mIoU in %). Last column: where the "
                "models disagree, in the colour of the one model that is right there (grey: "
                "no single model is right); where they agree the image is dimmed."
                if len(runs) > 1
                else "The images with the lowest per-image mIoU, with the model's prediction "
                "(title: its per-image mIoU in %) and its errors in grey on the dimmed image.",
            ],
            images=[(files["hardest"], "Hardest images")],
        ))
    sections.append(Section(
        "Confusion matrices",
        ["Rows: ground-truth class; columns: predicted class; each row sums to 100% of the "
         "class's pixels. Off-diagonal cells are the classes a model mistakes for each other."],
        images=[(files["confusion"][run.label], f"{run.label}") for run in runs],
    ))
    if any(run.robustness for run in runs):
        kinds = list(runs[0].robustness["miou"])
        n_corrupt = meta["robustness"]["num_images"]
        header = ["model", "clean"] + [f"{k} {s}" for k in kinds for s in SEVERITIES]
        header += ["mean", "relative"]
        rows = []
        for run in runs:
            rb = run.robustness
            rows.append(
                [run.label, _pct(rb["clean_miou"])]
                + [_pct(v) for k in kinds for v in rb["miou"][k]]
                + [_pct(rb["mean_miou"]), _num(rb["relative_miou"], ".2f")]
            )
        levels = "; ".join(
            f"{k}: {', '.join(str(CORRUPTION_LEVELS[k][s - 1]) for s in SEVERITIES)}"
            for k in kinds
        )
        sections.append(Section(
            "Robustness to corrupted inputs",
            [
                f"mIoU (%) on {n_corrupt} images ('clean' on the same images) under each "
                "corruption at ImageNet-C severity "
                f"levels {', '.join(map(str, SEVERITIES))} (Hendrycks & Dietterich 2019). "
                f"Parameters: {levels} (noise: std on [0, 1]; blur: Gaussian sigma in px; jpeg: "
                "quality; brightness: added to V of HSV). 'relative' is the mean corrupted mIoU "
                "over the clean mIoU: the SegFormer paper reports its transformer encoder keeps "
                "more of its accuracy than CNNs do.",
            ],
            (header, rows),
            images=[(files["robustness"], "mIoU against corruption severity")],
        ))  # fmt: skip
    weights_rows = [[run.label, str(run.weights or "random (seed 0)")] for run in runs]
    sections.append(Section(
        "How this was measured",
        [
            f"segcompare {meta['segcompare']}, torch {meta['torch']}, {meta['created']}. "
            f"Inference: {describe_inference(meta['inference'])}. Parameters and GMACs: "
            "segcompare stats (every "
            "operation counted, attention included). Latency: segcompare bench (models "
            "interleaved after warm-up; memory MB = peak size of the tensors one forward pass "
            "creates: the CUDA allocator's peak, or on the CPU the live tensors tracked op by op).",
        ],
        (["model", "weights"], weights_rows),
        numeric_table=False,
    ))
    return sections


def run_compare(
    models: Sequence[tuple[Optional[str], Optional[PathLike]]],
    data_root: PathLike,
    split: str = "val",
    out_dir: PathLike = "compare",
    images: int = 4,
    corrupt: Sequence[str] = (),
    *,
    inference: Optional[InferenceSettings] = None,
    max_images: Optional[int] = None,
    corrupt_images: Optional[int] = None,
    bench_iters: int = 3,
    bench_warmup: int = 1,
    boundary_frac: float = BOUNDARY_FRAC,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate, count and time every model and write the report into `out_dir`.

    models: (name, weights) pairs; name None reads the variant from the weights file, weights
        None gives random weights (seed 0, as `segcompare eval` does without --weights).
    images: K, the number of hardest images shown (0: none).
    corrupt: corruption names (`CORRUPTIONS`), each measured at `SEVERITIES`.
    inference: how every model runs (`InferenceSettings`, as `segcompare eval` takes it; the
        default is eval's, so the figures equal `segcompare eval`'s; its `optimize` also decides
        whether the models are timed through `prepare_for_inference`).
    max_images / corrupt_images: score only the first N images of the split (all / all).
    bench_iters / bench_warmup: timed and warm-up forward passes per model, at the eval size.
    Returns the metrics.json document.
    """
    from tqdm import tqdm

    from segcompare import bench, stats
    from segcompare.data.cityscapes import CityscapesDataset
    from segcompare.data.transforms import build_test_transform
    from segcompare.evaluate import results_to_json
    from segcompare.infer import Predictor
    from segcompare.models import build_model, model_family

    inference = inference or InferenceSettings()
    if not models:
        raise SegcompareError("compare needs at least one model")
    if images < 0 or bench_iters < 1 or bench_warmup < 0:
        raise SegcompareError("--images and --bench-warmup must be >= 0, --bench-iters >= 1")
    corrupt = list(corrupt)
    for kind in corrupt:
        if kind not in CORRUPTION_LEVELS:
            raise SegcompareError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SegcompareError(f"{out}: exists and is not a directory")

    dataset = _Subset(
        CityscapesDataset(data_root, split, transform=build_test_transform(), with_instances=True),
        max_images,
    )
    raw = _Subset(CityscapesDataset(data_root, split), max_images)
    label_hw = tuple(raw[0]["label"].shape)  # predictions are scored at the label size
    eval_hw = inference.size_hw or label_hw  # the size the models run at
    d = boundary_width(label_hw, boundary_frac)

    # Build every model first, so that a bad name or file fails before any long step.
    runs: list[ModelRun] = []
    resolved = []
    for name, weights in models:
        if name is None and weights is None:
            raise SegcompareError("each model needs a name or weights (or both)")
        torch.manual_seed(0)  # without weights: the random model `segcompare eval` builds
        model = build_model(name, weights=weights)
        if weights is None:
            log.warning("no weights for %s: random weights (seed 0); figures mean nothing", name)
        resolved.append((model.variant, None if weights is None else str(weights), model))
    labels = _labels([(n, w) for n, w, _ in resolved])
    for (name, weights, model), label in zip(resolved, labels):
        predictor = Predictor(model, inference)
        runs.append(ModelRun(name, weights, label, predictor))

    for run in runs:
        with tqdm(total=len(dataset), desc=f"eval {run.label}", unit="img",
                  disable=not progress) as bar:
            evaluate_run(run, dataset, d, progress, bar)
    num_images = len(dataset)

    for run in tqdm(runs, desc="stats", disable=not progress, leave=False):
        model = run.predictor.model
        num_classes = _num_classes(model)
        run.stats = stats.model_stats(run.name, eval_hw, num_classes, **model.settings)
        # model_stats rounds to 0.01 GMACs; a tiny model at a tiny size needs the exact figure.
        with torch.device("meta"):
            meta_model = build_model(run.name, num_classes=num_classes, **model.settings)
        run.stats["gmacs"] = float(f"{stats.count_macs(meta_model, eval_hw)['gmacs']:.4g}")

    device_t = runs[0].predictor.device
    x = torch.randn(1, 3, *eval_hw, device=device_t)
    candidates = [bench.Candidate(run.label, run.predictor.run_model) for run in runs]
    rows = bench.benchmark(candidates, x, bench_warmup, bench_iters, progress=progress)
    for run, row in zip(runs, rows):
        run.bench = row
    amp = inference.amp
    dtype = str(runs[0].predictor.amp_dtype).replace("torch.", "") + " autocast" if amp else "fp32"
    bench_meta = bench.machine_info(device_t, torch.get_num_threads(), dtype)
    bench_meta.update(iters=bench_iters, warmup=bench_warmup, size=list(eval_hw), batch=1)

    corrupt_set = _Subset(raw, corrupt_images)
    evaluate_corruptions(runs, corrupt_set, corrupt, len(corrupt_set) < num_images, progress)

    hardest = hardest_images(runs, images)

    # --- files ---------------------------------------------------------------------------------
    from segcompare import __version__

    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "segcompare": __version__,
        "torch": torch.__version__,
        "device": str(device_t),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "eval_size": list(eval_hw),
        "inference": inference.describe(),
        "bench": bench_meta,
        "stats_size": list(eval_hw),
        "boundary": {"d_px": d, "frac": boundary_frac},
        "robustness": {"corruptions": corrupt, "severities": list(SEVERITIES),
                       "num_images": len(corrupt_set) if corrupt else 0},
        "families": {run.label: model_family(run.name) for run in runs},
    }
    doc: dict[str, Any] = {
        "models": [model_entry(run) for run in runs],
        "data": str(data_root),
        "split": split,
        "num_images": num_images,
        "hardest": [runs[0].image_names[i] for i in hardest],
        "meta": meta,
    }

    files: dict[str, Any] = {}
    files["per_class"] = plot_per_class(runs, out / "per_class_iou.png").name
    if len(runs) > 1:
        files["per_class_diff"] = plot_per_class_difference(runs, out / "per_class_diff.png").name
    files["miou_vs_gmacs"] = plot_scatter(
        runs, "gmacs", f"GMACs at {eval_hw[0]}x{eval_hw[1]}", out / "miou_vs_gmacs.png").name
    files["miou_vs_latency"] = plot_scatter(
        runs, "latency_ms", f"latency (ms) on {device_t.type}", out / "miou_vs_latency.png").name
    files["boundary"] = plot_boundary(runs, d, out / "boundary_iou.png").name
    if hardest:
        files["hardest"] = plot_hardest(runs, raw, hardest, out / "hardest_images.png",
                                        progress).name
    files["confusion"] = {
        run.label: plot_confusion(run, out / f"confusion_{_slug(run.label)}.png").name
        for run in runs
    }
    if corrupt:
        files["robustness"] = plot_robustness(runs, out / "robustness.png").name

    title = "segcompare: " + " vs ".join(run.label for run in runs)
    sections = build_sections(runs, doc, files)
    atomic_write_text(out / "report.md", render_markdown(title, sections))
    atomic_write_text(out / "report.html", render_html(title, sections, out))
    atomic_write_text(out / "metrics.json", results_to_json(doc))
    return doc


def _num_classes(model: torch.nn.Module) -> int:
    from segcompare.models.checkpoint import num_classes_of

    return num_classes_of(model)

