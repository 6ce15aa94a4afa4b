"""HRNetV2 for semantic segmentation: W18-Small-v1/v2, W18, W32, W48.

Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition" (TPAMI 2020),
Fig. 2 and Fig. 4(b), read top to bottom:

    stem      two stride-2 3×3 convs                      -> 64 ch at 1/4
    layer1    bottleneck blocks ("stage 1")               -> one branch at 1/4
    stage k   transition: add a branch at half the resolution of the lowest one (k = 2, 3, 4),
              then `num_modules` times: blocks on every branch in parallel, then multi-resolution
              fusion (every branch receives the sum of all branches, resized to its resolution)
    head      upsample the 4 branches to 1/4, concatenate, 1×1 conv-BN-ReLU, 1×1 classifier

Parameter names, shapes and order equal `lib/models/seg_hrnet.py` of
HRNet/HRNet-Semantic-Segmentation (branch HRNet-OCR), so its checkpoints load with plain
`load_state_dict`: `conv1`, `bn1`, `conv2`, `bn2`, `layer1`, `transition1`, `stage2`, `transition2`,
`stage3`, `transition3`, `stage4`, `last_layer`. Resizing is bilinear with align_corners=False
(`ALIGN_CORNERS: False` of the W48 Cityscapes configs; the small models' branches leave it at
PyTorch's default, also False) to the exact size of the target branch, so any input size works.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from segcompare.utils import SegcompareError

STEM_CHANNELS = 64  # fixed in the official code, whatever the width
# The default BN momentum: seg_hrnet.py on branch HRNet-OCR (W18, W32, W48). The small models
# were trained on branch pytorch-v1.1, whose seg_hrnet.py sets BN_MOMENTUM = 0.01 (line 23 at
# 88419ab1; master's InPlaceABNSync version also 0.01): their `bn_momentum` setting below.
BN_MOMENTUM = 0.1
SMALL_BN_MOMENTUM = 0.01
ALIGN_CORNERS = False
STAGE_KEYS = ("num_modules", "num_branches", "block", "num_blocks", "num_channels", "fuse_method")
# `last_layer` is the official head's nn.Sequential(1×1 conv, BN, ReLU, classifier), keys
# `last_layer.0.*`, `.1.*`, `.3.*`: its parts by position.
HEAD_CONV, HEAD_BN, HEAD_CLS = 0, 1, 3


def _stage(
    num_modules: int, block: str, num_blocks: Sequence[int], num_channels: Sequence[int]
) -> dict[str, Any]:
    """One `STAGEk` entry of an official config (`MODEL.EXTRA`), keys lower-cased."""
    return {
        "num_modules": num_modules,
        "num_branches": len(num_channels),
        "block": block,
        "num_blocks": tuple(num_blocks),
        "num_channels": tuple(num_channels),
        "fuse_method": "SUM",
    }


def _hrnetv2(width: int) -> dict[str, Any]:
    """Full-size HRNetV2-W<width>: 4/1/4/3 modules, 4 blocks per branch, widths w, 2w, 4w, 8w."""
    w = width
    return {
        "stage1": _stage(1, "BOTTLENECK", (4,), (64,)),
        "stage2": _stage(1, "BASIC", (4, 4), (w, 2 * w)),
        "stage3": _stage(4, "BASIC", (4, 4, 4), (w, 2 * w, 4 * w)),
        "stage4": _stage(3, "BASIC", (4, 4, 4, 4), (w, 2 * w, 4 * w, 8 * w)),
        "final_conv_kernel": 1,
        "bn_momentum": BN_MOMENTUM,
    }


# name -> settings. STAGE1 of a config builds `layer1` (only its block, NUM_BLOCKS[0] and
# NUM_CHANNELS[0] are used); STAGE2..4 build the multi-resolution stages.
VARIANTS: dict[str, dict[str, Any]] = {
    # experiments/cityscapes/seg_hrnet_w18_small_v1_512x1024_sgd_lr1e-2_wd5e-4_bs_12_epoch484.yaml
    # (branches master / pytorch-v1.1): a single 32-wide bottleneck in layer1, 1 module per stage.
    "hrnet-w18-small-v1": {
        "stage1": _stage(1, "BOTTLENECK", (1,), (32,)),
        "stage2": _stage(1, "BASIC", (2, 2), (16, 32)),
        "stage3": _stage(1, "BASIC", (2, 2, 2), (16, 32, 64)),
        "stage4": _stage(1, "BASIC", (2, 2, 2, 2), (16, 32, 64, 128)),
        "final_conv_kernel": 1,
        "bn_momentum": SMALL_BN_MOMENTUM,
    },
    # experiments/cityscapes/seg_hrnet_w18_small_v2_512x1024_sgd_lr1e-2_wd5e-4_bs_12_epoch484.yaml
    # (branches master / pytorch-v1.1)
    "hrnet-w18-small-v2": {
        "stage1": _stage(1, "BOTTLENECK", (2,), (64,)),
        "stage2": _stage(1, "BASIC", (2, 2), (18, 36)),
        "stage3": _stage(3, "BASIC", (2, 2, 2), (18, 36, 72)),
        "stage4": _stage(2, "BASIC", (2, 2, 2, 2), (18, 36, 72, 144)),
        "final_conv_kernel": 1,
        "bn_momentum": SMALL_BN_MOMENTUM,
    },
    # lib/config/hrnet_config.py, HRNET_18 (branch HRNet-OCR; no Cityscapes yaml ships for W18/W32)
    "hrnet-w18": _hrnetv2(18),
    # lib/config/hrnet_config.py, HRNET_32
    "hrnet-w32": _hrnetv2(32),
    # experiments/cityscapes/seg_hrnet_w48_train_512x1024_sgd_lr1e-2_wd5e-4_bs_12_epoch484.yaml
    # (branch HRNet-OCR), the same as HRNET_48 of lib/config/hrnet_config.py
    "hrnet-w48": _hrnetv2(48),
}


# ---------------------------------------------------------------------------------------------
# Residual blocks (ResNet's), as used on every branch


class ConvBN(nn.Sequential):
    """What `conv_bn` makes: the official nn.Sequential (same keys), its parts by name."""

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]

    @property
    def has_relu(self) -> bool:
        return isinstance(self[-1], nn.ReLU)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = False) -> ConvBN:
    """Conv (no bias) + BN (+ ReLU): keys `0.weight`, `1.weight`, `1.bias`, `1.running_*`."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return ConvBN(*layers)


