"""SegFormer (Xie et al., NeurIPS 2021): the Mix Transformer encoder MiT-B0..B5, all-MLP decoder.

Equal to NVlabs/SegFormer: `mmseg/models/backbones/mix_transformer.py` (the encoder) and
`mmseg/models/decode_heads/segformer_head.py` (the head), with the state-dict keys, shapes and order
of the official checkpoints, so they load with plain `load_state_dict`:

    backbone.patch_embed{1..4}.{proj,norm}             OverlapPatchEmbed
    backbone.block{s}.{j}.{norm1,attn,norm2,mlp}       Block (attn: q, kv, proj, sr, norm)
    backbone.norm{1..4}                                the LayerNorm closing each stage
    decode_head.linear_c{4,3,2,1}.proj, linear_fuse.{conv,bn}, linear_pred   AllMLPHead

The official checkpoints also carry `decode_head.conv_seg.*`, the classifier that mmseg's
`BaseDecodeHead` creates and `SegFormerHead` never calls. This model does NOT have it (so its
parameter count is the one of the paper and of HuggingFace, e.g. 84,607,955 for B5 with 19
classes); drop the `UNUSED_OFFICIAL_KEYS` before loading an official checkpoint.

Shapes: N images, C channels, h×w the stage's token grid, L = h·w tokens, L' the reduced tokens.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcompare.utils import SegcompareError

# Keys of the official checkpoints that this model does not have (see the module docstring).
UNUSED_OFFICIAL_KEYS = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")


# Encoder settings of `mit_b0` ... `mit_b5` in NVlabs/SegFormer mmseg/models/backbones/
# mix_transformer.py (all: num_heads 1, 2, 5, 8; mlp_ratios 4; sr_ratios 8, 4, 2, 1;
# qkv_bias=True; drop_path_rate 0.1; patch 7/stride 4 then 3/2 for stages 2-4). Decoder width
# `decoder_params=dict(embed_dim=...)` and `dropout_ratio=0.1` of local_configs/segformer/B*/
# segformer.b*.1024x1024.city.160k.py: 256 for B0 and B1, 768 for B2 to B5.
def _mit(embed_dims: tuple[int, ...], depths: tuple[int, ...], decoder_dim: int) -> dict[str, Any]:
    return dict(
        embed_dims=embed_dims,
        depths=depths,
        num_heads=(1, 2, 5, 8),
        mlp_ratios=(4, 4, 4, 4),
        sr_ratios=(8, 4, 2, 1),
        decoder_dim=decoder_dim,
        drop_path_rate=0.1,
        patch_sizes=(7, 3, 3, 3),
        strides=(4, 2, 2, 2),
        qkv_bias=True,
        dropout=0.1,  # the head's Dropout2d before linear_pred
    )


VARIANTS: dict[str, dict[str, Any]] = {
    "segformer-b0": _mit((32, 64, 160, 256), (2, 2, 2, 2), decoder_dim=256),
    "segformer-b1": _mit((64, 128, 320, 512), (2, 2, 2, 2), decoder_dim=256),
    "segformer-b2": _mit((64, 128, 320, 512), (3, 4, 6, 3), decoder_dim=768),
    "segformer-b3": _mit((64, 128, 320, 512), (3, 4, 18, 3), decoder_dim=768),
    "segformer-b4": _mit((64, 128, 320, 512), (3, 8, 27, 3), decoder_dim=768),
    "segformer-b5": _mit((64, 128, 320, 512), (3, 6, 40, 3), decoder_dim=768),
}

# mit_b* pass `norm_layer=partial(nn.LayerNorm, eps=1e-6)`, used by the block norms and the
# stage-closing norms; the patch-embedding norm and the attention's reduction norm are plain
# `nn.LayerNorm(dim)` in the official code, eps 1e-5.
_BLOCK_NORM_EPS = 1e-6


def _tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """N×L×C tokens -> N×C×h×w map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples with probability `p`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # N×1×1
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch merging (paper 3.1): a strided conv whose kernel exceeds its stride."""

    def __init__(self, in_dim: int, dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the official OverlapPatchEmbed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # N×C×h×w, h = ceil(H / stride) for odd H too
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w  # N×L×C


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a grid `sr_ratio` times coarser.

    Paper 3.1, "Efficient Self-Attention": the sequence reduction (a conv with kernel = stride =
    sr_ratio, then LayerNorm) cuts the cost from O(L²) to O(L²/sr_ratio²).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise SegcompareError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # rows: keys, then values
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the official Attention

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(n, length, heads, head_dim).transpose(1, 2)  # N×heads×L×d
        if self.sr_ratio > 1:
            reduced = self.sr(_tokens_to_map(x, h, w))  # N×C×floor(h/sr)×floor(w/sr)
            x = self.norm(reduced.flatten(2).transpose(1, 2))  # N×L'×C
        kv = self.kv(x).reshape(n, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # 2×N×heads×L'×d
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # N×heads×L×d, scale d^-0.5
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))  # N×L×C


class DWConv(nn.Module):
    """The 3×3 depthwise conv of Mix-FFN, applied to tokens laid back out on their grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.dwconv(_tokens_to_map(x, h, w)).flatten(2).transpose(1, 2)  # N×L×C


