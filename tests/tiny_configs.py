"""Recipes small enough for seconds-long CPU runs, shared by the config and training tests."""

from pathlib import Path

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
