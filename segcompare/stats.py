"""Model statistics: parameters, multiply-accumulates, layer counts, depth and activation memory.

Everything is measured on the model itself, never typed in:

- MACs come from `torch.utils.flop_counter` (FLOPs / 2) over one forward pass on the meta device,
  so even SegFormer-B5 at 1024×2048 is counted in a fraction of a second. On the meta device
  `scaled_dot_product_attention` runs its math path (two batched matmuls), which the counter sees;
  on a real CPU tensor torch 2.13 dispatches to a fused kernel the counter does not know, so the
  formula for that kernel is registered as well.
- `gmacs_conv_linear` counts convolutions and linear layers only (what most papers' tables and
  the seed's table counted); `gmacs` adds the attention matmuls.
- `depth` is the number of convolution and linear layers on the longest path from input to output
  of the autograd graph: the way ResNet-50 is "50 layers deep".
- `activation_mb` is the peak of the bytes held by live tensors (weights excluded) during one
  inference forward, tracked tensor by tensor on the meta device: the figure depends only on the
  model and the input size, not on the allocator or the machine. Attention is tracked as the fused
  kernel runs it (no L×S matrix held), as on the CPU and GPU.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

DEFAULT_SIZE = (1024, 2048)  # Cityscapes full resolution, H×W

# aten ops whose FLOPs are attention (not conv/linear) in the counter's output.
_ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product")


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _flop_mapping() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_flash_attention_flops} if op is not None else {}


def count_macs(model: nn.Module, size: Sequence[int] = DEFAULT_SIZE, batch: int = 1) -> dict:
    """Multiply-accumulates of one forward at `size` (H, W): {"gmacs", "gmacs_conv_linear"}.

    The model must be on the meta device (build it under `torch.device("meta")`) or on the CPU.
    """
    device = next(model.parameters()).device
    x = torch.zeros(batch, 3, *size, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
        model(x)
    model.train(was_training)
    by_op = fc.get_flop_counts()["Global"]
    total = sum(by_op.values())
    attention = sum(
        v for op, v in by_op.items() if str(op).split(".")[-1].startswith(_ATTENTION_OPS)
    )
    return {"gmacs": total / 2e9, "gmacs_conv_linear": (total - attention) / 2e9}


def layer_counts(model: nn.Module) -> dict[str, int]:
    """How many modules of each class the model holds, containers excluded, most common first."""
    # Containers and Identity hold no computation of their own.
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity)
    modules = [m for m in model.modules() if m is not model and not isinstance(m, containers)]
    counts = Counter(type(m).__name__ for m in modules)
    return dict(counts.most_common())


# autograd node names of layers with weights; the depth counts these on the longest path.
_WEIGHTED_NODES = ("ConvolutionBackward", "AddmmBackward", "MmBackward", "LinearBackward")


def depth(model: nn.Module, size: Sequence[int] = (64, 64)) -> int:
    """Convolution and linear layers on the longest input-to-output path of the autograd graph."""
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, *size, device=device, requires_grad=True)
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        out = model(x)
    model.train(was_training)
    memo: dict[Any, int] = {}
    # Iterative post-order DFS: the graph of a W48 is thousands of nodes deep in places.
    stack = [(out.grad_fn, False)]
    while stack:
        node, ready = stack.pop()
        if node is None or (node in memo and not ready):
            continue
        parents = [p for p, _ in node.next_functions if p is not None]
        if not ready:
            stack.append((node, True))
            stack.extend((p, False) for p in parents if p not in memo)
            continue
        here = 1 if type(node).__name__.startswith(_WEIGHTED_NODES) else 0
        # A linear layer appears as AddmmBackward (or MmBackward when bias-free) fed by the weight's
        # TBackward, which is not a layer on the data path: only data-path nodes are followed.
        memo[node] = here + max((memo.get(p, 0) for p in parents), default=0)
    return memo[out.grad_fn]


class _FusedAttentionOnMeta(TorchFunctionMode):
    """On the meta device, run `scaled_dot_product_attention` as the fused CPU kernel does.

    Left alone, meta tensors take SDPA's math path, which materialises the L×S attention matrix
    (1 GB for SegFormer's first stage at 1024×2048) that the fused kernels of CPU and GPU never
    hold; the memory figure must describe what really runs.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            unsupported = set(kwargs) - {"scale"} or len(args) > 3
            if not unsupported:
                fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
                return fused(q, k, v, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created inside the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)  # views share their base's storage and are counted once
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def activation_mb(model: nn.Module, size: Sequence[int] = DEFAULT_SIZE, batch: int = 1) -> float:
    """Peak MB (2**20 bytes) of live activations during one inference forward (input included)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, 3, *size, device=device)
    tracker = LiveTensorBytes()
    with torch.no_grad(), _FusedAttentionOnMeta(), tracker:
        out = model(x)
    del out
    model.train(was_training)
    return (tracker.peak + x.numel() * x.element_size()) / 2**20


def check_forward_memory(
    name: str,
    size: Sequence[int],
    batch: int = 1,
    num_classes: int = 19,
    device: Any = None,
    extra_bytes: float = 0.0,
    what: str = "",
    **overrides: Any,
) -> None:
    """SegcompareError, before anything is allocated, when one inference forward of the variant
    at batch×3×H×W needs more memory than is available on `device` (RAM, or a CUDA device's
    free memory): weights and the activation peak, as counted on the meta device.
    `extra_bytes`: what the caller holds beside the forward (a resized image, score maps),
    checked first and alone, so that an absurd size is refused without a meta forward; `what`:
    the message's name for it all (default: the input size)."""
    from segcompare.models import build_model
    from segcompare.utils import check_memory

    what = what or f"{name} at {batch}x3x{size[0]}x{size[1]}"
    check_memory(extra_bytes, what, device)
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes, **overrides)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = weights + activation_mb(model, size, batch) * 2**20 + extra_bytes
    check_memory(need, what, device)


