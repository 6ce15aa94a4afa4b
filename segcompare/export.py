"""Exporting a model for other runtimes: ONNX.

What is exported is `prepare_for_inference(model)`: BN folded, the heads applied per branch at
low resolution. While tracing, its fused oneDNN calls fall back to plain conv / linear / add /
ReLU / GELU, which every ONNX runtime has. The graph takes `images` N×3×H×W (normalised, as
`segcompare.data.transforms.normalize` makes them) and returns `logits` N×C×ceil(H/4)×ceil(W/4);
with `dynamic=True` N, H and W are free.

Uses torch's TorchScript-based exporter (`dynamo=False`): it needs only the `onnx` package,
where the newer exporter also needs `onnxscript`. Install with `pip install segcompare[onnx]`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from segcompare.data.transforms import MEAN, STD
from segcompare.infer.fast import prepare_for_inference
from segcompare.utils import PathLike, SegcompareError, atomic_path
from segcompare.values import MIN_OPSET, check

OPSET = MIN_OPSET  # the default: the oldest that has LayerNormalization (values.MIN_OPSET)


def max_opset() -> int:
    """The newest opset torch's TorchScript-based exporter writes (20 in torch 2.13)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return OPSET
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", OPSET))


def check_opset(opset: int) -> int:
    """The opset, checked by its row of values.RULES and against what the installed torch
    writes (an older one may stop below values.MAX_OPSET); SegcompareError otherwise."""
    opset = check("--opset", opset, name="opset")
    if opset > max_opset():
        raise SegcompareError(
            f"opset must be at most {max_opset()} (the newest this torch's exporter writes), "
            f"got {opset}"
        )
    return opset


def export_onnx(
    model: nn.Module,
    out: PathLike,
    size_hw: tuple[int, int] = (1024, 2048),
    dynamic: bool = False,
    batch: int = 1,
    opset: int = OPSET,
) -> Path:
    """Write `model` (prepared for inference) as an ONNX file at `out`, atomically.

    `size_hw` and `batch` shape the example input the graph is traced with; with `dynamic`
    the batch size, height and width of the input are symbolic. The model's name, settings,
    class count and output stride go into the file's metadata.
    """
    try:
        import onnx
    except ImportError as err:
        raise SegcompareError("ONNX export needs the onnx package: pip install onnx") from err
    check_opset(opset)
    size_hw = check("--size", size_hw, name="size_hw")  # the options' rows (values.RULES)
    check("--batch", batch, name="batch")
    prepared = prepare_for_inference(model.cpu())
    x = torch.randn(batch, 3, *size_hw)
    axes = None
    if dynamic:
        axes = {
            "images": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "height_4", 3: "width_4"},
        }
    out = Path(out)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated in favour of the dynamo one (onnxscript)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            prepared,
            (x,),
            str(tmp),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        props = {
            "model": getattr(model, "variant", type(model).__name__),
            "settings": json.dumps(getattr(model, "settings", {})),
            "num_classes": str(_num_classes(graph)),
            "output_stride": "4",
            "input": f"RGB 0-255, (x - mean) / std, mean {_csv(MEAN)}, std {_csv(STD)}",
        }
        onnx.helper.set_model_props(graph, props)
        onnx.save(graph, str(tmp))
    return out


def _csv(values) -> str:
    return ",".join(str(float(v)) for v in values)


def _num_classes(graph) -> int:
    dims = graph.graph.output[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value)


def check_onnx(
    path: PathLike, model: nn.Module, size_hw: tuple[int, int], batch: int = 1
) -> Optional[float]:
    """Max |logit difference| between onnxruntime running `path` and the eager `model` on one
    random input; None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, *size_hw, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model.cpu().eval()(x)
    out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return (out - ref).abs().max().item()
