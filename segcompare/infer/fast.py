"""Inference rewrites: the same function as our eager models, computed faster.

`prepare_for_inference(model)` deep-copies a SegFormer or HRNet and rebuilds it from modules that
only run forward. Nothing here changes what is computed (up to float rounding); the rewrites are:

1. **BatchNorm folded into the conv before it** (eval statistics: y = a·conv(x) + b).
2. **One oneDNN call per conv with its epilogue**: bias, residual add, ReLU/GELU run inside
   the kernel (`torch.ops.mkldnn._convolution_pointwise`, the op inductor emits for CPU)
   instead of three passes over memory; a residual the model owns is accumulated into in place
   (`_convolution_pointwise_`), not copied first. Where these cannot run (off the CPU, while
   tracing, exporting or compiling, without oneDNN) the same maths runs as plain ops.
3. **channels_last (NHWC)** for every map: oneDNN's fast layout on CPU. SegFormer runs on
   channels_last maps throughout: their memory *is* the N×L×C token sequence, so its Linears
   are 1×1 convs (faster than oneDNN's matmul here), and LayerNorm, attention, the depthwise
   conv and the sequence reduction read views: no transpose-and-copy between tokens and maps.
4. **The heads, where linear maps meet bilinear upsampling.** A per-pixel linear (1×1 conv) map
   commutes with bilinear resizing (align_corners=False interpolates with weights that sum to 1,
   so even the bias passes through), hence W·concat(up(x_1), …, up(x_n)) = Σ up(W_s·x_s): the
   big 1×1 conv may run at each branch's own resolution. SegFormer: `linear_c{s}` and its
   slice of `linear_fuse` (with BN folded) become one Linear per stage. HRNet: `last_layer`'s
   first conv (with BN folded) is split per branch. `BranchSum` takes the wide, far terms at
   their own resolution and concatenates only the narrow, near ones, by a cost rule.
5. **Fused attention**: `F.scaled_dot_product_attention` (no L×L' matrix in memory), fed
   with views of the q/kv projections.

Each idea was kept only if `benchmarks/inference_cpu.py` measured it faster (RESULTS.md there).
The prepared model is for inference only (no gradients, no `train()`): its weights are frozen.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcompare.models import hrnet, segformer
from segcompare.models.precision import bf16_conv_is_wrong, guard_bf16, report_float32

log = logging.getLogger(__name__)

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise_"
)
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# epilogue name -> (oneDNN post-op, its algorithm, the plain-op equivalent)
_ACTS = {
    None: ("none", None, lambda x: x),
    "relu": ("relu", None, F.relu),
    "gelu": ("gelu", "none", F.gelu),  # "none": the exact erf GELU, nn.GELU's default
}


def _use_onednn(x: torch.Tensor) -> bool:
    """Whether the fused oneDNN ops may run on `x` (else: the same maths with plain ops)."""
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype in _FUSED_DTYPES
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


def fold_bn(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a conv or linear followed by `bn` in eval mode, as one layer.

    bn(z) = a·(z - mean) + beta with a = gamma / sqrt(var + eps), so the layer becomes
    W' = a·W (per output channel) and b' = a·(b - mean) + beta. Computed in float64.
    """
    var, mean = bn.running_var.double(), bn.running_mean.double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    b = -mean if bias is None else bias.double() - mean
    b = a * b
    if bn.bias is not None:
        b = b + bn.bias.double()
    w = weight.double() * a.reshape(-1, *([1] * (weight.ndim - 1)))
    return w.to(weight.dtype), b.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# The two fused primitives


