"""int8 inference on the CPU: post-training static quantization through PyTorch's PT2E.

    forward = Int8Model(prepare_for_inference(model), model, Calibration("data/", 32))
    logits = forward(images)   # N×3×H×W normalised -> N×C×H/4×W/4 float32

What runs in int8: every convolution (uint8 activations per tensor, int8 weights per channel,
torchao's `X86InductorQuantizer`), with the additions, ReLUs and concatenations the quantizer fuses
into them; `torch.compile` (inductor, freezing) lowers the graph to oneDNN int8 kernels. Everything
else (upsampling, the classifier's output, softmax) stays float32.

Where it is offered: `INT8_FAMILIES`, the families for which int8 passed the rule of issue 25 on
the CPU (`benchmarks/int8_cpu.py`, `benchmarks/RESULTS.md` "int8"): at least 1.5× faster than our
fp32 at 1024×2048, and mIoU on trained weights within 0.5 points. HRNet: 0.33-0.44× of fp32's
time (all five) and -0.01 to -0.02 points.
SegFormer is refused: both int8 paths were slower than its fp32 model (0.91× and 0.70×), whose time
is its float32 attention. So is a CPU without int8 dot products (no AVX512-VNNI, AVX-VNNI or
AMX-INT8: `cpu_has_vnni`): on an AMD EPYC with AVX2 only int8 took 1.05× of fp32's time.

A graph is built per input size (the exported graph has static shapes; batches run image by
image): export, calibration on the `Calibration` images resized to that size, conversion,
compilation. Calibration is the slow part (minutes at 1024×2048), so its result is cached: the
observers' statistics (min/max tensors), as safetensors, keyed by the weights, the calibration
images' bytes, the size and the library versions. Loading the cache reads tensors only: no code
runs from the file. Compilation is redone in each process (inductor keeps its own cache of the
kernels it generates, so a second run compiles faster). Each step's time is logged.

Needs torchao (the int8 extra: `pip install -e '.[int8]'`): PyTorch's PT2E quantization lives there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from segcompare.data.images import IMAGE_SUFFIXES
from segcompare.models import precision as model_precision
from segcompare.utils import SegcompareError, atomic_path, cache_dir, cpu_model_name

log = logging.getLogger(__name__)

DEFAULT_CALIB_IMAGES = 32
# family -> the measurement that let int8 in (benchmarks/RESULTS.md, "int8")
INT8_FAMILIES = {
    "hrnet": "0.33-0.44x of fp32's time at 1024x2048 for every HRNet; mIoU -0.01/-0.02",
}
# without int8 dot products (VNNI) oneDNN's int8 kernels gain nothing on float32's
NO_VNNI = ("1.05x of fp32's time for HRNet-W18-Small-v1 and -v2 at 1024x2048 on an AMD EPYC with "
           "AVX2 only, 2026-12-04; benchmarks/RESULTS.md, 'A CPU with AVX2 only'")
NOT_OFFERED = {
    "segformer": "slower than fp32 on the CPU (0.91x PT2E, 0.70x onnxruntime at 1024x2048: "
    "its time is the float32 attention); benchmarks/RESULTS.md, 'int8'",
}


def check_int8(model: nn.Module, device: torch.device) -> None:
    """SegcompareError unless `model` may run in int8 on `device` (the CPU, a family of
    `INT8_FAMILIES`, torchao installed)."""
    from segcompare.models import family_of

    if device.type != "cpu":
        raise SegcompareError(f"--precision int8 runs on the CPU only, not {device.type}: "
                              "use --precision fp16 or bf16 there")
    if not model_precision.cpu_has_vnni():
        raise SegcompareError(f"--precision int8 is not offered on a CPU without VNNI "
                              f"({cpu_model_name() or 'this CPU'}): int8 was not faster than "
                              f"fp32 there ({NO_VNNI}); use fp32")
    family = family_of(model)
    if family not in INT8_FAMILIES:
        why = NOT_OFFERED.get(family, "not measured")
        raise SegcompareError(f"--precision int8 is not offered for {family} "
                              f"({getattr(model, 'variant', family)}): {why}")
    try:
        _torchao()
    except ImportError as err:
        raise SegcompareError(f"--precision int8 needs torchao ({err}): install the int8 "
                              "extra, pip install -e '.[int8]' in a clone") from None


def int8_forward(
    model: nn.Module, device: torch.device, calib: Optional[str], count: int, optimize: bool
) -> Int8Model:
    """What `--precision int8` runs for `model` (`Predictor`, `segcompare bench`): its prepared
    model, quantized after a calibration on `count` images of `calib`; one error line where
    int8 is not offered, or where no calibration images are given."""
    from segcompare.infer.fast import prepare_for_inference

    check_int8(model, device)
    if not calib:
        raise SegcompareError(
            "--precision int8 needs calibration images: --calib DIR (a data set root, whose "
            f"train split is used, or a folder of images; --calib-images {count})"
        )
    if not optimize:
        raise SegcompareError("--precision int8 quantizes the optimized model: drop --no-optimize")
    return Int8Model(prepare_for_inference(model), model, Calibration(calib, count))


def _torchao() -> Any:
    """torchao's PT2E entry points, imported without its notices (it logs a warning for each
    CUDA-only library it cannot load on a CPU machine, torch one for an Enum it registers)."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401  (int8 lowerings)
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return torchao, quantize_pt2e, x86_inductor_quantizer


