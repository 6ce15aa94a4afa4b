"""Every metric segcompare reports, computed in one place.

`ConfusionMatrix` accumulates a K-row confusion matrix (ground-truth class indices; anything
outside 0..K-1, such as 255, is ignored) with `torch.bincount` over whole batches, and `compute()`
turns it into the figures of every data set, as mmsegmentation's `IoUMetric`
(mmseg/evaluation/metrics/iou_metric.py) defines them: per class IoU, accuracy, Dice, precision,
recall and F-score; mIoU, mAcc, mDice, mFscore (means over the classes that are not NaN) and aAcc
(all pixels). For Cityscapes it also keeps the instance-weighted counts of iIoU and gives the
figures of cityscapesscripts' `evalPixelLevelSemanticLabeling` that only Cityscapes has:
per-class iIoU, per-category IoU and iIoU and their means. Training validation, `segcompare eval`
and the comparison report all use it; tests/test_evaluate.py checks every figure against
cityscapesscripts and tests/test_metrics.py against a NumPy computation of mmseg's formulas.
`results_to_json`, `format_results` and `write_results` write its results.

Boundary IoU (Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", CVPR 2021): IoU restricted to the pixels within d of each class's contour, in the
ground truth and in the prediction alike (`BoundaryIoU`). `image_miou` is the mIoU of one image;
`image_scores` gives every image's mIoU and pixel accuracy from its own confusion matrix
(`ConfusionMatrix(per_image=True)`).

Uncertainty: a paired bootstrap over images (`bootstrap_draws`, `bootstrap_scores`, `interval`,
`pairwise_differences`). A resample's confusion matrix is the sum of its images' matrices, so
mIoU, mean accuracy and per-class IoU are recomputed exactly on each, for every model on the
same draws.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from segcompare.data.labels import (
    CATEGORY_NAMES,
    CITYSCAPES,
    IGNORE_INDEX,
    LABELS,
    NUM_CLASSES,
    TRAIN_LABELS,
    ClassTable,
    nameless_table,
)
from segcompare.utils import PathLike, SegcompareError, atomic_write_text

# ------------------------------------------------------------------------------------------------
# Cityscapes metrics
# ------------------------------------------------------------------------------------------------


# Mean instance size in pixels per class, over the Cityscapes training set: the weights of iIoU.
# Copied from `args.avgClassSize` in cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py
# (cityscapesScripts 2.x); caravan and trailer are listed there too but never evaluated.
AVG_CLASS_SIZE: dict[str, float] = {
    "person": 3462.4756337644,
    "rider": 3930.4788056518,
    "car": 12794.0202738185,
    "truck": 27855.1264367816,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "motorcycle": 6298.7200839748,
    "bicycle": 4672.3249222261,
}

# Categories whose labels all have instances (human, vehicle). The official script scores them with
# iIoU as well, and counts every label of the category there, the ignored caravan and trailer
# included; so a prediction of those two labels is kept apart from other non-evaluated labels.
INSTANCE_CATEGORIES: tuple[str, ...] = tuple(
    cat
    for cat in CATEGORY_NAMES
    if all(lb.has_instances for lb in LABELS if lb.category == cat and lb.id >= 0)
)

# Prediction codes beyond the train ids, for predictions given as label ids (`label_ids_to_pred`).
PRED_OTHER = IGNORE_INDEX  # a label that is not evaluated (void, parking, guard rail, ...)
PRED_OTHER_INSTANCE = 254  # caravan or trailer: not evaluated, but 'vehicle' for category iIoU
_OTHER_INSTANCE_LABELS = tuple(
    lb for lb in LABELS if lb.id >= 0 and lb.ignore_in_eval and lb.category in INSTANCE_CATEGORIES
)
# The code PRED_OTHER_INSTANCE stands for one category; the Cityscapes table has exactly one.
assert len({lb.category for lb in _OTHER_INSTANCE_LABELS}) == 1
_OTHER_INSTANCE_CATEGORY = _OTHER_INSTANCE_LABELS[0].category

# label id (0..255) -> prediction code: the train id, PRED_OTHER_INSTANCE or PRED_OTHER.
LABEL_ID_TO_PRED = np.full(256, PRED_OTHER, dtype=np.uint8)
for _lb in LABELS:
    if _lb.id < 0:
        continue
    if 0 <= _lb.train_id < IGNORE_INDEX:
        LABEL_ID_TO_PRED[_lb.id] = _lb.train_id
    elif _lb in _OTHER_INSTANCE_LABELS:
        LABEL_ID_TO_PRED[_lb.id] = PRED_OTHER_INSTANCE


def label_ids_to_pred(label_ids: np.ndarray) -> np.ndarray:
    """A prediction in label ids (as the Cityscapes server takes it) -> prediction codes for
    `ConfusionMatrix.update`. The caller checks first that every id is a Cityscapes label id."""
    return LABEL_ID_TO_PRED[label_ids]


def _nan_mean(values: Iterable[float]) -> float:
    """Mean over the entries that are not NaN; NaN when there are none (as the official script)."""
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


class ConfusionMatrix:
    """Accumulates what the metrics need, over any number of batches.

        cm = ConfusionMatrix()                  # Cityscapes' 19 classes
        cm = ConfusionMatrix(ADE20K)            # any data set's ClassTable (or a class count)
        cm.update(pred, target)                 # N×H×W or H×W class indices; target 255 = ignore
        cm.update(pred, target, instances)      # Cityscapes, with gtFine instanceIds: also iIoU
        cm.miou(); cm.compute()                 # mIoU; the full results dict

    `mat[t, p]` counts pixels of ground-truth class t predicted as p. Its columns are the
    num_classes classes, then 'another label' (any other prediction code, e.g. 255) and, for
    Cityscapes, 'caravan/trailer' (PRED_OTHER_INSTANCE): a pixel predicted so is a false negative
    of its class, as in the official script, which scores predictions in label ids. A label
    outside 0..K-1 is not counted (mmseg counts one that is not its ignore index in the
    prediction areas; the data sets refuse such labels before scoring).
    """

    def __init__(
        self, classes: Union[int, ClassTable] = CITYSCAPES, per_image: bool = False
    ) -> None:
        """classes: the data set's class table, or a class count (`nameless_table(K)`: K classes
        class_0, class_1, ..., whatever K is). Only Cityscapes' table, which has instances and
        categories, adds iIoU and the category figures: a 19-class count or another 19-class
        data set is not Cityscapes."""
        table = classes if isinstance(classes, ClassTable) else nameless_table(classes)
        self.classes = table
        self.num_classes = table.num_classes
        self.names = table.names
        self.cityscapes = table.name == CITYSCAPES.name
        if self.cityscapes and self.names != CITYSCAPES.names:
            raise ValueError("Cityscapes metrics need the 19 Cityscapes train classes")
        self.per_image = per_image  # also keep each image's own matrix (`image_matrices`)
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.mat = torch.zeros(c, c + 2, dtype=torch.int64)
        # Instance-weighted true positives / false negatives (float64, CPU): one row per image,
        # [tp per class | fn per class | tp per instance category | fn per category], summed only
        # when read. A sum of the same rows in the same order is the same float however the images
        # were batched or split over processes: `all_reduce` gathers the rows, and iIoU under
        # torchrun equals the one-process figure bit for bit.
        self._inst_rows: list[torch.Tensor] = []
        # With per_image: each batch's n×C×(C+2) matrices (int64, CPU), in the order added.
        self._image_mats: list[torch.Tensor] = []
        self.num_images = 0

    def image_matrices(self) -> np.ndarray:
        """N×C×(C+2) int64: each image's own `mat`, in the order the images were added (over
        all processes after `all_reduce`); they sum to `mat`. Needs per_image=True."""
        if not self.per_image:
            raise ValueError("ConfusionMatrix(per_image=True) keeps the per-image matrices")
        c = self.num_classes
        if not self._image_mats:
            return np.zeros((0, c, c + 2), dtype=np.int64)
        return torch.cat(self._image_mats).numpy()

    def _inst_total(self) -> torch.Tensor:
        k = 2 * self.num_classes + 2 * len(INSTANCE_CATEGORIES)
        if not self._inst_rows:
            return torch.zeros(k, dtype=torch.float64)
        return torch.cat(self._inst_rows).sum(0)

    @property
    def inst_tp(self) -> torch.Tensor:
        return self._inst_total()[: self.num_classes]

    @property
    def inst_fn(self) -> torch.Tensor:
        c = self.num_classes
        return self._inst_total()[c : 2 * c]

    @property
    def cat_inst_tp(self) -> torch.Tensor:
        c, k = self.num_classes, len(INSTANCE_CATEGORIES)
        return self._inst_total()[2 * c : 2 * c + k]

    @property
    def cat_inst_fn(self) -> torch.Tensor:
        return self._inst_total()[2 * self.num_classes + len(INSTANCE_CATEGORIES) :]

    def _columns(self, pred: torch.Tensor) -> torch.Tensor:
        """Prediction codes -> matrix columns."""
        c = self.num_classes
        other = torch.where(pred == PRED_OTHER_INSTANCE, c + 1, c) if self.cityscapes else c
        return torch.where((pred >= 0) & (pred < c), pred, other)

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        instances: Optional[torch.Tensor] = None,
    ) -> None:
        """Add a batch. pred: N×H×W (or H×W) train ids or prediction codes; target: the same shape,
        train ids with 255 ignored; instances: gtFine instanceIds of the same shape (label id × 1000
        + index for instances), for iIoU."""
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target, device=pred.device)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label {tuple(target.shape)}")
        images = pred.shape[0] if pred.dim() == 3 else 1
        self.num_images += images
        c = self.num_classes
        cols = self._columns(pred.long())
        target = target.long()
        valid = (target >= 0) & (target < c)
        index = target[valid] * (c + 2) + cols[valid]
        if self.per_image:  # one bincount for the batch, each image's counts in a block of its own
            image = torch.arange(images, device=index.device).view(-1, *[1] * (pred.dim() - 1))
            index = index + image.expand_as(target)[valid] * (c * (c + 2))
            per_image = torch.bincount(index, minlength=images * c * (c + 2))
            per_image = per_image.view(images, c, c + 2)
            self._image_mats.append(per_image.cpu())
            counts = per_image.sum(0)
        else:
            counts = torch.bincount(index, minlength=c * (c + 2)).view(c, c + 2)
        self.mat = self.mat.to(counts.device) + counts
        if not self.cityscapes:
            return
        rows = torch.zeros(images, 2 * c + 2 * len(INSTANCE_CATEGORIES), dtype=torch.float64)
        if instances is not None:
            self._update_instances(rows, cols, torch.as_tensor(instances, device=pred.device))
        self._inst_rows.append(rows)

    def _update_instances(
        self, rows: torch.Tensor, cols: torch.Tensor, instances: torch.Tensor
    ) -> None:
        """iIoU counts, as `evaluatePair` of the official script: every instance (instanceId >
        1000) of an evaluated class adds its true-positive and false-negative pixels, weighted by
        AVG_CLASS_SIZE / instance size, to its class and to its instance category, in the row of
        its image (`rows`, images × counts)."""
        if cols.dim() == 2:
            cols, instances = cols[None], instances[None]
        instances = instances.long()
        # Make ids unique over the batch: image index × 2^16 + instanceId (ids are < 34000).
        image_index = torch.arange(instances.shape[0], device=instances.device).view(-1, 1, 1)
        keyed = instances + (image_index << 16)
        mask = instances > 1000
        ids, inverse = torch.unique(keyed[mask], return_inverse=True)
        if ids.numel() == 0:
            return
        pixel_cols = cols[mask]
        train_ids = _ID_TO_TRAIN_ID_T.to(ids.device)[(ids & 0xFFFF) // 1000]
        size = torch.bincount(inverse, minlength=ids.numel())
        hit = pixel_cols == train_ids[inverse]
        tp = torch.bincount(inverse[hit], minlength=ids.numel())
        cat_of_col = _CATEGORY_OF_COLUMN.to(ids.device)
        cat_of_class = cat_of_col[train_ids.clamp(max=self.num_classes)]
        cat_hit = cat_of_col[pixel_cols] == cat_of_class[inverse]
        cat_tp = torch.bincount(inverse[cat_hit], minlength=ids.numel())

        train_ids, size, tp, cat_tp = (t.cpu() for t in (train_ids, size, tp, cat_tp))
        cat_of_class, image = cat_of_class.cpu(), (ids >> 16).cpu()
        evaluated = _HAS_INSTANCES[train_ids.clamp(max=self.num_classes)]
        train_ids, size, tp, cat_tp, image = (
            t[evaluated] for t in (train_ids, size, tp, cat_tp, image)
        )
        weight = _AVG_SIZE[train_ids] / size.double()
        c, k, width = self.num_classes, len(INSTANCE_CATEGORIES), rows.shape[1]
        flat = rows.view(-1)  # image i's count j at i * width + j
        cats = cat_of_class[evaluated]
        flat.index_add_(0, image * width + train_ids, tp.double() * weight)
        flat.index_add_(0, image * width + c + train_ids, (size - tp).double() * weight)
        flat.index_add_(0, image * width + 2 * c + cats, cat_tp.double() * weight)
        flat.index_add_(0, image * width + 2 * c + k + cats, (size - cat_tp).double() * weight)

    def all_reduce(self) -> None:
        """Sum the counts over all processes (call on every rank under torch.distributed): the
        pixel matrix by all_reduce (integers: exact), the per-image iIoU rows (and with per_image
        the per-image matrices) by all_gather in rank order, so that processes holding
        consecutive shards give the one-process sum, and the images in the one-process order."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        mat = self.mat.to(device)
        dist.all_reduce(mat)
        self.mat = mat.cpu()
        n = torch.tensor([self.num_images], device=device)
        dist.all_reduce(n)
        self.num_images = int(n.item())
        if self.cityscapes:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._inst_rows)
            self._inst_rows = [rows for rank_rows in gathered for rows in rank_rows]
        if self.per_image:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._image_mats)
            self._image_mats = [mats for rank_mats in gathered for mats in rank_mats]

    def iou(self) -> np.ndarray:
        """Per-class IoU (num_classes floats, NaN where the class is in neither label nor
        prediction)."""
        return matrix_iou(self.mat.cpu().numpy())

    def miou(self) -> float:
        """Mean IoU over the classes that are not NaN."""
        return _nan_mean(self.iou().tolist())

    def compute(self) -> dict[str, Any]:
        """All figures as fractions in [0, 1]; NaN where mmseg (or, for iIoU and categories,
        the official Cityscapes script) gives NaN.

        {"miou", "mean_acc", "pixel_acc" (mmseg's aAcc), "mdice", "mfscore", "mprecision",
         "mrecall", "per_class": {name: {"iou", "acc", "dice", "fscore", "precision", "recall"}},
         "num_images"}; for Cityscapes also "miiou", "category_miou", "category_miiou",
         "per_category": {name: {"iou", "iiou"}} and each class's "iiou".
        """
        mat = self.mat.cpu().numpy().astype(np.int64)
        c = self.num_classes
        per_class = {name: {} for name in self.names}
        figures = _mmseg_figures(mat, c)
        for key, values in figures.items():
            for name, value in zip(self.names, values.tolist()):
                per_class[name][key] = value
        results: dict[str, Any] = {
            "miou": _nan_mean(figures["iou"].tolist()),
            "mean_acc": _nan_mean(figures["acc"].tolist()),
            "pixel_acc": _ratio(np.diag(mat[:, :c]).sum(), mat.sum()),
            "mdice": _nan_mean(figures["dice"].tolist()),
            "mfscore": _nan_mean(figures["fscore"].tolist()),
            "mprecision": _nan_mean(figures["precision"].tolist()),
            "mrecall": _nan_mean(figures["recall"].tolist()),
            "per_class": per_class,
            "num_images": self.num_images,
        }
        if self.cityscapes:
            results.update(self._cityscapes_figures(mat, per_class))
        return results

    def _cityscapes_figures(
        self, mat: np.ndarray, per_class: dict[str, dict[str, float]]
    ) -> dict[str, Any]:
        """What only Cityscapes has (cityscapesscripts' evalPixelLevelSemanticLabeling): iIoU per
        class (also written into `per_class`), IoU and iIoU per category, and their means."""
        c = self.num_classes
        tp = np.diag(mat[:, :c])
        col = mat[:, :c].sum(0)  # pixels predicted as each class, over evaluated rows
        iiou = [float("nan")] * c
        inst_tp, inst_fn = self.inst_tp.numpy(), self.inst_fn.numpy()
        for i, lb in enumerate(TRAIN_LABELS):
            if lb.has_instances:
                fp = col[i] - tp[i]
                iiou[i] = _ratio(inst_tp[i], inst_tp[i] + fp + inst_fn[i])
            per_class[lb.name]["iiou"] = iiou[i]
        per_category: dict[str, dict[str, float]] = {}
        for cat in CATEGORY_NAMES:
            members = [i for i, lb in enumerate(TRAIN_LABELS) if lb.category == cat]
            others = [i for i in range(c) if i not in members]
            cat_tp = mat[np.ix_(members, members)].sum()
            cat_fn = mat[members].sum() - cat_tp
            cat_fp = mat[np.ix_(others, members)].sum()
            entry = {"iou": _ratio(cat_tp, cat_tp + cat_fp + cat_fn), "iiou": float("nan")}
            if cat in INSTANCE_CATEGORIES:
                k = INSTANCE_CATEGORIES.index(cat)
                cols = members + ([c + 1] if cat == _OTHER_INSTANCE_CATEGORY else [])
                fp = mat[np.ix_(others, cols)].sum()
                w_tp, w_fn = self.cat_inst_tp[k].item(), self.cat_inst_fn[k].item()
                entry["iiou"] = _ratio(w_tp, w_tp + fp + w_fn)
            per_category[cat] = entry
        return {
            "miiou": _nan_mean(iiou),
            "category_miou": _nan_mean(e["iou"] for e in per_category.values()),
            "category_miiou": _nan_mean(e["iiou"] for e in per_category.values()),
            "per_category": per_category,
        }


