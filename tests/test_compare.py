"""segcompare.compare: Boundary IoU (segcompare.metrics) on cases counted by hand, corruptions
(segcompare.data.corrupt) against independent implementations (colorsys, OpenCV, the statistics
of the noise), and the whole report end to end on a tiny synthetic Cityscapes with two tiny
models, checked against `segcompare eval`."""

from __future__ import annotations

import colorsys
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segcompare import compare
from segcompare.cli import main
from segcompare.compare import hardest_images
from segcompare.data.corrupt import CORRUPTIONS, SEVERITIES, corrupt, parse_corruptions
from segcompare.evaluate import InferenceSettings
from segcompare.metrics import BoundaryIoU, boundary_band, boundary_iou, boundary_width, image_miou
from segcompare.utils import SegcompareError, is_temporary

# --- Boundary IoU -------------------------------------------------------------------------------


def _square(hw=(20, 20), top=5, left=5, side=10) -> torch.Tensor:
    label = torch.zeros(hw, dtype=torch.long)
    label[top : top + side, left : left + side] = 1
    return label


def test_boundary_iou_of_a_perfect_prediction_is_one():
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 19, (2, 24, 40)))
    label[:, :3, :5] = 255  # ignored pixels change nothing
    assert boundary_iou(label.clamp(max=18), label, d=2) == pytest.approx(1.0)


def test_boundary_iou_of_a_shifted_square_counted_by_hand():
    # A 10×10 square of class 1 on class 0 (20×20 image), predicted 2 px to the right; d = 1.
    # Class 1: both bands are the squares' 1-px inner rings (36 px each); they share the top and
    # bottom rows over columns 7..14: 2 × 8 = 16 px -> 16 / (36 + 36 - 16) = 2/7.
    # Class 0: both bands are the 1-px rings just outside the squares (44 px each); they share
    # rows 4 and 15 over columns 6..15: 2 × 10 = 20 px -> 20 / (44 + 44 - 20) = 5/17.
    target, pred = _square(), _square(left=7)
    acc = BoundaryIoU(d=1, num_classes=2)
    acc.update(pred, target)
    assert acc.per_class() == pytest.approx([5 / 17, 2 / 7])
    assert acc.mean() == pytest.approx((2 / 7 + 5 / 17) / 2)
    # Plain IoU: square 80 / 120, background 280 / 320; Boundary IoU is stricter on edges.
    assert image_miou(pred, target, num_classes=2) == pytest.approx((80 / 120 + 280 / 320) / 2)


def test_a_wide_band_gives_the_mask_iou():
    # Cheng et al.: as d grows, Boundary IoU of an object tends to its mask IoU. With d = 5 every
    # pixel of the 10-px squares is within d of their contour: class 1 scores 80 / 120.
    acc = BoundaryIoU(d=5, num_classes=2)
    acc.update(_square(left=7), _square())
    assert acc.per_class()[1] == pytest.approx(80 / 120)


def test_the_image_frame_is_not_a_contour():
    label = torch.zeros(16, 16, dtype=torch.long)
    assert not boundary_band(label, 3).any()
    band = boundary_band(_square(), 1)
    assert band.sum() == 36 + 44  # the two rings of the square's edge, nothing on the frame


def test_boundary_width_scales_with_the_image():
    assert boundary_width((1024, 2048)) == 11  # 0.5% of the 2290 px diagonal
    assert boundary_width((1024, 2048), 0.02) == 46  # the paper's 2%
    assert boundary_width((64, 128)) == 1  # never less than a pixel


def test_hardest_images_have_the_lowest_mean_miou():
    a, b = compare.ModelRun("a", None, "a", None), compare.ModelRun("b", None, "b", None)
    a.image_miou = [0.9, 0.2, 0.5, float("nan")]
    b.image_miou = [0.7, 0.4, 0.1, 0.6]
    assert hardest_images([a, b], 2) == [2, 1]  # means 0.3 and 0.3: stable order by index


