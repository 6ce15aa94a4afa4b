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


class QuarterNet(torch.nn.Module):
    """A tiny real segmentation net with the model contract: logits at 1/4 of the input size;
    `seen` records the (H, W) of every input it was given."""

    def __init__(self, num_classes: int = 19):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, num_classes, 3, stride=2, padding=1),
        )
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return self.body(x)
