"""Model statistics against the figures counted with the official code (tests/fixtures/REFERENCE.md)
and against small cases counted by hand."""

import pytest
import torch
from torch import nn

from segcompare import stats
from segcompare.models import build_model

# REFERENCE.md, "Facts from the same code": GMACs at 1024x2048 and parameter counts.
REFERENCE = {
    "segformer-b0": (121.0, 3_719_027),  # without the unused conv_seg
    "segformer-b5": (1446.4, 84_607_955),
    "hrnet-w18-small-v1": (33.4, 1_540_819),
    "hrnet-w18-small-v2": (76.9, 3_939_579),
    "hrnet-w48": (747.5, 65_859_379),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_macs_and_parameters_match_official_code(name):
    gmacs, params = REFERENCE[name]
    with torch.device("meta"):
        model = build_model(name)
    macs = stats.count_macs(model, (1024, 2048))
    assert macs["gmacs"] == pytest.approx(gmacs, rel=0.01)
    assert sum(p.numel() for p in model.parameters()) == params


def test_attention_is_counted_apart_from_conv_linear():
    with torch.device("meta"):
        model = build_model("segformer-b0")
    macs = stats.count_macs(model, (1024, 2048))
    # Stage 1 alone: 131072 queries x 2048 reduced keys x 32 channels, twice (QK^T and AV).
    stage1_attention = 2 * 2 * 128 * 256 * 2048 * 32 / 1e9 / 2 * 2  # two blocks in B0 stage 1
    assert macs["gmacs"] - macs["gmacs_conv_linear"] > stage1_attention


def test_attention_counted_on_real_cpu_tensors_too():
    # On a CPU tensor SDPA runs a fused kernel that torch 2.13's counter does not know.
    model = build_model("segformer-b0", embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1),
                        depths=(1, 1, 1, 1), decoder_dim=16).eval()
    with torch.device("meta"):
        meta_model = build_model("segformer-b0", embed_dims=(8, 16, 24, 32),
                                 num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1), decoder_dim=16)
    cpu = stats.count_macs(model, (64, 96))
    meta = stats.count_macs(meta_model, (64, 96))
    assert cpu["gmacs"] == pytest.approx(meta["gmacs"], rel=1e-9)
    assert cpu["gmacs"] > cpu["gmacs_conv_linear"]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)  # the shortcut skips two convs; the long path goes through them
        return self.head(x.mean((2, 3)))


def test_layer_counts_and_depth_by_hand():
    model = _Residual()
    assert stats.layer_counts(model) == {"Conv2d": 3, "ReLU": 1, "Linear": 1}
    assert stats.depth(model, (8, 8)) == 4  # stem + 2 body convs + linear


def test_layer_counts_tiny_hrnet_by_hand():
    stage = {"num_modules": 1, "block": "BASIC", "fuse_method": "SUM"}
    model = build_model(
        "hrnet-w18-small-v1",
        num_classes=3,
        stage1={"num_modules": 1, "num_branches": 1, "block": "BOTTLENECK", "num_blocks": (1,),
                "num_channels": (8,), "fuse_method": "SUM"},
        stage2={**stage, "num_branches": 2, "num_blocks": (1, 1), "num_channels": (4, 8)},
        stage3={**stage, "num_branches": 3, "num_blocks": (1, 1, 1), "num_channels": (4, 8, 16)},
        stage4={**stage, "num_branches": 4, "num_blocks": (1, 1, 1, 1),
                "num_channels": (4, 8, 16, 32)},
    )
    counts = stats.layer_counts(model)
    # stem 2 + layer1 (bottleneck 3 + downsample 1) + transitions (2 + 1 + 1)
    # + blocks (2+3+4 BASIC x 2 convs = 18) + fuse layers: stage2 2, stage3 3+3=... see below.
    # Fuse convs, branch j -> i: upsample (j > i) 1 conv; downsample (j < i) i - j convs.
    fuse = sum(1 if j > i else (i - j) for n in (2, 3, 4) for i in range(n) for j in range(n)
               if i != j)
    assert counts["Conv2d"] == 2 + 4 + 4 + 18 + fuse + 2  # + last_layer's two convs
    assert counts["BasicBlock"] == 9 and counts["Bottleneck"] == 1
    assert counts["HighResolutionModule"] == 3


def test_activation_memory_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU())
    # input 3x4x4 fp32 = 192 B; conv output 512 B and ReLU output 512 B alive together.
    assert stats.activation_mb(model, (4, 4)) * 2**20 == pytest.approx(192 + 512 + 512)


def test_model_stats_row():
    row = stats.model_stats("hrnet-w18-small-v1", (256, 512))
    assert row["parameters"] == 1_540_819
    assert row["trainable_parameters"] == row["parameters"]
    assert 0 < row["backbone_parameters"] < row["parameters"]
    assert row["gmacs"] == pytest.approx(33.39 / 16, rel=0.01)
    table = stats.format_stats_table([row], (256, 512))
    assert "hrnet-w18-small-v1" in table and "1,540,819" in table


def test_activation_memory_does_not_count_the_attention_matrix():
    # Fused SDPA never holds the L x S attention matrix; the meta-device count must agree.
    q = torch.zeros(1, 1, 4096, 8, device="meta")
    k = torch.zeros(1, 1, 4096, 8, device="meta")

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return nn.functional.scaled_dot_product_attention(q, k, k)

    mb = stats.activation_mb(Attn().to("meta"), (1, 1))
    assert mb * 2**20 < 4096 * 4096 * 4 / 8  # far below the 64 MiB matrix