def test_disagreement_map_by_hand():
    image = np.full((1, 5, 3), 100, np.uint8)
    label = np.array([[0, 1, 2, 3, 4]], np.uint8)
    a = np.array([[0, 1, 5, 3, 9]], np.uint8)
    b = np.array([[0, 2, 7, 8, 4]], np.uint8)
    # pixels: agree | only a right | both wrong | only a right | only b right
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    out = compare.disagreement_map(image, label, [a, b], [red, blue])
    dim, grey = round(100 * 0.35), compare.NO_WINNER_GREY
    assert out[0].tolist() == [[dim] * 3, [255, 0, 0], [grey] * 3, [255, 0, 0], [0, 0, 255]]
    # One model: its errors in grey.
    out = compare.disagreement_map(image, label, [b], [blue])
    assert out[0].tolist() == [[dim] * 3] + [[grey] * 3] * 3 + [[dim] * 3]


# --- corruptions --------------------------------------------------------------------------------


def _image(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_corruptions_keep_shape_and_dtype_and_are_deterministic(kind, severity):
    image = _image()
    out = corrupt(image, kind, severity, seed=3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    assert np.array_equal(out, corrupt(image, kind, severity, seed=3))
    assert np.array_equal(image, _image())  # the input is left alone


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_higher_severity_moves_the_image_further(kind):
    image = _image(48, 64, seed=1)
    image = cv2.GaussianBlur(image, (0, 0), 2)  # some structure for blur and JPEG to destroy
    err = [np.abs(corrupt(image, kind, s).astype(float) - image).mean() for s in (1, 3, 5)]
    assert err[0] < err[1] < err[2]


def test_noise_has_the_imagenet_c_standard_deviation():
    grey = np.full((200, 200, 3), 128, np.uint8)  # far from 0 and 255: no clipping at level 1
    diff = corrupt(grey, "noise", 1, seed=0).astype(float) - 128
    assert diff.std() == pytest.approx(0.08 * 255, rel=0.02)
    assert abs(diff.mean()) < 0.3
    assert not np.array_equal(corrupt(grey, "noise", 1, seed=1), corrupt(grey, "noise", 1, seed=0))


def test_blur_equals_opencv_gaussian_blur():
    image = _image(40, 56, seed=2)
    for severity, sigma in ((1, 1), (3, 3)):
        radius = math.ceil(4 * sigma)
        ref = cv2.GaussianBlur(
            image.astype(np.float32) / 255, (2 * radius + 1,) * 2, sigma,
            borderType=cv2.BORDER_REPLICATE,
        )  # fmt: skip
        ref = (np.clip(ref, 0, 1) * 255 + 0.5).astype(np.uint8)
        out = corrupt(image, "blur", severity)
        assert np.abs(out.astype(int) - ref).max() <= 1


def test_brightness_adds_to_v_of_hsv():
    image = _image(6, 7, seed=4)
    image[0, 0] = 0  # black: saturation 0, becomes grey
    out = corrupt(image, "brightness", 3)  # level 3: +0.3
    for y, x in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255.0))
        ref = np.array(colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0))) * 255
        assert np.abs(out[y, x].astype(float) - ref).max() <= 0.51


def test_jpeg_quality_sets_the_loss():
    image = cv2.GaussianBlur(_image(64, 64, seed=5), (0, 0), 1.5)
    out = corrupt(image, "jpeg", 5)  # quality 7
    assert np.array_equal(out, corrupt(image, "jpeg", 5))
    assert np.abs(out.astype(float) - image).mean() > 1


def test_unknown_corruption_is_an_error():
    with pytest.raises(ValueError, match="valid"):
        corrupt(_image(), "fog", 1)
    with pytest.raises(SegcompareError, match="noise"):
        parse_corruptions("noise,fog")
    assert parse_corruptions("all") == list(CORRUPTIONS)


# --- the report, end to end ---------------------------------------------------------------------

TINY_SEGFORMER = {"depths": (1, 1, 1, 1), "embed_dims": (8, 16, 24, 32), "num_heads": (1, 1, 1, 1),
                  "decoder_dim": 16}
