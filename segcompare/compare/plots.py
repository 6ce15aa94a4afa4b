"""The comparison report's plots (matplotlib on an Agg canvas, imported inside the functions, so
that importing this module stays cheap). Each `plot_*` draws one figure from the measured runs and
writes it as a PNG; `draw_plots` draws them all."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from segcompare.data.corrupt import SEVERITIES
from segcompare.data.labels import CITYSCAPES, IGNORE_INDEX, ClassTable
from segcompare.utils import atomic_path

if TYPE_CHECKING:
    from segcompare.compare.measure import ModelRun


def _names(runs: Sequence[ModelRun]) -> list[str]:
    """The data set's class names, in class order (those the runs were scored on)."""
    from segcompare.compare.measure import class_names

    return class_names(runs[0])

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
    _class_ticks(ax, names)
    ax.grid(axis="y", alpha=0.3)


def _class_ticks(ax: Any, names: Sequence[str]) -> None:
    """One tick per class, named; with many classes (ADE20K's 150) smaller and upright."""
    x = np.arange(len(names))
    if len(names) > 40:
        ax.set_xticks(x, names, rotation=90, fontsize=max(3, 9 - len(names) // 30))
    else:
        ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_xlim(-0.6, len(names) - 0.4)


def _class_width(n: int) -> float:
    """Figure width (inches) for a per-class plot of n classes."""
    return max(12.0, 0.12 * n)


def plot_per_class(runs: Sequence[ModelRun], path: Path) -> Path:
    """Per-class IoU, one bar per model."""
    names = _names(runs)
    fig = _figure(_class_width(len(names)), 4.2)
    ax = fig.add_subplot()
    series = [[100 * run.results["per_class"][c]["iou"] for c in names] for run in runs]
    _grouped_bars(ax, names, series, [r.label for r in runs], _colors(len(runs)))
    ax.set_ylabel("IoU (%)")  # plots and tables in percent, as the report's summary
    ax.set_ylim(0, 100)
    ax.set_title("Per-class IoU")
    ax.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def _diff_whiskers(run: ModelRun, diff: np.ndarray) -> Optional[np.ndarray]:
    """2×C error-bar lengths (below, above) of a per-class IoU difference from its bootstrap
    interval (`ModelRun.uncertainty`), or None without a bootstrap."""
    ci = run.uncertainty.get("iou_diff_ci")
    if not ci:
        return None
    names = _names([run])
    lo = 100 * np.array([ci[c][0] for c in names], dtype=np.float64)  # percent points
    hi = 100 * np.array([ci[c][1] for c in names], dtype=np.float64)
    return np.nan_to_num(np.stack([diff - lo, hi - diff]), nan=0.0).clip(min=0)


def plot_per_class_difference(runs: Sequence[ModelRun], path: Path) -> Path:
    """IoU of each model minus the first model's, per class: where each model wins; whiskers:
    the 95 % bootstrap interval of each difference."""
    names = _names(runs)
    fig = _figure(_class_width(len(names)), 4.2)
    ax = fig.add_subplot()
    base = np.array([100 * runs[0].results["per_class"][c]["iou"] for c in names])
    others = runs[1:]
    series = [
        np.array([100 * run.results["per_class"][c]["iou"] for c in names]) - base
        for run in others
    ]
    x = np.arange(len(names))
    reach = [np.abs(v) for v in series]  # how far the bars and whiskers go
    if len(others) == 1:  # two models: colour each bar by the winner
        diff = _nan_to_zero(series[0])
        c0, c1 = _colors(2)
        ax.bar(x, diff, 0.7, color=[c1 if v >= 0 else c0 for v in diff])
        _class_ticks(ax, names)
        ax.grid(axis="y", alpha=0.3)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c1, label=f"{others[0].label} better"),
                           Patch(color=c0, label=f"{runs[0].label} better")],
                  loc="upper right", fontsize=9)
        offsets = [0.0]
    else:
        _grouped_bars(ax, names, series, [r.label for r in others], _colors(len(runs))[1:])
        ax.legend(loc="upper right", fontsize=9)
        width = 0.8 / len(others)
        offsets = [(i - (len(others) - 1) / 2) * width for i in range(len(others))]
    for run, values, offset in zip(others, series, offsets):
        whiskers = _diff_whiskers(run, _nan_to_zero(values))
        if whiskers is not None:
            ax.errorbar(x + offset, _nan_to_zero(values), yerr=whiskers, fmt="none",
                        ecolor="black", elinewidth=0.8, capsize=2)
            reach += [np.abs(_nan_to_zero(values)) + whiskers.max(0)]
    ax.axhline(0, color="black", linewidth=0.8)
    reach_all = np.concatenate(reach)
    finite = reach_all[np.isfinite(reach_all)]
    lim = max(5, float(finite.max()) * 1.15) if finite.size else 5
    ax.set_ylim(-lim, lim)
    ax.set_ylabel(f"IoU − IoU of {runs[0].label} (points)")
    whisk = ", whiskers: 95 % interval" if others[0].uncertainty else ""
    ax.set_title(f"Per-class IoU difference against {runs[0].label} (above 0: that model "
                 f"wins{whisk})")  # fmt: skip
    return _save(fig, path)