def backbone_parameters(model: nn.Module) -> int:
    """Parameters of the feature extractor: everything but the segmentation head."""
    from segcompare.models.variants import FAMILIES

    head_prefixes = tuple(family.head_prefix for family in FAMILIES.values())
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(head_prefixes))


def model_stats(
    name: str, size: Sequence[int] = DEFAULT_SIZE, num_classes: int = 19, **overrides: Any
) -> dict:
    """All statistics of one variant at `size`, counted on the meta device (no weights needed)."""
    from segcompare.models import build_model

    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes, **overrides)
    macs = count_macs(model, size)
    return {
        "name": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "backbone_parameters": backbone_parameters(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gmacs": round(macs["gmacs"], 2),
        "gmacs_conv_linear": round(macs["gmacs_conv_linear"], 2),
        "depth": depth(model),
        "layers": layer_counts(model),
        "activation_mb": round(activation_mb(model, size), 1),
    }


def format_stats_table(rows: Sequence[dict], size: Sequence[int]) -> str:
    """Markdown table of `model_stats` rows."""
    out = [
        f"Input {size[0]}x{size[1]}, 19 classes. GMACs = multiply-accumulates of one forward.",
        "",
        "| model | parameters | backbone | GMACs | GMACs conv+linear | depth | Conv2d | Linear "
        "| norms | activation MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        layers = r["layers"]
        norms = sum(v for k, v in layers.items() if "Norm" in k)
        out.append(
            f"| {r['name']} | {r['parameters']:,} | {r['backbone_parameters']:,} | "
            f"{r['gmacs']:.2f} | {r['gmacs_conv_linear']:.2f} | {r['depth']} | "
            f"{layers.get('Conv2d', 0)} | {layers.get('Linear', 0)} | {norms} | "
            f"{r['activation_mb']:.0f} |"
        )
    return "\n".join(out)
