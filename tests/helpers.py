"""Helpers the config, training and distributed tests share: a recipe small enough for
seconds-long CPU runs, a YAML writer, and the comparison of checkpoints' weights."""

from pathlib import Path

import torch
import yaml

# A SegFormer small enough for seconds-long CPU runs: one block per stage, narrow stages.
TINY_SEGFORMER = {
    "model": {
        "name": "segformer-b0",
        "overrides": {"depths": [1, 1, 1, 1], "embed_dims": [8, 16, 24, 32], "decoder_dim": 16,
                      "num_heads": [1, 1, 1, 1]},
    },
}


def write_yaml(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    """`cfg` as a YAML recipe file in `tmp_path`."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def model_state(path: Path) -> dict:
    """The model weights of training checkpoint `path`."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