class FusedConv(nn.Module):
    """conv2d (+ residual add) (+ ReLU/GELU) in one oneDNN call: act(conv(x) + residual).

    With `inplace=True` the result is written into `residual` (which the caller must own and
    no longer need): oneDNN then accumulates into it instead of copying it first.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Sequence[int] = (1, 1),
        padding: Sequence[int] = (0, 0),
        groups: int = 1,
        act: Optional[str] = None,
    ):
        super().__init__()
        self.weight = _frozen(weight)
        self.bias = None if bias is None else _frozen(bias)
        self.stride, self.padding, self.groups, self.act = list(stride), list(padding), groups, act
        # set by `_to_bf16_guarded` for a conv that bfloat16 computes wrongly on this CPU: its
        # weights stay float32 and it computes in float32 whatever the input's dtype
        self.keep_float32 = False

    @classmethod
    def fold(
        cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, act: Optional[str] = None
    ) -> FusedConv:
        """`conv`, with the BatchNorm after it folded in, then `act`."""
        if conv.dilation != (1, 1) or not isinstance(conv.padding, tuple):
            raise ValueError(f"unsupported conv {conv}")
        w, b = (conv.weight, conv.bias) if bn is None else fold_bn(conv.weight, conv.bias, bn)
        return cls(w, b, conv.stride, conv.padding, conv.groups, act)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FusedConv:
        """A Linear on the channels of a map, as a 1×1 conv: on channels_last maps (tokens)
        oneDNN runs it faster than its matmul, and can add a residual in place."""
        return cls(linear.weight[:, :, None, None], linear.bias)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, inplace: bool = False
    ) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            if self.keep_float32:  # bfloat16 is wrong for this conv here: float32 in and out
                out = self.forward(x.float(), _to(residual, torch.float32), inplace)
                return out.to(x.dtype)
            # a map of another dtype (CUDA autocast runs layer_norm in float32 and hands its
            # float32 output to a float16 model): computed in the weights' dtype
            x, residual = x.to(self.weight.dtype), _to(residual, self.weight.dtype)
        post, algorithm, plain = _ACTS[self.act]
        if _use_onednn(x):
            args = (self.weight, self.bias, self.padding, self.stride, [1, 1], self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, post, [], algorithm)
            unary = None if self.act is None else post
            binary = torch.ops.mkldnn._convolution_pointwise.binary
            if inplace:
                binary = torch.ops.mkldnn._convolution_pointwise_.binary
                x, residual = residual, x  # the in-place op takes the destination first
            return binary(x, residual, *args, "add", None, unary, [], algorithm)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return plain(y if residual is None else y + residual)

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return (
            f"{i * self.groups}, {o}, kernel=({kh}, {kw}), stride={tuple(self.stride)}, "
            f"groups={self.groups}, act={self.act}"
        )


def _to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _conv_bn(seq: hrnet.ConvBN) -> FusedConv:
    """An HRNet `conv_bn` (Conv2d, BatchNorm2d[, ReLU]) as one FusedConv."""
    return FusedConv.fold(seq.conv, seq.bn, "relu" if seq.has_relu else None)


class BranchSum(nn.Module):
    """act(b + Σ_j W_j·up(x_j)), a 1×1 conv (D×ΣC_j) over the concatenation of maps x_j that
    branch j holds at 1/2^j of x_0's side, upsampled to x_0's size (the heads of both
    families), computed without building the whole concatenation.

    A per-pixel linear map commutes with bilinear resizing (module docstring, point 4), so each
    term may be computed *low* (W_j at branch j's resolution, then D channels upsampled and
    added) or *high* (C_j channels upsampled, then W_j at x_0's resolution, as the eager model
    does). Per pixel of x_0, low costs C_j·D/4^j MACs plus resizing and adding D channels; high
    costs C_j·D MACs plus resizing C_j channels. Low wins for wide, far branches (HRNet-W18's
    144 channels), high for narrow, near ones (its 36 and 72): high is chosen where
    C_j·((1 - 4^-j)·D + UP) < D·(UP + ADD), with the cost of resizing (UP) and of adding (ADD)
    one channel of one pixel counted in MACs. The high terms are concatenated with x_0 and run
    as one conv whose kernel adds the sum of the low terms and applies the activation.
    """

    # MACs that take as long as resizing / adding one float of a channels_last map: 2-core
    # Intel Xeon VM, 2026-11-29 (conv 150 GMAC/s; resize 0.59 ns, add_ 0.36 ns per float).
    UP, ADD = 90, 55

    def __init__(
        self,
        slices: Sequence[torch.Tensor],
        bias: torch.Tensor,
        act: Optional[str] = "relu",
        high: Optional[Sequence[int]] = None,
    ):
        """`slices[j]`: the D×C_j×1×1 columns of W that x_j meets; `high`: the branches to
        compute high (default: by the cost rule above)."""
        super().__init__()
        d = slices[0].shape[0]
        if high is None:
            high = [
                j for j, w in enumerate(slices[1:], start=1)
                if w.shape[1] * ((1 - 4.0**-j) * d + self.UP) < d * (self.UP + self.ADD)
            ]  # fmt: skip
        self.high = sorted(high)
        self.low = [j for j in range(1, len(slices)) if j not in self.high]
        near = torch.cat([slices[0]] + [slices[j] for j in self.high], 1)
        self.near = FusedConv(near, bias, act=act)
        self.far = nn.ModuleList(FusedConv(slices[j], None) for j in self.low)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]  # read once (under ONNX tracing each read is a Shape node)

        def up(x: torch.Tensor) -> torch.Tensor:  # hrnet.resize_to; a copy even at equal sizes
            return F.interpolate(x, size, mode="bilinear", align_corners=hrnet.ALIGN_CORNERS)

        acc = None
        for j, conv in zip(self.low, self.far):
            y = up(conv(features[j]))
            acc = y if acc is None else acc.add_(y)
        x = features[0]
        if self.high:
            x = torch.cat([x] + [up(features[j]) for j in self.high], 1)
        return self.near(x) if acc is None else self.near(x, acc, inplace=True)

    def extra_repr(self) -> str:
        return f"high={self.high}, low={self.low}"


# ---------------------------------------------------------------------------------------------
# HRNet


def _add_relu_(acc: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """relu(acc + y), into `acc` (which the caller owns), in one pass where aten's fused kernel
    may run (float32, where oneDNN's may; tracers and exporters see add_ and relu_)."""
    if acc.dtype == torch.float32 and _use_onednn(acc):
        return torch.ops.aten._add_relu_(acc, y)
    return acc.add_(y).relu_()


class FastResidualBlock(nn.Module):
    """hrnet.BasicBlock / Bottleneck: convs with BN folded; the last adds the shortcut, ReLU."""

    def __init__(self, block: hrnet.BasicBlock | hrnet.Bottleneck):
        super().__init__()
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if isinstance(block, hrnet.Bottleneck):
            pairs.append((block.conv3, block.bn3))
        self.convs = nn.ModuleList(FusedConv.fold(c, bn, "relu") for c, bn in pairs)
        self.downsample = None if block.downsample is None else _conv_bn(block.downsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv(x)
        # relu(conv(x) + shortcut), into the shortcut: the block input (or its projection) is
        # needed by nothing else once the block has run
        return self.convs[-1](x, shortcut, inplace=True)


class FastHRModule(nn.Module):
    """hrnet.HighResolutionModule: parallel branches, then the multi-resolution fusion.

    Branch i receives x_i + Σ_{j>i} up(conv1×1_ij(x_j)) + Σ_{j<i} down_ij(x_j), then ReLU. The
    sums are taken in place, in the branch maps themselves: first every 1×1 conv reads the
    branch it needs (at its low resolution), then the targets are summed from the last to the
    first, so a stride-2 chain still reads x_j before branch j is summed into. The upsampled
    terms are added first; each chain's last conv then adds the running sum inside its kernel,
    the last one also applying the ReLU, so no separate add or ReLU pass remains for i > 0 (and
    branch 0's last addition applies the ReLU in the same pass).
    """

    def __init__(self, module: hrnet.HighResolutionModule):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(FastResidualBlock(b) for b in branch)) for branch in module.branches
        )
        fuse = []
        for i, to_i in enumerate(module.fuse_layers):
            paths = []
            for j, layer in enumerate(to_i):
                if j == i:
                    paths.append(nn.Identity())
                elif j > i:
                    paths.append(_conv_bn(layer))
                else:
                    chain = [_conv_bn(seq) for seq in layer]
                    if j == i - 1:  # the last term of the sum: ReLU after the add
                        chain[-1].act = "relu"
                    paths.append(nn.Sequential(*chain))
            fuse.append(nn.ModuleList(paths))
        self.fuse_layers = nn.ModuleList(fuse)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # the branch outputs are this module's own tensors: the fusion sums into them
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        n = len(xs)
        if n == 1:
            return [F.relu(xs[0])]
        # lower resolutions: each 1×1 conv at its branch's resolution, before any sum
        low = [
            [paths[j](xs[j]) for j in range(i + 1, n)] for i, paths in enumerate(self.fuse_layers)
        ]
        fused: list[torch.Tensor] = [xs[0]] * n
        for i in reversed(range(n)):
            paths, acc = self.fuse_layers[i], xs[i]
            for j, y in enumerate(low[i], start=i + 1):  # then upsampled and added
                up = hrnet.resize_to(y, acc)
                acc = _add_relu_(acc, up) if i == 0 and j == n - 1 else acc.add_(up)
            for j in range(i):  # higher resolutions (not summed into yet): stride-2 chains
                chain = paths[j]
                y = xs[j]
                for conv in chain[:-1]:
                    y = conv(y)
                acc = chain[-1](y, acc, inplace=True)  # the last conv adds acc in its kernel
            fused[i] = acc
        return fused


