import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import QuarterNet
from PIL import Image

from segcompare.data.labels import CATEGORY_NAMES, CLASS_NAMES, ID_TO_TRAIN_ID, LABELS
from segcompare.evaluate import InferenceSettings, inference, slide_windows
from segcompare.metrics import ConfusionMatrix, label_ids_to_pred

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


# --- inference modes ------------------------------------------------------------------------------
class WindowMean(torch.nn.Module):
    """Output depends on the whole window: every pixel gets the window's channel means."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True).expand(-1, -1, x.shape[2], x.shape[3]) * 1.0


def test_slide_windows_match_the_official_grids():
    # SegFormer at 1024×2048: window 1024², stride 768 -> 3 windows, the last one moved back.
    assert slide_windows((1024, 2048), (1024, 1024), (768, 768)) == [
        (0, 1024, 0, 1024),
        (0, 1024, 768, 1792),
        (0, 1024, 1024, 2048),
    ]
    # HRNet at scale 1.5 (1536×3072): crop 1024×2048, stride = crop -> 2×2, ends aligned.
    assert slide_windows((1536, 3072), (1024, 2048), (1024, 2048)) == [
        (0, 1024, 0, 2048),
        (0, 1024, 1024, 3072),
        (512, 1536, 0, 2048),
        (512, 1536, 1024, 3072),
    ]
    # a window larger than the image is clipped to it
    assert slide_windows((40, 50), (64, 64), (48, 48)) == [(0, 40, 0, 50)]
    # the official numbers scale down with the test size
    assert InferenceSettings("segformer").windows_for((64, 128)) == ((64, 64), (48, 48))
    assert InferenceSettings("hrnet").windows_for((64, 128)) == ((64, 128), (64, 128))
    assert InferenceSettings(window_hw=(32, 32)).windows_for((64, 128)) == ((32, 32), (32, 32))


def test_slide_equals_whole_when_the_window_covers_the_image():
    model = QuarterNet().eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        whole = inference(model, x, InferenceSettings("segformer", mode="whole"))
        slide = inference(
            model, x, InferenceSettings("segformer", mode="slide", window_hw=(32, 64))
        )
        hrnet = inference(model, x, InferenceSettings("hrnet", mode="slide"))  # window = image
    assert whole.shape == (2, 19, 32, 48)
    assert torch.equal(whole, slide) and torch.equal(whole, hrnet)
    # whole = the quarter-resolution logits upsampled bilinearly (align_corners=False)
    expected = F.interpolate(model(x), size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(whole, expected)


def test_slide_averages_overlapping_windows():
    x = torch.randn(1, 3, 16, 40)
    settings = InferenceSettings("segformer", window_hw=(16, 16), stride_hw=(16, 12))
    out = inference(WindowMean(), x, settings)
    # windows at x = 0..16, 12..28, 24..40: pixel 14 is in the first two, pixel 26 in the last two
    means = [x[..., a : a + 16].mean((2, 3)) for a in (0, 12, 24)]
    assert torch.allclose(out[:, :, 5, 14], (means[0] + means[1]) / 2, atol=1e-6)
    assert torch.allclose(out[:, :, 5, 26], (means[1] + means[2]) / 2, atol=1e-6)
    assert torch.allclose(out[:, :, 0, 39], means[2], atol=1e-6)


def _up(t, hw):
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)


def test_flip_and_multi_scale_average_as_the_official_code():
    model = QuarterNet().eval()
    x = torch.randn(1, 3, 32, 64)
    f = lambda t: _up(model(t), t.shape[-2:])  # noqa: E731
    with torch.no_grad():
        seg = inference(
            model, x, InferenceSettings("segformer", mode="whole", scales=(0.5, 1.0), flip=True)
        )
        hr = inference(
            model, x, InferenceSettings("hrnet", mode="whole", scales=(0.5, 1.0), flip=True)
        )
        # mmseg aug_test: softmax of each (scale, flip) pass at the original size, averaged
        passes = []
        for s in (0.5, 1.0):
            xs = _up(x, (int(32 * s), int(64 * s)))
            passes.append(_up(f(xs), (32, 64)).softmax(1))
            passes.append(_up(f(xs.flip(-1)), (32, 64)).softmax(1).flip(-1))
        expected_seg = sum(passes) / 4
        # HRNet: exp of the flip-averaged logits per scale, summed (we average: same argmax)
        expected_hr = (
            sum(
                _up(((f(xs) + f(xs.flip(-1)).flip(-1)) / 2).exp(), (32, 64))
                for xs in (_up(x, (16, 32)), x)
            )
            / 2
        )
    assert seg.shape == hr.shape == (1, 19, 32, 64)
    assert torch.allclose(seg, expected_seg, atol=1e-6)
    assert torch.allclose(hr, expected_hr, rtol=1e-5)


@pytest.mark.parametrize(
    "family, scales",
    [
        # NVlabs/SegFormer tools/test.py --aug-test, CityscapesDataset: img_ratios and flip=True
        ("segformer", (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)),
        # HRNet-Semantic-Segmentation README: TEST.SCALE_LIST 0.5,...,1.75 TEST.FLIP_TEST True
        ("hrnet", (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)),
    ],
)
def test_aug_test_is_each_familys_official_multi_scale_test(family, scales):
    model = QuarterNet().eval()
    x = torch.randn(1, 3, 16, 24)
    aug = InferenceSettings(family, mode="whole", aug_test=True)
    assert aug.resolved().scales == scales and aug.resolved().flip
    with torch.no_grad():
        out = inference(model, x, aug)
        explicit = inference(
            model, x, InferenceSettings(family, mode="whole", scales=scales, flip=True)
        )
    assert torch.equal(out, explicit)


def test_aug_test_cli_refuses_explicit_scales(capsys):
    from segcompare.cli import main

    rc = main(["eval", "--data", "x", "--model", "segformer-b0", "--aug-test", "--flip"])
    err = capsys.readouterr().err
    assert rc != 0 and "--aug-test" in err and len(err.strip().splitlines()) == 1


def test_test_size_and_output_size():
    model = QuarterNet().eval()
    x = torch.randn(1, 3, 30, 50)
    with torch.no_grad():
        out = inference(
            model, x, InferenceSettings("segformer", mode="whole", size_hw=(64, 96)),
            out_hw=(15, 25),
        )
        expected = _up(_up(model(_up(x, (64, 96))), (64, 96)), (15, 25))
    assert out.shape == (1, 19, 15, 25)
    assert torch.allclose(out, expected, atol=1e-6)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="mode"):
        InferenceSettings(mode="tile")
    with pytest.raises(ValueError, match="family"):
        InferenceSettings("deeplab")
    with pytest.raises(ValueError, match="scales"):
        InferenceSettings(scales=(0.0,))


# --- segcompare eval, end to end on the synthetic set ---------------------------------------------
TINY_SEGFORMER = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """3 synthetic val images (64×128) and a tiny seeded SegFormer saved as our checkpoint."""
    from segcompare.data.synth import make_synthetic_cityscapes
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_cityscapes(root / "city", train=0, val=3, size=(64, 128), seed=0)
    torch.manual_seed(0)
    model = build_model("segformer-b0", **TINY_SEGFORMER)
    save_weights(model, root / "tiny.safetensors")
    return root


def _cli(capsys, *argv):
    from segcompare.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_cli_equals_cityscapesscripts_and_pred_dir(synth, tmp_path, capsys, monkeypatch):
    import json

    data, weights = synth / "city", synth / "tiny.safetensors"
    rc, out, _ = _cli(
        capsys, "eval", "--model", "segformer-b0", "--weights", weights, "--data", data,
        "--workers", 0, "--device", "cpu", "--json", tmp_path / "model.json",
        "--save-pred", tmp_path / "pred",
    )  # fmt: skip
    assert rc == 0 and "mean" in out and "3 images" in out
    assert f"wrote 3 prediction PNG(s) to {tmp_path / 'pred'}" in out
    ours = json.loads((tmp_path / "model.json").read_text())
    assert ours["model"] == "segformer-b0" and ours["mode"] == "slide" and ours["num_images"] == 3
    assert set(ours["per_class"]["car"]) == {
        "iou", "iiou", "acc", "dice", "fscore", "precision", "recall"
    }
    assert all(v is None or 0 <= v <= 1 for v in (ours["miou"], ours["pixel_acc"]))

    # the saved predictions, scored by cityscapesscripts, give the same figures
    cs = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    gts = sorted(str(p) for p in data.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    pred_dir = tmp_path / "pred"
    preds = [
        str(pred_dir / Path(g).parent.name / f"{Path(g).name[:-20]}_leftImg8bit.png") for g in gts
    ]
    args = copy.copy(cs.args)
    args.quiet, args.JSONOutput = True, False
    official = cs.evaluateImgLists(preds, gts, args)
    nan = float("nan")
    for name in CLASS_NAMES:
        iou = ours["per_class"][name]["iou"]
        iiou = ours["per_class"][name]["iiou"]
        assert _close(nan if iou is None else iou, official["classScores"][name])
        assert _close(nan if iiou is None else iiou, official["classInstScores"][name])
    assert _close(ours["miou"], official["averageScoreClasses"])
    assert _close(ours["category_miou"], official["averageScoreCategories"])

    # --pred-dir scores the same files to the same figures
    rc, _, _ = _cli(
        capsys, "eval", "--pred-dir", tmp_path / "pred", "--data", data, "--workers", 0,
        "--json", tmp_path / "files.json",
    )  # fmt: skip
    files = json.loads((tmp_path / "files.json").read_text())
    assert rc == 0 and files["mode"] == "pred-dir"
    for key in ("miou", "miiou", "category_miou", "pixel_acc", "mean_acc", "per_class"):
        assert files[key] == ours[key]


def test_eval_cli_bad_predictions_are_one_line(synth, tmp_path, capsys):
    data = synth / "city"
    names = sorted(p.name[:-16] for p in data.glob("leftImg8bit/val/*/*.png"))
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in names:
        Image.fromarray(np.full((64, 128), 7, np.uint8)).save(pred / f"{name}_pred.png")

    def run():
        rc, _, err = _cli(capsys, "eval", "--pred-dir", pred, "--data", data, "--workers", 0)
        return rc, err.strip().splitlines()[-1]

    assert run()[0] == 0
    bad = pred / f"{names[1]}_pred.png"
    Image.fromarray(np.full((64, 128), 40, np.uint8)).save(bad)
    rc, line = run()
    assert rc == 1 and str(bad) in line and "unknown label ids [40]" in line
    Image.fromarray(np.full((32, 128), 7, np.uint8)).save(bad)
    rc, line = run()
    assert rc == 1 and str(bad) in line and "differs" in line
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(bad)
    rc, line = run()
    assert rc == 1 and str(bad) in line and "1-channel" in line
    Image.fromarray(np.full((64, 128), 7, np.uint8)).save(pred / f"{names[1]}_other.png")
    rc, line = run()
    assert rc == 1 and f"several predictions for {names[1]}" in line
    bad.unlink()
    (pred / f"{names[1]}_other.png").unlink()
    rc, line = run()
    assert rc == 1 and f"no prediction for {names[1]}" in line
    rc, _, err = _cli(capsys, "eval", "--data", data)  # neither a model nor --pred-dir
    assert rc == 1 and err.strip() == (
        "segcompare eval: error: name a model (--model NAME and/or --weights W), or score saved "
        "labelIds PNGs with --pred-dir DIR"
    )


def test_eval_refuses_a_model_of_other_classes_or_maps_them_by_name(synth, tmp_path, capsys):
    import json

    from segcompare.data.labels import CLASS_NAMES
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    data = synth / "city"
    model = build_model(weights=synth / "tiny.safetensors")
    reversed_path = tmp_path / "reversed.safetensors"
    # the same weights with the classifier's rows reversed, named in reverse: the same model
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(model.decode_head.linear_pred, name)
            p.copy_(p.flip(0))
    save_weights(model, reversed_path, class_names=list(reversed(CLASS_NAMES)))
    rc, out, err = _cli(capsys, "eval", "--weights", reversed_path, "--data", data)
    assert rc != 0 and len(err.strip().splitlines()) == 1
    assert "'bicycle'" in err and "'road'" in err and "--map-classes" in err
    rc, _, _ = _cli(capsys, "eval", "--weights", synth / "tiny.safetensors", "--data", data,
                    "--json", tmp_path / "a.json", "--mode", "whole")  # fmt: skip
    assert rc == 0
    rc, _, _ = _cli(capsys, "eval", "--weights", reversed_path, "--data", data, "--map-classes",
                    "--json", tmp_path / "b.json", "--mode", "whole")  # fmt: skip
    assert rc == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["per_class"] == b["per_class"] and a["miou"] == b["miou"]
