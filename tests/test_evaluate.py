import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from segcompare.data.labels import CATEGORY_NAMES, CLASS_NAMES, ID_TO_TRAIN_ID, LABELS
from segcompare.evaluate import ConfusionMatrix, label_ids_to_pred

INSTANCE_LABEL_IDS = [lb.id for lb in LABELS if lb.has_instances]  # 24..33
ALL_IDS = np.array([lb.id for lb in LABELS if lb.id >= 0])  # 0..33


def _random_scene(rng, h, w, absent_ids):
    """A blocky labelIds image, its instanceIds and a prediction in label ids."""
    ids = np.array([i for i in ALL_IDS if i not in absent_ids])
    gt = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.int32)
    for _ in range(40):  # rectangles of random labels, later ones on top
        y, x = rng.integers(0, h), rng.integers(0, w)
        bh, bw = rng.integers(2, h // 2), rng.integers(2, w // 2)
        label = rng.choice(ids)
        gt[y : y + bh, x : x + bw] = label
    inst[:] = gt
    for label in INSTANCE_LABEL_IDS:  # split each instance-class region into a few instances
        ys, xs = np.nonzero(gt == label)
        if len(ys) == 0:
            continue
        k = rng.integers(1, 4)
        part = (xs * k) // w  # vertical strips -> instance index
        crowd = rng.random() < 0.3  # some regions stay 'crowd' (instanceId = label id)
        if not crowd:
            inst[ys, xs] = label * 1000 + part
    # prediction: mostly right, otherwise any id (including ignored ones, caravan, trailer)
    pred = np.where(rng.random((h, w)) < 0.6, gt, rng.choice(ids, size=(h, w))).astype(np.uint8)
    return gt, inst, pred


def _official(tmp_path, gts, insts, preds, monkeypatch):
    """Run cityscapesscripts' evaluateImgLists on the images written as PNG files."""
    cs = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)  # removed in NumPy 2.4
    gt_files, pred_files = [], []
    for i, (gt, inst, pred) in enumerate(zip(gts, insts, preds)):
        stem = f"ulm_000000_{i:06d}"
        gt_file = tmp_path / f"{stem}_gtFine_labelIds.png"
        Image.fromarray(gt).save(gt_file)
        Image.fromarray(inst.astype(np.uint16)).save(tmp_path / f"{stem}_gtFine_instanceIds.png")
        Image.fromarray(pred).save(tmp_path / f"{stem}_pred.png")
        gt_files.append(str(gt_file))
        pred_files.append(str(tmp_path / f"{stem}_pred.png"))
    args = copy.copy(cs.args)
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, True
    return cs.evaluateImgLists(pred_files, gt_files, args)


def _close(a, b, tol=1e-6):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def test_metrics_equal_cityscapesscripts(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    # 'train' (31) and 'wall' (12) appear nowhere: NaN; 'bus' (28) only in predictions: IoU 0.
    scenes = [_random_scene(rng, 48, 96, absent_ids={31, 12, 28}) for _ in range(3)]
    gts, insts, preds = (list(x) for x in zip(*scenes))
    preds[1][:4, :8] = 28
    official = _official(tmp_path, gts, insts, preds, monkeypatch)

    one_by_one, batched = ConfusionMatrix(), ConfusionMatrix()
    for gt, inst, pred in zip(gts, insts, preds):
        one_by_one.update(
            torch.from_numpy(label_ids_to_pred(pred)),
            torch.from_numpy(ID_TO_TRAIN_ID[gt]),
            torch.from_numpy(inst),
        )
    batched.update(
        torch.from_numpy(label_ids_to_pred(np.stack(preds))),
        torch.from_numpy(ID_TO_TRAIN_ID[np.stack(gts)]),
        torch.from_numpy(np.stack(insts)),
    )

    conf = np.array(official["confMatrix"], dtype=np.float64)
    evaluated = [lb.id for lb in LABELS if lb.id >= 0 and not lb.ignore_in_eval]
    rows = conf[evaluated]
    expected_pixel_acc = sum(conf[i, i] for i in evaluated) / rows.sum()
    accs = [conf[i, i] / conf[i].sum() for i in evaluated if conf[i].sum() > 0]
    expected_mean_acc = sum(accs) / len(accs)

    checked = 0
    for ours in (one_by_one.compute(), batched.compute()):
        for name in CLASS_NAMES:
            assert _close(ours["per_class"][name]["iou"], official["classScores"][name]), name
            assert _close(ours["per_class"][name]["iiou"], official["classInstScores"][name]), name
            checked += 2
        for cat in CATEGORY_NAMES:
            assert _close(ours["per_category"][cat]["iou"], official["categoryScores"][cat]), cat
            assert _close(ours["per_category"][cat]["iiou"], official["categoryInstScores"][cat]), (
                cat
            )
            checked += 2
        assert _close(ours["miou"], official["averageScoreClasses"])
        assert _close(ours["miiou"], official["averageScoreInstClasses"])
        assert _close(ours["category_miou"], official["averageScoreCategories"])
        assert _close(ours["category_miiou"], official["averageScoreInstCategories"])
        assert _close(ours["pixel_acc"], expected_pixel_acc)
        assert _close(ours["mean_acc"], expected_mean_acc)
        assert ours["num_images"] == 3
    # the cases the test is for did occur
    ours = batched.compute()
    assert math.isnan(ours["per_class"]["train"]["iou"]) and ours["per_class"]["bus"]["iou"] == 0
    assert not math.isnan(ours["per_class"]["car"]["iiou"])
    assert not math.isnan(ours["per_category"]["vehicle"]["iiou"])
    assert checked == 2 * 2 * (19 + 7)
    assert abs(batched.miou() - official["averageScoreClasses"]) < 1e-6


def test_hand_computed_case():
    # 2 classes seen: road (0) and car (13); one pixel ignored; one pixel predicted 'other'.
    target = torch.tensor([[0, 0, 0, 13], [13, 13, 255, 0]])
    pred = torch.tensor([[0, 0, 13, 13], [13, 0, 5, 255]])
    cm = ConfusionMatrix()
    cm.update(pred, target)
    r = cm.compute()
    # road: tp 2, fn 2 (one -> car, one -> other), fp 1 (car pixel -> road): 2 / 5
    assert r["per_class"]["road"]["iou"] == pytest.approx(2 / 5)
    # car: tp 2, fn 1, fp 1: 2 / 4; pole (5) only predicted on an ignored pixel: NaN
    assert r["per_class"]["car"]["iou"] == pytest.approx(2 / 4)
    assert math.isnan(r["per_class"]["pole"]["iou"])
    assert r["miou"] == pytest.approx((2 / 5 + 2 / 4) / 2)
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    assert r["mean_acc"] == pytest.approx((2 / 4 + 2 / 3) / 2)