def _mmseg_figures(mat: np.ndarray, c: int) -> dict[str, np.ndarray]:
    """Per-class figures of mmseg's `IoUMetric.total_area_to_metrics` from a confusion matrix
    (`mat[t, p]`, rows the c classes, columns the c classes then other prediction codes):
    intersection I = the diagonal, label area L = the row, prediction area P = the column over
    labelled pixels (a prediction outside 0..c-1 counts in no P, as mmseg's histc drops it).
    IoU = I / (P + L - I), acc = recall = I / L, dice = 2I / (P + L), precision = I / P,
    F-score (beta 1) = 2 precision recall / (precision + recall); 0 / 0 is NaN, as there (so a
    class both predicted and present but never hit has F-score NaN, not 0)."""
    inter = np.diag(mat[:, :c]).astype(np.float64)
    label = mat.sum(1).astype(np.float64)
    pred = mat[:, :c].sum(0).astype(np.float64)

    def div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    precision, recall = div(inter, pred), div(inter, label)
    with np.errstate(invalid="ignore"):
        both = precision + recall
        fscore = np.where(both > 0, 2 * precision * recall / np.where(both > 0, both, 1), np.nan)
    return {
        "iou": div(inter, pred + label - inter),
        "acc": recall,
        "dice": div(2 * inter, pred + label),
        "fscore": fscore,
        "precision": precision,
        "recall": recall,
    }


