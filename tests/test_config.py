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
        ("train.class_weights=[1.0,2.0]", ["train.class_weights", "19"]),
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
    for path in recipes:
        cfg = load_config(path)
        model_settings(cfg.model.name, **cfg.model.overrides)  # the overrides exist
