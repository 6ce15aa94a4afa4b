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

6. **bfloat16 where it pays**: a bfloat16 SegFormer on the CPU times each layer once per input
   shape (`BF16Probe`) and runs it the fastest way there: bfloat16, float32, or for attention
   bfloat16 matmuls; the whole float32 model where that is faster. On a CPU without bfloat16
   units (no AVX512-BF16, no AMX: bfloat16 is emulated there, slower than float32 for both
   families) a bfloat16 model runs in float32. `layer_precision` says what ran in which
   precision.

Each idea was kept only if `benchmarks/inference_cpu.py` measured it faster (RESULTS.md there).
The prepared model is for inference only (no gradients, no `train()`): its weights are frozen.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcompare.models import hrnet, segformer
from segcompare.models import precision as model_precision
from segcompare.models.precision import (
    Float32Conv2d,
    bf16_conv_is_wrong,
    fastest,
    guard_bf16,
    probe_ms,
    report_float32,
    time_each,
)

log = logging.getLogger(__name__)

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise_"
)
# oneDNN's bfloat16 convolutions need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU
# they raise, and a bfloat16 conv runs as the plain op
_FUSED_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()
)  # fmt: skip
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
        # set per input size by `BF16Probe` in a bfloat16 model: 'fp32' where this conv is
        # slower in bfloat16 here (it then computes on float32 copies of its weights)
        self.way = "bf16"
        self._float32_weights: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

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
        elif self.way == "fp32" and x.dtype == torch.bfloat16:
            return self.forward_float32(x, residual, inplace)
        return self._conv(x, residual, inplace, self.weight, self.bias)

    def forward_float32(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, inplace: bool = False
    ) -> torch.Tensor:
        """A bfloat16 map through this conv in float32; the result in bfloat16 again."""
        with torch.autocast(x.device.type, enabled=False):  # Predictor's autocast: not here
            out = self._conv(x.float(), _to(residual, torch.float32), inplace,
                             *self.float32_weights())  # fmt: skip
        return out.to(x.dtype)

    def float32_weights(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) in float32, copied once."""
        if self._float32_weights is None:
            self._float32_weights = (self.weight.detach().float(), _to(self.bias, torch.float32))
        return self._float32_weights

    def _conv(
        self, x: torch.Tensor, residual: Optional[torch.Tensor], inplace: bool,
        weight: torch.Tensor, bias: Optional[torch.Tensor],
    ) -> torch.Tensor:  # fmt: skip
        post, algorithm, plain = _ACTS[self.act]
        if _use_onednn(x):
            args = (weight, bias, self.padding, self.stride, [1, 1], self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, post, [], algorithm)
            unary = None if self.act is None else post
            binary = torch.ops.mkldnn._convolution_pointwise.binary
            if inplace:
                binary = torch.ops.mkldnn._convolution_pointwise_.binary
                x, residual = residual, x  # the in-place op takes the destination first
            return binary(x, residual, *args, "add", None, unary, [], algorithm)
        y = F.conv2d(x, weight, bias, self.stride, self.padding, 1, self.groups)
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
        # set per input size by `BF16Probe` in a bfloat16 model: how the attention itself
        # (not its projections) runs fastest here, one of ATTENTION_WAYS
        self.way = "bf16"

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        n, dim, h, w = x.shape
        out = self.attend(*self.qkv(x))  # N×heads×L×d
        out = out.transpose(1, 2).reshape(n, h, w, dim).permute(0, 3, 1, 2)  # N×C×h×w
        return self.proj(out, residual, inplace=True)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N×heads×L×d) and k, v (N×heads×L'×d, after the spatial reduction): views of the
        projections' channels_last maps."""
        n, dim, h, w = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = _tokens(self.q(x)).view(n, h * w, heads, head_dim).transpose(1, 2)  # N×heads×L×d
        if self.sr is not None:
            x = _layer_norm(self.norm, self.sr(x))  # N×C×h/sr×w/sr
        kv = _tokens(self.kv(x)).view(n, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ/√d) v: fused, in the maps' dtype unless `way` says otherwise."""
        return _attention(q, k, v, self.way if q.dtype == torch.bfloat16 else "bf16")