class FastHRNetHead(nn.Module):
    """HRNet's `last_layer` (1×1 conv-BN-ReLU over the concatenated branches, then the classifier)
    with the first conv split per branch (`BranchSum`): relu(W_0·x_0 + b + Σ_{j>0} W_j·up(x_j)),
    the wide, far terms applied at their branch's own resolution before upsampling. The whole
    concatenation is never built; for W18 the conv's MACs at 1/4 resolution drop from D·D to
    (18 + 36 + 72)·D per pixel (D = ΣC_j: 270 for W18, 720 for W48).
    """

    def __init__(self, last_layer: nn.Sequential, channels: Sequence[int]):
        super().__init__()
        conv, bn = last_layer[hrnet.HEAD_CONV], last_layer[hrnet.HEAD_BN]
        w, b = fold_bn(conv.weight, conv.bias, bn)  # D×ΣC×1×1
        self.fuse = BranchSum(torch.split(w, list(channels), dim=1), b)
        self.classifier = FusedConv.fold(last_layer[hrnet.HEAD_CLS])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(features)  # N×D×H/4×W/4
        return self.classifier(x)  # N×classes×H/4×W/4


class FastHRNet(nn.Module):
    """hrnet.HRNet for inference: same forward, rebuilt from fused modules."""

    def __init__(self, model: hrnet.HRNet):
        super().__init__()
        self.stem = nn.Sequential(
            FusedConv.fold(model.conv1, model.bn1, "relu"),
            FusedConv.fold(model.conv2, model.bn2, "relu"),
        )
        self.layer1 = nn.Sequential(*(FastResidualBlock(b) for b in model.layer1))
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        for k in (1, 2, 3):
            transition = getattr(model, f"transition{k}")
            self.transitions.append(nn.ModuleList(_transition_path(t) for t in transition))
            stage = getattr(model, f"stage{k + 1}")
            self.stages.append(nn.Sequential(*(FastHRModule(m) for m in stage)))
        # the width of every branch of the last module: how `last_layer`'s input is split
        self.head = FastHRNetHead(model.last_layer, model.stage4[-1].out_channels)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs = [self.layer1(self.stem(x))]
        for transition, stage in zip(self.transitions, self.stages):
            xs = [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(transition)]
            xs = stage(xs)
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _transition_path(t: nn.Module) -> nn.Module:
    """One arrow of `hrnet.make_transition`: identity, a conv_bn (an existing branch changes
    width) or a chain of stride-2 conv_bns (a new branch)."""
    if isinstance(t, nn.Identity):
        return nn.Identity()
    if isinstance(t, hrnet.ConvBN):
        return _conv_bn(t)
    return nn.Sequential(*(_conv_bn(seq) for seq in t))