# Lookup tables for the instance counts (torch, built once).
_ID_TO_TRAIN_ID_T = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
for _lb in TRAIN_LABELS:
    _ID_TO_TRAIN_ID_T[_lb.id] = _lb.train_id
# train id (plus one 'not evaluated' slot at index 19) -> evaluated instance class?
_HAS_INSTANCES = torch.tensor([lb.has_instances for lb in TRAIN_LABELS] + [False])
_AVG_SIZE = torch.tensor(
    [AVG_CLASS_SIZE.get(lb.name, float("nan")) for lb in TRAIN_LABELS] + [float("nan")],
    dtype=torch.float64,
)
# matrix column (19 classes, 'other', 'caravan/trailer') -> index in INSTANCE_CATEGORIES or -1.
_CATEGORY_OF_COLUMN = torch.tensor(
    [
        INSTANCE_CATEGORIES.index(lb.category) if lb.category in INSTANCE_CATEGORIES else -1
        for lb in TRAIN_LABELS
    ]
    + [-1, INSTANCE_CATEGORIES.index(_OTHER_INSTANCE_CATEGORY)]
)


def matrix_iou(mat: np.ndarray) -> np.ndarray:
    """Per-class IoU of ...×C×(C+2) confusion matrices (`ConfusionMatrix.mat`, or a stack of
    them): ...×C floats, NaN where the class is in neither label nor prediction."""
    c = mat.shape[-2]
    tp = np.diagonal(mat[..., :c], axis1=-2, axis2=-1).astype(np.float64)
    # fn = row - tp (a row counts predictions of any label); fp = column over evaluated rows.
    denom = mat.sum(-1) + mat[..., :c].sum(-2) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def matrix_accuracy(mat: np.ndarray) -> np.ndarray:
    """Per-class accuracy (recall) of ...×C×(C+2) matrices: ...×C, NaN where the class has no
    ground-truth pixel."""
    c = mat.shape[-2]
    tp = np.diagonal(mat[..., :c], axis1=-2, axis2=-1).astype(np.float64)
    row = mat.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(row > 0, tp / np.maximum(row, 1), np.nan)


