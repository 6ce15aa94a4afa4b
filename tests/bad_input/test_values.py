"""The one value rule (issue 22, 4.B): every number and list from a recipe, `--set`, the command
line or the Python API is checked against one table (segcompare.values.RULES); the message
names the key and shows at most ~200 characters of the value.

Groups: recipe values (B1), model settings (B2), YAML as a recipe is written (B3), command-line
numbers (B4), devices (B5), the Python API (B6), the table itself (B7)."""

from __future__ import annotations

import math
import shutil
import tracemalloc
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error

from segcompare.config import load_config
from segcompare.utils import SegcompareError

# The table's figures, read here so that each test below fails alone on code without the table.
try:
    from segcompare.values import CPUS, MAX_WORKERS, RULES, SHOWN, check
except ImportError:  # before the one value rule: its tests fail, each for its own reason
    CPUS, MAX_WORKERS, RULES, SHOWN, check = 2, 8, {}, 200, None

TINY = {"model": {"name": "segformer-b0"}, "train": {"max_iters": 10}}


def _recipe(tmp_path: Path, text: str = "", name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text or yaml.safe_dump(TINY))
    return path


def _refused(path: Path, *overrides: str) -> str:
    with pytest.raises(SegcompareError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


# --- B1: recipe values and --set ---------------------------------------------------------------
@pytest.mark.parametrize(
    "override, named",
    [
        ("train.num_workers=100000", ["train.num_workers", f"[0, {MAX_WORKERS}]", f"has {CPUS}",
                                      "100000"]),
        ("optim.lr=.inf", ["optim.lr", "finite", "inf"]),
        ("optim.lr=.nan", ["optim.lr", "nan"]),
        ("optim.lr=-1e-3", ["optim.lr", "(0, "]),
        ("optim.betas=[0.9,.inf]", ["optim.betas", "inf"]),
        ("optim.momentum=1.5", ["optim.momentum", "[0, 1]"]),
        ("train.class_weights=[.nan" + ",1" * 18 + "]", ["train.class_weights", "nan"]),
        ("train.class_weights=[-1" + ",1" * 18 + "]", ["train.class_weights", "-1"]),
        ("train.seed=-1", ["train.seed", "-1", "4294967295"]),
        ("train.seed=4294967296", ["train.seed", "4294967296"]),
        ("train.threads=0", ["train.threads", "0"]),
        ("train.batch_size=true", ["train.batch_size", "True"]),
        ("train.max_iters=1e400", ["train.max_iters"]),
        ("data.scale_range=[0.5,.inf]", ["data.scale_range", "inf"]),
        ("data.scale_range=[2.0,0.5]", ["data.scale_range", "low <= high"]),
        ("data.crop_size=[512,-512]", ["data.crop_size", "-512"]),
        ("data.ignore_index=256", ["data.ignore_index", "256"]),
        ("train.ohem_threshold=.nan", ["train.ohem_threshold", "nan"]),
        ("optim.no_decay=[1,2]", ["optim.no_decay", "strings"]),
        ("model.overrides=5", ["model.overrides", "mapping"]),
        # found by test_fuzz.py: YAML reads the escape of U+10000 as two unpaired halves
        ('data.root="\\ud800\\udc00"', ["data.root", "unpaired surrogate"]),
    ],
)
def test_recipe_values_out_of_range_name_the_key(tmp_path, override, named):
    message = _refused(_recipe(tmp_path), override)
    for word in named:
        assert word in message, (word, message)


def test_a_long_bad_value_is_shown_cut_to_a_short_line(tmp_path):
    message = _refused(_recipe(tmp_path), "train.max_iters=" + "9x" * 5000)
    assert "train.max_iters" in message and "characters)" in message
    assert len(message) < SHOWN + 250, len(message)


def test_valid_recipes_still_load_with_their_numbers(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["optim.lr=6e-5", "train.amp=off", "train.threads=1",
                                          "train.class_weights=null", "data.scale_range=[0.5,2]"])
    assert cfg.optim.lr == 6e-5 and cfg.train.amp == "off" and cfg.train.threads == 1
    assert cfg.data.scale_range == (0.5, 2.0)


# --- B2: a model's settings are shaped as the variant's own ----------------------------------
@pytest.mark.parametrize(
    "override, named",
    [
        ("model.overrides.embed_dims=[32,64,160]", ["model.overrides.embed_dims", "4 values"]),
        ('model.overrides.depths=[1,1,"1",1]', ["model.overrides.depths", "integer", "'1'"]),
        ("model.overrides.depths=[1,1,1,1,1]", ["model.overrides.depths", "4 values"]),
        ("model.overrides.drop_path_rate=.nan", ["model.overrides.drop_path_rate", "nan"]),
        ("model.overrides.num_heads=[1,2,5,7]", ["num_heads[3]", "multiple"]),
        ("model.overrides.qkv_bias=1", ["model.overrides.qkv_bias", "true or false"]),
        ("model.overrides.depths=4", ["model.overrides.depths", "4 values"]),
        ("model.overrides.widths=[1]", ["widths", "valid"]),
    ],
)
def test_model_settings_of_another_shape_are_refused(tmp_path, override, named):
    message = _refused(_recipe(tmp_path), override)
    for word in named:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "name, settings, named",
    [
        ("segformer-b0", dict(embed_dims=(32, 64, 160)), "embed_dims"),
        ("segformer-b0", dict(depths=[1, 1, "1", 1]), "depths"),
        ("segformer-b0", dict(mlp_ratios=(4, 4, 4, 0)), "mlp_ratios"),
        ("hrnet-w18-small-v1", dict(stage2=dict(
            num_modules=1, num_branches=3, block="BASIC", num_blocks=(2, 2),
            num_channels=(16, 32), fuse_method="SUM")), "stage2.num_branches"),
        ("hrnet-w18-small-v1", dict(stage2=dict(
            num_modules=1, num_branches=2, block="BASICX", num_blocks=(2, 2),
            num_channels=(16, 32), fuse_method="SUM")), "stage2.block"),
        ("hrnet-w18-small-v1", dict(stage2=dict(num_modules=1)), "stage2"),
        ("hrnet-w18-small-v1", dict(bn_momentum=float("inf")), "bn_momentum"),
    ],
)
def test_build_model_checks_settings_by_the_same_rule(name, settings, named):
    from segcompare.models import build_model

    with pytest.raises(SegcompareError, match=named.replace(".", r"\.")):
        build_model(name, **settings)