_STAGE = {"num_modules": 1, "block": "BASIC", "fuse_method": "SUM"}
TINY_HRNET = {
    "stage1": {"num_modules": 1, "num_branches": 1, "block": "BOTTLENECK", "num_blocks": (1,),
               "num_channels": (8,), "fuse_method": "SUM"},
    "stage2": {**_STAGE, "num_branches": 2, "num_blocks": (1, 1), "num_channels": (4, 8)},
    "stage3": {**_STAGE, "num_branches": 3, "num_blocks": (1, 1, 1), "num_channels": (4, 8, 16)},
    "stage4": {**_STAGE, "num_branches": 4, "num_blocks": (1, 1, 1, 1),
               "num_channels": (4, 8, 16, 32)},
}  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from segcompare.data.synth import make_synthetic_cityscapes
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    root = tmp_path_factory.mktemp("compare")
    make_synthetic_cityscapes(root / "data", train=0, val=3, size=(64, 128), seed=0)
    torch.manual_seed(0)
    # SegFormer as a training run folder: compare takes its final weights, not best.safetensors
    (root / "run_b0").mkdir()
    weights = {
        "segformer-b0": save_weights(
            build_model("segformer-b0", **TINY_SEGFORMER), root / "run_b0" / "final.safetensors"),
        "hrnet-w18-small-v1": save_weights(
            build_model("hrnet-w18-small-v1", **TINY_HRNET), root / "w18s.safetensors"),
    }  # fmt: skip
    best = build_model("segformer-b0", **TINY_SEGFORMER)
    save_weights(best, root / "run_b0" / "best.safetensors")
    given = {"segformer-b0": root / "run_b0", "hrnet-w18-small-v1": weights["hrnet-w18-small-v1"]}
    out = root / "report"
    doc = compare.run_compare(compare.CompareSpec(
        [(name, path) for name, path in given.items()], root / "data", "val", out, images=2,
        corruptions=["noise", "blur", "jpeg", "brightness"], corrupt_images=1, bench_iters=1,
        bench_warmup=0, inference=InferenceSettings(device="cpu"), progress=False,
    ))  # fmt: skip
    return {"root": root, "out": out, "doc": doc, "weights": weights}


def test_report_writes_every_file(report):
    out = report["out"]
    names = {
        "metrics.json", "report.md", "report.html", "per_class_iou.png", "per_class_diff.png",
        "miou_vs_gmacs.png", "miou_vs_latency.png", "boundary_iou.png", "hardest_images.png",
        "confusion_segformer-b0.png", "confusion_hrnet-w18-small-v1.png", "robustness.png",
        "most_different_images.png",
    }  # fmt: skip
    assert names <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if is_temporary(p)]
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert (out / "per_image.csv").is_file()
    for name in names - {"metrics.json", "report.md", "report.html"}:
        assert f"({name})" in md  # every plot is shown in the Markdown report