def nan_mean_last(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the entries that are not NaN (NaN where all are): the mean
    `_nan_mean` takes, for many rows at once."""
    valid = ~np.isnan(values)
    count = valid.sum(-1)
    total = np.where(valid, values, 0.0).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def results_to_json(results: dict[str, Any]) -> str:
    """The results dict as JSON text; NaN (not a JSON value) is written as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(results), indent=2) + "\n"


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of the results, in percent: per class IoU, (Cityscapes: iIoU,) accuracy,
    Dice and F-score, their means, the categories where there are any, and aAcc."""

    def pct(value: Optional[float]) -> str:
        return "    -" if value is None or math.isnan(value) else f"{100 * value:5.1f}"

    cityscapes = "miiou" in results
    columns = [("IoU", "iou", "miou")]
    columns += [("iIoU", "iiou", "miiou")] if cityscapes else []
    columns += [("acc", "acc", "mean_acc"), ("Dice", "dice", "mdice"), ("F1", "fscore", "mfscore")]
    width = max([16] + [len(name) + 2 for name in results["per_class"]])
    rule = "-" * (width + 7 * len(columns))
    lines = [f"{'class':<{width}}" + "".join(f"{title:>7}" for title, _, _ in columns), rule]
    for name, entry in results["per_class"].items():
        lines.append(f"{name:<{width}}" + "".join(f"{pct(entry.get(k)):>7}" for _, k, _ in columns))
    lines.append(rule)
    lines.append(f"{'mean':<{width}}" + "".join(f"{pct(results.get(m)):>7}" for *_, m in columns))
    if results.get("per_category"):
        lines += ["", f"{'category':<16}{'IoU':>7}{'iIoU':>7}", "-" * 30]
        for name, entry in results["per_category"].items():
            lines.append(f"{name:<16}{pct(entry['iou']):>7}{pct(entry['iiou']):>7}")
        lines.append("-" * 30)
        lines.append(
            f"{'mean':<16}{pct(results['category_miou']):>7}{pct(results['category_miiou']):>7}"
        )
    lines += [
        "",
        f"pixel accuracy (aAcc) {pct(results['pixel_acc']).strip()}  "
        f"({results['num_images']} images)",
    ]
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: PathLike) -> None:
    """The results as JSON (`results_to_json`), written atomically."""
    atomic_write_text(path, results_to_json(results))


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
        raise SegcompareError(f"boundary width must be at least 1 pixel, got {d}")
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
    """mIoU of one image (H×W train ids), as `ConfusionMatrix` computes it for a dataset."""
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, torch.as_tensor(target).to(torch.as_tensor(pred).device))
    return cm.miou()


def image_scores(image_mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mIoU, pixel accuracy) of each image, from N×C×K per-image matrices: N floats each (mIoU
    over the classes in the image's label or prediction; NaN for an image with no labelled
    pixel)."""
    c = image_mats.shape[1]
    tp = np.diagonal(image_mats[:, :, :c], axis1=1, axis2=2).sum(1)
    total = image_mats.sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(total > 0, tp / np.maximum(total, 1), np.nan)
    return nan_mean_last(matrix_iou(image_mats)), acc