class MixFFN(nn.Module):
    """Mix-FFN (paper 3.1): MLP with a 3×3 depthwise conv that leaks position, so no position
    encoding is needed: fc1 -> dwconv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))  # N×L×C


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mixffn(norm2(x)), each branch
    dropped with stochastic depth during training."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool,
        drop_path: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))  # N×L×C


def _init_mit(m: nn.Module) -> None:
    """The official MiT initialisation (`_init_weights` of every mix_transformer.py module)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        # fan_out per group, which torch's kaiming_normal_ does not divide out for depthwise convs
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MixTransformer(nn.Module):
    """The hierarchical encoder: four stages at 1/4, 1/8, 1/16, 1/32 of the input.

    Each stage s (1-based, as the official names) is `patch_embed{s}` -> `block{s}` -> `norm{s}`.
    The official module registers the four patch embeddings first, then each stage's blocks and
    norm; the same order here keeps the state dict in the official order.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: Sequence[float],
        sr_ratios: Sequence[int],
        patch_sizes: Sequence[int],
        strides: Sequence[int],
        qkv_bias: bool,
        drop_path_rate: float,
        in_dim: int = 3,
    ):
        super().__init__()
        self.num_stages = len(embed_dims)
        in_dims = [in_dim, *embed_dims[:-1]]
        for s in range(self.num_stages):
            embed = OverlapPatchEmbed(in_dims[s], embed_dims[s], patch_sizes[s], strides[s])
            self.add_module(f"patch_embed{s + 1}", embed)
        # stochastic depth rising linearly from 0 to drop_path_rate over all blocks, as official
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        first = 0
        for s in range(self.num_stages):
            blocks = [
                Block(
                    embed_dims[s],
                    num_heads[s],
                    mlp_ratios[s],
                    sr_ratios[s],
                    qkv_bias,
                    rates[first + j],
                )
                for j in range(depths[s])
            ]
            first += depths[s]
            self.add_module(f"block{s + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{s + 1}", nn.LayerNorm(embed_dims[s], eps=_BLOCK_NORM_EPS))
        self.apply(_init_mit)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """N×3×H×W -> four maps N×C_s×h_s×w_s, h_1 = ceil(H/4), h_s+1 = ceil(h_s/2)."""
        features = []
        for s in range(1, self.num_stages + 1):
            tokens, h, w = getattr(self, f"patch_embed{s}")(x)  # N×L×C
            for block in getattr(self, f"block{s}"):
                tokens = block(tokens, h, w)
            x = _tokens_to_map(getattr(self, f"norm{s}")(tokens), h, w)  # N×C×h×w
            features.append(x)
        return features


class LinearEmbed(nn.Module):
    """One `linear_c{s}` of the head: a per-pixel Linear to the decoder width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        return _tokens_to_map(self.proj(x.flatten(2).transpose(1, 2)), h, w)  # N×D×h×w


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule as `SegFormerHead.linear_fuse` uses it: 1×1 conv without bias, BN, ReLU."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU(inplace=True)
        # mmcv ConvModule.init_weights: kaiming_init (fan_out, normal, ReLU gain); BN 1, 0
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class AllMLPHead(nn.Module):
    """The all-MLP decoder (paper 3.2): unify the four stages' widths with per-pixel Linears,
    upsample all to 1/4, concatenate, fuse with a 1×1 conv, classify at 1/4 of the input.

    The official head registers `linear_c4` first and concatenates [c4, c3, c2, c1]; both orders
    are kept. Its Linears and `linear_pred` keep PyTorch's default initialisation, as official.
    """

    def __init__(self, in_dims: Sequence[int], dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.num_stages = len(in_dims)
        for s in reversed(range(self.num_stages)):
            self.add_module(f"linear_c{s + 1}", LinearEmbed(in_dims[s], dim))
        self.linear_fuse = ConvBNReLU(self.num_stages * dim, dim)
        self.dropout = nn.Dropout2d(dropout)  # mmseg BaseDecodeHead's dropout_ratio
        self.linear_pred = nn.Conv2d(dim, num_classes, 1)
        # stages whose part of `linear_fuse` runs at the stage's own resolution (`forward_split`;
        # `segcompare.train` sets them); none: the official order of operations
        self.low_stages: tuple[int, ...] = ()

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.low_stages:
            return self.forward_split(features)
        size = features[0].shape[2:]  # the 1/4 grid
        unified = []
        for s in reversed(range(self.num_stages)):  # c4, c3, c2, c1
            x = getattr(self, f"linear_c{s + 1}")(features[s])  # N×D×h_s×w_s
            unified.append(_resize(x, size))
        x = self.linear_fuse(torch.cat(unified, dim=1))  # N×D×H/4×W/4
        return self.linear_pred(self.dropout(x))  # N×classes×H/4×W/4

    def forward_split(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """`forward` without the N×4D×H/4×W/4 concatenation, for training (same parameters, same
        function, other rounding): `linear_c{s}` and the D×D columns of `linear_fuse.conv` that
        stage s meets merge into one D×C_s map A_s = W_s·P_s (bias W_s·b_s), and since a per-pixel
        linear map commutes with bilinear resizing, the stages of `low_stages` apply theirs at
        their own resolution and upsample D channels; the others upsample their C_s channels and
        meet their A_s in one conv at 1/4. B0's 4D·D = 1024·256 MACs per pixel at 1/4 become
        (32 + 64)·256 with stages 3 and 4 low."""
        size = features[0].shape[2:]  # the 1/4 grid
        w = self.linear_fuse.conv.weight[:, :, 0, 0]  # D×4D
        # the merged weights in float32 even under autocast (they are small)
        with torch.autocast(w.device.type, enabled=False):
            merged, bias = [], 0.0
            for s in range(1, self.num_stages + 1):
                proj = getattr(self, f"linear_c{s}").proj
                cols = w[:, self.fuse_channels(s)]  # D×D
                merged.append(cols @ proj.weight)  # D×C_s
                bias = bias + cols @ proj.bias  # D
        near = [s for s in range(1, self.num_stages + 1) if s not in self.low_stages]
        x = torch.cat([_resize(features[s - 1], size) for s in near], dim=1)
        x = F.conv2d(x, torch.cat([merged[s - 1] for s in near], dim=1)[:, :, None, None], bias)
        for s in self.low_stages:  # N×D×h_s×w_s, upsampled and added
            x = x + _resize(F.conv2d(features[s - 1], merged[s - 1][:, :, None, None]), size)
        x = self.linear_fuse.relu(self.linear_fuse.bn(x))  # N×D×H/4×W/4
        return self.linear_pred(self.dropout(x))  # N×classes×H/4×W/4

    def fuse_channels(self, s: int) -> slice:
        """The input channels of `linear_fuse` that hold stage `s` (1-based): [c4, ..., c1]."""
        dim = self.linear_fuse.conv.out_channels
        k = self.num_stages - s
        return slice(k * dim, (k + 1) * dim)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`x` bilinearly resized to `size` (the head's 1/4 grid), as the official head does."""
    if x.shape[2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegFormer(nn.Module):
    """MiT encoder + all-MLP head. `forward`: N×3×H×W -> logits N×classes×ceil(H/4)×ceil(W/4).

    H and W need not be multiples of 32 (203×329 works); the stage-1 reduction conv (kernel 8 at
    1/4 scale) needs H, W >= 29, as the official model.
    """

    def __init__(
        self,
        num_classes: int = 19,
        *,
        variant: Optional[str] = None,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: Sequence[float],
        sr_ratios: Sequence[int],
        decoder_dim: int,
        drop_path_rate: float = 0.1,
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        qkv_bias: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        # What rebuilds it (save_weights writes both): the VARIANTS name it was made as (None:
        # settings of one's own) and its settings. Plain attributes, not in the state dict.
        self.variant = variant
        self.settings = copy.deepcopy(
            dict(
                embed_dims=embed_dims,
                depths=depths,
                num_heads=num_heads,
                mlp_ratios=mlp_ratios,
                sr_ratios=sr_ratios,
                decoder_dim=decoder_dim,
                drop_path_rate=drop_path_rate,
                patch_sizes=patch_sizes,
                strides=strides,
                qkv_bias=qkv_bias,
                dropout=dropout,
            )
        )
        self.backbone = MixTransformer(
            embed_dims,
            depths,
            num_heads,
            mlp_ratios,
            sr_ratios,
            patch_sizes,
            strides,
            qkv_bias,
            drop_path_rate,
        )
        self.decode_head = AllMLPHead(embed_dims, decoder_dim, num_classes, dropout)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four encoder outputs, N×C_s×h_s×w_s at 1/4, 1/8, 1/16, 1/32."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))  # N×classes×ceil(H/4)×ceil(W/4)