class _StrictHTML(HTMLParser):
    """Checks that every element is closed in order and collects the src/href values."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def test_report_html_is_valid_and_self_contained(report):
    text = (report["out"] / "report.html").read_text()
    parser = _StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.doctype.lower() == "doctype html"
    assert parser.stack == []
    assert [parser.tags.count(t) for t in ("html", "head", "body", "title")] == [1, 1, 1, 1]
    images = [link for link in parser.links if link.startswith("data:image/png;base64,")]
    assert len(images) == 10 and images == parser.links  # every plot embedded, nothing else
    assert "http://" not in text and "https://" not in text
    assert "url(" not in text and "@import" not in text


def test_metrics_json_schema(report):
    doc = json.loads((report["out"] / "metrics.json").read_text())
    assert set(doc) >= {"models", "data", "split", "num_images", "meta"}
    assert doc["split"] == "val" and doc["num_images"] == 3
    keys = {"name", "weights", "miou", "miiou", "category_miou", "pixel_acc", "boundary_iou",
            "per_class", "parameters", "gmacs", "latency_ms", "images_per_s", "memory_mb",
            "robustness"}  # fmt: skip
    assert [m["name"] for m in doc["models"]] == ["segformer-b0", "hrnet-w18-small-v1"]
    for m in doc["models"]:
        assert keys <= set(m)
        for key in ("miou", "category_miou", "pixel_acc", "boundary_iou"):
            assert 0 <= m[key] <= 1
        assert m["parameters"] > 0 and m["gmacs"] > 0 and m["latency_ms"] > 0
        rb = m["robustness"]
        assert rb["severities"] == [1, 3, 5]
        assert set(rb["miou"]) == {"noise", "blur", "jpeg", "brightness"}
        assert all(len(v) == 3 and all(0 <= x <= 1 for x in v) for v in rb["miou"].values())
        # corrupt_images=1: the clean figure is measured again on that one image
        assert 0 <= rb["clean_miou"] <= 1
        mean = np.mean([x for v in rb["miou"].values() for x in v])
        assert rb["mean_miou"] == pytest.approx(mean)
        assert rb["relative_miou"] == pytest.approx(mean / rb["clean_miou"])
    assert doc["meta"]["boundary"]["d_px"] == 1


def test_metrics_agree_with_segcompare_eval(report, capsys):
    doc = json.loads((report["out"] / "metrics.json").read_text())
    for entry in doc["models"]:
        out = report["root"] / f"eval_{entry['name']}.json"
        args = ["eval", "--model", entry["name"], "--weights", entry["weights"], "--data",
                str(report["root"] / "data"), "--workers", "0", "--device", "cpu", "--json",
                str(out)]  # fmt: skip
        assert main(args) == 0
        ref = json.loads(out.read_text())
        for key in ("miou", "miiou", "category_miou", "pixel_acc"):
            assert entry[key] == pytest.approx(ref[key], nan_ok=True), key
        assert entry["per_class"] == ref["per_class"]
    capsys.readouterr()


def test_a_run_folder_is_evaluated_by_its_final_weights(report):
    doc = json.loads((report["out"] / "metrics.json").read_text())
    assert doc["models"][0]["weights"] == str(report["root"] / "run_b0" / "final.safetensors")
    md = (report["out"] / "report.md").read_text()
    assert "final weights of a training run" in md and "best val mIoU of a training run" not in md


def test_run_weights_picks_final_or_best(tmp_path):
    from segcompare.run_folder import run_weights

    (tmp_path / "final.safetensors").write_bytes(b"x")
    assert run_weights(tmp_path) == tmp_path / "final.safetensors"
    with pytest.raises(SegcompareError, match="no best.safetensors"):
        run_weights(tmp_path, "best")
    (tmp_path / "best.safetensors").write_bytes(b"x")
    assert run_weights(tmp_path, "best") == tmp_path / "best.safetensors"
    assert run_weights(tmp_path / "final.safetensors") == tmp_path / "final.safetensors"
    hf_dir = tmp_path / "hf"  # any other folder (a HuggingFace directory) stays as it is
    hf_dir.mkdir()
    assert run_weights(hf_dir) == hf_dir


def test_parameters_and_gmacs_match_stats(report):
    from segcompare.models import build_model
    from segcompare.stats import count_macs

    entry = report["doc"]["models"][0]
    model = build_model(weights=report["weights"]["segformer-b0"])
    assert entry["parameters"] == sum(p.numel() for p in model.parameters())
    assert entry["gmacs"] == pytest.approx(count_macs(model, (64, 128))["gmacs"], rel=1e-3)


def test_cli_pairs_models_with_weights(tmp_path, capsys):
    code = main(["compare", "--model", "segformer-b0", "--model", "hrnet-w18", "--weights", "a",
                 "--data", str(tmp_path)])  # fmt: skip
    assert code == 1
    assert "one --weights per --model" in capsys.readouterr().err
    assert main(["compare", "--model", "segformer-b0", "--data", str(tmp_path), "--corrupt",
                 "rain"]) == 1  # fmt: skip
    assert "unknown corruption 'rain'" in capsys.readouterr().err


def test_report_text_names_the_boundary_band(report):
    md = (report["out"] / "report.md").read_text()
    assert "d = 1 px" in md and "0.5% of the image diagonal" in md
    assert Path(report["out"] / "report.html").stat().st_size > 10_000


def test_report_tables_scroll_and_figures_scale(report):
    text = (report["out"] / "report.html").read_text()
    # every table sits in a horizontal scroller: a narrow screen scrolls it, not the page
    assert text.count("<table") == text.count('<div class="scroll">\n<table') > 0
    css = text[text.index("<style>"): text.index("</style>")]
    assert ".scroll { overflow-x: auto;" in css
    assert "figure img { max-width: 100%; height: auto;" in css
    assert "min-width: 0" in css  # a flex figure may shrink below its image's width


def test_markdown_and_html_escape_what_comes_from_file_names(tmp_path):
    from segcompare.compare.report import Section, render_html, render_markdown

    label = "<img src=x onerror=alert(1)>|b&c"
    (tmp_path / "confusion_a b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    sections = [Section(
        f"about {label}", [f"weights {label}"], (["model", "weights"], [[label, "w|x.pt"]]),
        images=[("confusion_a b.png", f"confusion of {label} [x]")],
    )]  # fmt: skip
    md = render_markdown(label, sections)
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;\\|b&amp;c" in md
    row = next(line for line in md.splitlines() if line.startswith("| &lt;img"))
    # two cells: the only unescaped pipes are the table's own
    assert len(row.replace("\\|", "").split("|")) == 4
    assert "](confusion_a%20b.png)" in md and "\\[x\\]" in md
    page = render_html(label, sections, tmp_path)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_mixed_precision_is_reported_against_float32(report):
    """With --amp (bf16 on the CPU), each model is scored again in float32: that figure equals
    the float32 compare's (the fixture's), and the report gives the change. The bf16 figures
    themselves are not checked: they differ between CPUs."""
    name, weights = "hrnet-w18-small-v1", report["weights"]["hrnet-w18-small-v1"]
    out = report["root"] / "report_amp"
    doc = compare.run_compare(compare.CompareSpec(
        [(name, weights)], report["root"] / "data", "val", out, images=0, bench_iters=1,
        bench_warmup=0, inference=InferenceSettings(device="cpu", amp=True), progress=False,
    ))  # fmt: skip
    fp32 = next(m for m in report["doc"]["models"] if m["name"] == name)
    entry = doc["models"][0]
    assert entry["miou_fp32"] == fp32["miou"]
    assert entry["amp_miou_change"] == entry["miou"] - fp32["miou"]
    text = (out / "report.md").read_text()
    assert "fp32 mIoU" in text and "bf16 precision" in text and "lower − fp32" in text
    assert doc["meta"]["inference"]["precision"] == "bf16"
    assert "fp32 mIoU" not in (report["out"] / "report.md").read_text()
    assert fp32["miou_fp32"] is None and fp32["amp_miou_change"] is None


# --- uncertainty: per-image matrices and the paired bootstrap -----------------------------------


def _hand_matrix(pred: np.ndarray, target: np.ndarray, c: int) -> np.ndarray:
    """C×(C+2) counts by a plain loop over pixels: row = label, column = prediction (C: any
    other prediction code); label 255 left out."""
    mat = np.zeros((c, c + 2), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t < c:
            mat[t, p if p < c else c] += 1
    return mat


def _images(rng: np.random.Generator, n: int, c: int = 3, hw=(6, 7), right: float = 0.7):
    """n random (pred, target) pairs of c classes; `right`: the chance a pixel is right."""
    pairs = []
    for _ in range(n):
        target = rng.integers(0, c, hw)
        target[rng.random(hw) < 0.1] = 255
        pred = np.where(rng.random(hw) < right, target, rng.integers(0, c, hw))
        pred[target == 255] = rng.integers(0, c)
        pairs.append((pred, target))
    return pairs


def test_per_image_matrices_are_each_images_counts_in_order():
    from segcompare.metrics import ConfusionMatrix

    pairs = _images(np.random.default_rng(1), 5, c=3)
    pairs[2] = (np.full((6, 7), 255), pairs[2][1])  # a prediction outside the classes
    cm = ConfusionMatrix(3, per_image=True)
    cm.update(torch.from_numpy(np.stack([p for p, _ in pairs[:2]])),
              torch.from_numpy(np.stack([t for _, t in pairs[:2]])))  # a batch of two
    for pred, target in pairs[2:]:  # then one by one, H×W
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    mats = cm.image_matrices()
    assert mats.shape == (5, 3, 5)
    for mat, (pred, target) in zip(mats, pairs):
        assert (mat == _hand_matrix(pred, target, 3)).all()
    assert (mats.sum(0) == cm.mat.numpy()).all()


def _loop_bootstrap(mats: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap as the metrics docstring states it, one resample at a time: the same draws
    (`default_rng(seed).integers(0, N, (B, N))`), the images' matrices summed, IoU and mean
    accuracy counted by hand."""
    n, c = mats.shape[0], mats.shape[1]
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    miou, macc = [], []
    for b in range(resamples):
        total = np.zeros(mats.shape[1:], dtype=np.int64)
        for i in draws[b]:
            total += mats[i]
        ious, accs = [], []
        for k in range(c):
            tp = total[k, k]
            union = total[k].sum() + total[:, k].sum() - tp
            if union:
                ious.append(tp / union)
            if total[k].sum():
                accs.append(tp / total[k].sum())
        miou.append(np.mean(ious))
        macc.append(np.mean(accs))
    return np.array(miou), np.array(macc)