# ------------------------------------------------------------------------------------------------
# Uncertainty: the paired bootstrap over images
# ------------------------------------------------------------------------------------------------

# A confusion matrix sums over images, so a resample of the images is a weighted sum of their
# per-image matrices (`ConfusionMatrix(per_image=True)`): exact, and cheap enough to run by default.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95  # the intervals' coverage: the 2.5th and 97.5th percentiles
# The resampled matrices are made this many bytes at a time (float64 B×C×K): without it,
# ADE20K's 150×152 matrices at 100,000 resamples would need 18 GB at once.
BOOTSTRAP_CHUNK_BYTES = 128 * 2**20


def bootstrap_draws(num_images: int, resamples: int, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """resamples×num_images image indices, drawn with replacement:
    `np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))`.
    Every model is scored on the same draws (a paired bootstrap)."""
    if num_images < 1:
        raise SegcompareError("the bootstrap needs at least one image")
    return np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))


def resample_matrices(image_mats: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The confusion matrix of each resample: N×C×K per-image matrices, B×N draws -> B×C×K
    (float64, exact for counts below 2^53). Resample b takes image i as often as i is drawn, so it
    is (B×N counts) @ (N×(C·K) matrices): one product, no loop over resamples."""
    b, n = draws.shape
    offsets = (draws + n * np.arange(b)[:, None]).ravel()
    counts = np.bincount(offsets, minlength=b * n).reshape(b, n).astype(np.float64)
    flat = image_mats.reshape(n, -1).astype(np.float64)
    return (counts @ flat).reshape(b, *image_mats.shape[1:])


def bootstrap_scores(runs: Sequence[np.ndarray], draws: np.ndarray) -> dict[str, np.ndarray]:
    """mIoU, mean accuracy and per-class IoU on every resample, of one model given as one or more
    runs (N×C×K per-image matrices each, on the same images): each figure is the mean over the
    runs, as the comparison's row of several seeds gives it.

    {"miou": B, "mean_acc": B, "iou": B×C}

    The resamples are scored a chunk at a time (`BOOTSTRAP_CHUNK_BYTES` of matrices): the same
    figures to the bit, since a resample's matrix is a sum of integer counts (exact in float64)
    whatever the chunk, in bounded memory whatever the number of resamples."""
    miou, mean_acc, iou = [], [], []
    for mats in runs:
        n = mats.shape[0]
        row_bytes = 8 * max(n, int(np.prod(mats.shape[1:])))  # a resample's counts or matrix
        step = max(1, BOOTSTRAP_CHUNK_BYTES // row_bytes)
        per_class, accuracy = [], []
        for start in range(0, max(len(draws), 1), step):  # no draws: one empty chunk
            resampled = resample_matrices(mats, draws[start:start + step])
            per_class.append(matrix_iou(resampled))
            accuracy.append(nan_mean_last(matrix_accuracy(resampled)))
        per_class_all = np.concatenate(per_class)
        iou.append(per_class_all)
        miou.append(nan_mean_last(per_class_all))
        mean_acc.append(np.concatenate(accuracy))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every run: NaN
        return {"miou": np.mean(miou, 0), "mean_acc": np.mean(mean_acc, 0),
                "iou": np.nanmean(iou, 0)}  # fmt: skip


def interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """The percentile interval of bootstrap samples (over the first axis; NaN samples, where a
    resample holds none of a class, left out): [lo, hi], or 2×... for many figures at once."""
    tail = 100 * (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: NaN
        return np.nanpercentile(samples, [tail, 100 - tail], axis=0)


def verdict(ci: Sequence[float]) -> str:
    """A difference a − b with interval `ci`: 'better' (a is) or 'worse' where the interval
    excludes 0, 'no clear difference' where it holds 0 (or is unknown)."""
    lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no clear difference"


def pairwise_differences(
    labels: Sequence[str], miou: Sequence[float], samples: Sequence[np.ndarray],
    confidence: float = CONFIDENCE,
) -> list[dict[str, Any]]:
    """Every pair (a before b): {"a", "b", "diff": mIoU a − mIoU b, "ci": its interval from the
    paired resamples (`samples`: each model's B mIoUs on the same draws), "verdict"}."""
    pairs = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            ci = [float(v) for v in interval(samples[i] - samples[j], confidence)]
            pairs.append({"a": labels[i], "b": labels[j], "diff": float(miou[i] - miou[j]),
                          "ci": ci, "verdict": verdict(ci)})  # fmt: skip
    return pairs
