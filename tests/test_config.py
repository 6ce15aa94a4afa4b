"""segcompare.config: a recipe and its `--set` overrides become a checked `Config`, and a wrong
key or value is one error that names it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_SEGFORMER
from helpers import write_yaml as _write

from segcompare.config import load_config
from segcompare.utils import SegcompareError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# --- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=0.1", ["optim.lrr", "lr", "weight_decay"]),  # unknown key: names valid ones
        ("trian.max_iters=3", ["trian", "train"]),  # unknown section
        ("train.max_iters=ten", ["train.max_iters", "integer"]),
        ("train.max_iters=0", ["train.max_iters", "in [1, "]),
        ("train.amp=fp8", ["train.amp", "bf16"]),
        ("data.crop_size=[128]", ["data.crop_size", "2"]),
        ("train.class_weights=[1.0,-2.0]", ["train.class_weights", "in [0, ", "-2.0"]),
        ("train.class_weights=often", ["train.class_weights", "auto", "often"]),
        ("model.num_classes=0", ["model.num_classes", "in [1, "]),
        ("optim.warmup_iters=5000", ["optim.warmup_iters", "max_iters"]),
        ("max_iters=3", ["SECTION.KEY"]),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, override: str, words: list) -> None:
    path = _write(tmp_path, {**TINY_SEGFORMER, "train": {"max_iters": 100}})
    with pytest.raises(SegcompareError) as err:
        load_config(path, [override])
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_class_weights_count_is_checked_when_the_class_count_is_given(tmp_path: Path) -> None:
    path = _write(tmp_path, {**TINY_SEGFORMER, "train": {"max_iters": 100}})
    with pytest.raises(SegcompareError, match="class_weights must be 19 non-negative"):
        load_config(path, ["model.num_classes=19", "train.class_weights=[1.0,2.0]"])
    assert load_config(path, ["train.class_weights=auto"]).train.class_weights == "auto"
    with pytest.raises(SegcompareError, match="model.init .* model.pretrained"):
        load_config(path, ["model.init=a.safetensors", "model.pretrained=mit_b0.pth"])


def test_config_overrides_are_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, {**TINY_SEGFORMER, "train": {"amp": False}})  # YAML's bare `off`
    cfg = load_config(path, ["data.crop_size=[64,128]", "optim.lr=6e-5",
                             "model.overrides.drop_path_rate=0.0", "train.loss=ohem"])
    assert cfg.data.crop_size == (64, 128)
    assert cfg.optim.lr == 6e-5  # YAML reads 6e-5 as a string; accepted as a number
    assert cfg.model.overrides["drop_path_rate"] == 0.0
    assert cfg.train.amp == "off" and cfg.train.loss == "ohem"


def test_recipes_load() -> None:
    from segcompare.models import model_settings

    recipes = sorted(CONFIGS.glob("*.yaml"))
    names = {p.name for p in recipes}
    assert {f"segformer_b{i}_cityscapes_1024x1024_160k.yaml" for i in range(6)} <= names
    assert {"hrnet_w48_cityscapes_512x1024.yaml", "synthcity_segformer_b0.yaml",
            "synthcity_hrnet_w18_small_v1.yaml"} <= names
    assert {f"segformer_b{i}_ade20k_512x512_160k.yaml" for i in range(6)} <= names
    assert {"segformer_b5_ade20k_640x640_160k.yaml", "hrnet_w48_ade20k_520x520_ohem.yaml",
            "finetune_segformer_b0_folder.yaml", "finetune_hrnet_w18_small_v2_folder.yaml"} <= names
    for path in recipes:
        cfg = load_config(path)
        model_settings(cfg.model.name, **cfg.model.overrides)  # the overrides exist


def test_median_frequency_weights_by_hand() -> None:
    import numpy as np

    from segcompare.losses import label_histogram, median_frequency_weights

    # image A (4 px): class 0 x3, class 1 x1; image B (4 px): class 1 x2, ignore x2; class 2 none
    a = np.array([[0, 0], [0, 1]])
    b = np.array([[1, 1], [255, 255]])
    pixels, image_pixels = label_histogram([a, b], 3)
    assert (pixels, image_pixels) == ([3, 3, 0], [4, 8, 0])
    # freq: 0 -> 3/4, 1 -> 3/8; median of the present (0.75, 0.375) = 0.5625
    assert median_frequency_weights(pixels, image_pixels) == pytest.approx([0.75, 1.5, 0.0])