def test_settings_shaped_as_the_variant_still_build():
    import torch

    from segcompare.models import build_model

    with torch.device("meta"):
        model = build_model("segformer-b0", depths=[1, 1, 1, 1], embed_dims=[16, 32, 40, 64])
    assert model.settings["depths"] == (1, 1, 1, 1)
    assert len(model.backbone.block1) == 1 and model.backbone.patch_embed4.proj.out_channels == 64


# --- B3: YAML as recipes are written -----------------------------------------------------------
@pytest.mark.parametrize(
    "text, named",
    [
        ("model:\n  name: segformer-b0\ntrain:\n  max_iters: 3\ntrain:\n  seed: 1\n",
         ["'train'", "twice", "lines 3 and 5"]),
        ("model:\n  name: segformer-b0\n  name: hrnet-w48\n", ["'name'", "twice"]),
        ("model: {name: segformer-b0, name: hrnet-w48}\n", ["'name'", "twice"]),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, text, named):
    message = _refused(_recipe(tmp_path, text))
    for word in named:
        assert word in message, (word, message)


def test_a_key_given_twice_in_set_is_refused(tmp_path):
    message = _refused(_recipe(tmp_path), "model.overrides={depths: [1,1,1,1], depths: [2,2,2,2]}")
    assert "--set model.overrides" in message and "twice" in message


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: segformer-b0  # café\n".encode("latin-1"))
    message = _refused(path)
    assert str(path) in message and "UTF-8" in message and "0xe9" in message


ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefghi", "bcdefghij")
)


