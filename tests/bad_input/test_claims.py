"""Inputs are what they claim (issue 22, 4.C): weights are floating point (C1), a HuggingFace
directory's config.json describes the model that is built (C2), and memory is estimated for what
really runs, the image's own size times the scales (C3). Class names: the class-table work."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_no_partial, assert_one_line_error
from PIL import Image

from segcompare.utils import SegcompareError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def retag(src: Path, dst: Path, key: str, dtype: str) -> Path:
    """A copy of safetensors `src` whose header calls tensor `key` `dtype`, bytes unchanged (the
    layout of the safetensors format: u64 header length, JSON header, data)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert header[key]["dtype"] == "F32"
    header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    dst.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    return dst


# --- C1: weights are floating point ------------------------------------------------------------
KEY = "decode_head.linear_pred.weight"


@pytest.fixture
def int_tagged(tiny_weights, tmp_path) -> Path:
    return retag(tiny_weights["segformer"], tmp_path / "i32.safetensors", KEY, "I32")


def test_a_header_calling_float32_int32_is_refused_by_eval(cli, int_tagged, tiny_data):
    rc, _, err = cli("eval", "--weights", int_tagged, "--data", tiny_data, "--device", "cpu")
    assert_one_line_error(rc, err, str(int_tagged), KEY, "int32", "floating point",
                          allow_log=True)


def test_convert_refuses_integer_weights_and_writes_nothing(cli, int_tagged, tmp_path):
    before = _digest(int_tagged)
    rc, _, err = cli("convert", int_tagged, tmp_path / "out.safetensors")
    assert_one_line_error(rc, err, KEY, "int32", allow_log=True)
    assert_no_partial(tmp_path / "out.safetensors")
    assert _digest(int_tagged) == before


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_load_weights_refuses_an_integer_state_dict(tiny_weights, dtype):
    from safetensors.torch import load_file

    from segcompare.models import build_model, load_weights

    model = build_model(weights=tiny_weights["segformer"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.to(dtype) for k, v in load_file(str(tiny_weights["segformer"])).items()}
    with pytest.raises(SegcompareError, match="floating point"):
        load_weights(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_batchnorm_counter_that_is_no_count_is_refused(tiny_weights):
    from safetensors.torch import load_file

    from segcompare.models import build_model, load_weights

    model = build_model(weights=tiny_weights["hrnet"])
    state = load_file(str(tiny_weights["hrnet"]))
    counter = next(k for k in state if k.endswith("num_batches_tracked"))
    load_weights(model, state)  # as saved: int64 counters
    for bad in (torch.tensor([1, 2, 3]), torch.tensor(1.5), torch.tensor(-1)):
        with pytest.raises(SegcompareError, match=counter.replace(".", r"\.")):
            load_weights(model, {**state, counter: bad})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_weights_still_load(tiny_weights, dtype):
    from safetensors.torch import load_file

    from segcompare.models import build_model, load_weights

    model = build_model(weights=tiny_weights["segformer"])
    state = {k: v.to(dtype) for k, v in load_file(str(tiny_weights["segformer"])).items()}
    load_weights(model, state)
    expected = state[KEY].float()
    assert torch.equal(model.state_dict()[KEY], expected)


# --- C2: a HuggingFace directory's config.json is read and checked -----------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from segcompare.models import build_model
    from segcompare.models.save import export_hf

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "b0"
    export_hf(build_model("segformer-b0"), out)
    return out


def _edited(hf_dir: Path, tmp_path: Path, change: dict, drop: tuple = ()) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(hf_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(change)
    for key in drop:
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "change, named",
    [
        ({"architectures": ["BeitForSemanticSegmentation"]}, "BeitForSemanticSegmentation"),
        ({"model_type": "beit"}, "model_type"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"layer_norm_eps": 1e-5}, "layer_norm_eps"),
        ({"num_attention_heads": [1, 2, 4, 8]}, "num_attention_heads"),
        ({"sr_ratios": [4, 2, 1, 1]}, "sr_ratios"),
        ({"strides": [4, 2, 2, 1]}, "strides"),
        ({"reshape_last_stage": False}, "reshape_last_stage"),
    ],
)
def test_a_config_of_another_model_is_refused(cli, hf_dir, tmp_path, tiny_data, change, named):
    edited = _edited(hf_dir, tmp_path, change)
    rc, _, err = cli("eval", "--weights", edited, "--data", tiny_data, "--device", "cpu")
    assert_one_line_error(rc, err, "config.json", named, allow_log=True)


def test_a_hf_directory_without_config_is_refused(cli, hf_dir, tmp_path, tiny_data):
    edited = _edited(hf_dir, tmp_path, {})
    (edited / "config.json").unlink()
    rc, _, err = cli("eval", "--weights", edited, "--data", tiny_data, "--device", "cpu")
    assert_one_line_error(rc, err, str(edited), "without config.json", allow_log=True)


def test_a_config_that_is_not_json_is_one_line(hf_dir, tmp_path):
    from segcompare.models import build_model

    edited = _edited(hf_dir, tmp_path, {})
    (edited / "config.json").write_text("{not json")
    with pytest.raises(SegcompareError, match="config.json: not valid JSON"):
        build_model(weights=edited)


def test_the_export_and_our_folder_without_config_still_load(hf_dir, tmp_path, tiny_weights):
    from segcompare.models import build_model

    model = build_model(weights=hf_dir)
    assert model.variant == "segformer-b0"
    # keys left out take transformers' defaults, which are segformer-b0's
    build_model(weights=_edited(hf_dir, tmp_path, {}, drop=("depths", "hidden_act")))
    ours = tmp_path / "ours"
    ours.mkdir()
    shutil.copy(tiny_weights["segformer"], ours / "model.safetensors")
    assert build_model(weights=ours).settings["depths"] == (1, 1, 1, 1)


# --- C3: memory for what really runs -----------------------------------------------------------
@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge_leftImg8bit.png"
    Image.fromarray(np.zeros((12000, 12000, 3), np.uint8)).save(path)  # 0.4 MB on disk
    return path


def test_a_huge_image_is_the_memory_line_with_the_figure(cli, huge_png, tiny_weights, tmp_path):
    rc, _, err = cli("predict", huge_png, "--weights", tiny_weights["segformer"], "--out",
                     tmp_path / "o", "--device", "cpu")
    assert_one_line_error(rc, err, "12000x12000", "GiB", allow_log=True)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.png"))


@pytest.mark.parametrize("scales", ["1e3", "1,1e3"])
def test_a_huge_test_scale_is_the_memory_line_with_the_figure(cli, tiny_data, tiny_weights,
                                                             tmp_path, scales):
    rc, _, err = cli("eval", "--weights", tiny_weights["segformer"], "--data", tiny_data,
                     "--device", "cpu", "--scales", scales, "--json", tmp_path / "r.json")
    assert_one_line_error(rc, err, "64000x128000", "GiB", allow_log=True)
    assert not (tmp_path / "r.json").exists()


def test_the_predictor_api_checks_memory_for_the_image_it_gets(tiny_weights):
    from segcompare.evaluate import InferenceSettings
    from segcompare.infer import Predictor
    from segcompare.models import build_model

    predictor = Predictor(build_model(weights=tiny_weights["segformer"]),
                          InferenceSettings(device="cpu", scales=(500.0,)))
    with pytest.raises(SegcompareError, match="GiB"):
        predictor.predict(np.zeros((64, 128, 3), np.uint8))
    ok = Predictor(build_model(weights=tiny_weights["segformer"]), InferenceSettings(device="cpu"))
    assert ok.predict(np.zeros((64, 128, 3), np.uint8)).shape == (64, 128)
