"""The metrics of every data set against an independent NumPy computation of mmsegmentation's
`IoUMetric` (mmseg/evaluation/metrics/iou_metric.py, 1.x): `intersect_and_union` per image,
areas summed over the data set, then `total_area_to_metrics` and `np.nanmean`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from segcompare.data.labels import ADE20K, generic_table
from segcompare.metrics import ConfusionMatrix, format_results


def _mmseg_areas(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore: int):
    """intersect_and_union: drop the ignored label pixels; histc over 0..num_classes-1 keeps only
    values in that range."""
    keep = label != ignore
    pred, label = pred[keep], label[keep]

    def hist(values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values <= num_classes - 1)]
        return np.bincount(values, minlength=num_classes).astype(np.float64)

    inter = hist(pred[pred == label])
    area_pred, area_label = hist(pred), hist(label)
    return inter, area_pred + area_label - inter, area_pred, area_label


def _mmseg_metrics(preds, labels, num_classes: int, ignore: int = 255) -> dict:
    areas = [_mmseg_areas(p, t, num_classes, ignore) for p, t in zip(preds, labels)]
    inter, union, area_pred, area_label = (sum(a[i] for a in areas) for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = inter / area_pred
        recall = inter / area_label
        per_class = {
            "iou": inter / union,
            "acc": inter / area_label,
            "dice": 2 * inter / (area_pred + area_label),
            "precision": precision,
            "recall": recall,
            "fscore": 2 * precision * recall / (precision + recall),  # beta = 1
        }
    means = {f"m{k}": float(np.nanmean(v)) for k, v in per_class.items()}
    return {"per_class": per_class, "aAcc": inter.sum() / area_label.sum(), **means}


def _check(ours: dict, ref: dict, names) -> int:
    checked = 0
    for key in ("iou", "acc", "dice", "precision", "recall", "fscore"):
        for i, name in enumerate(names):
            a, b = ours["per_class"][name][key], float(ref["per_class"][key][i])
            same = (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)
            assert same, (key, name, a, b)
            checked += 1
    pairs = {"miou": "miou", "mean_acc": "macc", "mdice": "mdice", "mfscore": "mfscore",
             "mprecision": "mprecision", "mrecall": "mrecall"}  # fmt: skip
    for ours_key, ref_key in pairs.items():
        assert ours[ours_key] == pytest.approx(ref[ref_key], abs=1e-12), ours_key
    assert ours["pixel_acc"] == pytest.approx(ref["aAcc"], abs=1e-12)
    return checked


def _cases(rng, k: int, images: int, hw=(24, 40)):
    labels = [rng.integers(0, k, hw) for _ in range(images)]
    for t in labels:
        t[rng.random(hw) < 0.1] = 255  # ignored pixels
        t[t == k - 1] = 0  # the last class is never in a label ...
    preds = [np.where(rng.random(hw) < 0.6, t, rng.integers(0, k, hw)) for t in labels]
    preds[0][:3, :5] = k - 1  # ... but predicted: IoU 0, recall NaN
    preds[1][:2, :2] = 200  # a prediction code outside the classes: a false negative only
    for p in preds:  # class 1 is labelled and predicted, but never where it is: F-score NaN
        p[p == 1] = 2
        p[:1, :3] = 1
        p[:1, :3][labels[0][:1, :3] == 1] = 2
    return preds, labels


def test_every_figure_equals_mmseg_iou_metric():
    rng = np.random.default_rng(0)
    k = 6
    preds, labels = _cases(rng, k, images=3)
    names = [f"c{i}" for i in range(k)]
    table = dataclasses.replace(generic_table(k), names=tuple(names))
    one_by_one, batched = ConfusionMatrix(table), ConfusionMatrix(table)
    for p, t in zip(preds, labels):
        one_by_one.update(torch.from_numpy(p), torch.from_numpy(t))
    batched.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(labels)))
    ref = _mmseg_metrics(preds, labels, k)
    # the cases the test is for did occur
    assert math.isnan(ref["per_class"]["recall"][k - 1]) and ref["per_class"]["iou"][k - 1] == 0
    assert math.isnan(ref["per_class"]["fscore"][1]) and ref["per_class"]["precision"][1] == 0
    for cm in (one_by_one, batched):
        ours = cm.compute()
        assert _check(ours, ref, names) == 6 * k
        assert ours["num_images"] == 3
        # iIoU and categories exist only for Cityscapes
        assert "miiou" not in ours and "per_category" not in ours
        assert all("iiou" not in entry for entry in ours["per_class"].values())
        assert cm.miou() == pytest.approx(ref["miou"], abs=1e-12)
    text = format_results(one_by_one.compute())
    assert "iIoU" not in text and "Dice" in text and "c5" in text


def _reduce_zero_label(annotation: np.ndarray) -> np.ndarray:
    """mmseg's LoadAnnotations(reduce_zero_label=True): 0 -> 255, every other id minus one."""
    gt = annotation.astype(np.int64)
    gt[gt == 0] = 255
    gt = gt - 1
    gt[gt == 254] = 255
    return gt


