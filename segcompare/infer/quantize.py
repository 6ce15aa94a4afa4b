"""int8 inference on the CPU: post-training static quantization with onnxruntime (QDQ).

    run = int8_model(model, calibration)   # built once, then cached
    logits = run(images)                   # N×3×H×W -> N×C×H/4×W/4, any H, W

The model is exported as `segcompare.export` exports it (`prepare_for_inference`: BN folded, the
heads per branch), then onnxruntime's `quantize_static` puts int8 quantize/dequantize pairs
around every convolution: activations uint8 per tensor, weights int8 per output channel, scales
from the min/max the calibration images (normalised, N×3×H×W) produce. Only convolutions are
quantized: LayerNorm, softmax and attention's scores stay float32. The graph has free batch,
height and width, so one int8 model serves every input size. onnxruntime's calibration keeps
every conv output of every calibration image in memory (about 1 GB per 1024×2048 image for
HRNet-W18-Small): calibrate on images of training-crop size (benchmarks/int8_cpu.py: 256×512).

Offered only for the families in `INT8_FAMILIES`: where benchmarks/int8_cpu.py measured int8 at
least 1.5× faster than our fp32 model at 1024×2048 and its mIoU on the demo's trained weights
within 0.5 points of fp32 (benchmarks/RESULTS.md, "int8"). `check_int8` refuses the others.

The quantized model is an ONNX file: data, no code. It is cached under the user cache folder
(`segcompare.utils.user_cache`) per model weights and calibration images (their size
included), so the calibration (a minute for 32 images of 256×512 on two cores) runs once;
loading it back runs no code from the file. Needs `pip install segcompare[onnx]`.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from segcompare.utils import PathLike, SegcompareError, atomic_path, user_cache

log = logging.getLogger(__name__)

# Families whose int8 model passed the rule above (benchmarks/RESULTS.md, "int8").
INT8_FAMILIES = frozenset({"hrnet"})
CALIB_IMAGES = 32  # the default number of calibration images


def check_int8(model: nn.Module) -> str:
    """The model's family if int8 is offered for it; else one SegcompareError saying why not."""
    from segcompare.models import family_of

    family = family_of(model)
    if family not in INT8_FAMILIES:
        raise SegcompareError(
            f"--precision int8 is not offered for {family} ({getattr(model, 'variant', '')}): "
            "on this project's CPUs it did not pass the speed and mIoU rule "
            "(benchmarks/RESULTS.md, int8); offered for: " + ", ".join(sorted(INT8_FAMILIES))
        )
    return family


def _onnxruntime():
    try:
        import onnxruntime
        from onnxruntime import quantization
    except ImportError as err:
        raise SegcompareError(
            "--precision int8 needs onnxruntime: pip install segcompare[onnx]"
        ) from err
    return onnxruntime, quantization


def cache_key(model: nn.Module, calibration: Sequence[torch.Tensor]) -> str:
    """A digest of what decides the int8 model: the variant, every weight (names, shapes, values)
    and the calibration images (shapes and values)."""
    h = hashlib.sha256()
    h.update(str(getattr(model, "variant", type(model).__name__)).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for x in calibration:
        h.update(str(tuple(x.shape)).encode())
        h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: one {"images": N×3×H×W} per call."""

    def __init__(self, images: Sequence[torch.Tensor]):
        self._images = iter(images)

    def get_next(self) -> Optional[dict]:
        x = next(self._images, None)
        return None if x is None else {"images": x.detach().cpu().float().numpy()}


def quantize_to_onnx(model: nn.Module, calibration: Sequence[torch.Tensor], out: PathLike) -> Path:
    """Write the int8 (QDQ) ONNX model of `model` at `out`, atomically, calibrated on
    `calibration` (normalised N×3×H×W images, all of one size)."""
    from segcompare.export import export_onnx

    _, quantization = _onnxruntime()
    check_int8(model)
    if not calibration:
        raise SegcompareError("--precision int8: no calibration images")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out) as dst:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32, size_hw=tuple(calibration[0].shape[-2:]), dynamic=True)
        quantization.quantize_static(
            str(fp32), str(dst), _Reader(calibration),
            quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            op_types_to_quantize=["Conv"],  # LayerNorm, Softmax, attention's MatMuls: float
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )  # fmt: skip
    return out


class Int8Model:
    """An int8 ONNX file run by onnxruntime on the CPU: N×3×H×W normalised -> logits (torch)."""

    def __init__(self, path: PathLike, threads: Optional[int] = None):
        ort, _ = _onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # no busy-waiting after a run: it would take the cores from whatever runs next
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().float().contiguous().numpy()
        logits = torch.from_numpy(self.session.run(None, {"images": x})[0])
        return logits.to(images.device)


def int8_model(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    cache: Optional[PathLike] = None,
) -> Int8Model:
    """The int8 model of `model`, calibrated on `calibration`: built once (calibration time
    logged), then read back from `cache` (default: the user cache folder's int8/)."""
    check_int8(model)
    if not calibration:
        raise SegcompareError("--precision int8: no calibration images")
    folder = Path(cache) if cache is not None else user_cache() / "int8"
    variant = getattr(model, "variant", type(model).__name__)
    h, w = calibration[0].shape[-2:]
    path = (
        folder / f"{variant}-calib{len(calibration)}x{h}x{w}-{cache_key(model, calibration)}.onnx"
    )
    if path.is_file():
        log.info("int8: reusing %s", path)
    else:
        t0 = time.perf_counter()
        quantize_to_onnx(model, calibration, path)
        log.info(
            "int8: %s calibrated on %d images in %.1f s -> %s",
            variant, len(calibration), time.perf_counter() - t0, path,
        )  # fmt: skip
    t0 = time.perf_counter()
    run = Int8Model(path)
    log.info("int8: session ready in %.1f s", time.perf_counter() - t0)
    return run