def test_bootstrap_equals_a_plain_loop_with_the_same_draws():
    from segcompare.metrics import bootstrap_draws, bootstrap_scores, interval

    c = 3
    mats = np.stack([_hand_matrix(p, t, c) for p, t in _images(np.random.default_rng(2), 7, c)])
    miou, macc = _loop_bootstrap(mats, 50, seed=5)
    got = bootstrap_scores([mats], bootstrap_draws(7, 50, seed=5))
    np.testing.assert_allclose(got["miou"], miou, rtol=1e-12)
    np.testing.assert_allclose(got["mean_acc"], macc, rtol=1e-12)
    np.testing.assert_allclose(interval(got["miou"]), np.percentile(miou, [2.5, 97.5]),
                               rtol=1e-12)
    assert len(set(np.round(miou, 12))) > 10  # the resamples differ: the test can tell


def test_bootstrap_in_chunks_gives_the_same_figures_to_the_bit(monkeypatch):
    """The resamples are scored a chunk at a time, so their matrices never need memory for all
    of them (18 GB for ADE20K at the most resamples): chunks of one resample, of a few and of
    all give the same figures exactly."""
    from segcompare import metrics

    c = 4
    mats = np.stack([_hand_matrix(p, t, c) for p, t in _images(np.random.default_rng(3), 9, c)])
    draws = metrics.bootstrap_draws(9, 37, seed=1)
    whole = metrics.bootstrap_scores([mats, mats[::-1]], draws)
    row_bytes = 8 * mats[0].size  # one resample's matrix
    resample, chunks = metrics.resample_matrices, []
    monkeypatch.setattr(metrics, "resample_matrices",
                        lambda m, d: chunks.append(len(d)) or resample(m, d))  # fmt: skip
    for per_chunk in (1, 5):
        monkeypatch.setattr(metrics, "BOOTSTRAP_CHUNK_BYTES", per_chunk * row_bytes)
        chunks.clear()
        chunked = metrics.bootstrap_scores([mats, mats[::-1]], draws)
        assert chunks == 2 * ([per_chunk] * (37 // per_chunk) + [37 % per_chunk] * (per_chunk > 1))
        for key in ("miou", "mean_acc", "iou"):
            assert chunked[key].shape == whole[key].shape
            np.testing.assert_array_equal(chunked[key], whole[key])
    assert len(set(np.round(whole["miou"], 12))) > 5  # the resamples differ: the test can tell
    empty = metrics.bootstrap_scores([mats], draws[:0])
    assert empty["miou"].shape == (0,) and empty["iou"].shape == (0, c)


def test_interval_narrows_as_images_are_added():
    from segcompare.metrics import bootstrap_draws, bootstrap_scores, interval

    rng = np.random.default_rng(3)
    widths = []
    mats = np.stack([_hand_matrix(p, t, 3) for p, t in _images(rng, 160, 3, right=0.6)])
    for n in (10, 40, 160):
        samples = bootstrap_scores([mats[:n]], bootstrap_draws(n, 400, seed=0))["miou"]
        lo, hi = interval(samples)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] > 2.5 * widths[2]  # about sqrt(16) = 4 in theory


def test_identical_models_get_no_clear_difference_and_a_real_gap_a_verdict():
    from segcompare.metrics import bootstrap_draws, bootstrap_scores, pairwise_differences

    rng = np.random.default_rng(4)
    pairs = _images(rng, 30, 3, right=0.5)
    worse = np.stack([_hand_matrix(p, t, 3) for p, t in pairs])
    # the same images predicted better: right where the first was, and on half its mistakes
    better = np.stack([
        _hand_matrix(np.where(rng.random(t.shape) < 0.5, t, p), t, 3) for p, t in pairs])
    draws = bootstrap_draws(30, 300, seed=0)
    s = [bootstrap_scores([m], draws)["miou"] for m in (worse, worse, better)]
    miou = [float(np.nanmean(np.diag(m.sum(0)[:, :3]) / (m.sum(0).sum(1) + m.sum(0)[:, :3].sum(0)
                                                         - np.diag(m.sum(0)[:, :3]))))
            for m in (worse, worse, better)]  # fmt: skip
    pairs_out = pairwise_differences(["a", "a again", "b"], miou, s)
    same = pairs_out[0]
    assert (same["a"], same["b"], same["diff"]) == ("a", "a again", 0.0)
    assert same["verdict"] == "no clear difference" and same["ci"] == [0.0, 0.0]
    gap = pairs_out[1]
    assert (gap["a"], gap["b"]) == ("a", "b") and gap["diff"] < 0
    assert gap["verdict"] == "worse" and gap["ci"][1] < 0  # the interval excludes 0


def test_report_gives_intervals_pairwise_verdicts_and_per_image_figures(report):
    import csv

    doc = json.loads((report["out"] / "metrics.json").read_text())
    assert doc["meta"]["bootstrap"]["resamples"] == 1000
    for m in doc["models"]:
        lo, hi = m["miou_ci"]
        assert 0 <= lo < hi <= 1 and lo <= m["miou"] <= hi
        assert m["training"] is None  # neither weights file has a training log beside it
    (pair,) = doc["pairwise"]
    assert (pair["a"], pair["b"]) == ("segformer-b0", "hrnet-w18-small-v1")
    assert pair["diff"] == pytest.approx(doc["models"][0]["miou"] - doc["models"][1]["miou"])
    assert pair["verdict"] in ("better", "worse", "no clear difference")
    md = (report["out"] / "report.md").read_text()
    assert "## Verdict" in md and "Is the difference real?" in md and "| no training log |" in md
    m0 = doc["models"][0]
    lo, hi = m0["miou_ci"]
    assert f"{100 * m0['miou']:.1f} ({100 * lo:.1f}–{100 * hi:.1f})" in md
    rows = list(csv.DictReader((report["out"] / "per_image.csv").open()))
    assert len(rows) == 3 * 2 and rows[0]["model"] == "segformer-b0"
    # the gallery's hardest image is the one with the lowest mean of the file's figures
    names = sorted({r["image"] for r in rows})
    mean = {n: np.mean([float(r["miou"]) for r in rows if r["image"] == n]) for n in names}
    assert doc["hardest"][0] == min(names, key=mean.get)
    assert all(0 <= float(r["pixel_acc"]) <= 1 for r in rows)


# --- several runs of one model (seeds), and the training side ----------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny SegFormer runs of one recipe, seeds 0 and 1, and the comparison of both as one
    row beside the first run alone, through the command line."""
    from segcompare.config import config_from_dict
    from segcompare.data.synth import make_synthetic_cityscapes
    from segcompare.train import train

    root = tmp_path_factory.mktemp("seeds")
    make_synthetic_cityscapes(root / "data", train=2, val=3, size=(64, 128), seed=0)
    runs = []
    for seed in (0, 1):
        cfg = config_from_dict({
            "model": {"name": "segformer-b0", "overrides": dict(TINY_SEGFORMER)},
            "data": {"root": str(root / "data"), "crop_size": [48, 48], "base_size": 128},
            "optim": {"lr": 2e-3, "warmup_iters": 1},
            "train": {"max_iters": 2, "batch_size": 2, "num_workers": 0, "log_every": 1,
                      "eval_every": 2, "checkpoint_every": 2, "seed": seed},
        })  # fmt: skip
        train(cfg, root / f"run{seed}")
        runs.append(root / f"run{seed}")
    out = root / "report"
    code = main(["compare", "--weights", str(runs[0]), "--runs", f"{runs[0]},{runs[1]}",
                 "--label", "b0 seeds", "--data", str(root / "data"), "--out", str(out),
                 "--images", "1", "--bench-iters", "1", "--bench-warmup", "0", "--device", "cpu",
                 "--bootstrap", "200"])  # fmt: skip
    assert code == 0
    return {"runs": runs, "out": out, "doc": json.loads((out / "metrics.json").read_text())}


def test_runs_of_one_model_are_one_row_with_mean_and_spread(two_runs):
    single, row = two_runs["doc"]["models"]
    assert (single["label"], row["label"]) == ("segformer-b0", "b0 seeds")
    seeds = row["seeds"]
    assert [s["weights"] for s in seeds] == [str(r / "final.safetensors") for r in two_runs["runs"]]
    assert seeds[0]["miou"] == single["miou"]  # the first run, alone, is the other row
    assert seeds[0]["miou"] != seeds[1]["miou"]  # the seeds gave different models
    assert row["miou"] == pytest.approx((seeds[0]["miou"] + seeds[1]["miou"]) / 2, abs=1e-12)
    std = abs(seeds[0]["miou"] - seeds[1]["miou"]) / math.sqrt(2)
    md = (two_runs["out"] / "report.md").read_text()
    assert f"{100 * row['miou']:.1f} ± {100 * std:.1f}" in md
    assert "Seeds: the same recipe, run again" in md
    assert two_runs["doc"]["pairwise"][0]["b"] == "b0 seeds"


def test_run_folders_bring_their_training_curves_and_cost(two_runs):
    out = two_runs["out"]
    for m in two_runs["doc"]["models"]:
        t = m["training"]
        assert t["iterations"] == 2 and t["batch_size"] == 2
        assert t["wall_s"] > 0 and t["images_per_s"] > 0 and t["peak_memory_mb"] > 0
        assert t["device"].startswith("cpu")
        assert t["curves"]["iter"] == [1, 2] and len(t["curves"]["loss"]) == 2
        assert t["val"]["iter"] == [2]
    md = (out / "report.md").read_text()
    assert "What training cost" in md and "(training_curves.png)" in md
    assert "| no training log |" not in md
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_runs_without_labels_and_a_negative_bootstrap(tmp_path, capsys):
    code = main(["compare", "--runs", "a.safetensors,b.safetensors", "--data", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 --runs but 0 --label" in err[0]
    with pytest.raises(SystemExit) as stop:  # argparse: its row of values.RULES refuses it
        main(["compare", "--model", "segformer-b0", "--data", str(tmp_path), "--bootstrap", "-1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--bootstrap: must be an integer in [0, " in err and "'-1'" in err