# ---------------------------------------------------------------------------------------------
# SegFormer, on channels_last maps: N×C×h×w in NHWC memory *is* the N×L×C token sequence, so
# the Linears run as 1×1 convs on the map and the LayerNorms / attention on views of it.


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """N×C×h×w map -> N×L×C tokens (a view of a channels_last map)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a map; channels_last in, channels_last out."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


class FastAttention(nn.Module):
    """segformer.EfficientSelfAttention, returning residual + attention(x) (added in place)."""

    def __init__(self, attn: segformer.EfficientSelfAttention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.q = FusedConv.from_linear(attn.q)
        self.kv = FusedConv.from_linear(attn.kv)
        self.proj = FusedConv.from_linear(attn.proj)
        self.sr = FusedConv.fold(attn.sr) if attn.sr_ratio > 1 else None
        self.norm = attn.norm if attn.sr_ratio > 1 else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        n, dim, h, w = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = _tokens(self.q(x)).view(n, h * w, heads, head_dim).transpose(1, 2)  # N×heads×L×d
        if self.sr is not None:
            x = _layer_norm(self.norm, self.sr(x))  # N×C×h/sr×w/sr
        kv = _tokens(self.kv(x)).view(n, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # N×heads×L×d
        out = out.transpose(1, 2).reshape(n, h, w, dim).permute(0, 3, 1, 2)  # N×C×h×w
        return self.proj(out, residual, inplace=True)


class FastBlock(nn.Module):
    """segformer.Block: x + attn(norm1(x)), then x + fc2(gelu(dwconv(fc1(norm2(x)))))."""

    def __init__(self, block: segformer.Block):
        super().__init__()
        self.norm1 = block.norm1
        self.attn = FastAttention(block.attn)
        self.norm2 = block.norm2
        self.fc1 = FusedConv.from_linear(block.mlp.fc1)
        self.dwconv = FusedConv.fold(block.mlp.dwconv.dwconv, act="gelu")
        self.fc2 = FusedConv.from_linear(block.mlp.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each residual add goes into x itself: the block owns it once norm1/norm2 have read it
        x = self.attn(_layer_norm(self.norm1, x), residual=x)
        y = self.dwconv(self.fc1(_layer_norm(self.norm2, x)))  # N×4C×h×w, GELU applied
        return self.fc2(y, x, inplace=True)  # N×C×h×w


class FastStage(nn.Module):
    """One MiT stage: patch embedding, blocks, closing LayerNorm; map in, map out."""

    def __init__(self, embed: segformer.OverlapPatchEmbed, blocks: nn.ModuleList, norm: nn.Module):
        super().__init__()
        self.proj = FusedConv.fold(embed.proj)
        self.embed_norm = embed.norm
        self.blocks = nn.ModuleList(FastBlock(b) for b in blocks)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _layer_norm(self.embed_norm, self.proj(x))  # N×C×h×w
        for block in self.blocks:
            x = block(x)
        return _layer_norm(self.norm, x)


class FastSegFormerHead(nn.Module):
    """The all-MLP decoder with `linear_c{s}` and its slice of `linear_fuse` (BN folded) merged
    into one D×C_s linear per stage: relu(A_1·x_1 + b + Σ_{s>1} A_s·up(x_s)), then
    `linear_pred`, summed by `BranchSum` (stage 2 upsampled first, stages 3 and 4 applied at their
    own resolution). The 4D·D MACs per pixel of the fuse conv at 1/4 resolution become
    (C_1 + C_2)·D there (B0: 1024·256 -> 96·256).
    """

    def __init__(self, head: segformer.AllMLPHead):
        super().__init__()
        fuse = head.linear_fuse
        w_fuse, b = fold_bn(fuse.conv.weight[:, :, 0, 0], None, fuse.bn)  # D×(n·D)
        merged = []
        for s in range(1, head.num_stages + 1):
            cols = w_fuse[:, head.fuse_channels(s)].double()  # D×D: the columns stage s feeds
            proj = getattr(head, f"linear_c{s}").proj
            merged.append((cols @ proj.weight.double()).to(w_fuse.dtype)[:, :, None, None])
            b = b + (cols @ proj.bias.double()).to(b.dtype)
        self.fuse = BranchSum(merged, b)
        self.linear_pred = FusedConv.fold(head.linear_pred)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(features)  # N×D×H/4×W/4, relu(sum)
        return self.linear_pred(x)  # N×classes×H/4×W/4


class FastSegFormer(nn.Module):
    """segformer.SegFormer for inference: same forward, rebuilt from fused modules."""

    def __init__(self, model: segformer.SegFormer):
        super().__init__()
        bb = model.backbone
        self.stages = nn.ModuleList(
            FastStage(
                getattr(bb, f"patch_embed{s}"), getattr(bb, f"block{s}"), getattr(bb, f"norm{s}")
            )
            for s in range(1, bb.num_stages + 1)
        )
        self.head = FastSegFormerHead(model.decode_head)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# The entry point


class Prepared(nn.Module):
    """Wraps a fast model: casts the input to the model's dtype and memory format, and the
    logits back to the input's dtype."""

    def __init__(self, net: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        if not self.channels_last:
            logits = logits.contiguous()
        return logits.to(out_dtype)


def _to_bf16_guarded(net: nn.Module, channels_last: bool) -> list[str]:
    """Cast `net` to bfloat16, except the FusedConvs whose geometry bfloat16 computes wrongly on
    this CPU (`segcompare.models.precision`): those keep float32 weights and compute in float32.
    Returns their names (logged once)."""
    wrong = {
        name: module for name, module in net.named_modules()
        if isinstance(module, FusedConv) and bf16_conv_is_wrong(
            module.weight.shape, module.stride, module.padding, (1, 1), module.groups,
            channels_last, module.weight.device,
        )
    }  # fmt: skip
    kept = {name: (m.weight.detach().float(), m.bias) for name, m in wrong.items()}
    net.to(torch.bfloat16)
    for name, (weight, bias) in kept.items():
        wrong[name].weight = _frozen(weight)
        wrong[name].bias = None if bias is None else _frozen(bias.float())
        wrong[name].keep_float32 = True
    report_float32(list(wrong))
    return list(wrong)


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    glibc serves every block above 32 MB (its largest mmap threshold) with a fresh mmap and
    unmaps it when freed, so each inference pays the kernel again for faulting in and zeroing
    all its large activations: a third of the time of a 1024×2048 forward on the 2-core VM of
    benchmarks/RESULTS.md, eager and prepared models alike. With mmap and trimming off, large
    blocks come from the heap and are reused; the process then keeps its peak memory until it
    exits. Process-wide and for good, so the caller decides: the CLI's inference commands and
    the benchmarks call it. Returns whether it applied (glibc only; elsewhere it does nothing).
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def prepare_for_inference(
    model: nn.Module,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """A faster model that computes the same logits as `model` (which is left untouched).

    SegFormer and HRNet are rebuilt as described in this module's docstring; any other module
    is deep-copied and only put in eval mode and `dtype`.

    `dtype=torch.bfloat16` runs in bfloat16 (opt-in: about 3 significant digits); the logits
    come back in the input's dtype. `channels_last` runs the convolutions in NHWC, the fast
    layout of oneDNN on CPU. `compile=True` wraps the result in `torch.compile`. The result is
    in eval mode, with frozen weights: use it for inference only.
    """
    src = copy.deepcopy(model).eval()
    if isinstance(src, hrnet.HRNet):
        net: nn.Module = FastHRNet(src)
    elif isinstance(src, segformer.SegFormer):
        net = FastSegFormer(src)
    else:  # not ours: nothing to rewrite; a copy in eval mode and `dtype`, layout untouched
        log.info(
            "prepare_for_inference: %s is not a SegFormer or HRNet; copied as is",
            type(model).__name__,
        )
        net, channels_last = src, False
    for attr in ("variant", "settings"):
        if hasattr(model, attr):
            setattr(net, attr, copy.deepcopy(getattr(model, attr)))
    on_cpu = all(p.device.type == "cpu" for p in net.parameters())
    if dtype == torch.bfloat16 and on_cpu:
        guard_bf16(net)  # plain convs of a model that is not ours
        _to_bf16_guarded(net, channels_last)
    else:
        net = net.to(dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fast: nn.Module = Prepared(net, dtype, channels_last).eval()
    for attr in ("variant", "settings"):
        if hasattr(net, attr):
            setattr(fast, attr, getattr(net, attr))
    if compile:
        fast = torch.compile(fast)
    return fast
