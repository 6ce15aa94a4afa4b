"""Running a model on images: `Predictor`, and predictions written to files.

    predictor = Predictor(build_model("segformer-b0", weights="b0.safetensors"))
    train_ids = predictor.predict(image)            # H×W×3 uint8 RGB -> H×W uint8 train ids

`Predictor` calls the model in one place, `run_model`, so that an optimised model can take its
place; the test-time modes (whole / slide / scales / flip) are `segcompare.evaluate.inference`.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from segcompare.data.images import ACCEPTED, IMAGE_SUFFIXES, load_image, to_rgb8
from segcompare.data.labels import MAX_CLASSES, NUM_CLASSES, ClassTable, generic_table
from segcompare.evaluate import InferenceSettings, inference
from segcompare.infer.fast import (
    Prepared,
    describe_layer_precision,
    layer_precision,
    prepare_for_inference,
)
from segcompare.models.precision import guard_bf16
from segcompare.models.variants import check_input_hw
from segcompare.precision import precision_for
from segcompare.utils import (
    PathLike,
    SegcompareError,
    atomic_path,
    check_output,
    is_temporary,
    output_folder,
    select_device,
    shard,
)

log = logging.getLogger(__name__)

FORMATS = ("trainid", "labelid", "color", "overlay", "logits")
OVERLAY_OPACITY = 0.5  # mmseg's show_result default


class Predictor:
    """A model ready to segment images.

    model: a segmentation model (N×3×H×W normalised -> N×C×H/4×W/4 logits).
    settings: how to run it (`InferenceSettings`: test mode, size, scales, flip, windows,
        device, precision, optimize); its family, when not set, is the model's.
    """

    def __init__(
        self, model: torch.nn.Module, settings: Optional[InferenceSettings] = None
    ) -> None:
        settings = settings or InferenceSettings()
        self.device = select_device(settings.device)
        self.model = model.to(self.device).eval()
        self.name = getattr(model, "variant", type(model).__name__)
        # The classes the model predicts: its classifier's outputs for a segcompare model; for
        # another module, what its first call returns (None until then).
        self.num_classes: Optional[int] = _num_classes(model)
        self.variant: Optional[str] = getattr(model, "variant", None)
        # The data set's classes the weights were trained on (their metadata), if known.
        self.class_table: Optional[ClassTable] = getattr(model, "class_table", None)
        self._fitted: list[tuple[int, int, int]] = []  # batch shapes whose memory was checked
        self.settings = dataclasses.replace(
            settings, family=settings.family or _family_name(model)
        ).resolved()  # aug_test: the family's own scales and flip
        # what the model computes in here (`segcompare.precision.TABLE`); below float32 the
        # model runs under autocast, prepared in that dtype
        self.precision = precision_for(settings.precision, self.device.type)
        self.amp = self.precision.reduced and not self.precision.quantized  # autocast
        self.amp_dtype: torch.dtype = getattr(torch, self.precision.dtype)
        if self.amp_dtype is torch.bfloat16 and self.device.type == "cuda" and not (
                torch.cuda.is_bf16_supported(including_emulation=False)):
            raise SegcompareError(
                f"--precision bf16: {torch.cuda.get_device_name(self.device)} has no bfloat16 "
                "units (CUDA compute capability 8.0 or newer); use --precision fp16"
            )
        # What run_model calls: the model itself, or what prepare_for_inference makes of it.
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        if self.amp_dtype is torch.bfloat16 and self.device.type == "cpu" and not settings.optimize:
            guard_bf16(self.model, self.name)  # autocast: layers bf16 gets wrong here stay fp32
        if self.precision.quantized:
            from segcompare.infer.quantize import int8_forward

            self.forward = int8_forward(self.model, self.device, settings.calib,
                                        settings.calib_images, settings.optimize)
        elif settings.optimize:
            self.forward = prepare_for_inference(self.model, dtype=self.amp_dtype)

    def describe(self) -> dict[str, Any]:
        """The model and how it runs, as `segcompare eval` records them."""
        s = self.settings
        return {
            "model": self.name, "mode": s.mode, "size": list(s.size_hw) if s.size_hw else None,
            "scales": list(s.scales), "flip": s.flip, "device": str(self.device),
            "precision": self.precision.name,
            **(self.forward.calibration.describe() if self.precision.quantized else {}),
        }  # fmt: skip

    def layer_precision(self) -> list[dict[str, Any]]:
        """What each layer computed in (`segcompare.infer.fast.layer_precision`: one report per
        input shape a probed bfloat16 SegFormer, or an int8 model, has met), below float32; []
        in float32."""
        if self.precision.quantized:
            return self.forward.layer_precision()
        if not self.amp:
            return []
        if isinstance(self.forward, Prepared):
            return self.forward.layer_precision()
        return [layer_precision(self.model, self.amp_dtype)]  # the eager model under autocast

    def describe_layers(self) -> list[str]:
        """`layer_precision` as one line per input shape (what the CLI prints)."""
        return [describe_layer_precision(r) for r in self.layer_precision()]

    def run_model(self, images: torch.Tensor) -> torch.Tensor:
        """The one place the model is called: N×3×H×W normalised -> N×C×H/4×W/4 float logits."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return self.forward(images).float()

    @torch.inference_mode()
    def scores(
        self, images: torch.Tensor, out_hw: Optional[tuple[int, int]] = None
    ) -> torch.Tensor:
        """Class scores N×C×out_h×out_w (default: the input size) for a normalised batch, on
        the predictor's device; see `segcompare.evaluate.inference`."""
        if self.variant is not None:  # a segcompare model: too small an input is a user error
            check_input_hw(
                self.settings.model_input_hw(tuple(images.shape[-2:])),
                f"the model input (an image of {images.shape[-2]}x{images.shape[-1]}, test "
                f"size, scales and window as set)",
            )
            if self.device.type == "cpu":
                self._check_memory(tuple(images.shape), tuple(out_hw or images.shape[-2:]))
        scores = inference(self.run_model, images.to(self.device), self.settings, out_hw)
        self.num_classes = int(scores.shape[1])
        return scores

    def _check_memory(self, shape: tuple[int, ...], out_hw: tuple[int, int]) -> None:
        """SegcompareError with the figures, before anything is allocated, when what really
        runs for a batch of `shape` (N×3×H×W) does not fit in memory: the image resized to its
        largest test scale, the score maps at that size and at `out_hw`, and the model's
        forward at its largest input (a window, in slide mode). Checked once per shape; a
        shape no larger than one that fitted fits too."""
        from segcompare.evaluate import scaled_hw
        from segcompare.stats import check_forward_memory

        n, _, h, w = shape
        if any(n <= a and h <= b and w <= c for a, b, c in self._fitted):
            return
        s = self.settings
        test_hw = s.size_hw or (h, w)
        sh, sw = max((scaled_hw(test_hw, scale) for scale in s.scales), key=lambda x: x[0] * x[1])
        classes = self.num_classes or NUM_CLASSES
        # float32: the resized image, the summed and counted scores at the scaled size, then
        # the scores at the output size and their running total over scales and flips
        out_pixels = out_hw[0] * out_hw[1]
        extra = 4 * n * (3 * sh * sw + (2 * classes + 1) * sh * sw + 2 * classes * out_pixels)
        check_forward_memory(
            self.variant, s.model_input_hw((h, w), largest=True), n, classes, extra_bytes=extra,
            what=f"{self.name} on {n} image(s) of {h}x{w} at scale(s) "
            f"{', '.join(f'{x:g}' for x in s.scales)} (largest: {sh}x{sw})",
            **self.model.settings,
        )  # fmt: skip
        self._fitted.append((n, h, w))

    def predict_scores(self, image: Union[np.ndarray, PathLike]) -> torch.Tensor:
        """One image -> C×H×W float32 scores on the CPU. `image`: a path, or an H×W×3 uint8 RGB
        array (or any array `segcompare.data.images.to_rgb8` reads: grey, RGBA, 16-bit,
        float in [0, 1]); SegcompareError (a ValueError) for anything else."""
        from segcompare.data.transforms import normalize

        return self.scores(normalize(_image_rgb8(image, "predict_scores"))[None])[0].cpu()

    def predict(self, image: Union[np.ndarray, PathLike]) -> np.ndarray:
        """One image (as `predict_scores` takes) -> H×W uint8 train ids (a model of at most
        255 classes: 255 is ignore)."""
        from segcompare.data.transforms import normalize

        scores = self.scores(normalize(_image_rgb8(image, "predict"))[None])
        if scores.shape[1] > MAX_CLASSES:  # uint8 would wrap class 256 to 0 and call 255 ignore
            raise SegcompareError(
                f"{self.name} predicts {scores.shape[1]} classes; 8-bit train ids hold at most "
                f"{MAX_CLASSES}: use Predictor.predict_scores (or --format logits)"
            )
        return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


