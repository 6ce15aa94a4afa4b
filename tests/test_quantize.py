"""--precision int8 (segcompare/infer/quantize.py): where it is offered and refused, its
calibration images, the cache of calibration statistics (tensors only), and, slow, the whole
path through `segcompare eval` with inductor's int8 kernels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from segcompare.utils import SegcompareError

SIZE = (64, 128)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segcompare.data.synth import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("synthcity")
    make_synthetic_cityscapes(root, train=6, val=2, size=SIZE, seed=0)
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "segcompare" / "int8"


def _hrnet(num_classes: int = 5):
    from segcompare.models import build_model

    torch.manual_seed(0)
    return build_model("hrnet-w18-small-v1", num_classes=num_classes).eval()


def _cli(capsys, *argv):
    from segcompare.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --- where int8 is offered ----------------------------------------------------------------------


def test_segformer_is_refused_with_the_measurement(synth, capsys, cache) -> None:
    rc, _, err = _cli(capsys, "eval", "--model", "segformer-b0", "--data", synth,
                      "--precision", "int8", "--workers", "0")
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("segcompare eval: error: --precision int8 is not offered for "
                           "segformer (segformer-b0): slower than fp32"), err
    assert not cache.exists()


def test_a_cpu_without_vnni_is_refused_with_the_measurement(synth, capsys, cache,
                                                           monkeypatch) -> None:
    """No int8 dot products (AVX2 only): int8 took 1.05x of fp32's time, so it is refused there,
    for every family, in one line naming the CPU and the figure."""
    from segcompare.models import precision

    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: False)
    rc, _, err = _cli(capsys, "eval", "--model", "hrnet-w18-small-v1", "--data", synth,
                      "--precision", "int8", "--calib", synth, "--workers", "0")
    assert rc == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("segcompare eval: error: --precision int8 is not offered on a CPU "
                           "without VNNI ("), err
    assert "1.05x of fp32's time" in line and line.endswith("use fp32"), line
    assert not cache.exists()


def test_predict_without_calibration_images_is_one_line(synth, tmp_path, capsys, cache) -> None:
    images = synth / "leftImg8bit" / "val"
    rc, _, err = _cli(capsys, "predict", "--model", "hrnet-w18-small-v1", images,
                      "--out", tmp_path / "out", "--precision", "int8")
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith(
        "segcompare predict: error: --precision int8 needs calibration images: --calib DIR"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, says", [
    ("--calib", "missing", "--calib {tmp}/missing: not a folder"),
    ("--calib", "empty", "--calib {tmp}/empty: no images"),
])
def test_bad_calibration_values_are_one_line(synth, tmp_path, capsys, cache, flag, value,
                                             says) -> None:
    (tmp_path / "empty").mkdir()
    args = {"--calib": str(synth), "--calib-images": "2"}
    args[flag] = str(tmp_path / value) if flag == "--calib" else value
    rc, _, err = _cli(capsys, "eval", "--model", "hrnet-w18-small-v1", "--data", synth,
                      "--precision", "int8", "--workers", "0", *[v for kv in args.items()
                                                                  for v in kv])
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith(
        "segcompare eval: error: " + says.format(tmp=tmp_path)), err


def test_bench_int8_needs_calibration(capsys) -> None:
    rc, _, err = _cli(capsys, "bench", "hrnet-w18-small-v1", "--size", "64x128",
                      "--precision", "int8")
    assert rc == 1
    assert "--precision int8 needs calibration images" in err.strip().splitlines()[-1]


# --- calibration images -------------------------------------------------------------------------


def test_calibration_reads_the_train_split_spread_evenly(synth, tmp_path) -> None:
    from segcompare.infer.quantize import Calibration

    train = sorted((synth / "leftImg8bit" / "train").rglob("*.png"))
    assert len(train) == 6
    calib = Calibration(synth, 3)
    assert calib.files == [train[0], train[2], train[4]]
    assert Calibration(synth, 50).files == train  # no more than there are
    # a plain folder of images, searched recursively
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, path in enumerate(train[:2]):
        (tmp_path / "a" / ("b" if i else "") / f"{i}.png").write_bytes(path.read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert [p.name for p in Calibration(tmp_path / "a", 8).files] == ["0.png", "1.png"]
    with pytest.raises(SegcompareError, match="--calib-images 0: must be 1 or more"):
        Calibration(synth, 0)
    tensors = Calibration(synth, 2).tensors((32, 48))
    assert [tuple(t.shape) for t in tensors] == [(1, 3, 32, 48)] * 2


def test_the_cache_key_follows_images_weights_and_size(synth, tmp_path) -> None:
    from segcompare.infer.fast import prepare_for_inference
    from segcompare.infer.quantize import Calibration, Int8Model

    model = _hrnet()
    calib = Calibration(synth, 2)
    q = Int8Model(prepare_for_inference(model), model, calib, cache=tmp_path)
    first = q.cache_file(SIZE)
    assert first == q.cache_file(SIZE)
    assert q.cache_file((32, 64)) != first
    other = _hrnet()
    with torch.no_grad():
        other.last_layer[-1].bias.add_(1)
    assert Int8Model(prepare_for_inference(other), other, calib, cache=tmp_path
                     ).cache_file(SIZE) != first
    copy = tmp_path / "copy"
    copy.mkdir()
    for i, path in enumerate(calib.files):
        data = path.read_bytes()
        (copy / f"{i}.png").write_bytes(data)
    same = Int8Model(prepare_for_inference(model), model, Calibration(copy, 2), cache=tmp_path)
    assert same.cache_file(SIZE) == first  # the images' bytes, not their names
    from PIL import Image

    with Image.open(copy / "1.png") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(copy / "1.png")
    changed = Int8Model(prepare_for_inference(model), model, Calibration(copy, 2), cache=tmp_path)
    assert changed.cache_file(SIZE) != first


def test_cached_statistics_give_the_same_int8_graph(synth, tmp_path, capsys) -> None:
    """Calibrate once: the statistics are written as safetensors (tensors only); a second model
    reads them instead of calibrating and gives the same logits; a damaged file is said and
    calibrated again. The int8 graph is really quantized: close to fp32, not equal."""
    from safetensors.torch import load_file

    from segcompare.infer.fast import prepare_for_inference
    from segcompare.infer.quantize import Calibration, Int8Model

    model = _hrnet()
    prepared = prepare_for_inference(model)
    x = Calibration(synth / "leftImg8bit" / "val", 1).tensors(SIZE)[0]

    def quantized() -> tuple[torch.Tensor, str]:
        nonlocal q
        q = Int8Model(prepared, model, Calibration(synth, 3), cache=tmp_path)
        with torch.no_grad():
            out = q._quantize(SIZE)(x)
        return out, capsys.readouterr().err

    q = None
    with torch.no_grad():
        fp32 = prepared(x)
    first, err = quantized()
    assert "calibrated on 3 image(s)" in err, err
    # every convolution of the prepared model is in the report, in int8
    (report,) = q.layer_precision()
    convs = [n for n, m in prepared.named_modules() if isinstance(m, torch.nn.Conv2d)
             or type(m).__name__ == "FusedConv"]
    assert report["input"] == [1, 3, *SIZE]
    assert sorted(r["name"] for r in report["layers"]) == sorted(convs)
    assert {r["precision"] for r in report["layers"]} == {"int8"}
    roles = [r["role"] for r in report["layers"]]
    assert roles.count("decode head") == sum(".head." in n for n in convs) > 0
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    stats = load_file(str(files[0]))
    assert stats and all(k.startswith("activation_post_process_") for k in stats)
    again, err = quantized()
    assert f"calibration statistics from {files[0]}" in err, err
    assert torch.equal(again, first)  # the same scales: the same int8 graph
    rel = ((first - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 0.05, rel
    files[0].write_bytes(b"not safetensors")
    third, err = quantized()
    assert "cannot read" in err or "calibrated on 3 image(s)" in err, err
    assert torch.equal(third, first)
    assert load_file(str(files[0]))  # replaced by a good one
    # the same tensors made for another graph (another observer on each tensor): recalibrated
    from safetensors.torch import save_file

    save_file(load_file(str(files[0])), str(files[0]), metadata={"graph": "another"})
    fourth, err = quantized()
    assert "calibrated on 3 image(s)" in err, err
    assert torch.equal(fourth, first)


# --- the whole path -----------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_int8_compiles_reports_and_reuses_the_calibration(synth, tmp_path, capsys,
                                                              cache) -> None:
    """eval --precision int8 on an HRNet: the calibration (on --data's train split) and compile
    lines, one layer-precision line with every convolution in int8, and the run recorded; a
    second run reads the cached statistics. Its mIoU matches the fp32 run's to a point."""
    from segcompare.models.save import save_weights

    weights = tmp_path / "hrnet.safetensors"
    save_weights(_hrnet(19), weights)
    common = ["eval", "--weights", weights, "--data", synth, "--workers", "0", "--mode", "whole"]
    rc, out32, _ = _cli(capsys, *common, "--json", tmp_path / "fp32.json")
    assert rc == 0
    rc, out, err = _cli(capsys, *common, "--precision", "int8", "--calib-images", "4",
                        "--json", tmp_path / "int8.json")
    assert rc == 0, err
    assert re.search(r"int8 hrnet-w18-small-v1 at 64x128: calibrated on 4 image\(s\) of "
                     rf"{re.escape(str(synth))} in \d+ s \(cached: {re.escape(str(cache))}/", err)
    assert re.search(r"int8 hrnet-w18-small-v1 at 64x128: compiled in \d+ s", err), err
    layers = [line for line in out.splitlines() if line.startswith("layer precision")]
    assert len(layers) == 1 and re.fullmatch(
        r"layer precision at 1x3x64x128: int8: \d+ convs, \d+ decode head", layers[0]
    ), layers
    import json

    doc = json.loads((tmp_path / "int8.json").read_text())
    base = json.loads((tmp_path / "fp32.json").read_text())
    assert doc["precision"] == "int8" and doc["calib"] == str(synth)
    assert doc["calib_images"] == 4
    assert abs(doc["miou"] - base["miou"]) < 0.01, (doc["miou"], base["miou"])
    rc, _, err = _cli(capsys, *common, "--precision", "int8", "--calib-images", "4")
    assert rc == 0
    assert "calibration statistics from" in err and "calibrated on" not in err, err


def test_compare_report_says_how_int8_ran() -> None:
    from segcompare.compare.report import describe_inference
    from segcompare.evaluate import InferenceSettings

    inference = InferenceSettings(precision="int8", calib="data/city", calib_images=32).describe()
    words = describe_inference({**inference, "calib_images": 20})  # what compare records: used
    assert "int8 convolutions (PT2E, calibrated on 20 images of data/city)" in words, words
    assert words.endswith("compiled by inductor"), words
    fp32 = describe_inference(InferenceSettings().describe())
    assert "calib" not in fp32 and fp32.endswith("through prepare_for_inference"), fp32


@pytest.mark.slow
def test_bench_int8_times_int8_beside_our_fp32(synth, tmp_path, capsys, cache) -> None:
    import json

    rc, out, err = _cli(capsys, "bench", "hrnet-w18-small-v1", "--size", "64x128",
                        "--precision", "int8", "--calib", synth, "--calib-images", "2",
                        "--warmup", "1", "--iters", "1", "--json", tmp_path / "b.json")
    assert rc == 0, err
    doc = json.loads((tmp_path / "b.json").read_text())
    assert [r["name"] for r in doc["models"]] == ["hrnet-w18-small-v1",
                                                  "hrnet-w18-small-v1 (fp32)"]
    assert doc["meta"]["dtype"] == "int8"
    assert all(r["latency_ms"] > 0 for r in doc["models"])
    assert re.search(r"hrnet-w18-small-v1: layer precision at 1x3x64x128: int8: \d+ convs", out)