class BasicBlock(nn.Module):
    """3×3 - 3×3 residual block."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int) -> None:
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        # a 1×1 projection of the shortcut where the width changes
        self.downsample = conv_bn(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)

    @property
    def out_channels(self) -> int:
        return self.bn2.num_features


class Bottleneck(nn.Module):
    """1×1 (reduce) - 3×3 - 1×1 (expand ×4) residual block."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int) -> None:
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_bn(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)

    @property
    def out_channels(self) -> int:
        return self.bn3.num_features


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "BASIC": BasicBlock,
    "BOTTLENECK": Bottleneck,
}


def make_blocks(block: str, in_ch: int, ch: int, num_blocks: int) -> nn.Sequential:
    """`num_blocks` residual blocks in a row; the first one adapts the width."""
    cls = BLOCKS[block]
    out_ch = ch * cls.expansion
    return nn.Sequential(*(cls(in_ch if i == 0 else out_ch, ch) for i in range(num_blocks)))


# ---------------------------------------------------------------------------------------------
# The multi-resolution parts: transition (new branch), module (parallel branches + fusion)


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of `x` to the spatial size of `like` (exact, so odd sizes line up)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=ALIGN_CORNERS)


def make_transition(in_channels: Sequence[int], out_channels: Sequence[int]) -> nn.ModuleList:
    """Map the previous stage's branches to the next stage's (the arrows between stages).

    Existing branch i: a 3×3 conv-BN-ReLU where its width changes, else nothing (identity).
    New branch i: from the lowest-resolution previous branch, one stride-2 3×3 conv-BN-ReLU per
    halving (all but the last keep that branch's width).
    """
    last = in_channels[-1]
    layers: list[nn.Module] = []
    for i, out_ch in enumerate(out_channels):
        if i < len(in_channels):
            same = in_channels[i] == out_ch
            layers.append(nn.Identity() if same else conv_bn(in_channels[i], out_ch, 3, relu=True))
        else:
            halvings = i + 1 - len(in_channels)
            layers.append(
                nn.Sequential(
                    *(
                        conv_bn(last, out_ch if k == halvings - 1 else last, 3, 2, relu=True)
                        for k in range(halvings)
                    )
                )
            )
    return nn.ModuleList(layers)


def make_fuse_layer(in_channels: Sequence[int], j: int, i: int) -> nn.Module:
    """What branch j passes to branch i in the fusion (paper Fig. 3).

    Lower resolution (j > i): 1×1 conv-BN to branch i's width; the caller upsamples.
    Higher resolution (j < i): i - j stride-2 3×3 conv-BNs, ReLU between them, keeping branch j's
    width until the last one. Itself: identity.
    """
    if j == i:
        return nn.Identity()
    if j > i:
        return conv_bn(in_channels[j], in_channels[i], 1)
    halvings = i - j
    return nn.Sequential(
        *(
            conv_bn(in_channels[j], in_channels[i], 3, 2)
            if k == halvings - 1
            else conv_bn(in_channels[j], in_channels[j], 3, 2, relu=True)
            for k in range(halvings)
        )
    )