# How a bfloat16 model's attention may run: the fused kernel in bfloat16, the fused kernel in
# float32 (casts included), or two bfloat16 matmuls per chunk of queries with the softmax between
# them (what AMX or AVX512-BF16 matmuls may run faster than the fused kernel).
ATTENTION_WAYS = ("fp32", "bf16", "bf16 matmuls")
SCORES_PER_CHUNK = 1 << 22  # bf16 scores held at once by "bf16 matmuls" (8 MB)
# The queries (of all of them, with every key) on which BF16Probe times an attention: enough for
# its cost per query (1024×2048's stage 1 has 131072 queries: timing them all would cost seconds)
PROBE_QUERIES = 8192


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, way: str = "bf16"
) -> torch.Tensor:
    """softmax(q kᵀ/√d) v (N×heads×L×d) computed one of `ATTENTION_WAYS`; 'bf16' is the fused
    kernel in the maps' own dtype."""
    if way == "bf16":
        return F.scaled_dot_product_attention(q, k, v)
    if way == "fp32":
        with torch.autocast(q.device.type, enabled=False):  # autocast would make it bf16 again
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return out.to(q.dtype)
    n, heads, length, d = q.shape
    rows = max(1, SCORES_PER_CHUNK // (n * heads * k.shape[-2]))
    kt = k.transpose(-1, -2) * d**-0.5  # N×heads×d×L', scaled once
    out = []
    for i in range(0, length, rows):
        scores = torch.matmul(q[:, :, i : i + rows], kt)  # N×heads×rows×L'
        # torch's CPU softmax of bfloat16 accumulates in float32
        out.append(torch.matmul(torch.softmax(scores, -1), v))
    return torch.cat(out, 2) if len(out) > 1 else out[0]


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


class BF16Probe:
    """How each layer of a bfloat16 SegFormer runs fastest on this CPU, decided per input shape
    (N×3×H×W) the first time it is seen: in bfloat16, or in float32 where that is faster.

    Each convolution (patch embeddings, the attention's projections, the Mix-FFN's linears and
    depthwise conv, the decode head) is timed at the shape it meets for that input in bfloat16
    and in float32 with the casts, and each attention each of `ATTENTION_WAYS`
    (`segcompare.models.precision.probe_ms`, cached per process by op and shape, so blocks of
    one shape, models of one variant and later Predictors pay nothing); the fastest way runs.
    The shapes come from one forward pass of a copy of the model on the meta device: no real
    computation. The probe costs about three forward passes in each way, once per input shape
    and process.
    """

    def __init__(self, net: nn.Module, net_float32: nn.Module, channels_last: bool):
        self.net = net
        self.net_float32 = net_float32  # the same model in float32
        self.channels_last = channels_last
        self.layers = [
            (name, m) for name, m in net.named_modules()
            if isinstance(m, FastAttention) or (isinstance(m, FusedConv) and not m.keep_float32)
        ]  # fmt: skip
        for _, module in self.layers:  # made here, not in the probe's inference mode
            if isinstance(module, FusedConv):
                module.float32_weights()
        # input shape -> layer name -> {way: ms}
        self.timings: dict[tuple[int, ...], dict[str, dict[str, float]]] = {}
        # input shape -> {"fp32": ms, "bf16": ms}: the whole model in float32, and in bfloat16
        # with each layer's fastest way
        self.whole: dict[tuple[int, ...], dict[str, float]] = {}

    def apply(self, shape: tuple[int, ...]) -> nn.Module:
        """Set each layer's `way` for an input of `shape` (probed the first time); returns the
        net to run: this one, or the float32 one where the whole model is faster in float32
        (a CPU without bfloat16 units: the casts and the bfloat16 LayerNorms cost more than
        the layers left in bfloat16 save)."""
        if shape not in self.timings:
            self.timings[shape] = self.probe(shape)
        for name, module in self.layers:
            module.way = fastest(self.timings[shape][name])
        if shape not in self.whole:  # needed only where some layer is faster in float32
            slower = any(module.way == "fp32" for _, module in self.layers)
            self.whole[shape] = self.probe_whole(shape) if slower else {}
        whole = self.whole[shape]
        return self.net_float32 if whole and fastest(whole) == "fp32" else self.net

    def probe_whole(self, shape: tuple[int, ...]) -> dict[str, float]:
        """{"fp32": ms, "bf16": ms} of the whole model on a random input of `shape`."""
        x = torch.randn(shape)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x16 = x.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            return time_each({"fp32": partial(self.net_float32, x), "bf16": partial(self.net, x16)})

    def probe(self, shape: tuple[int, ...]) -> dict[str, dict[str, float]]:
        """name -> {way: ms} of each layer for an input of `shape`."""
        inputs = self.input_shapes(shape)
        found = {}
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            for name, module in self.layers:
                x = torch.randn(inputs[name], dtype=torch.bfloat16)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                found[name] = _probe_layer(module, x)
        return found

    def input_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """name -> the shape of the map each probed layer receives for an input of `shape`."""
        meta = copy.deepcopy(self.net).to("meta")
        wanted = {name for name, _ in self.layers}
        found: dict[str, tuple[int, ...]] = {}
        hooks = []
        for name, module in meta.named_modules():
            if name in wanted:
                module.way = "bf16"  # its float32 weights are not on the meta device

                def record(module: nn.Module, args: tuple, name: str = name) -> None:
                    found[name] = tuple(args[0].shape)

                hooks.append(module.register_forward_pre_hook(record))
        x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            meta(x)
        for hook in hooks:
            hook.remove()
        return found


def _probe_layer(module: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """{way: ms} of `module` (a FusedConv: 'fp32' with the casts, 'bf16'; a FastAttention: each
    of `ATTENTION_WAYS`) on `x`, its real input."""
    if isinstance(module, FastAttention):
        q, k, v = module.qkv(x)
        key = ("attention", tuple(q.shape), tuple(k.shape))
        q = q[:, :, :PROBE_QUERIES]  # its cost is linear in the queries: time a share of them
        return probe_ms(key, {way: partial(_attention, q, k, v, way) for way in ATTENTION_WAYS})
    key = ("conv", tuple(module.weight.shape), tuple(module.stride), tuple(module.padding),
           module.groups, module.act, tuple(x.shape), x.is_contiguous())  # fmt: skip
    return probe_ms(key, {
        "fp32": partial(module.forward_float32, x),
        "bf16": partial(module._conv, x, None, False, module.weight, module.bias),
    })  # fmt: skip


class Prepared(nn.Module):
    """Wraps a fast model: casts the input to the model's dtype and memory format, and the
    logits back to the input's dtype. `probe`: a bfloat16 SegFormer's `BF16Probe`, applied to
    each input shape before the model runs."""

    def __init__(
        self, net: nn.Module, dtype: torch.dtype, channels_last: bool,
        probe: Optional[BF16Probe] = None, float32_why: str = "",
    ):  # fmt: skip
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.channels_last = channels_last
        self.probe = probe
        self.float32_why = float32_why  # why a model asked for in bfloat16 runs in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        net, dtype = self.net, self.dtype
        if self.probe is not None and not (
            torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export()
        ):  # fmt: skip
            net = self.probe.apply(tuple(x.shape))
            if net is not self.net:  # the whole model is faster in float32 here
                dtype = torch.float32
        x = x.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if net is self.net and not self.float32_why:
            logits = net(x)
        else:  # the caller's bfloat16 autocast would turn the float32 model's attention back
            with torch.autocast(x.device.type, enabled=False):
                logits = net(x)
        if not self.channels_last:
            logits = logits.contiguous()
        return logits.to(out_dtype)

    def layer_precision(self) -> list[dict[str, Any]]:
        """What each layer computed in: one `layer_precision` report per input shape seen (in a
        probed model), else one for the model as it stands."""
        if self.probe is None or not self.probe.timings:
            report = layer_precision(self.net, self.dtype)
            for row in report["layers"] if self.float32_why else []:
                row["why"] = self.float32_why
            return [report]
        reports = []
        for shape, timings in self.probe.timings.items():
            whole = self.probe.whole.get(shape)
            report = layer_precision(self.net, self.dtype, timings, shape)
            if whole and fastest(whole) == "fp32":  # the float32 model ran instead
                for row in report["layers"]:
                    row["precision"], row["why"] = "fp32", "the whole model is faster in fp32 here"
            report["whole_ms"] = whole
            reports.append(report)
        return reports


# ---------------------------------------------------------------------------------------------
# What precision each layer ran in


def _role(name: str, module: nn.Module) -> Optional[str]:
    """What a layer is, in the words of the papers (None: not a layer the report counts)."""
    if isinstance(module, FastAttention):
        return "attention"
    if isinstance(module, nn.LayerNorm):
        return "LayerNorm"
    if not isinstance(module, (FusedConv, nn.Conv2d, nn.Linear)):
        return None
    last = name.rsplit(".", 1)[-1]
    if name.startswith(("head.", "decode_head.")):
        return "decode head"
    if ".attn." in name:
        return "attention projections"
    if last == "dwconv":
        return "Mix-FFN depthwise"
    if last in ("fc1", "fc2"):
        return "Mix-FFN linears"
    if (name.startswith("stages.") and last == "proj") or "patch_embed" in name:
        return "patch embeddings"
    return "linears" if isinstance(module, nn.Linear) else "convs"


def layer_precision(
    net: nn.Module, dtype: torch.dtype,
    timings: Optional[dict[str, dict[str, float]]] = None,
    shape: Optional[tuple[int, ...]] = None,
) -> dict[str, Any]:  # fmt: skip
    """{"input": shape or None, "layers": [{"name", "role", "precision", "why"[, "ms"]}]}:
    what each convolution, linear, attention and LayerNorm of `net` (prepared, or eager under
    autocast in `dtype`) computes in. why: 'wrong in bf16 here' (the self-check), 'slower in
    bf16 here' or 'as bf16 matmuls, faster here' (`BF16Probe`'s `timings`: {way: ms}, which
    the rows carry as "ms"), 'autocast' (an eager model's LayerNorm: autocast keeps it
    float32)."""
    low = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    timings = timings or {}
    eager = not any(isinstance(m, (FusedConv, FastAttention)) for m in net.modules())
    rows = []
    for name, module in net.named_modules():
        role = _role(name, module)
        if role is None:
            continue
        why = ""
        if getattr(module, "keep_float32", False) or isinstance(module, Float32Conv2d):
            why = "wrong in bf16 here"
        elif name in timings and fastest(timings[name]) == "fp32":
            why = "slower in bf16 here"
        elif name in timings and fastest(timings[name]) == "bf16 matmuls":
            why = "as bf16 matmuls, faster here"
        elif eager and role == "LayerNorm" and low != "fp32":
            why = "autocast"
        fp32 = why and why != "as bf16 matmuls, faster here"
        row = {"name": name, "role": role, "precision": "fp32" if fp32 else low, "why": why}
        if name in timings:  # the probe's figures, and the layer's own fastest way
            row["ms"] = {way: round(ms, 3) for way, ms in timings[name].items()}
            row["fastest"] = fastest(timings[name])
        rows.append(row)
    return {"input": list(shape) if shape else None, "layers": rows}


def describe_layer_precision(report: dict[str, Any]) -> str:
    """One line: 'bf16: 16 Mix-FFN linears, 8 attention, ...; fp32: 8 attention (slower in
    bf16 here), ...' (the layers of a `layer_precision` report, counted by role)."""
    groups: dict[tuple[str, str], dict[str, int]] = {}
    for row in report["layers"]:
        counts = groups.setdefault((row["precision"], row["why"]), {})
        counts[row["role"]] = counts.get(row["role"], 0) + 1
    parts = []
    for (precision, why), counts in sorted(groups.items(), key=lambda g: (g[0][0] == "fp32", g[0])):
        what = ", ".join(f"{n} {role}" for role, n in counts.items())
        parts.append(f"{precision}: {what}" + (f" ({why})" if why else ""))
    where = ""
    if report["input"]:
        where = " at " + "x".join(str(v) for v in report["input"])
    return f"layer precision{where}: " + "; ".join(parts)


NO_BF16_UNITS = "no bfloat16 units on this CPU (AVX512-BF16, AMX): bf16 is emulated, slower"


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
    probe: bool = True,
) -> nn.Module:
    """A faster model that computes the same logits as `model` (which is left untouched).

    SegFormer and HRNet are rebuilt as described in this module's docstring; any other module
    is deep-copied and only put in eval mode and `dtype`.

    `dtype=torch.bfloat16` runs in bfloat16 (opt-in: about 3 significant digits); the logits
    come back in the input's dtype. A bfloat16 SegFormer on the CPU computes in float32 the
    layers that are slower in bfloat16 there (`BF16Probe`, at the first call of each input
    shape; `probe=False` keeps every layer bfloat16); on a CPU without bfloat16 units
    (`cpu_has_bf16_units`) the model runs in float32 unless `probe=False`. `channels_last` runs
    the convolutions in NHWC, the fast layout of oneDNN on CPU. `compile=True` wraps the result in
    `torch.compile`. The result is in eval mode, with frozen weights: use it for inference only.
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
    bf16_cpu = dtype == torch.bfloat16 and on_cpu
    float32_why = ""
    if probe and bf16_cpu and not model_precision.cpu_has_bf16_units():
        # emulated bfloat16 is slower than float32 for both families: 3.7x (HRNet-W18-Small-v2)
        # on an Intel Xeon with AVX-512 and 7.7x on an AMD EPYC with AVX2; SegFormer's probe
        # chose the float32 model for B0-B5 there (benchmarks/RESULTS.md)
        float32_why = NO_BF16_UNITS
        log.info("bf16: %s; the model runs in float32", NO_BF16_UNITS)
        dtype, bf16_cpu = torch.float32, False
    if probe and bf16_cpu and isinstance(net, FastSegFormer):  # what BF16Probe compares with
        net_float32 = copy.deepcopy(net)
        if channels_last:
            net_float32 = net_float32.to(memory_format=torch.channels_last)
    if bf16_cpu:
        guard_bf16(net)  # plain convs of a model that is not ours
        _to_bf16_guarded(net, channels_last)
    else:
        net = net.to(dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    found = None
    if probe and bf16_cpu and isinstance(net, FastSegFormer):
        found = BF16Probe(net, net_float32, channels_last)
    fast: nn.Module = Prepared(net, dtype, channels_last, found, float32_why).eval()
    for attr in ("variant", "settings"):
        if hasattr(net, attr):
            setattr(fast, attr, getattr(net, attr))
    if compile:
        fast = torch.compile(fast)
    return fast