def plot_scatter(runs: Sequence[ModelRun], x_key: str, x_label: str, path: Path,
                 front: Sequence[str] = ()) -> Path:
    """mIoU against a cost (GMACs or latency), one labelled point per model, with its 95 %
    interval as a vertical whisker; `front`: the labels on the Pareto front, joined and ringed."""
    from segcompare.models import family_of

    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    xs = [float(run.stats.get(x_key) or run.bench.get(x_key) or float("nan")) for run in runs]
    ys = [100 * run.results["miou"] for run in runs]
    for run, x, y, color in zip(runs, xs, ys, _colors(len(runs))):
        ax.scatter([x], [y], s=70, color=color, marker=_MARKERS[family_of(run.name)],
                   label=run.label, zorder=3)
        ci = run.uncertainty.get("miou_ci")
        if ci:
            # an interval of few images need not hold its point estimate: whiskers from 0
            below, above = max(0.0, y - 100 * ci[0]), max(0.0, 100 * ci[1] - y)
            ax.errorbar([x], [y], yerr=[[below], [above]], fmt="none",
                        ecolor=color, elinewidth=1, capsize=3, zorder=2)
        ax.annotate(run.label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9)
    on_front = [(x, y) for run, x, y in zip(runs, xs, ys) if run.label in front]
    if on_front:
        fx, fy = zip(*sorted(on_front))
        ax.plot(fx, fy, linestyle="--", color="0.4", linewidth=1, zorder=1)
        ax.scatter(fx, fy, s=260, facecolors="none", edgecolors="0.3", linewidths=1.2, zorder=4,
                   label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
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
    names = _names(runs)
    fig = _figure(_class_width(len(names)) + 2, 4.2)
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
    series = [100 * np.asarray(r.boundary.per_class()) for r in runs]
    _grouped_bars(right, names, series, [r.label for r in runs], colors)
    right.set_ylim(0, 100)
    right.set_ylabel("Boundary IoU (%)")
    right.set_title(f"Boundary IoU per class (band d = {d} px)")
    right.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def plot_confusion(run: ModelRun, path: Path) -> Path:
    """Row-normalised confusion matrix (rows: ground truth; each row sums to 1)."""
    mat = run.confusion.astype(np.float64)
    rows = mat.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, mat / np.maximum(rows, 1), np.nan)
    names = _names([run])
    n = len(names)
    side = max(6.6, 0.09 * n)  # inches: ADE20K's 150 classes need room
    fig = _figure(side + 0.9, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fontsize = 8 if n <= 40 else 4
    ax.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            if n <= 40 and np.isfinite(v) and v >= 0.1:
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


def plot_training(runs: Sequence[ModelRun], path: Path) -> Path:
    """Training loss, learning rate and validation mIoU against iteration, every model with a
    training log on the same axes (a row of several runs: each run, one colour)."""
    fig = _figure(14, 3.8)
    axes = fig.subplots(1, 3, sharex=True)
    for run, color in zip(runs, _colors(len(runs))):
        members = run.seeds or [run]
        for k, member in enumerate(members):
            t = member.training
            if not t:
                continue
            label = run.label if k == 0 else None
            curves, val = t["curves"], t["val"]
            axes[0].plot(curves["iter"], curves["loss"], color=color, label=label, linewidth=1)
            axes[1].plot(curves["iter"], curves["lr"], color=color, label=label, linewidth=1)
            axes[2].plot(val["iter"], [100 * v for v in val["miou"]], color=color, marker="o",
                         markersize=3, label=label, linewidth=1)
    for ax, name in zip(axes, ["training loss", "learning rate", "val mIoU (%)"]):
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")  # the recipes' rates differ by orders (AdamW 6e-5, SGD 1e-2)
    axes[2].legend(fontsize=8)
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


_HARDEST_TITLE = "Hardest images: lowest per-image mIoU, averaged over the models"
DIFFERENT_TITLE = "Where the models differ most: largest spread of per-image mIoU"


def plot_hardest(
    runs: Sequence[ModelRun], raw_dataset: Any, indices: Sequence[int], path: Path,
    progress: bool = True, heading: str = _HARDEST_TITLE, table: ClassTable = CITYSCAPES,
) -> Path:
    """A row per image: image | ground truth | each model | where they disagree; the label and
    the predictions in the data set's colours (`table`)."""
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
    for row, index in enumerate(tqdm(indices, desc="gallery", disable=not progress)):
        sample = sample0 if row == 0 else raw_dataset[index]
        image, label = sample["image"], sample["label"]
        preds = [run.predictor.predict(image) for run in runs]
        # the label and every prediction in the data set's colours (black: ignored)
        colours = table.palette_256()
        panels = [_thumb(image, width, False), _thumb(colours[label], width, True)]
        panels += [_thumb(colours[p], width, True) for p in preds]
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
    fig.suptitle(heading, fontsize=14)
    return _save(fig, path, dpi)



def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_")


def draw_plots(
    runs: Sequence[ModelRun],
    out: Path,
    raw_dataset: Any,
    hardest: Sequence[int],
    different: Sequence[int],
    front: Sequence[str],
    d: int,
    eval_hw: Sequence[int],
    device_type: str,
    progress: bool = True,
    table: ClassTable = CITYSCAPES,
) -> dict[str, Any]:
    """Every plot of the report into `out`; returns their file names by key ("confusion": one per
    run label). raw_dataset / hardest / different: the uint8 images, the hardest ones' indices
    and those where the models differ most; front: the labels on the accuracy-latency Pareto
    front; d: the Boundary IoU band; eval_hw and device_type: what GMACs and latency were
    measured at / on; table: the data set's classes (the gallery's colours)."""
    files: dict[str, Any] = {}
    files["per_class"] = plot_per_class(runs, out / "per_class_iou.png").name
    if len(runs) > 1:
        files["per_class_diff"] = plot_per_class_difference(runs, out / "per_class_diff.png").name
    files["miou_vs_gmacs"] = plot_scatter(
        runs, "gmacs", f"GMACs at {eval_hw[0]}x{eval_hw[1]}", out / "miou_vs_gmacs.png").name
    files["miou_vs_latency"] = plot_scatter(
        runs, "latency_ms", f"latency (ms) on {device_type}", out / "miou_vs_latency.png",
        front).name
    files["boundary"] = plot_boundary(runs, d, out / "boundary_iou.png").name
    if hardest:
        files["hardest"] = plot_hardest(runs, raw_dataset, hardest, out / "hardest_images.png",
                                        progress, table=table).name
    if different:
        files["different"] = plot_hardest(runs, raw_dataset, different,
                                          out / "most_different_images.png", progress,
                                          DIFFERENT_TITLE, table).name
    if any(member.training for run in runs for member in (run.seeds or [run])):
        files["training"] = plot_training(runs, out / "training_curves.png").name
    files["confusion"] = {
        run.label: plot_confusion(run, out / f"confusion_{_slug(run.label)}.png").name
        for run in runs
    }
    if any(run.robustness for run in runs):
        files["robustness"] = plot_robustness(runs, out / "robustness.png").name
    return files
