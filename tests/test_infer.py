import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segcompare.data.labels import PALETTE, TRAIN_ID_TO_ID
from segcompare.evaluate import InferenceSettings
from segcompare.infer import Predictor, predict_files, render_prediction, render_video
from segcompare.utils import SegcompareError, is_temporary

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


# The toy models below are no segcompare variant: they follow SegFormer's test code.
CPU = InferenceSettings(family="segformer", device="cpu")
WHOLE = InferenceSettings(family="segformer", device="cpu", mode="whole")


class RedNet(torch.nn.Module):
    """Logits at 1/4 size; class c scores w_c × (normalised red), w rising from -1 to 1: a red
    pixel (normalised red > 0) is class 18 (bicycle), a pixel without red class 0 (road)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.linspace(-1, 1, 19).view(1, 19, 1, 1))

    def forward(self, x):
        return F.avg_pool2d(x[:, :1], 4, ceil_mode=True) * self.w


class QuarterNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 19, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


def _half_red(h=32, w=64):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2, 0] = 255
    image[:, :, 1] = 40
    return image


def test_predict_equals_normalise_forward_upsample_argmax():
    model = QuarterNet()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    pred = Predictor(model, WHOLE).predict(image)
    x = torch.from_numpy(((image - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = F.interpolate(model(x), size=(32, 48), mode="bilinear", align_corners=False)
    assert pred.dtype == np.uint8 and pred.shape == (32, 48)
    assert np.array_equal(pred, logits.argmax(1)[0].numpy())


def test_optimize_changes_no_prediction():
    model = QuarterNet()
    image = np.random.default_rng(1).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    a = Predictor(model, InferenceSettings(family="segformer", device="cpu", optimize=False))
    a = a.predict(image)
    b = Predictor(model, CPU).predict(image)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("fmt", ["trainid", "labelid", "color", "overlay", "logits"])
def test_predict_files_writes_ids_and_names(tmp_path, fmt):
    src = tmp_path / "in"
    (src / "ulm").mkdir(parents=True)
    image = _half_red()
    Image.fromarray(image).save(src / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    Image.fromarray(image).save(tmp_path / "single.jpg", quality=100)
    predictor = Predictor(RedNet(), WHOLE)
    out = tmp_path / "out"
    written = predict_files(predictor, [str(src), str(tmp_path / "*.jpg")], out, fmt, False)
    suffix = ".npy" if fmt == "logits" else ".png"
    assert written == [
        out / "ulm" / f"ulm_000000_000019_leftImg8bit{suffix}",
        out / f"single{suffix}",
    ]
    if fmt == "logits":
        scores = np.load(written[0])
        assert scores.dtype == np.float16 and scores.shape == (19, 32, 64)
        assert scores[:, 4, 4].argmax() == 18 and scores[:, 4, 60].argmax() == 0
        return
    result = np.asarray(Image.open(written[0]))
    left, right = result[4:28, 4:28], result[4:28, 36:60]  # away from the red/black border
    expected = {
        "trainid": (18, 0),
        "labelid": (TRAIN_ID_TO_ID[18], TRAIN_ID_TO_ID[0]),  # bicycle 33, road 7
        "color": (PALETTE[18], PALETTE[0]),
        "overlay": (
            np.round(0.5 * image[8, 8] + 0.5 * PALETTE[18]),
            np.round(0.5 * image[8, 40] + 0.5 * PALETTE[0]),
        ),
    }[fmt]
    assert (left == expected[0]).all() and (right == expected[1]).all()
    assert not [p for p in out.rglob("*") if is_temporary(p)]


def test_predict_files_bad_inputs(tmp_path):
    predictor = Predictor(RedNet(), CPU)
    with pytest.raises(SegcompareError, match="no images found"):
        predict_files(predictor, [str(tmp_path / "missing*.png")], tmp_path / "out", progress=False)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SegcompareError, match="bad.png"):
        predict_files(predictor, [str(tmp_path / "bad.png")], tmp_path / "out", progress=False)


def _frames(folder, n=5, h=32, w=64):
    folder.mkdir(parents=True)
    for i in range(n):
        image = _half_red(h, w)
        image[..., 2] = 20 * i  # a frame index we can read back
        Image.fromarray(image).save(folder / f"stuttgart_00_000000_{i:06d}_leftImg8bit.png")
    return folder


def test_video_gif_has_the_frames_and_panels(tmp_path):
    frames = _frames(tmp_path / "stuttgart_00")
    a = Predictor(RedNet(), WHOLE)
    b = Predictor(QuarterNet(), WHOLE)
    out = tmp_path / "demo.gif"
    n = render_video([a, b], frames, out, fps=10, every=2, progress=False)
    assert n == 3  # frames 0, 2, 4
    with Image.open(out) as gif:
        assert gif.n_frames == 3
        assert gif.info.get("loop") == 0 and gif.info.get("duration") == 100
        width, height = gif.size
        assert width == 3 * 64  # input | model 1 | model 2
        gif.seek(2)
        last = np.asarray(gif.convert("RGB")).astype(int)
    title_h = 14  # max(14, 32 // 16)
    assert height > title_h + 32  # title bars above, legend below
    # panel 1 is the input (frame 4: blue = 80); panel 2 RedNet's overlay (bicycle | road)
    assert np.abs(last[title_h + 16, 16] - [255, 40, 80]).max() <= 12
    overlay_left = 0.5 * np.array([255, 40, 80]) + 0.5 * PALETTE[18]
    overlay_right = 0.5 * np.array([0, 40, 80]) + 0.5 * PALETTE[0]
    assert np.abs(last[title_h + 16, 64 + 8] - overlay_left).max() <= 12
    assert np.abs(last[title_h + 16, 64 + 56] - overlay_right).max() <= 12


def test_video_max_frames_size_and_errors(tmp_path):
    frames = _frames(tmp_path / "f", n=4)
    p = Predictor(RedNet(), CPU)
    n = render_video([p], frames, tmp_path / "v.gif", size=(16, 32), max_frames=2, progress=False)
    with Image.open(tmp_path / "v.gif") as gif:
        assert n == gif.n_frames == 2 and gif.size[0] == 2 * 32
    with pytest.raises(SegcompareError, match=r"\.gif or \.mp4"):
        render_video([p], frames, tmp_path / "v.avi", progress=False)
    with pytest.raises(SegcompareError, match="neither a folder nor a file"):
        render_video([p], tmp_path / "nothing", tmp_path / "w.gif", progress=False)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        with pytest.raises(SegcompareError, match="imageio-ffmpeg"):
            render_video([p], frames, tmp_path / "v.mp4", progress=False)
    assert not (tmp_path / "w.gif").exists()


def test_mp4_without_the_video_extra_is_one_line(tmp_path, monkeypatch):
    # imageio is the 'video' extra, not a core dependency: without it, one line naming the extra
    monkeypatch.setitem(sys.modules, "imageio", None)  # import imageio -> ImportError
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (32, 16)).save(frames / "a.png")
    with pytest.raises(SegcompareError, match=r"segcompare\[video\]"):
        render_video([Predictor(RedNet(), CPU)], frames, tmp_path / "v.mp4", progress=False)
    assert not (tmp_path / "v.mp4").exists()


# --- segcompare predict / video, end to end on the synthetic set ----------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """2 synthetic val images and 3 demo-video frames (64×128); a tiny seeded SegFormer and a
    seeded HRNet-W18-Small-v1 saved as our checkpoints."""
    from segcompare.data.synth import make_synthetic_cityscapes
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_cityscapes(root / "city", train=0, val=2, size=(64, 128), seed=0, video_frames=3)
    torch.manual_seed(0)
    tiny = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)
    save_weights(build_model("segformer-b0", **tiny), root / "b0.safetensors")
    save_weights(build_model("hrnet-w18-small-v1"), root / "hr.safetensors")
    return root


def _cli(capsys, *argv):
    from segcompare.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_cli_writes_label_ids_named_after_the_inputs(synth, tmp_path, capsys):
    from segcompare.models import build_model

    images = synth / "city" / "leftImg8bit" / "val"
    rc, out, _ = _cli(
        capsys, "predict", "--weights", synth / "b0.safetensors", images, "--out", tmp_path,
        "--device", "cpu", "--mode", "whole",
    )  # fmt: skip
    assert rc == 0 and "wrote 2 labelid file(s)" in out
    inputs = sorted(images.glob("*/*.png"))
    written = sorted(tmp_path.glob("*/*.png"))
    assert [p.relative_to(tmp_path) for p in written] == [p.relative_to(images) for p in inputs]
    # the ids are the loaded model's train-id predictions mapped to label ids
    model = build_model(weights=synth / "b0.safetensors")
    expected = Predictor(model, WHOLE).predict(inputs[0])
    assert np.array_equal(np.asarray(Image.open(written[0])), TRAIN_ID_TO_ID[expected])


def test_video_cli_two_models_side_by_side(synth, tmp_path, capsys):
    frames = synth / "city" / "leftImg8bit_demoVideo" / "stuttgart_00"
    out = tmp_path / "demo.gif"
    rc, stdout, _ = _cli(
        capsys, "video", "--model", "segformer-b0", "--weights", synth / "b0.safetensors",
        "--model", "hrnet-w18-small-v1", "--weights", synth / "hr.safetensors", frames,
        "--out", out, "--max-frames", 2, "--device", "cpu",
    )  # fmt: skip
    assert rc == 0 and "2 frames, 2 model(s)" in stdout
    with Image.open(out) as gif:
        assert gif.n_frames == 2 and gif.size[0] == 3 * 128 and gif.size[1] > 64


def test_cli_bad_inputs_are_one_line(synth, tmp_path, capsys):
    w = synth / "b0.safetensors"
    cases = [
        (("predict", "--weights", w, tmp_path / "none*.png", "--out", tmp_path), "no images found"),
        (("video", "--model", "segformer-b0", "--model", "hrnet-w18", "--weights", w, tmp_path,
          "--out", tmp_path / "v.gif"), "give one --weights per --model"),
        (("video", "--weights", w, tmp_path / "missing", "--out", tmp_path / "v.gif"),
         "neither a folder nor a file"),
        (("predict", "--model", "segformer-b9", tmp_path, "--out", tmp_path), "unknown model"),
        (("predict", "--weights", tmp_path / "missing.pt", tmp_path, "--out", tmp_path),
         "missing.pt"),
    ]  # fmt: skip
    for argv, message in cases:
        rc, _, err = _cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and lines[-1].startswith(f"segcompare {argv[0]}: error: "), err
        assert message in lines[-1]


def test_class_boundaries_by_hand():
    from segcompare.infer.video import class_boundaries

    ids = np.array([[0, 0, 13], [0, 14, 13], [0, 0, 0]], dtype=np.uint8)
    # a pixel is on a boundary when its right or lower neighbour has another class
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    assert np.array_equal(class_boundaries(ids), expected)


def test_video_draws_boundaries_and_shrinks_to_max_width(tmp_path):
    from segcompare.infer.video import BOUNDARY_RGB

    frames = _frames(tmp_path / "stuttgart_00", n=1)  # 32×64: bicycle | road for RedNet
    out = tmp_path / "v.gif"
    render_video([Predictor(RedNet(), WHOLE)], frames, out, max_width=64, progress=False)
    with Image.open(out) as gif:
        width, height = gif.size
        frame = np.asarray(gif.convert("RGB")).astype(int)
    assert width == 64  # two 32-px panels (the 64-px frames drawn at half size)
    title_h = 14
    row = frame[title_h + 8, 32:]  # the overlay panel at half size: bicycle | road
    white = np.abs(row - BOUNDARY_RGB).max(axis=1) <= 12
    assert white.sum() == 1 and 8 < np.flatnonzero(white)[0] < 24  # one boundary, mid-panel
    assert np.abs(row[4] - (0.5 * np.array([255, 40, 0]) + 0.5 * PALETTE[18])).max() <= 12


# --- models of another class count than Cityscapes' 19 --------------------------------------------
class KNet(torch.nn.Module):
    """RedNet with `k` classes: a red pixel is class k - 1, a pixel without red class 0."""

    def __init__(self, k):
        super().__init__()
        self.register_buffer("w", torch.linspace(-1, 1, k).view(1, k, 1, 1))

    def forward(self, x):
        return F.avg_pool2d(x[:, :1], 4, ceil_mode=True) * self.w


def _tiny(k):
    from segcompare.models import build_model

    torch.manual_seed(0)
    tiny = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)
    return build_model("segformer-b0", num_classes=k, **tiny)


def test_predictor_knows_the_class_count():
    assert Predictor(_tiny(5), WHOLE).num_classes == 5  # a segcompare model: from its classifier
    predictor = Predictor(KNet(25), WHOLE)  # any other module: from its first call
    assert predictor.num_classes is None
    predictor.predict(_half_red())
    assert predictor.num_classes == 25


@pytest.mark.parametrize("fmt", ["color", "overlay", "trainid"])
def test_predict_files_of_25_classes_use_their_own_colours(tmp_path, fmt):
    from segcompare.data.labels import palette

    image = _half_red()
    Image.fromarray(image).save(tmp_path / "a.png")
    (written,) = predict_files(
        Predictor(KNet(25), WHOLE), [str(tmp_path / "a.png")], tmp_path / "out", fmt, False
    )
    result = np.asarray(Image.open(written))
    left, right = result[4:28, 4:28], result[4:28, 36:60]  # class 24 | class 0
    colours = palette(25)
    assert colours[24].any() and colours[24].tolist() not in PALETTE.tolist()
    expected = {
        "trainid": (24, 0),
        "color": (colours[24], colours[0]),
        "overlay": (
            np.round(0.5 * image[8, 8] + 0.5 * colours[24]),
            np.round(0.5 * image[8, 40] + 0.5 * colours[0]),
        ),
    }[fmt]
    assert (left == expected[0]).all() and (right == expected[1]).all()


def test_label_ids_are_refused_for_a_model_of_another_class_count(tmp_path):
    Image.fromarray(_half_red()).save(tmp_path / "a.png")
    out = tmp_path / "out"
    # a segcompare model: refused before any input is read (the missing one is not named)
    with pytest.raises(SegcompareError, match="5 classes: use --format trainid"):
        predict_files(Predictor(_tiny(5), WHOLE), [str(tmp_path / "none*.png")], out)
    # another module: at its first image, before anything is written
    with pytest.raises(SegcompareError, match="25 classes: use --format trainid"):
        predict_files(Predictor(KNet(25), WHOLE), [str(tmp_path / "a.png")], out, progress=False)
    assert not out.exists()
    with pytest.raises(SegcompareError, match="25 classes"):
        render_prediction(np.zeros((2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), "labelid", 25)


def test_predict_refuses_more_classes_than_8_bit_train_ids_hold():
    with pytest.raises(SegcompareError, match="256 classes.*predict_scores"):
        Predictor(KNet(256), WHOLE).predict(_half_red())
    assert Predictor(KNet(255), WHOLE).predict(_half_red())[8, 8] == 254


def test_legend_shows_the_classes_of_the_model(monkeypatch):
    from PIL import ImageDraw

    from segcompare.data.labels import CLASS_NAMES, palette
    from segcompare.infer.video import legend

    written = []
    draw_text = ImageDraw.ImageDraw.text

    def text(self, xy, string, *args, **kwargs):  # Pillow's own drawing, the names recorded
        written.append(string)
        return draw_text(self, xy, string, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    legend(600, 18, 19)
    assert written == list(CLASS_NAMES)
    written.clear()
    legend(600, 18, 25)
    assert written == [f"class_{i}" for i in range(25)]
    monkeypatch.undo()

    for k in (19, 5, 25):
        strip = legend(600, 18, k).reshape(-1, 3)
        shown = {tuple(c) for c in np.unique(strip, axis=0).tolist()}
        assert all(tuple(c) in shown for c in palette(k)[:k].tolist())  # every class's swatch
    # 25 names need more rows than 19, and a 5-class legend shows no Cityscapes colour (but
    # its greys: the text is antialiased)
    assert legend(600, 18, 25).shape[0] > legend(600, 18, 19).shape[0]
    five = {tuple(c) for c in np.unique(legend(600, 18, 5).reshape(-1, 3), axis=0).tolist()}
    assert not five & {tuple(c) for c in PALETTE.tolist() if len(set(c)) > 1}


def test_video_of_a_25_class_model_draws_its_colours(tmp_path):
    from segcompare.data.labels import palette

    frames = _frames(tmp_path / "stuttgart_00", n=1)
    out = tmp_path / "v.gif"
    render_video([Predictor(KNet(25), WHOLE)], frames, out, progress=False)
    with Image.open(out) as gif:
        frame = np.asarray(gif.convert("RGB")).astype(int)
    title_h = 14
    expected = 0.5 * np.array([255, 40, 0]) + 0.5 * palette(25)[24]  # class 24 over red
    assert np.abs(frame[title_h + 16, 64 + 8] - expected).max() <= 12


def test_video_refuses_models_of_different_class_counts(tmp_path):
    frames = _frames(tmp_path / "f", n=1)
    out = tmp_path / "v.gif"
    # segcompare models: before any frame is read (the missing source is not named)
    with pytest.raises(SegcompareError, match="different numbers of classes.*5.*19"):
        render_video([Predictor(_tiny(5), WHOLE), Predictor(_tiny(19), WHOLE)],
                     tmp_path / "missing", out, progress=False)
    # other modules: after their first call, before anything is written
    with pytest.raises(SegcompareError, match="different numbers of classes"):
        render_video([Predictor(KNet(25), WHOLE), Predictor(RedNet(), WHOLE)], frames, out,
                     progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if is_temporary(p)]


@pytest.mark.parametrize("extra", [[], ["--format", "labelid"]], ids=["default", "labelid"])
def test_predict_cli_refuses_label_ids_of_5_classes_in_one_line(synth, tmp_path, capsys, extra):
    from segcompare.models.save import save_weights

    weights = tmp_path / "k5.safetensors"
    save_weights(_tiny(5), weights)
    rc, _, err = _cli(
        capsys, "predict", "--weights", weights, synth / "city" / "leftImg8bit" / "val",
        "--out", tmp_path / "out", "--device", "cpu", *extra,
    )  # fmt: skip
    assert rc != 0 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("segcompare predict: error: --format labelid")
    assert "5 classes" in line and "--format trainid" in line
    assert not (tmp_path / "out").exists()
    rc, out, _ = _cli(
        capsys, "predict", "--weights", weights, synth / "city" / "leftImg8bit" / "val",
        "--out", tmp_path / "out", "--device", "cpu", "--mode", "whole", "--format", "trainid",
    )  # fmt: skip
    assert rc == 0 and "wrote 2 trainid file(s)" in out
    ids = np.concatenate([np.asarray(Image.open(p)).ravel() for p in tmp_path.glob("out/*/*")])
    assert ids.max() < 5


def test_compare_cli_refuses_a_5_class_model_before_any_step(synth, tmp_path, capsys):
    from segcompare.models.save import save_weights

    weights = tmp_path / "k5.safetensors"
    save_weights(_tiny(5), weights)
    rc, _, err = _cli(
        capsys, "compare", "--weights", synth / "b0.safetensors", "--weights", weights,
        "--data", synth / "city", "--out", tmp_path / "cmp", "--device", "cpu",
    )  # fmt: skip
    assert rc != 0 and "Traceback" not in err
    (line,) = [ln for ln in err.strip().splitlines() if "error:" in ln]
    assert "k5.safetensors" in line and "5 classes" in line
    assert not (tmp_path / "cmp").exists()


def test_predict_and_eval_say_what_each_layer_ran_in_below_fp32(synth, tmp_path, capsys):
    """--precision bf16: one line of what ran in which precision (which layers that is depends
    on this CPU's timings; the shape of the report does not), and eval's JSON holds it per
    layer. fp32 prints no such line."""
    import json

    images = synth / "city" / "leftImg8bit" / "val"
    common = ("--weights", synth / "b0.safetensors", "--device", "cpu", "--mode", "whole")
    rc, out, _ = _cli(capsys, "predict", images, "--out", tmp_path / "p", *common,
                      "--precision", "bf16")  # fmt: skip
    lines = [line for line in out.splitlines() if line.startswith("layer precision")]
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("layer precision at 1x3x64x128: ")
    rc, out, _ = _cli(capsys, "eval", "--data", synth / "city", *common, "--precision", "bf16",
                      "--json", tmp_path / "e.json")  # fmt: skip
    doc = json.loads((tmp_path / "e.json").read_text())
    assert rc == 0 and doc["precision"] == "bf16" and "layer precision at" in out
    rows = doc["layer_precision"][0]["layers"]
    roles = [row["role"] for row in rows]
    assert set(roles) == {"patch embeddings", "attention", "attention projections", "LayerNorm",
                          "Mix-FFN linears", "Mix-FFN depthwise", "decode head"}
    # the tiny B0 (one block per stage): 4 attentions; per stage the patch embedding's, norm1,
    # norm2, the reduction's (stages 1-3) and the closing LayerNorm: 5 + 5 + 5 + 4
    assert roles.count("attention") == 4 and roles.count("LayerNorm") == 19
    assert all(row["precision"] == "bf16" or row["why"] for row in rows)
    rc, out, _ = _cli(capsys, "predict", images, "--out", tmp_path / "q", *common)
    assert rc == 0 and "layer precision" not in out