def test_an_alias_bomb_is_one_short_line_in_bounded_memory(tmp_path):
    path = _recipe(tmp_path, ALIAS_BOMB)
    assert path.stat().st_size < 400  # 9**10 elements once expanded
    tracemalloc.start()
    try:
        message = _refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "alias" in message and "line 2" in message
    assert len(message) < 300
    assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_an_alias_in_set_is_refused(tmp_path):
    message = _refused(_recipe(tmp_path), "train.class_weights=[&w 1, *w]")
    assert "--set train.class_weights" in message and "alias" in message


@pytest.mark.parametrize("text", ["[" * 5000, "model:\n  name: [unclosed\n", "a: b: c\n"])
def test_broken_yaml_is_one_line(tmp_path, text):
    message = _refused(_recipe(tmp_path, text))
    assert "not valid YAML" in message and len(message) < SHOWN + 200


def test_a_huge_recipe_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    assert "bytes" in _refused(path)


def test_the_shipped_recipes_still_load():
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        load_config(path)


# --- B4: the command line's numbers -----------------------------------------------------------
@pytest.mark.parametrize(
    "argv, named",
    [
        (["eval", "--weights", "{w}", "--data", "{data}", "--scales", "nan"], "--scales"),
        (["eval", "--weights", "{w}", "--data", "{data}", "--scales", "1,inf"], "--scales"),
        (["eval", "--weights", "{w}", "--data", "{data}", "--scales", ","], "--scales"),
        (["predict", "{img}", "--weights", "{w}", "--out", "{tmp}/o", "--scales=-inf"],
         "-inf"),
        (["video", "--weights", "{w}", "{video}", "--out", "{tmp}/v.gif", "--fps", "nan"],
         "--fps"),
        (["video", "--weights", "{w}", "{video}", "--out", "{tmp}/v.gif", "--fps", "inf"],
         "--fps"),
        (["video", "--weights", "{w}", "{video}", "--out", "{tmp}/v.gif", "--max-frames", "0"],
         "--max-frames"),
        (["video", "--weights", "{w}", "{video}", "--out", "{tmp}/v.gif", "--max-width", "-5"],
         "--max-width"),
        (["data", "synth", "{tmp}/s", "--seed", "-1"], "--seed"),
        (["data", "synth", "{tmp}/s", "--train", "-3"], "--train"),
        (["data", "synth", "{tmp}/s", "--size", "64xnan"], "--size"),
        (["eval", "--weights", "{w}", "--data", "{data}", "--workers", "100000"], "--workers"),
        (["compare", "--weights", "{w}", "--data", "{data}", "--out", "{tmp}/c",
          "--boundary-frac", "nan"], "--boundary-frac"),
        (["compare", "--weights", "{w}", "--data", "{data}", "--out", "{tmp}/c",
          "--max-images", "0"], "--max-images"),
        (["stats", "segformer-b0", "--size", "64x1e3"], "--size"),
        (["bench", "segformer-b0", "--threads", "100000"], "--threads"),
        (["models", "--num-classes", "nan"], "--num-classes"),
        (["export", "{tmp}/x.onnx", "--model", "segformer-b0", "--opset", "16"], "--opset"),
        (["export", "{tmp}/x.onnx", "--model", "segformer-b0", "--opset", "21"], "--opset"),
        (["export", "{tmp}/x.onnx", "--model", "segformer-b0", "--opset", "17.5"], "--opset"),
        (["compare", "--model", "segformer-b0", "--data", "{data}", "--out", "{tmp}/c",
          "--bootstrap", "-1"], "--bootstrap"),
        (["compare", "--model", "segformer-b0", "--data", "{data}", "--out", "{tmp}/c",
          "--bootstrap", "1e9"], "--bootstrap"),
    ],
    ids=lambda v: " ".join(v[:1] + v[-2:]) if isinstance(v, list) else None,
)
def test_command_line_numbers_are_checked_by_the_table(cli, tiny_data, tiny_weights, tmp_path,
                                                       argv, named):
    fill = {"data": tiny_data, "w": tiny_weights["segformer"], "tmp": tmp_path,
            "img": next((tiny_data / "leftImg8bit" / "val").rglob("*.png")),
            "video": tiny_data / "leftImg8bit_demoVideo" / "stuttgart_00"}
    rc, _, err = cli(*[a.format(**fill) for a in argv])
    line = assert_one_line_error(rc, err, named, argv[-1].split("=")[-1], allow_log=True)
    assert "must be" in line
    assert list(tmp_path.iterdir()) == []


