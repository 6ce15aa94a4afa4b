"""The bad-input battery, part A (issue 15): sliding windows (group 2), image modes (3), synth
targets (6), sizes and memory (7, 17), numeric arguments (18), the Python API (19) and which
errors the CLI prints as one line (20).

One parametrised case per situation, including those that already behaved; the helpers are in
conftest.py. Every CLI case asserts a non-zero exit, one stderr line naming the value at fault,
no traceback, and nothing written."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY_SEGFORMER = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)


# --- group 20: only SegcompareError (and argparse's) is a one-line user error -------------------
MISSING = "/nonexistent-segcompare-input"


@pytest.mark.parametrize(
    "argv, named",
    [
        (["stats", "no-such-model"], "no-such-model"),
        (["train", f"{MISSING}.yaml"], f"{MISSING}.yaml"),
        (["eval", "--weights", f"{MISSING}.safetensors", "--data", "{data}"], MISSING),
        (["eval", "--pred-dir", MISSING, "--data", "{data}"], MISSING),
        (["predict", "--weights", "{w}", f"{MISSING}.png", "--out", "{tmp}/o"], MISSING),
        (["video", "--weights", "{w}", MISSING, "--out", "{tmp}/v.gif"], MISSING),
        (["data", "check", MISSING], MISSING),
        (["data", "prepare", MISSING], MISSING),
        (["convert", f"{MISSING}.pth", "{tmp}/x.safetensors"], MISSING),
        (["export", "{tmp}/x.onnx", "--weights", f"{MISSING}.safetensors"], MISSING),
        (["eval", "--model", "segformer-b9", "--data", "{data}"], "segformer-b9"),
    ],
    ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None,
)
def test_missing_inputs_are_one_line(cli, tiny_data, tiny_weights, tmp_path, argv, named):
    fill = {"data": tiny_data, "w": tiny_weights["segformer"], "tmp": tmp_path}
    rc, _, err = cli(*[a.format(**fill) for a in argv])
    assert_one_line_error(rc, err, named, allow_log=True)
    assert list(tmp_path.iterdir()) == []


def test_a_bug_keeps_its_traceback(cli, monkeypatch):
    """A ValueError that is no SegcompareError is a bug: main lets it through."""
    import segcompare.stats

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(segcompare.stats, "model_stats", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli("stats", "segformer-b0")


def test_a_bug_in_a_subprocess_prints_a_traceback(tmp_path):
    """The same through `python -m segcompare`: exit 1 with the traceback, not one line."""
    (tmp_path / "sitecustomize.py").write_text(
        "import segcompare.data.synth\n"
        "def broken(*a, **k):\n    raise ValueError('an internal bug')\n"
        "segcompare.data.synth.make_synthetic_cityscapes = broken\n"
    )
    import os

    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    rc, _, err = run_cli("data", "synth", tmp_path / "cs", env=env)
    assert rc == 1 and "Traceback" in err and "an internal bug" in err
    assert not (tmp_path / "cs").exists()


def test_user_errors_stay_value_errors_for_the_python_api():
    from segcompare.evaluate import InferenceSettings
    from segcompare.models import build_model
    from segcompare.utils import SegcompareError

    for call in (lambda: build_model("no-such-model"), lambda: InferenceSettings(mode="tiles")):
        with pytest.raises(SegcompareError) as err:
            call()
        assert isinstance(err.value, ValueError)


# --- group 2: sliding windows -------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, named",
    [
        (["--window", "32x32", "--stride", "80x80"], "80x80"),
        (["--window", "64x64", "--stride", "32x65"], "32x65"),
        (["--stride", "80x80"], "80x80"),  # the recipe's window at 64x64 is 64x32
    ],
)
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_stride_larger_than_window_is_refused(cli, tiny_data, tiny_weights, tmp_path, command,
                                              extra, named):
    images = tiny_data / "leftImg8bit" / "val"
    where = [images, "--out", tmp_path / "o"] if command == "predict" else ["--data", tiny_data]
    rc, out, err = cli(command, "--weights", tiny_weights["segformer"], *where, "--device",
                       "cpu", "--mode", "slide", "--size", "64x64", *extra, "--json"
                       if command == "eval" else "--format", tmp_path / "r.json"
                       if command == "eval" else "logits")
    assert_one_line_error(rc, err, named, "window", allow_log=True)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.json").exists()


def test_stride_larger_than_window_in_the_api():
    from segcompare.evaluate import InferenceSettings
    from segcompare.utils import SegcompareError

    with pytest.raises(SegcompareError, match="stride 40x32 is larger than the window 32x32"):
        InferenceSettings("segformer", window_hw=(32, 32), stride_hw=(40, 32))
    settings = InferenceSettings("segformer", stride_hw=(600, 600))  # recipe window 1024 at 1024
    assert settings.windows_for((1024, 2048)) == ((1024, 1024), (600, 600))
    with pytest.raises(SegcompareError, match="stride 600x600 is larger than the window 512x512"):
        settings.windows_for((512, 1024))


def test_every_pixel_is_covered_for_any_accepted_window_and_stride():
    """For a grid of image sizes, windows and every stride up to the window, each output pixel
    gets scores (finite) and each window's scores land where the window was (the average of
    constant windows is that constant)."""
    from segcompare.evaluate import slide_inference

    checked = 0
    for h, w in [(5, 7), (17, 33), (64, 40)]:
        x = torch.zeros(1, 1, h, w)
        for wh, ww in [(1, 3), (4, 4), (8, 16), (70, 9)]:
            strides_h = {1, wh // 2 + 1, wh - 1, wh} - {0}
            for sh, sw in itertools.product(strides_h, {1, ww - 1, ww} - {0}):
                out = slide_inference(lambda c: torch.ones(1, 2, *c.shape[-2:]), x, (wh, ww),
                                      (sh, sw))
                assert out.shape == (1, 2, h, w)
                assert torch.isfinite(out).all() and (out == 1).all(), (h, w, wh, ww, sh, sw)
                checked += 1
    assert checked > 50


# --- group 3: every image mode becomes 8-bit RGB by its value range -----------------------------
def _mode_files(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """One small file per mode Pillow or OpenCV decodes, with the 8-bit RGB it stands for."""
    rng = np.random.default_rng(0)
    h, w = 40, 48
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    files = {}

    def add(mode, name, expected, write):
        path = folder / mode / name
        path.parent.mkdir(parents=True)
        write(path)
        files[mode] = (path, expected)

    bits = grey > 127
    add("1", "a.png", np.repeat(bits[..., None] * np.uint8(255), 3, 2),
        lambda p: Image.fromarray(bits).save(p))
    add("L", "a.png", np.dstack([grey] * 3), lambda p: Image.fromarray(grey).save(p))
    add("LA", "a.png", np.dstack([grey] * 3),
        lambda p: Image.fromarray(np.dstack([grey, 255 - grey]), "LA").save(p))
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = (grey % 16).astype(np.uint8)

    def write_p(p):
        im = Image.fromarray(index, "P")
        im.putpalette(palette.ravel().tolist())
        im.save(p)

    add("P", "a.png", palette[index], write_p)
    add("I;16", "a.png", np.dstack([grey] * 3),
        lambda p: Image.fromarray(grey.astype(np.uint16) * 257).save(p))
    add("I", "a.tif", np.dstack([grey] * 3),
        lambda p: Image.fromarray(grey.astype(np.int32) * 257).save(p))
    add("RGB", "a.png", rgb, lambda p: Image.fromarray(rgb).save(p))
    add("RGBA", "a.png", rgb, lambda p: Image.fromarray(np.dstack([rgb, grey]), "RGBA").save(p))
    add("RGB16", "a.png", rgb,  # OpenCV writes 16-bit colour PNGs (in its BGR order)
        lambda p: cv2.imwrite(str(p), rgb[..., ::-1].astype(np.uint16) * 257))
    return files


MODES = ["1", "L", "LA", "P", "I;16", "I", "RGB", "RGBA", "RGB16"]


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory):
    return _mode_files(tmp_path_factory.mktemp("modes"))


def _read_cityscapes(path):
    from segcompare.data.cityscapes import read_image

    return read_image(path)


def _read_predict(path):
    from segcompare.infer.predictor import load_image

    return load_image(path)


def _read_video(path):
    from segcompare.infer.video import iter_frames

    return next(iter_frames(path.parent))


@pytest.mark.parametrize("reader", [_read_cityscapes, _read_predict, _read_video],
                         ids=["data-pipeline", "predict", "video"])
@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_becomes_its_8bit_rgb(mode_files, mode, reader):
    path, expected = mode_files[mode]
    image = reader(path)
    assert image.dtype == np.uint8 and image.shape == expected.shape
    assert np.array_equal(image, expected)


def test_a_16bit_grey_image_is_predicted_as_its_8bit_twin(cli, mode_files, tiny_weights,
                                                          tmp_path):
    """`predict` on the I;16 file writes the same prediction as on the 8-bit L file (before: the
    prediction of an all-white image)."""
    outs = {}
    for mode in ("I;16", "L"):
        out = tmp_path / mode.replace(";", "")
        rc, _, err = cli("predict", "--weights", tiny_weights["segformer"], mode_files[mode][0],
                         "--out", out, "--device", "cpu", "--mode", "whole", "--format", "logits")
        assert rc == 0, err
        outs[mode] = np.load(out / "a.npy")
    assert np.array_equal(outs["I;16"], outs["L"])


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8), np.int64), "int64"),
        (np.full((8, 8), -1, np.int32), "-1"),
        (np.full((8, 8, 3), 2.0, np.float32), "floats must be in"),
        (np.full((8, 8, 3), np.nan, np.float32), "floats must be in"),
        (np.zeros((8, 8, 5), np.uint8), "(8, 8, 5)"),
        (np.zeros((2, 8, 8, 3), np.uint8), "(2, 8, 8, 3)"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
    ],
)
def test_pixels_of_no_image_type_are_refused(image, message):
    from segcompare.data.images import to_rgb8
    from segcompare.utils import SegcompareError

    with pytest.raises(SegcompareError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_rgb8(image)


# --- group 19: the Python API ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor():
    from segcompare.evaluate import InferenceSettings
    from segcompare.infer import Predictor
    from segcompare.models import build_model

    torch.manual_seed(0)
    model = build_model("segformer-b0", **TINY_SEGFORMER)
    return Predictor(model, InferenceSettings(device="cpu", mode="whole"))


@pytest.mark.parametrize(
    "image, named",
    [
        (np.zeros((3, 64, 64), np.uint8), "C×H×W"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((1, 1, 3), np.uint8), "32x32"),
        (np.zeros((16, 64, 3), np.uint8), "32x32"),
        (np.full((64, 64, 3), 255.0, np.float32), "floats must be in [0, 1]"),
        (torch.zeros(1, 3, 64, 64), "Predictor.scores"),
        (None, "NoneType"),
        ([[0, 1], [2, 3]], "list"),
    ],
    ids=["chw", "empty", "1x1", "16x64", "float-255", "tensor", "none", "list"],
)
@pytest.mark.parametrize("method", ["predict", "predict_scores"])
def test_predictor_says_what_it_accepts(predictor, method, image, named):
    from segcompare.utils import SegcompareError

    with pytest.raises(SegcompareError) as err:
        getattr(predictor, method)(image)
    assert named in str(err.value) and isinstance(err.value, ValueError)


def test_predictor_reads_float_in_0_1_and_rgba_as_the_8bit_rgb(predictor):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    expected = predictor.predict(rgb)
    assert np.array_equal(predictor.predict(rgb / 255.0), expected)  # float64 in [0, 1]
    assert np.array_equal(predictor.predict((rgb / 255.0).astype(np.float32)), expected)
    assert np.array_equal(predictor.predict(np.dstack([rgb, rgb[..., :1]])), expected)  # RGBA


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_build_model_refuses_a_class_count_below_one(num_classes):
    from segcompare.models import build_model
    from segcompare.utils import SegcompareError

    with pytest.raises(SegcompareError, match=f"num_classes .* got {num_classes!r}"):
        build_model("segformer-b0", num_classes=num_classes)


# --- groups 17 and 18: sizes the networks cannot take, numeric arguments ------------------------
@pytest.mark.parametrize(
    "argv, named",
    [
        (["stats", "segformer-b0", "--size", "1x1"], "1x1"),
        (["stats", "hrnet-w18-small-v1", "--size", "31x64"], "31x64"),
        (["bench", "segformer-b0", "--size", "16x16"], "16x16"),
        (["export", "{tmp}/x.onnx", "--model", "segformer-b0", "--size", "1x1"], "1x1"),
        (["predict", "--weights", "{w}", "{images}", "--out", "{tmp}/o", "--window", "16x16",
          "--mode", "slide"], "16x16"),
        (["eval", "--weights", "{w}", "--data", "{data}", "--size", "16x32"], "16x32"),
        (["train", "{repo}/configs/synthcity_segformer_b0.yaml", "--set",
          "data.crop_size=[8,8]", "--out", "{tmp}/run"], "data.crop_size"),
        (["stats", "segformer-b0", "--num-classes", "-1"], "--num-classes"),
        (["models", "--num-classes", "-1"], "--num-classes"),
        (["models", "--num-classes", "0"], "--num-classes"),
        (["convert", "{w}", "{tmp}/c.safetensors", "--num-classes", "-3"], "--num-classes"),
        (["convert", "{w}", "{tmp}/c.safetensors", "--num-classes", "0"], "--num-classes"),
        (["bench", "segformer-b0", "--iters", "0"], "--iters"),
        (["bench", "segformer-b0", "--iters", "-1"], "--iters"),
        (["bench", "segformer-b0", "--batch", "0"], "--batch"),
        (["bench", "segformer-b0", "--threads", "0"], "--threads"),
        (["bench", "segformer-b0", "--warmup", "-1"], "--warmup"),
        (["export", "{tmp}/x.onnx", "--model", "segformer-b0", "--opset", "3"], "--opset"),
        (["export", "{tmp}/x.onnx", "--model", "segformer-b0", "--opset", "999"], "--opset"),
        (["export", "{tmp}/x.onnx", "--model", "segformer-b0", "--batch", "0"], "--batch"),
        (["video", "--weights", "{w}", "{video}", "--out", "{tmp}/v.gif", "--every", "0"],
         "--every"),
        (["eval", "--weights", "{w}", "--data", "{data}", "--batch", "0"], "--batch"),
        (["stats", "segformer-b0", "--size", "0x64"], "0x64"),
        (["data", "check", "{data}", "--workers", "-1"], "--workers"),
        (["data", "prepare", "{data}", "--workers", "-1"], "--workers"),
        (["compare", "--weights", "{w}", "--data", "{data}", "--out", "{tmp}/c", "--bench-iters",
          "0"], "--bench-iters"),
        (["video", "--weights", "{w}", "{video}", "--out", "{tmp}/v.gif", "--fps", "0"], "--fps"),
    ],
    ids=lambda v: " ".join(v[:3] + v[-2:]) if isinstance(v, list) else None,
)
def test_sizes_and_numbers_out_of_range_are_one_line(cli, tiny_data, tiny_weights, tmp_path,
                                                     monkeypatch, argv, named):
    work = tmp_path / "cwd"  # the current folder too: a stray write there is seen, not lost
    work.mkdir()
    monkeypatch.chdir(work)
    fill = {"data": tiny_data, "w": tiny_weights["segformer"], "tmp": tmp_path, "repo": REPO,
            "images": tiny_data / "leftImg8bit" / "val",
            "video": tiny_data / "leftImg8bit_demoVideo" / "stuttgart_00"}
    rc, _, err = cli(*[a.format(**fill) for a in argv], *(
        ["--device", "cpu"] if argv[0] in ("predict", "eval", "video", "compare") else []))
    assert_one_line_error(rc, err, named, allow_log=True)
    assert list(tmp_path.iterdir()) == [work] and list(work.iterdir()) == []


# --- group 5: trainId PNGs given to eval --pred-dir --------------------------------------------
def _predictions(tiny_data: Path, out: Path, train_ids: bool) -> Path:
    """The val ground truth written as prediction PNGs: labelIds as they are, or as trainIds."""
    from segcompare.data.labels import ID_TO_TRAIN_ID

    for gt in sorted((tiny_data / "gtFine" / "val").rglob("*_gtFine_labelIds.png")):
        ids = np.array(Image.open(gt))
        name = gt.name.replace("_gtFine_labelIds.png", "_leftImg8bit.png")
        (out / gt.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ID_TO_TRAIN_ID[ids] if train_ids else ids).save(out / gt.parent.name / name)
    return out


def test_eval_pred_dir_refuses_train_id_pngs(cli, tiny_data, tmp_path):
    pred = _predictions(tiny_data, tmp_path / "pred", train_ids=True)
    rc, out, err = cli("eval", "--pred-dir", pred, "--data", tiny_data, "--workers", 0,
                       "--json", tmp_path / "r.json")
    line = assert_one_line_error(rc, err, "trainIds", "TRAIN_ID_TO_ID", allow_log=True)
    assert str(pred) in line and "mIoU" not in out
    assert not (tmp_path / "r.json").exists()


def test_eval_pred_dir_still_scores_label_id_pngs(cli, tiny_data, tmp_path):
    """The control: the same ground truth as labelIds scores mIoU 100 (nothing flagged)."""
    import json

    pred = _predictions(tiny_data, tmp_path / "pred", train_ids=False)
    rc, _, err = cli("eval", "--pred-dir", pred, "--data", tiny_data, "--workers", 0,
                     "--json", tmp_path / "r.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["miou"] == pytest.approx(1.0)


# --- group 6: data synth never overwrites a data set, never leaves a partial one ---------------
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_synth_refuses_a_folder_that_holds_a_data_set(cli, tiny_data, tmp_path):
    target = tmp_path / "cs"
    shutil.copytree(tiny_data, target)
    before = _tree(target)
    rc, _, err = cli("data", "synth", target, "--train", 1, "--val", 0, "--size", "64x64")
    assert_one_line_error(rc, err, str(target), "--overwrite")
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["cs"]  # no temporary folder left


def test_synth_overwrite_replaces_same_names_and_keeps_the_rest(cli, tmp_path):
    target = tmp_path / "cs"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    rc, out, err = cli("data", "synth", target, "--train", 1, "--val", 0, "--size", "64x64",
                       "--overwrite")
    assert rc == 0, err
    assert (target / "notes.txt").read_text() == "mine"
    assert len(list((target / "leftImg8bit" / "train").rglob("*.png"))) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["cs"]


def test_synth_into_an_empty_folder_and_a_new_one(cli, tmp_path):
    for target in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        if target.name == "empty":
            target.mkdir()
        rc, _, err = cli("data", "synth", target, "--train", 1, "--val", 0, "--size", "64x64")
        assert rc == 0, err
        # image, color, labelIds, instanceIds, polygons, and the list of them that a later
        # --overwrite replaces (.segcompare-outputs)
        assert len(_tree(target)) == 6


@pytest.mark.parametrize("fail_after", [0, 2])
def test_a_failing_synthesis_leaves_nothing(tmp_path, monkeypatch, fail_after):
    from segcompare.data.synth import io

    real, calls = io.write_sample, []

    def write_then_fail(*args):
        if len(calls) == fail_after:
            raise KeyboardInterrupt  # as a Ctrl-C between two samples
        calls.append(1)
        real(*args)

    monkeypatch.setattr(io, "write_sample", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        io.make_synthetic_cityscapes(tmp_path / "cs", train=3, val=0, size=(64, 64))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--size", "100000x100000"], "100000x100000"),
        (["--size", "16x64"], "16x64"),
        (["--size", "64"], "64"),
        (["--train", "-1"], "--train"),
    ],
)
def test_synth_sizes_and_counts_out_of_range_are_one_line(cli, tmp_path, argv, named):
    rc, _, err = cli("data", "synth", tmp_path / "cs", *argv)
    assert_one_line_error(rc, err, named)
    assert list(tmp_path.iterdir()) == []


# --- group 7: memory estimated before allocating; decompression bombs are bad files ------------
def _bomb(path: Path, side: int = 100_000) -> Path:
    """A valid PNG whose header claims side×side RGB pixels (its data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def bombed(tiny_data, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny set whose first val image is a decompression bomb: (root, bomb)."""
    root = tmp_path / "cs"
    shutil.copytree(tiny_data, root)
    first = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    return root, _bomb(first)


def test_data_check_reports_a_bomb_as_a_bad_file(cli, bombed):
    root, bomb = bombed
    rc, out, err = cli("data", "check", root, "--workers", 0)
    assert rc == 1 and "Traceback" not in err
    assert [line for line in out.splitlines() if str(bomb) in line]


@pytest.mark.parametrize("command", ["predict", "video", "eval"])
def test_a_bomb_is_one_line_naming_the_file(cli, bombed, tiny_weights, tmp_path, command):
    root, bomb = bombed
    out = tmp_path / "out"
    where = {
        "predict": [bomb, "--out", out],
        "video": [bomb.parent, "--out", out / "v.gif"],
        "eval": ["--data", root, "--workers", 0, "--json", out / "r.json"],
    }[command]
    rc, _, err = cli(command, "--weights", tiny_weights["segformer"], *where, "--device", "cpu",
                     "--mode", "whole")
    assert_one_line_error(rc, err, str(bomb), allow_log=True)
    assert not out.exists() or not any(out.rglob("*"))  # (video makes the folder, empty)


def test_a_bomb_read_by_the_data_pipeline_is_a_bad_sample(tmp_path):
    from segcompare.data.cityscapes import BadSampleError, read_image, read_label

    bomb = _bomb(tmp_path / "x.png")
    for read in (read_image, read_label):
        with pytest.raises(BadSampleError, match="x.png"):
            read(bomb)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "segformer-b0", "--size", "100000x100000"],
        ["export", "{tmp}/x.onnx", "--model", "hrnet-w18-small-v1", "--size", "100000x100000"],
    ],
    ids=["bench", "export"],
)
def test_a_forward_larger_than_memory_is_refused_with_the_figure(cli, tmp_path, monkeypatch,
                                                                 argv):
    import tempfile

    out, work, temp = tmp_path / "out", tmp_path / "cwd", tmp_path / "tmp"
    for folder in (out, work, temp):
        folder.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where a temporary without a place goes
    rc, _, err = cli(*[a.format(tmp=out) for a in argv])
    line = assert_one_line_error(rc, err, "100000x100000", "GiB", allow_log=True)
    assert "available" in line
    left = [p for p in tmp_path.rglob("*") if not p.is_dir()]
    assert left == [], f"left behind: {left}"  # no x.onnx, no temporary, anywhere


def test_available_memory_honours_an_address_space_limit():
    """Under `ulimit -v` the room is at most the limit less what the process already maps."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from segcompare.utils import available_memory, _read_kib_fields\n"
        "used = _read_kib_fields('/proc/self/status')['VmSize']\n"
        "limit = used + 300 * 2**20\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "print(available_memory() <= 300 * 2**20, available_memory() > 100 * 2**20)\n"
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc on this system")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.stdout.split() == ["True", "True"], proc.stderr


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_test_size_larger_than_memory_is_refused_with_the_figure(cli, tiny_data, tiny_weights,
                                                                   tmp_path, command):
    where = ([tiny_data / "leftImg8bit" / "val", "--out", tmp_path / "o"]
             if command == "predict" else ["--data", tiny_data, "--workers", 0])
    rc, _, err = cli(command, "--weights", tiny_weights["segformer"], *where, "--device", "cpu",
                     "--mode", "whole", "--size", "100000x100000")
    line = assert_one_line_error(rc, err, "100000x100000", "GiB", allow_log=True)
    assert "available" in line and list(tmp_path.iterdir()) == []


# --- the battery's own helpers ------------------------------------------------------------------
def test_readonly_and_full_helpers_refuse_writes(readonly_dir, full_fs):
    for folder in (readonly_dir, full_fs):
        with pytest.raises(OSError):
            (folder / "x").write_bytes(b"\0" * 65536)