def _image_rgb8(image: Any, method: str) -> np.ndarray:
    """What `Predictor.predict` takes -> H×W×3 uint8 RGB; SegcompareError saying what it takes."""
    what = f"Predictor.{method}"
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        raise SegcompareError(
            f"{what}: a torch.Tensor; it takes an image path or a numpy array ({ACCEPTED}); "
            "for a normalised N×3×H×W tensor use Predictor.scores"
        )
    if not isinstance(image, np.ndarray):
        raise SegcompareError(
            f"{what}: a {type(image).__name__}; it takes an image path or a numpy array "
            f"({ACCEPTED})"
        )
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] not in (1, 2, 3, 4):
        raise SegcompareError(
            f"{what}: shape {image.shape} looks like C×H×W; it takes H×W×C "
            "(image.transpose(1, 2, 0))"
        )
    rgb = to_rgb8(image, f"{what}: image")
    # np.asarray(PIL image) is read-only; torch.from_numpy of it warns ("not writable")
    return rgb if rgb.flags.writeable else rgb.copy()


def _num_classes(model: torch.nn.Module) -> Optional[int]:
    from segcompare.models.save import num_classes_of

    try:
        return num_classes_of(model)
    except (TypeError, SegcompareError):  # not a segcompare model: known after its first call
        return None