# --- B5: devices -------------------------------------------------------------------------------
def test_a_cuda_device_that_does_not_exist_is_named_with_its_index(cli, tiny_data, tiny_weights):
    import torch

    index = torch.cuda.device_count() + 3  # no machine has it
    rc, _, err = cli("eval", "--weights", tiny_weights["segformer"], "--data", tiny_data,
                     "--device", f"cuda:{index}")
    line = assert_one_line_error(rc, err, f"cuda:{index}", allow_log=True)
    if torch.cuda.is_available():
        assert f"{torch.cuda.device_count()} CUDA device(s)" in line


def test_a_cpu_index_is_refused():
    from segcompare.utils import select_device

    with pytest.raises(SegcompareError, match="cpu:3"):
        select_device("cpu:3")
    assert select_device("cpu").type == "cpu"


# --- B6: the Python API takes the same rows ----------------------------------------------------
def test_inference_settings_check_scales_and_sizes():
    from segcompare.evaluate import InferenceSettings

    for scales in [(math.nan,), (1.0, math.inf), (), (0.0,), ("1",)]:
        with pytest.raises(SegcompareError, match="scales"):
            InferenceSettings(scales=scales)
    with pytest.raises(SegcompareError, match="size_hw"):
        InferenceSettings(size_hw=(64, 1.5))
    assert InferenceSettings(scales=[0.5, 1]).scales == (0.5, 1.0)


def test_render_video_checks_its_numbers(tmp_path):
    from segcompare.infer import render_video

    for kwargs, named in [({"fps": math.nan}, "fps"), ({"fps": math.inf}, "fps"),
                          ({"every": 0}, "every"), ({"max_frames": -1}, "max_frames")]:
        with pytest.raises(SegcompareError, match=named):
            render_video([], tmp_path, tmp_path / "v.gif", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_synth_and_run_eval_check_their_numbers(tmp_path, tiny_data):
    from segcompare.data.synth import make_synthetic_cityscapes
    from segcompare.evaluate import run_eval

    with pytest.raises(SegcompareError, match="seed"):
        make_synthetic_cityscapes(tmp_path / "s", train=1, val=0, size=(32, 64), seed=-1)
    with pytest.raises(SegcompareError, match="train"):
        make_synthetic_cityscapes(tmp_path / "s", train=-1, val=0, size=(32, 64))
    with pytest.raises(SegcompareError, match="workers"):
        run_eval(tiny_data, "val", pred_dir=tmp_path, workers=10**6)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "section, key, value, override",
    [
        ("optim", "lr", math.inf, "optim.lr=.inf"),
        ("optim", "lr", 1e30, "optim.lr=1.0e+30"),
        ("train", "num_workers", 100000, "train.num_workers=100000"),
        ("train", "seed", -1, "train.seed=-1"),
        ("train", "batch_size", True, "train.batch_size=true"),
        ("data", "crop_size", (8, 8), "data.crop_size=[8,8]"),  # a relation: the smallest input
        ("optim", "warmup_iters", 10, "optim.warmup_iters=10"),  # a relation: < max_iters (10)
        ("model", "overrides", {"embed_dims": [32, 64, 160]},
         "model.overrides.embed_dims=[32,64,160]"),
    ],
    ids=lambda v: v if isinstance(v, str) and "=" in v else "",
)
def test_train_checks_a_config_built_in_python_as_a_recipe(tmp_path, tiny_data, section, key,
                                                           value, override):
    """train(cfg) with a Config changed in Python refuses a value with the line that
    `segcompare train` (a recipe or --set) gives for it, before it writes anything."""
    from segcompare.config import config_from_dict
    from segcompare.train import train

    cfg = config_from_dict({**TINY, "data": {"root": str(tiny_data)}})
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(SegcompareError) as err:
        train(cfg, tmp_path / "run", device="cpu")
    recipe = _recipe(tmp_path)
    # the same line, less the recipe file that the Python API has not got
    assert _refused(recipe, f"data.root={tiny_data}", override) == f"config {recipe}: {err.value}"
    assert not (tmp_path / "run").exists()