class HighResolutionModule(nn.Module):
    """Parallel branches of residual blocks, then every branch gets the sum of all of them."""

    def __init__(self, block: str, num_blocks: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        expansion = BLOCKS[block].expansion
        out_channels = [ch * expansion for ch in channels]
        self.branches = nn.ModuleList(
            make_blocks(block, ch_out, ch, n)
            for ch_out, ch, n in zip(out_channels, channels, num_blocks)
        )
        n = len(channels)
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(make_fuse_layer(out_channels, j, i) for j in range(n)) for i in range(n)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        fused = []
        for i, to_i in enumerate(self.fuse_layers):
            # lower-resolution branches (j > i) are upsampled to branch i's exact size
            parts = [
                resize_to(layer(x), xs[i]) if j > i else layer(x)
                for j, (layer, x) in enumerate(zip(to_i, xs))
            ]
            fused.append(self.relu(sum(parts[1:], parts[0])))  # summed in branch order
        return fused

    @property
    def out_channels(self) -> list[int]:
        """The width of every branch's output (of the last module: what the head splits)."""
        return [branch[-1].out_channels for branch in self.branches]


# ---------------------------------------------------------------------------------------------
# The network


def _check_stage(name: str, stage: dict[str, Any]) -> None:
    missing = [k for k in STAGE_KEYS if k not in stage]
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if missing or unknown:
        raise SegcompareError(
            f"HRNet setting {name!r}: expected the keys {', '.join(STAGE_KEYS)}; "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    if stage["block"] not in BLOCKS:
        raise SegcompareError(f"HRNet setting {name!r}: block must be one of {', '.join(BLOCKS)}")
    if stage["fuse_method"] != "SUM":
        raise SegcompareError(f"HRNet setting {name!r}: fuse_method must be 'SUM' (the only one)")
    n = stage["num_branches"]
    if len(stage["num_blocks"]) != n or len(stage["num_channels"]) != n:
        raise SegcompareError(
            f"HRNet setting {name!r}: num_blocks and num_channels need num_branches={n} entries"
        )
    if name == "stage1" and (n != 1 or stage["num_modules"] != 1):
        raise SegcompareError("HRNet setting 'stage1' (layer1): one branch, one module")


class HRNet(nn.Module):
    """HRNetV2: N×3×H×W images -> N×num_classes×ceil(H/4)×ceil(W/4) logits."""

    def __init__(
        self,
        num_classes: int = 19,
        *,
        variant: Optional[str] = None,
        stage1: dict[str, Any],
        stage2: dict[str, Any],
        stage3: dict[str, Any],
        stage4: dict[str, Any],
        final_conv_kernel: int = 1,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        stages = {"stage1": stage1, "stage2": stage2, "stage3": stage3, "stage4": stage4}
        for name, stage in stages.items():
            _check_stage(name, stage)
        # What rebuilds it (save_weights writes both): the VARIANTS name it was made as (None:
        # settings of one's own) and its settings. Plain attributes, not in the state dict.
        self.variant = variant
        self.settings = copy.deepcopy(
            {**stages, "final_conv_kernel": final_conv_kernel, "bn_momentum": bn_momentum}
        )

        # stem: 1/4 resolution
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)

        # stage 1: one branch of blocks
        self.layer1 = make_blocks(
            stage1["block"], STEM_CHANNELS, stage1["num_channels"][0], stage1["num_blocks"][0]
        )
        channels = [stage1["num_channels"][0] * BLOCKS[stage1["block"]].expansion]

        # stages 2-4: a transition adds a branch, then modules of parallel branches + fusion
        for k in (2, 3, 4):
            cfg = stages[f"stage{k}"]
            expansion = BLOCKS[cfg["block"]].expansion
            stage_channels = [ch * expansion for ch in cfg["num_channels"]]
            self.add_module(f"transition{k - 1}", make_transition(channels, stage_channels))
            modules = [
                HighResolutionModule(cfg["block"], cfg["num_blocks"], cfg["num_channels"])
                for _ in range(cfg["num_modules"])
            ]
            self.add_module(f"stage{k}", nn.Sequential(*modules))
            channels = stage_channels

        # head (HRNetV2, paper Fig. 4(b)): all branches at 1/4, concatenated, then per-pixel
        # classification; both convs have a bias, as in the official code
        concat_ch = sum(channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(concat_ch, concat_ch, 1),
            nn.BatchNorm2d(concat_ch, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(concat_ch, num_classes, final_conv_kernel, padding=final_conv_kernel // 2),
        )
        # one momentum for every BN of the network, as the official file's BN_MOMENTUM
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: convs N(0, 0.001), BN scale 1 and shift 0.

        Conv biases (only in the head) keep PyTorch's default, as in the official code.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The branch outputs of stage 4 (before the head): at 1/4, 1/8, 1/16, 1/32 of H×W."""
        x = self.relu(self.bn1(self.conv1(x)))  # N×64×H/2×W/2
        x = self.relu(self.bn2(self.conv2(x)))  # N×64×H/4×W/4
        xs = [self.layer1(x)]
        for transition, stage in (
            (self.transition1, self.stage2),
            (self.transition2, self.stage3),
            (self.transition3, self.stage4),
        ):
            # existing branches pass through; new ones start from the lowest resolution
            xs = [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(transition)]
            xs = stage(xs)
        return xs

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Upsample every branch to the first one's size, concatenate, classify."""
        high = features[0]
        x = torch.cat([high] + [resize_to(f, high) for f in features[1:]], dim=1)
        return self.last_layer(x)  # N×num_classes×H/4×W/4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