def _family_name(model: torch.nn.Module) -> str:
    from segcompare.models import family_of

    try:
        return family_of(model)
    except TypeError:
        raise SegcompareError(
            f"{type(model).__name__} is not a segcompare model: set InferenceSettings.family "
            "to the test code it follows ('segformer' or 'hrnet')"
        ) from None


# ------------------------------------------------------------------------------------------------
# Predictions to files
# ------------------------------------------------------------------------------------------------


def collect_inputs(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """Files, folders (searched recursively) and glob patterns -> sorted (image path, output path
    relative to the output folder, without suffix). Folder inputs keep their sub-folders."""
    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and not is_temporary(p)
            )  # fmt: skip
            pairs += [(p, p.relative_to(path).with_suffix("")) for p in found]
        elif path.is_file():
            found = [path]
            pairs.append((path, Path(path.stem)))
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            pairs += [(p, Path(p.stem)) for p in found]
        if not found:
            raise SegcompareError(f"no images found for input {item!r}")
    seen: dict[Path, Path] = {}
    for src, rel in pairs:
        if rel in seen and seen[rel] != src:
            raise SegcompareError(f"inputs {seen[rel]} and {src} would both be written as {rel}")
        seen[rel] = src
    return list(dict.fromkeys(pairs))


def check_format(
    fmt: str, num_classes: Optional[int], table: Optional[ClassTable] = None
) -> None:
    """SegcompareError for a format that cannot be written for a model of `num_classes` classes
    (None: not known yet): labelid writes the data set's own label ids, known from the weights'
    class table (Cityscapes labelIds, ADE20K 1..150, a folder set's indices), or the Cityscapes
    table's for a 19-class model without one."""
    if fmt not in FORMATS:
        raise SegcompareError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "labelid" and table is None and num_classes is not None and (
            num_classes != NUM_CLASSES):
        raise SegcompareError(
            f"--format labelid writes the data set's own label ids, and these weights name no "
            f"data set (no class table); this model predicts {num_classes} classes: use --format "
            "trainid (or color, overlay, logits)"
        )