def test_train_takes_only_a_config():
    from segcompare.train import train

    with pytest.raises(SegcompareError, match="Config .* got dict"):
        train({"model": {"name": "segformer-b0"}}, "run")


# --- B7: the table -----------------------------------------------------------------------------
def test_every_recipe_key_has_one_row_of_its_type():
    import dataclasses
    import typing

    from segcompare.config import _SECTIONS

    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            rule = RULES[f"{section}.{field.name}"]
            hint = hints[field.name]
            args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
            assert rule.optional == (type(None) in getattr(hint, "__args__", ())), field.name
            inner = args[0] if args and typing.get_origin(hint) is typing.Union else hint
            origin = typing.get_origin(inner)
            if origin in (list, tuple):
                assert rule.items is not None and rule.kind in typing.get_args(inner), field.name
            elif origin is dict:
                assert rule.kind is dict
            else:
                assert rule.kind is inner and rule.items is None, field.name


def test_every_numeric_option_of_the_command_line_uses_the_table():
    from segcompare.cli import build_parser

    unchecked = []
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            elif action.type in (int, float):
                unchecked.append(f"{p.prog} {action.option_strings}")
            elif action.type is not None:
                assert action.type.__name__ in RULES, action.option_strings
    assert unchecked == []


@pytest.mark.parametrize(
    "key, value, ok",
    [("--workers", 0, True), ("--workers", MAX_WORKERS, True), ("--workers", True, False),
     ("--workers", 1.0, False), ("--workers", MAX_WORKERS + 1, False), ("--fps", 17, True),
     ("--fps", "17", False), ("--fps", 0.0, False), ("--fps", "nan", False),
     ("--size", [64, 128], True), ("--size", "64x128", False), ("--size", [64], False),
     ("--scales", [], False)],
)
def test_a_row_takes_exactly_its_values(key, value, ok):
    if ok:
        assert check(key, value) is not None
    else:
        with pytest.raises(SegcompareError, match=key):
            check(key, value)


# --- B8: values that depend on the data ------------------------------------------------------
def _train_recipe(tmp_path: Path, data: Path, crop: list) -> Path:
    recipe = {
        "model": {"name": "segformer-b0", "overrides": {
            "depths": [1, 1, 1, 1], "embed_dims": [8, 16, 24, 32], "num_heads": [1, 1, 1, 1],
            "decoder_dim": 16}},
        "data": {"root": str(data), "crop_size": crop, "base_size": 128,
                 "scale_range": [0.5, 2.0]},
        "optim": {"warmup_iters": 0},
        "train": {"max_iters": 1, "batch_size": 1, "num_workers": 0, "log_every": 1,
                  "checkpoint_every": 1},
    }
    return _recipe(tmp_path, yaml.safe_dump(recipe))