# ------------------------------------------------------------------------------------------------
# Calibration images
# ------------------------------------------------------------------------------------------------


class Calibration:
    """`count` images of `source` (evenly spread over its sorted files) for int8 calibration.

    source: a data set root (its train split's images; `segcompare.data.layouts`) or a folder of
    images (searched recursively)."""

    def __init__(self, source: str | os.PathLike, count: int = DEFAULT_CALIB_IMAGES) -> None:
        if count < 1:
            raise SegcompareError(f"--calib-images {count}: must be 1 or more")
        self.source = Path(source)
        self.count = count
        files = _calibration_files(self.source)
        if not files:
            raise SegcompareError(f"--calib {source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        step = len(files) / min(count, len(files))
        self.files = [files[int(i * step)] for i in range(min(count, len(files)))]

    def describe(self) -> dict[str, Any]:
        return {"calib": str(self.source), "calib_images": len(self.files)}

    def digest(self) -> str:
        """sha256 over the chosen images' bytes, in order."""
        h = hashlib.sha256()
        for path in self.files:
            h.update(path.read_bytes())
        return h.hexdigest()

    def tensors(self, hw: tuple[int, int]) -> list[torch.Tensor]:
        """The images, normalised and resized to `hw`: 1×3×H×W each."""
        from segcompare.data.images import load_image
        from segcompare.data.transforms import normalize

        out = []
        for path in self.files:
            x = normalize(load_image(path))[None]
            out.append(nn.functional.interpolate(x, size=hw, mode="bilinear",
                                                 align_corners=False))
        return out


def _calibration_files(source: Path) -> list[Path]:
    from segcompare.data.layouts import available_splits, detect_layout, split_dirs

    if not source.is_dir():
        raise SegcompareError(f"--calib {source}: not a folder")
    try:
        layout = detect_layout(source)
    except SegcompareError:  # a plain folder of images
        layout = None
    if layout is not None and "train" in available_splits(source, layout):
        source = split_dirs(source, layout, "train")[0]
    return sorted(p for p in source.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# ------------------------------------------------------------------------------------------------
# The int8 model
# ------------------------------------------------------------------------------------------------


def weights_digest(model: nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Int8Model:
    """The int8 forward of a prepared model (see the module's docstring).

    prepared: `prepare_for_inference(model)` in float32 (what is exported and quantized).
    model: the model itself (its weights key the cache; its variant names it).
    calibration: the images the observers see. cache: the folder of calibration statistics
    (default ~/.cache/segcompare/int8, or $XDG_CACHE_HOME's)."""

    def __init__(
        self, prepared: nn.Module, model: nn.Module, calibration: Calibration,
        cache: Optional[Path] = None,
    ) -> None:  # fmt: skip
        self.prepared = prepared
        self.name = getattr(model, "variant", type(model).__name__)
        self.calibration = calibration
        self.cache = Path(cache) if cache else cache_dir() / "int8"
        self._weights = weights_digest(model)
        self._digest: Optional[str] = None  # the calibration images', read when first needed
        self._graphs: dict[tuple[int, int], Any] = {}
        self._reports: dict[tuple[int, int], dict[str, Any]] = {}
        self.timings: dict[tuple[int, int], dict[str, Any]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        graph = self._graphs[hw] if hw in self._graphs else self._build(hw)
        # each image as an inference-mode copy, as the graph was compiled for: a tensor made
        # outside inference mode carries another dispatch key, which would make dynamo compile
        # the graph again (minutes)
        with torch.inference_mode():
            return torch.cat([graph(x[i : i + 1].clone()) for i in range(x.shape[0])])

    def layer_precision(self) -> list[dict[str, Any]]:
        """One report per input size (`segcompare.infer.fast.layer_precision`'s form): each
        convolution of the quantized graph, int8 where its weight is quantized."""
        return [self._reports[hw] for hw in sorted(self._reports)]

    def cache_file(self, hw: tuple[int, int]) -> Path:
        return self.cache / f"{self.name}_{hw[0]}x{hw[1]}_{self._key(hw)[:16]}.safetensors"

    def _key(self, hw: tuple[int, int]) -> str:
        if self._digest is None:
            self._digest = self.calibration.digest()
        torchao, _, _ = _torchao()
        text = json.dumps([self.name, list(hw), self._weights, self._digest,
                           torch.__version__, torchao.__version__])  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()

    def _build(self, hw: tuple[int, int]) -> Any:
        # Predictor.scores runs under inference mode; observers made there would hold inference
        # tensors, which calibration cannot update in place
        with torch.inference_mode(False), torch.no_grad():
            converted = self._quantize(hw)
        start = time.perf_counter()
        import torch._inductor.config as inductor_config

        compiled = torch.compile(converted)
        # freezing: the weights are constants, so inductor prepacks them into oneDNN's int8
        # layout; the first call compiles
        with inductor_config.patch(freezing=True), torch.inference_mode():
            compiled(torch.zeros(1, 3, *hw))
        timing = self.timings[hw]
        timing["compile_s"] = round(time.perf_counter() - start, 1)
        _say(f"int8 {self.name} at {hw[0]}x{hw[1]}: compiled in {timing['compile_s']:.0f} s "
             f"(export {timing['export_s']:.0f} s)")
        self._graphs[hw] = compiled
        return compiled

    def _quantize(self, hw: tuple[int, int]) -> torch.fx.GraphModule:
        """The converted (quantized, not yet compiled) graph at `hw`: calibrated here, or with
        the cached statistics."""
        from safetensors.torch import save_file

        _, pt2e, xiq = _torchao()
        what = f"{self.name} at {hw[0]}x{hw[1]}"
        example = torch.zeros(1, 3, *hw)
        start = time.perf_counter()
        # strict: dynamo records which module made each node, which the quantizer reads
        graph = torch.export.export(self.prepared, (example,), strict=True).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        observed = pt2e.prepare_pt2e(graph, quantizer)
        stats_names = sorted(k for k in observed.state_dict() if "activation_post_process" in k)
        # which observer watches which tensor: the statistics fit this graph only
        signature = hashlib.sha256(str(observed.graph).encode()).hexdigest()
        path = self.cache_file(hw)
        cached = _load_stats(path, stats_names, signature)
        timing: dict[str, Any] = {"export_s": round(time.perf_counter() - start, 1)}
        if cached is not None:
            # set each observer's tensors as they are (min_val, max_val, histogram, eps):
            # load_state_dict does not restore the activation observers' eps, which changes
            # their scales
            for key, value in cached.items():
                owner, attr = key.rsplit(".", 1)
                setattr(observed.get_submodule(owner), attr, value)
            timing["calibration"] = str(path)
            _say(f"int8 {what}: calibration statistics from {path}")
        else:
            start = time.perf_counter()
            for image in self.calibration.tensors(hw):
                observed(image)
            state = observed.state_dict()
            stats = {k: state[k].detach().contiguous().clone() for k in stats_names}
            with atomic_path(path) as tmp:
                save_file(stats, str(tmp), metadata={"key": self._key(hw), "graph": signature})
            timing["calibration_s"] = round(time.perf_counter() - start, 1)
            _say(f"int8 {what}: calibrated on {len(self.calibration.files)} image(s) of "
                 f"{self.calibration.source} in {timing['calibration_s']:.0f} s (cached: {path})")
        converted = pt2e.convert_pt2e(observed)
        self._reports[hw] = _int8_report(converted, hw)
        self.timings[hw] = timing
        return converted


def _say(line: str) -> None:
    """One line on stderr, around any progress bar: what int8 costs is always shown (eval and
    predict configure no logging)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _load_stats(path: Path, names: Sequence[str], signature: str) -> Optional[dict]:
    """The cached statistics at `path` when they are there and were made for this graph (the
    same observers on the same tensors: `signature`); else None (calibrate again). A file that
    cannot be read is said and replaced."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            made_for = (f.metadata() or {}).get("graph")
            stats = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001  (a damaged cache file is recalibrated, not fatal)
        log.warning("int8: %s: cannot read (%s); calibrating again", path, err)
        return None
    if made_for != signature or sorted(stats) != list(names):
        log.warning("int8: %s: made for another graph; calibrating again", path)
        return None
    return stats


def _int8_report(graph: torch.fx.GraphModule, hw: tuple[int, int]) -> dict[str, Any]:
    """{"input": [1, 3, H, W], "layers": [...]}: each convolution of the converted graph, int8
    where its weight comes through a per-channel dequantize (the quantizer chose it)."""
    rows = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or "convolution" not in str(node.target) and (
            "conv2d" not in str(node.target)
        ):
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        quantized = weight is not None and "dequantize_per_channel" in str(
            getattr(weight, "target", "")
        )
        stack = node.meta.get("nn_module_stack") or {}
        name = list(stack.values())[-1][0] if stack else node.name
        # the prepared model's modules: net.stem..., net.head... (the decode head)
        role = "decode head" if ".head." in f".{name}." or "last_layer" in name else "convs"
        rows.append({"name": str(name), "role": role,
                     "precision": "int8" if quantized else "fp32",
                     "why": "" if quantized else "not quantized"})  # fmt: skip
    return {"input": [1, 3, *hw], "layers": rows}