def test_ade20k_reduce_zero_label_equals_numpy():
    # ADE20K annotations: 0 is 'other', 1..150 the classes; the model predicts 0..149.
    rng = np.random.default_rng(1)
    annotations = [rng.integers(0, 151, (32, 48)).astype(np.uint8) for _ in range(2)]
    annotations[0][:8] = 0
    targets = [_reduce_zero_label(a) for a in annotations]
    preds = [np.where(rng.random(t.shape) < 0.7, t % 150, rng.integers(0, 150, t.shape))
             for t in targets]  # fmt: skip
    cm = ConfusionMatrix(ADE20K)
    for p, a in zip(preds, annotations):
        # annotation value v scores as class v - 1, 0 ignored
        reduced = torch.from_numpy(a).long() - 1
        reduced[reduced < 0] = 255
        cm.update(torch.from_numpy(p), reduced)
    ref = _mmseg_metrics(preds, targets, 150)
    assert _check(cm.compute(), ref, ADE20K.names) == 6 * 150


def test_an_ade20k_folder_scored_end_to_end_equals_numpy(tmp_path):
    """A hand-made ADEChallengeData2016 folder (annotations 0..150, 0 = 'other') and prediction
    PNGs in ADE20K's own ids 1..150 (what its benchmark server takes), scored by `segcompare
    eval --pred-dir`: every figure equals mmseg's IoUMetric in NumPy after mmseg's
    reduce_zero_label."""
    import json

    from PIL import Image

    from segcompare.cli import main

    rng = np.random.default_rng(3)
    root = tmp_path / "ADEChallengeData2016"
    preds, targets = [], []
    for name, hw in (("ADE_val_00000001", (40, 56)), ("ADE_val_00000002", (48, 32))):
        for sub in ("images/validation", "annotations/validation", "../pred"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(
            root / "images/validation" / f"{name}.jpg"
        )
        annotation = rng.integers(0, 151, hw).astype(np.uint8)
        annotation[:6] = 0  # 'other'
        annotation[-4:] = rng.choice([5, 7, 12], (4, hw[1]))  # a few classes many times
        Image.fromarray(annotation).save(root / "annotations/validation" / f"{name}.png")
        target = _reduce_zero_label(annotation)
        pred = np.where(rng.random(hw) < 0.6, target % 150, rng.integers(0, 150, hw))
        Image.fromarray((pred + 1).astype(np.uint8)).save(tmp_path / "pred" / f"{name}.png")
        preds.append(pred)
        targets.append(target)
    out = tmp_path / "r.json"
    rc = main(["eval", "--pred-dir", str(tmp_path / "pred"), "--data", str(root),
               "--workers", "0", "--json", str(out)])  # fmt: skip
    assert rc == 0
    ours = json.loads(out.read_text())
    nan = float("nan")
    for entry in ours["per_class"].values():  # JSON null is NaN
        entry.update({k: nan if v is None else v for k, v in entry.items()})
    ref = _mmseg_metrics(preds, targets, 150)
    assert list(ours["per_class"]) == list(ADE20K.names)
    assert _check(ours, ref, ADE20K.names) == 6 * 150
    assert "miiou" not in ours and ours["num_images"] == 2