@pytest.mark.parametrize("crop, warned", [([512, 512], True), ([64, 128], False)])
def test_a_crop_larger_than_every_image_is_a_warning_with_the_cost(cli, tiny_data, tmp_path,
                                                                   caplog, crop, warned):
    # 64x128 images at base size 128 and ratios up to 2: at most 128x256 after the resize, so a
    # 512x512 crop is at least 1 - 128*256 / 512**2 = 87.5 % padding (by hand)
    recipe = _train_recipe(tmp_path, tiny_data, crop)
    with caplog.at_level("WARNING", logger="segcompare"):
        rc, _, err = cli("train", recipe, "--out", tmp_path / "run")
    assert rc == 0, err
    found = [r.getMessage() for r in caplog.records if "padding" in r.getMessage()]
    if warned:
        assert len(found) == 1 and "512x512" in found[0] and "128x256" in found[0], found
        assert "88%" in found[0] and "8.0x less work" in found[0], found
    else:
        assert found == []


@pytest.fixture
def mixed_sizes(tiny_data, tmp_path) -> Path:
    """The tiny data set with its first val sample (image and labels) at half the size."""
    from PIL import Image

    root = tmp_path / "mixed"
    shutil.copytree(tiny_data, root)
    image = sorted((root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]
    stem = image.name.replace("_leftImg8bit.png", "")
    for path in [image, *image.parents[3].joinpath("gtFine", "val").rglob(f"{stem}_gtFine_*.png")]:
        with Image.open(path) as im:
            im.resize((64, 32), Image.NEAREST).save(path)
    return root


def test_eval_batch_of_images_of_different_sizes_is_one_line(cli, mixed_sizes, tiny_weights,
                                                             tmp_path):
    rc, _, err = cli("eval", "--weights", tiny_weights["segformer"], "--data", mixed_sizes,
                     "--batch", "2", "--device", "cpu", "--json", tmp_path / "r.json")
    assert_one_line_error(rc, err, "--batch 2", "32x64", "64x128", allow_log=True)
    assert not (tmp_path / "r.json").exists()
    rc, out, err = cli("eval", "--weights", tiny_weights["segformer"], "--data", mixed_sizes,
                       "--batch", "1", "--device", "cpu")
    assert rc == 0, err
    assert "2 images" in out


def test_the_opset_row_is_what_this_torch_exports():
    """The table's newest opset is the installed torch's (torch.onnx's own constant): a torch
    that writes more or fewer makes this fail, so the row is moved with it."""
    from torch.onnx import _constants

    row = RULES["--opset"]
    assert (row.low, row.high) == (17, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def test_export_and_compare_check_opset_and_bootstrap_by_their_rows(tmp_path):
    from segcompare.compare import CompareSpec
    from segcompare.export import check_opset

    for bad in (16, 21, 17.0, True, "17"):
        with pytest.raises(SegcompareError, match="opset must be an integer in .17, 20."):
            check_opset(bad)
    assert check_opset(18) == 18
    for bad in (-1, 10**9, 2.5, None):
        with pytest.raises(SegcompareError, match=r"bootstrap must be an integer in \[0, "):
            CompareSpec(models=(("segformer-b0", None),), data_root=tmp_path, out_dir=tmp_path,
                        bootstrap=bad)
    assert CompareSpec(models=(("segformer-b0", None),), data_root=tmp_path, out_dir=tmp_path,
                       bootstrap=0).bootstrap == 0


def test_bench_export_and_build_model_check_their_numbers(tmp_path):
    import torch

    from segcompare.bench import bench_models
    from segcompare.export import export_onnx
    from segcompare.models import build_model

    for kwargs, named in [({"size_hw": (64, math.nan)}, "size_hw"), ({"batch": 0}, "batch"),
                          ({"iters": -1}, "iters")]:
        with pytest.raises(SegcompareError, match=named):
            bench_models(["segformer-b0"], **{"size_hw": (64, 128), **kwargs})
    with torch.device("meta"):
        model = build_model("segformer-b0")
    with pytest.raises(SegcompareError, match="size_hw"):
        export_onnx(model, tmp_path / "m.onnx", size_hw=(64, -1))
    with pytest.raises(SegcompareError, match="num_classes"):
        build_model("segformer-b0", num_classes=float("nan"))
    assert list(tmp_path.iterdir()) == []