def render_prediction(
    train_ids: np.ndarray, image: np.ndarray, fmt: str, num_classes: int = NUM_CLASSES,
    table: Optional[ClassTable] = None,
) -> np.ndarray:
    """H×W train ids of a model of `num_classes` classes -> the array written for `fmt`
    (trainid | labelid | color | overlay). Label ids and colours: the class table `table` (the
    data set's, from the weights), else `generic_table(num_classes)` (Cityscapes' for 19
    classes); labelid needs a table or 19 classes (`check_format`)."""
    check_format(fmt, num_classes, table)
    table = table or generic_table(num_classes)
    if fmt == "trainid":
        return train_ids
    if fmt == "labelid":
        return table.train_id_to_label_id()[train_ids]
    if fmt == "color":
        return table.palette_256()[train_ids]
    if fmt == "overlay":
        colors = table.palette_256()[train_ids]
        blended = (1 - OVERLAY_OPACITY) * image + OVERLAY_OPACITY * colors
        return blended.round().astype(np.uint8)
    raise SegcompareError(f"format {fmt!r} is not an image")


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str],
    out_dir: PathLike,
    fmt: str = "labelid",
    progress: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Segment every input image and write one file per image under `out_dir`: a PNG named after
    the image (labelid PNGs are what the Cityscapes server takes; only for a 19-class model), or
    for 'logits' the float16 C×H×W scores as .npy. `out_dir` follows the output rule
    (`segcompare.utils.output_folder`): never an input folder or inside one, no output over an
    input image, existing outputs replaced only with `overwrite`. Under torch.distributed
    (torchrun) each process segments and writes its consecutive share of the images
    (`segcompare.utils.shard`) and returns those paths."""
    from tqdm import tqdm

    check_format(fmt, predictor.num_classes, predictor.class_table)  # known for our models
    folders = [i for i in inputs if Path(i).is_dir()]
    check_output(out_dir, "--out", folders, overwrite, folder=True)  # before naming any output
    pairs = collect_inputs(inputs)
    suffix = ".npy" if fmt == "logits" else ".png"
    names = [rel.with_name(rel.name + suffix).as_posix() for _, rel in pairs]
    sources = {_real(src) for src, _ in pairs}
    for name in names:
        if _real(Path(out_dir) / name) in sources:
            raise SegcompareError(
                f"--out {out_dir}: the output {Path(out_dir) / name} would replace the input "
                "image of that name; write into another folder"
            )
    written = []
    with output_folder(out_dir, "--out", folders, overwrite, names):
        for i in tqdm(shard(len(pairs)), desc="predict", unit="img", disable=not progress):
            src, out = pairs[i][0], Path(out_dir) / names[i]
            image = load_image(src)
            if fmt == "logits":
                scores = predictor.predict_scores(image).to(torch.float16).numpy()
                with atomic_path(out) as tmp, open(tmp, "wb") as f:
                    np.save(f, scores)
            else:
                train_ids = predictor.predict(image)
                assert predictor.num_classes is not None  # set by its first call
                _save_png(out, render_prediction(train_ids, image, fmt, predictor.num_classes,
                                                 predictor.class_table))
            written.append(out)
    return written


def _real(path: PathLike) -> Path:
    return Path(os.path.abspath(path)).resolve()
