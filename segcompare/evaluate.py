"""Test-time inference and scoring a split; the figures themselves are `segcompare.metrics`'.

Inference. `inference(model, images, ...)` runs a model on a normalised N×3×H×W batch the way the
official test code does: `whole` (resize to the test size, one forward pass) or `slide`
(overlapping windows), at one or several scales, optionally with horizontal flip, and returns class
scores at the label size. `InferenceSettings` is the one value that says how.

Scoring. `evaluate_model` runs a model over a whole split and `evaluate_prediction_files` reads
existing labelIds PNGs; both feed `segcompare.metrics.ConfusionMatrix`, so training validation,
`segcompare eval` and the comparison report give the same figures.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import InitVar, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segcompare.metrics import ConfusionMatrix, label_ids_to_pred
from segcompare.models.variants import FAMILIES, OFFICIAL_TEST_HW, OfficialTest, TestResize
from segcompare.precision import amp_precision, check_precision
from segcompare.utils import (
    PathLike,
    SegcompareError,
    atomic_path,
    select_device,
    shard,
    torchrun_rank_world,
)
from segcompare.values import check

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Test-time inference
# ------------------------------------------------------------------------------------------------

Model = Callable[[torch.Tensor], torch.Tensor]  # N×3×H×W normalised -> N×C×h×w logits

@dataclass(frozen=True)
class InferenceSettings:
    """How to run a model at test time: one value, built once (by the CLI from its options) and
    handed to every `Predictor`, `evaluate_model` and `run_compare`.

    family: whose official test code to follow ('segformer' | 'hrnet'): the default slide window
        and how flips and scales are averaged. None: the model's own (`Predictor` fills it in).
    mode: 'whole' (one pass over the image at the test size) or 'slide' (windows).
    scales: test-size multipliers; several, or flip, average the class probabilities.
    size_hw: test size the image is resized to; None: each image's own size.
    window_hw / stride_hw: slide window and step in pixels at the test size; None: the family's
        official ones, each side scaled from 1024×2048 to the test size (SegFormer on a 64×128
        image: window 64×64, stride 48×48).
    device: 'auto' | 'cpu' | 'cuda' | 'mps'.
    precision: what the model computes in, a name of `segcompare.precision.PRECISIONS`
        ('fp32', 'bf16', 'fp16', 'int8'; its `TABLE` says what each means on each device).
    calib / calib_images: int8's calibration images (`segcompare.infer.quantize.Calibration`: a
        data set root, whose train split is used, or a folder of images) and how many.
    amp: the older switch, kept as an alias: True sets `precision` to bfloat16 on the CPU and
        float16 on a GPU (the device `device` resolves to); not stored.
    optimize: run the model through `prepare_for_inference` (the same logits, faster; in
        the precision's dtype); False runs the eager model (under autocast below fp32).
    aug_test: the family's official multi-scale test: its scales and flip (SegFormer 0.5-2.0,
        HRNet 0.5-1.75, both with flip, on Cityscapes) replace `scales` and `flip` (`resolved`).
    dataset: whose official test recipe (`Family.test_for`) gives the default window, the
        aug-test scales and, where the recipe has one (ADE20K), the resize of each image
        (`TestResize`: SegFormer's AlignedResize, HRNet's 520 test). `official_settings` builds
        the whole official test of a data set.
    """

    family: Optional[str] = None
    mode: str = "slide"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    size_hw: Optional[tuple[int, int]] = None
    window_hw: Optional[tuple[int, int]] = None
    stride_hw: Optional[tuple[int, int]] = None
    device: str = "auto"
    precision: str = "fp32"
    calib: Optional[str] = None
    calib_images: int = 32
    optimize: bool = True
    aug_test: bool = False
    dataset: str = "cityscapes"
    amp: InitVar[bool] = False

    def __post_init__(self, amp: bool) -> None:
        check_precision(self.precision)
        if amp:  # the alias: the 16-bit type of the device this resolves to
            meant = amp_precision(select_device(self.device).type)
            if self.precision not in ("fp32", meant):
                raise SegcompareError(f"--amp means --precision {meant} here, not "
                                      f"{self.precision}: give one of the two")
            object.__setattr__(self, "precision", meant)
        if self.family is not None and self.family not in FAMILIES:
            raise SegcompareError(f"unknown model family {self.family!r}; valid: segformer, hrnet")
        if self.mode not in ("whole", "slide"):
            raise SegcompareError(f"unknown test mode {self.mode!r}; valid: whole, slide")
        # the values of --scales, --size, --window, --stride: their rows of values.RULES
        object.__setattr__(self, "scales", tuple(check("--scales", self.scales, name="scales")))
        for name, flag in (("size_hw", "--size"), ("window_hw", "--window"),
                           ("stride_hw", "--stride")):  # fmt: skip
            if getattr(self, name) is not None:  # a frozen dataclass: set once, here
                object.__setattr__(self, name, check(flag, getattr(self, name), name=name))
        if self.window_hw and self.stride_hw:
            _check_stride(self.window_hw, self.stride_hw)

    def resolved(self) -> InferenceSettings:
        """These settings with `aug_test` applied: the family's official scales and flip."""
        if not self.aug_test:
            return self
        test = self.recipe()
        return replace(self, scales=test.scales, flip=test.flip)

    def recipe(self) -> OfficialTest:
        """The family's official test on this data set."""
        return FAMILIES[self._family()].test_for(self.dataset)

    def resize(self) -> Optional[TestResize]:
        """The official resize of each image, unless a test size is given."""
        return None if self.size_hw else self.recipe().resize

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-ready values (what eval's and compare's metadata record)."""

        def hw(value: Optional[tuple[int, int]]) -> Optional[list[int]]:
            return list(value) if value else None

        return {
            "mode": self.mode, "size": hw(self.size_hw), "scales": list(self.scales),
            "flip": self.flip, "precision": self.precision, "optimize": self.optimize,
            "window": hw(self.window_hw), "stride": hw(self.stride_hw), "aug_test": self.aug_test,
            "dataset": self.dataset,
            **({"calib": self.calib, "calib_images": self.calib_images}
               if self.precision == "int8" else {}),
        }  # fmt: skip

    def windows_for(self, test_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(window_hw, stride_hw) in pixels for images tested at `test_hw`."""
        if self.window_hw:  # the user's window; stride: theirs, else the window (no overlap)
            return self.window_hw, self.stride_hw or self.window_hw
        recipe = self.recipe()

        def scaled(hw: tuple[int, int]) -> tuple[int, int]:
            # Each side in proportion to the test size: HRNet's window stays the whole test
            # image, SegFormer's stays half its width, whatever the image's aspect.
            return tuple(max(1, round(v * t / o)) for v, t, o in zip(hw, test_hw, OFFICIAL_TEST_HW))

        window_hw = scaled(recipe.window_hw)
        if self.stride_hw:
            _check_stride(window_hw, self.stride_hw)
        return window_hw, self.stride_hw or scaled(recipe.stride_hw)

    def model_input_hw(
        self, image_hw: tuple[int, int], largest: bool = False
    ) -> tuple[int, int]:
        """The smallest (or `largest`) (H, W) the model is given for an image of `image_hw`: the
        test size at each scale, cut into windows in slide mode (a window is clipped to the
        image)."""
        test_hw = tuple(self.size_hw or image_hw)
        window_hw, _ = self.windows_for(test_hw)
        resize = self.resize()
        sizes = [
            _pad_hw(resize.resized_hw(image_hw, s), resize) if resize else scaled_hw(test_hw, s)
            for s in self.scales
        ]
        if self.mode == "slide":
            sizes = [(min(h, window_hw[0]), min(w, window_hw[1])) for h, w in sizes]
        pick = max if largest else min
        return pick(h for h, _ in sizes), pick(w for _, w in sizes)

    def _family(self) -> str:
        if self.family is None:
            raise SegcompareError(
                "InferenceSettings.family is not set: name 'segformer' or 'hrnet'"
            )
        return self.family


def _check_stride(window_hw: tuple[int, int], stride_hw: tuple[int, int]) -> None:
    """A stride larger than the window would leave pixels between windows without scores."""
    if stride_hw[0] > window_hw[0] or stride_hw[1] > window_hw[1]:
        raise SegcompareError(
            f"slide stride {stride_hw[0]}x{stride_hw[1]} is larger than the window "
            f"{window_hw[0]}x{window_hw[1]}: pixels between windows would get no prediction; "
            "use a stride of at most the window"
        )


def scaled_hw(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """The test size at `scale`, rounded as both official codes round it."""
    return int(hw[0] * scale + 0.5), int(hw[1] * scale + 0.5)


def _pad_hw(hw: tuple[int, int], resize: TestResize) -> tuple[int, int]:
    """`hw` padded to the recipe's pad size (never cut)."""
    pad = resize.pad_hw or hw
    return max(hw[0], pad[0]), max(hw[1], pad[1])


def _pad(x: torch.Tensor, resize: Optional[TestResize]) -> torch.Tensor:
    """N×3×H×W normalised images padded at the bottom and right to the recipe's pad size with
    black (0 before normalisation, -mean/std after), as HRNet's pad_image."""
    if resize is None or resize.pad_hw is None:
        return x
    h, w = x.shape[-2:]
    ph, pw = _pad_hw((h, w), resize)
    if (ph, pw) == (h, w):
        return x
    from segcompare.data.transforms import MEAN, STD

    black = torch.tensor([-m / s for m, s in zip(MEAN, STD)], dtype=x.dtype, device=x.device)
    out = black.view(1, 3, 1, 1).expand(x.shape[0], 3, ph, pw).clone()
    out[:, :, :h, :w] = x
    return out


def _crop_resize(
    scores: torch.Tensor, hw: tuple[int, int], out_hw: tuple[int, int]
) -> torch.Tensor:
    """Scores of a padded input: the top-left `hw` (the image), resized to `out_hw`."""
    return _resize(scores[:, :, : hw[0], : hw[1]], out_hw)


def official_settings(family: str, dataset: str, **kwargs: Any) -> InferenceSettings:
    """The official single-scale test of `family` on `dataset` ('cityscapes', 'ade20k', or any
    other name: tested as Cityscapes), as `variants.Family.tests` records it; `kwargs` set other
    fields (device, precision, aug_test, ...)."""
    recipe = FAMILIES[family].test_for(dataset)
    return InferenceSettings(family=family, mode=recipe.mode, dataset=dataset, **kwargs)


def test_of_dataset(
    settings: InferenceSettings, dataset: str, keep_mode: bool = False
) -> InferenceSettings:
    """`settings` (its family set, as a `Predictor` holds them) for a data set of layout `dataset`:
    the family's official test of it (its mode, resize and window; with aug_test its scales and
    flip), as `segcompare eval` and `compare` run a model; keep_mode: the mode as given (--mode)."""
    mode = settings.mode if keep_mode else FAMILIES[settings.family].test_for(dataset).mode
    tested = replace(settings, dataset=dataset, mode=mode)
    return tested.resolved() if tested.aug_test else tested


def check_test_sizes(dataset: Any, settings: InferenceSettings) -> None:
    """Every image of `dataset` (its `samples`: (image, mask) paths) is large enough for the model
    as `settings` test it; the first that is not is one error naming it and both sizes, before
    any work (the official tests do not pad an image at test time; training pads its crops).
    Only the files' headers are read; a file that does not decode is left to the data set."""
    from PIL import Image

    from segcompare.models.variants import MIN_INPUT_SIDE

    for image_path, _ in getattr(dataset, "samples", ()):
        try:
            with Image.open(image_path) as im:
                w, h = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
        mh, mw = settings.model_input_hw((h, w))
        if min(mh, mw) < MIN_INPUT_SIDE:
            raise SegcompareError(
                f"{image_path}: a {h}x{w} image, which the {settings.family or 'model'} test "
                f"({settings.dataset}) gives the model at {mh}x{mw}, smaller than "
                f"{MIN_INPUT_SIDE}x{MIN_INPUT_SIDE}, the smallest input both families accept: "
                f"enlarge (or pad) the images of this split to at least {MIN_INPUT_SIDE} px a "
                "side"
            )


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of N×C×H×W to `hw` (align_corners=False, as both official codes)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def forward_logits(model: Model, images: torch.Tensor) -> torch.Tensor:
    """The model's 1/4-resolution logits upsampled to the input size (float32)."""
    return _resize(model(images).float(), tuple(images.shape[-2:]))


def slide_windows(
    hw: tuple[int, int], window_hw: tuple[int, int], stride_hw: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) covering an image of size `hw`: a grid with step `stride_hw`
    whose last row and column are moved back to end at the border; a window larger than the image
    is clipped to it. The grid of mmseg's slide_inference and HRNet's multi_scale_inference."""
    (h, w), (wh, ww), (sh, sw) = hw, window_hw, stride_hw
    rows = max(h - wh + sh - 1, 0) // sh + 1
    cols = max(w - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + wh, h), min(c * sw + ww, w)
            boxes.append((max(y2 - wh, 0), y2, max(x2 - ww, 0), x2))
    return boxes


def slide_inference(
    window_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    window_hw: tuple[int, int],
    stride_hw: tuple[int, int],
) -> torch.Tensor:
    """Run `window_fn` (N×3×h×w -> N×C×h×w) on each window and average where windows overlap."""
    n, _, h, w = images.shape
    total: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, h, w, device=images.device)
    for y1, y2, x1, x2 in slide_windows((h, w), window_hw, stride_hw):
        out = window_fn(images[:, :, y1:y2, x1:x2])
        if total is None:
            total = out.new_zeros(n, out.shape[1], h, w)
        total[:, :, y1:y2, x1:x2] += out
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


def inference(
    model: Model,
    images: torch.Tensor,
    settings: InferenceSettings = InferenceSettings(),
    out_hw: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Class scores N×C×out_h×out_w (default: the input size) for a normalised N×3×H×W batch.

    The argmax over C is the prediction. With one scale and no flip the scores are logits; else
    the average over scales (and flips) of what the family's official code averages:
    SegFormer the softmax of each pass, HRNet exp() of the flip-averaged logits.
    """
    settings = settings.resolved()
    n, _, h, w = images.shape
    out_hw = tuple(out_hw or (h, w))
    test_hw = tuple(settings.size_hw or (h, w))
    window_hw, stride_hw = settings.windows_for(test_hw)
    single = len(settings.scales) == 1 and not settings.flip
    hrnet_style = settings.recipe().score == "exp"

    def run(window_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if settings.mode == "whole":
            return window_fn(x)
        return slide_inference(window_fn, x, window_hw, stride_hw)

    def hrnet_window(x: torch.Tensor) -> torch.Tensor:
        logits = forward_logits(model, x)
        if settings.flip:
            logits = (logits + forward_logits(model, x.flip(-1)).flip(-1)) / 2
        # exp() as the official code; the clamp keeps float32 finite (exp(80) ~ 5.5e34).
        return logits if single else logits.clamp(max=80.0).exp()

    total: Optional[torch.Tensor] = None
    passes = 0
    resize = settings.resize()
    for scale in settings.scales:
        at_hw = resize.resized_hw((h, w), scale) if resize else scaled_hw(test_hw, scale)
        x = _pad(_resize(images, at_hw), resize)
        if hrnet_style:
            outs = [_crop_resize(run(hrnet_window, x), at_hw, out_hw)]
        else:
            outs = []
            for flipped in (False, True) if settings.flip else (False,):
                xi = x.flip(-1) if flipped else x
                scores = run(lambda c: forward_logits(model, c), xi)
                scores = scores.flip(-1) if flipped else scores
                scores = _crop_resize(scores, at_hw, out_hw)
                outs.append(scores if single else scores.softmax(1))
        for scores in outs:
            total = scores if total is None else total + scores
            passes += 1
    return total / passes if passes > 1 else total


# ------------------------------------------------------------------------------------------------
# Evaluating a split
# ------------------------------------------------------------------------------------------------


class _Catching:
    """Wraps a dataset so that a user-facing error in a loader worker comes back as one line
    (a DataLoader would re-raise it with the worker's traceback in the message)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.dataset[index]
        except SegcompareError as err:
            return {"error": str(err)}


def _batches(dataset: Any, batch_size: int, workers: int, desc: str, progress: bool) -> Iterable:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        from torch.utils.data import default_collate

        for item in items:
            if "error" in item:
                return item
        sizes = [tuple(item["label"].shape[-2:]) for item in items]
        if len(set(sizes)) > 1:  # default_collate would stack them: a traceback
            other = next(i for i, hw in enumerate(sizes) if hw != sizes[0])
            named = [f"{items[i].get('name', 'an image')} {sizes[i][0]}x{sizes[i][1]}"
                     for i in (0, other)]  # fmt: skip
            return {"error": f"--batch {batch_size}: images of different sizes in one batch "
                             f"({named[0]}, {named[1]}); use --batch 1 for this split"}
        return default_collate(items)

    loader = DataLoader(
        _Catching(dataset),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # batches go to the GPU without a staging copy
    )
    rank, _ = torchrun_rank_world()  # under torchrun one bar, process 0's
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress or rank != 0):
        if "error" in batch:
            raise SegcompareError(batch["error"])
        yield batch


def save_label_ids(
    train_ids: np.ndarray, out_dir: PathLike, name: str, table: Any = None
) -> Path:
    """Write H×W train ids in the data set's own label ids (`table`, default Cityscapes), as its
    benchmark server and `evaluate_prediction_files` take them: Cityscapes labelIds as
    OUT/<city>/<name>_leftImg8bit.png, ADE20K's 1..150 and a folder set's indices as
    OUT/<name>.png."""
    from PIL import Image

    from segcompare.data.labels import CITYSCAPES

    table = table or CITYSCAPES
    if table.name == CITYSCAPES.name:
        path = Path(out_dir) / name.rsplit("_", 2)[0] / f"{name}_leftImg8bit.png"
    else:
        path = Path(out_dir) / f"{name}.png"
    with atomic_path(path) as tmp:
        Image.fromarray(table.train_id_to_label_id()[train_ids]).save(tmp, format="PNG")
    return path


def eval_dataset(
    root: PathLike, split: str = "val", transform: Any = None, layout: Optional[str] = None,
    reduce_zero_label: Optional[bool] = None, ignore_index: Optional[int] = None,
) -> Any:
    """The `CityscapesDataset` an evaluation reads, in any layout: for Cityscapes with gtFine
    instanceIds when the split has them (for iIoU), else without (iIoU is then NaN, with a
    warning)."""
    from segcompare.data.cityscapes import CityscapesDataset, label_path, sample_name
    from segcompare.data.layouts import CITYSCAPES_LAYOUT, detect_layout

    found = detect_layout(root, layout)
    if found is not CITYSCAPES_LAYOUT:
        return CityscapesDataset(root, split, transform=transform, layout=found,
                                 reduce_zero_label=reduce_zero_label, ignore_index=ignore_index)
    dataset = CityscapesDataset(root, split, transform=transform, with_instances=True,
                                layout=found, reduce_zero_label=reduce_zero_label,
                                ignore_index=ignore_index)
    image = dataset.samples[0][0]
    if not label_path(
        root, split, Path(image).parent.name, sample_name(image), "instanceIds"
    ).exists():
        log.warning("%s: no gtFine instanceIds for split %s; iIoU is not computed", root, split)
        dataset = CityscapesDataset(root, split, transform=transform, with_instances=False,
                                    layout=found, ignore_index=ignore_index)
    return dataset


def match_classes(
    model_names: Optional[Sequence[str]],
    data_names: Sequence[str],
    by_name: bool = False,
    model: str = "the model",
) -> Optional[list[int]]:
    """Which output channel of a model scores each class of a data set, or None where channel i
    is class i: the same names in the same order, or a model that names no classes (its count is
    checked when it is scored).

    Classes that differ (other names, another order, another count) are a SegcompareError, unless
    `by_name`: then every data-set class must be among the model's names, and the channels are
    taken by name (a model's extra classes are left out of the argmax).
    """
    data_names = list(data_names)
    if model_names is None or list(model_names) == data_names:
        return None
    model_names = list(model_names)
    if not by_name:
        if len(model_names) != len(data_names):
            at = f"{model} has {len(model_names)} classes, the data set {len(data_names)}"
        else:
            first = next(i for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b)
            at = (
                f"class {first} is {model_names[first]!r} in {model}, {data_names[first]!r} in "
                "the data set"
            )
        raise SegcompareError(
            f"{model} was trained on other classes than the data set's ({at}); score it on data "
            "with its classes, or map the classes by name (--map-classes)"
        )
    index = {name: i for i, name in enumerate(model_names)}
    missing = [name for name in data_names if name not in index]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise SegcompareError(
            f"--map-classes: {len(missing)} class(es) of the data set are not among the "
            f"{len(model_names)} classes of {model}: {shown}"
        )
    return [index[name] for name in data_names]


# on_batch(pred, labels, batch) of `evaluate_model`: N×H×W predicted and label train ids, the batch.
BatchHook = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], None]


def evaluate_model(
    scores_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Any,
    batch_size: int = 1,
    workers: int = 0,
    save_pred_dir: Optional[PathLike] = None,
    progress: bool = True,
    on_batch: Optional[BatchHook] = None,
    class_order: Optional[Sequence[int]] = None,
    confusion: Optional[ConfusionMatrix] = None,
) -> dict[str, Any]:
    """Score a model on a dataset and return `ConfusionMatrix.compute()` with `_throughput`'s
    "world_size" and "processes".

    scores_fn: normalised N×3×H×W -> N×C×H×W class scores at the input size (e.g.
        `Predictor.scores`, or `lambda x: inference(model, x, settings)`).
    dataset: a `CityscapesDataset` with the test transform and with_instances=True (without
        instances iIoU is NaN).
    save_pred_dir: also write each prediction as a labelIds PNG there (`save_label_ids`).
    class_order: the output channel of each data-set class (`match_classes`), None: channel i
        is class i.
    on_batch: called as `on_batch(pred, labels, batch)` after each batch is scored, in dataset
        order: pred and labels N×H×W train ids on the scores' device (labels 255 = ignore),
        batch the loader's dict ("image", "label", "name", ...). For figures beyond the
        Cityscapes ones, measured in the same pass (the comparison report's).
    confusion: the (empty) `ConfusionMatrix` to fill, e.g. one with per_image=True; a new one by
        default. The caller reads it afterwards, summed over processes.

    Under torch.distributed (torchrun) each process scores its consecutive share of the images
    (`segcompare.utils.shard`), writes its own predictions and sees only those in `on_batch`;
    the counts are summed over processes, so the figures equal one process's bit for bit.
    """
    table = _table(dataset)
    cm = ConfusionMatrix(table) if confusion is None else confusion
    start = time.perf_counter()
    share = _share(dataset)
    for batch in _batches(share, batch_size, workers, "eval", progress):
        with torch.inference_mode():
            scores = scores_fn(batch["image"])  # N×C×H×W
            if class_order is not None:  # the model's channels of the data set's classes
                scores = scores[:, list(class_order)]
        if scores.shape[1] != cm.num_classes:  # else argmax scores a C-class model silently
            raise SegcompareError(
                f"the model predicts {scores.shape[1]} classes; the data set "
                f"({table.name}) has {cm.num_classes}: score a {cm.num_classes}-class model"
            )
        pred = scores.argmax(1)
        labels = batch["label"].to(pred.device)
        if pred.shape != labels.shape:  # a transform that resized the image: score at label size
            raise SegcompareError(
                f"prediction {tuple(pred.shape[1:])} and label {tuple(labels.shape[1:])} sizes "
                "differ; use a test transform that keeps the image size"
            )
        cm.update(pred, labels, batch.get("instances"))
        if on_batch is not None:
            on_batch(pred, labels, batch)
        if save_pred_dir is not None:
            for train_ids, name in zip(pred.to(torch.uint8).cpu().numpy(), batch["name"]):
                save_label_ids(train_ids, save_pred_dir, name, table)
    seconds = time.perf_counter() - start
    cm.all_reduce()
    return {**_computed(cm, dataset), **_throughput(len(share), seconds)}


def _table(dataset: Any) -> Any:
    """The data set's `ClassTable` (a plain dataset without one: Cityscapes')."""
    from segcompare.data.labels import CITYSCAPES

    return getattr(getattr(dataset, "dataset", dataset), "table", CITYSCAPES)


def _computed(cm: ConfusionMatrix, dataset: Any) -> dict[str, Any]:
    """`cm.compute()`; a split without one labelled pixel is an error (its figures would all be
    NaN)."""
    if int(cm.mat.sum()) == 0:
        inner = getattr(dataset, "dataset", dataset)
        raise SegcompareError(
            f"{getattr(inner, 'root', 'the data set')}: split {getattr(inner, 'split', '?')!r} "
            "has no labelled pixel (every "
            "mask is ignore): nothing to score; `segcompare data check` shows the values"
        )
    return cm.compute()  # named by the data set's table


def _share(dataset: Any) -> Any:
    """This process's consecutive share of `dataset` (all of it in one process)."""
    from torch.utils.data import Subset

    part = shard(len(dataset))
    return dataset if len(part) == len(dataset) else Subset(dataset, part)


def _throughput(images: int, seconds: float) -> dict[str, Any]:
    """{"world_size": processes, "processes": [{"rank", "images", "seconds", "images_per_s"}]}:
    what each process scored and how fast (gathered from every process under torchrun)."""
    import torch.distributed as dist

    mine = {"images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 3) if seconds > 0 else None}  # fmt: skip
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1, "processes": [{"rank": 0, **mine}]}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {"world_size": len(gathered),
            "processes": [{"rank": r, **p} for r, p in enumerate(gathered)]}  # fmt: skip


# A prediction file belongs to sample <city>_<seq>_<frame> when its name contains that stem, as
# cityscapesscripts' getPrediction looks for <city>_<seq>_<frame>*.png anywhere under the folder.
_SEQ_FRAME = re.compile(r"\d{6}_\d{6}")


def find_predictions(
    pred_dir: PathLike, names: Sequence[str], cityscapes: bool = True
) -> list[Path]:
    """The prediction PNG of each sample name under `pred_dir` (searched recursively): for
    Cityscapes the one file whose name contains the name, else <name>.png. A missing or
    ambiguous prediction is an error."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise SegcompareError(f"prediction folder {pred_dir} does not exist")
    if not cityscapes:
        return _find_by_stem(pred_dir, names)
    by_numbers: dict[str, list[Path]] = {}
    for path in pred_dir.rglob("*.png"):
        for numbers in set(_SEQ_FRAME.findall(path.name)):
            by_numbers.setdefault(numbers, []).append(path)
    found, missing = [], []
    for name in names:
        matches = sorted(p for p in by_numbers.get(name[-13:], []) if name in p.name)
        if len(matches) > 1:
            raise SegcompareError(
                f"several predictions for {name}: {', '.join(str(p) for p in matches[:3])}"
            )
        if matches:
            found.append(matches[0])
        else:
            missing.append(name)
    if missing:
        raise SegcompareError(
            f"no prediction for {missing[0]} under {pred_dir} (expected a PNG whose name contains "
            f"it, e.g. {missing[0]}_leftImg8bit.png); {len(missing)} of {len(names)} missing"
        )
    return found


def _find_by_stem(pred_dir: Path, names: Sequence[str]) -> list[Path]:
    by_stem: dict[str, list[Path]] = {}
    for path in pred_dir.rglob("*.png"):
        by_stem.setdefault(path.stem, []).append(path)
    found = []
    for name in names:
        matches = sorted(by_stem.get(name, []))
        if len(matches) > 1:
            raise SegcompareError(
                f"several predictions for {name}: {', '.join(str(p) for p in matches[:3])}"
            )
        if not matches:
            missing = [n for n in names if n not in by_stem]
            raise SegcompareError(
                f"no prediction for {name} under {pred_dir} (expected {name}.png); "
                f"{len(missing)} of {len(names)} missing"
            )
        found.append(matches[0])
    return found


def read_prediction(path: PathLike, hw: tuple[int, int], table: Any = None) -> np.ndarray:
    """A prediction PNG in the data set's own label ids -> H×W prediction codes, checked: one
    channel, the label's size, only the data set's label ids (Cityscapes labelIds via
    `label_ids_to_pred`; ADE20K 1..150, where 0 'other' counts as no class; a folder set's
    indices)."""
    from PIL import Image, UnidentifiedImageError

    from segcompare.data.labels import VALID_LABEL_IDS

    try:
        with Image.open(path) as im:
            ids = np.array(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise SegcompareError(f"{path}: cannot read the prediction ({err})") from None
    if ids.ndim != 2:
        raise SegcompareError(
            f"{path}: a prediction must be a 1-channel labelIds PNG, got shape {ids.shape}"
        )
    if ids.shape != tuple(hw):
        raise SegcompareError(
            f"{path}: size {ids.shape[1]}x{ids.shape[0]} differs from the label's {hw[1]}x{hw[0]}"
        )
    present = np.unique(ids)
    if table is not None and table.name != "cityscapes":
        return _own_ids_to_pred(path, ids, present, table)
    _refuse_train_ids(path, [int(v) for v in present])
    unknown = [int(v) for v in present if int(v) not in VALID_LABEL_IDS]
    if unknown:
        raise SegcompareError(
            f"{path}: unknown label ids {unknown[:8]} (Cityscapes labelIds are "
            f"0-{max(VALID_LABEL_IDS)})"
        )
    return label_ids_to_pred(ids.astype(np.uint8))


def _own_ids_to_pred(path: PathLike, ids: np.ndarray, present: np.ndarray, table: Any) -> Any:
    """A prediction in the data set's own ids -> train ids; 255 (and ADE20K's 0) -> no class."""
    from segcompare.data.labels import IGNORE_INDEX

    lut = np.full(max(256, int(present.max()) + 1), -1, dtype=np.int16)
    lut[list(table.own_ids)] = np.arange(table.num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    if table.reduce_zero_label:
        lut[0] = IGNORE_INDEX  # "other": a prediction of no class (a false negative)
    unknown = [int(v) for v in present if lut[int(v)] < 0]
    if unknown:
        ids_text = f"{min(table.own_ids)}..{max(table.own_ids)}"
        raise SegcompareError(
            f"{path}: unknown label ids {unknown[:8]} ({table.name} predictions hold its own "
            f"label ids {ids_text}; write them with `segcompare predict --format labelid`)"
        )
    return lut[ids.astype(np.int64)].astype(np.uint8)


def _refuse_train_ids(path: PathLike, values: list[int]) -> None:
    """A PNG of trainIds (0-18, 255) read as labelIds scores near 0: stop and say so. It looks
    like trainIds when no value is above 18 but 255, and one is a value no labelIds prediction
    holds (255, or a labelId of no evaluated class, e.g. 0 'unlabeled' where trainId 0 is road)."""
    from segcompare.data.labels import IGNORE_INDEX, NUM_CLASSES, TRAIN_ID_TO_ID

    evaluated = {int(v) for v in TRAIN_ID_TO_ID[:NUM_CLASSES]}
    if all(v < NUM_CLASSES or v == IGNORE_INDEX for v in values) and any(
        v not in evaluated for v in values
    ):
        raise SegcompareError(
            f"{path}: holds only {values[:8]}: these look like trainIds (0-18, 255), not the "
            "labelIds --pred-dir scores; convert them with "
            "segcompare.data.labels.TRAIN_ID_TO_ID[train_ids], or write labelIds with "
            "`segcompare predict --format labelid`"
        )


class _PredictionPairs:
    """(prediction codes, train-id label, instances) per sample, for `evaluate_prediction_files`."""

    def __init__(self, dataset: Any, predictions: list[Path]) -> None:
        self.dataset, self.predictions = dataset, predictions

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from segcompare.data.cityscapes import (
            label_path,
            read_instances,
            sample_name,
        )

        image_path, label_file = self.dataset.samples[index]
        table = _table(self.dataset)
        label = self.dataset.read_train_ids(label_file)
        pred = read_prediction(self.predictions[index], label.shape, table)
        item = {"pred": pred, "label": label}
        if table.name != "cityscapes":
            return item
        city, name = Path(image_path).parent.name, sample_name(image_path)
        inst_file = label_path(self.dataset.root, self.dataset.split, city, name, "instanceIds")
        if inst_file.exists():
            item["instances"] = read_instances(inst_file)
        return item


def evaluate_prediction_files(
    pred_dir: PathLike, dataset: Any, workers: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Score existing labelIds prediction PNGs (from segcompare or any other tool) against a
    `CityscapesDataset`'s labels, exactly as `evaluate_model` scores a model. Samples without a
    gtFine instanceIds file count for everything but iIoU."""
    table = _table(dataset)
    names = dataset.names
    predictions = find_predictions(pred_dir, names, table.name == "cityscapes")
    pairs = _PredictionPairs(dataset, predictions)
    cm = ConfusionMatrix(table)
    without_instances = 0
    start = time.perf_counter()
    share = _share(pairs)
    for batch in _batches(share, 1, workers, "eval", progress):
        cm.update(batch["pred"], batch["label"], batch.get("instances"))
        without_instances += "instances" not in batch
    seconds = time.perf_counter() - start
    cm.all_reduce()
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if distributed:  # under torchrun: count every process's samples
        count = torch.tensor([without_instances])
        dist.all_reduce(count)
        without_instances = int(count.item())
    if without_instances and rank == 0 and table.name == "cityscapes":
        log.warning(
            "%d of %d samples have no instanceIds file: iIoU leaves them out",
            without_instances,
            len(names),
        )
    return {**_computed(cm, dataset), **_throughput(len(share), seconds)}


def run_eval(
    data_root: PathLike,
    split: str = "val",
    *,
    scores: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    pred_dir: Optional[PathLike] = None,
    batch_size: int = 1,
    workers: int = 2,
    save_pred_dir: Optional[PathLike] = None,
    meta: Optional[dict[str, Any]] = None,
    model_classes: Optional[Sequence[str]] = None,
    map_classes: bool = False,
    layout: Optional[str] = None,
    reduce_zero_label: Optional[bool] = None,
    ignore_index: Optional[int] = None,
) -> dict[str, Any]:
    """`segcompare eval`: score a model (`scores`, e.g. `Predictor.scores`) or the labelIds PNGs
    in `pred_dir` on a split. Returns the metrics with `meta`, the data, the split, the wall time
    and images per second in total, and per process ("world_size", "processes"; several under
    torchrun, each scoring its share of the images). `model_classes`: the model's class names
    (`model.class_table.names`), checked against the data set's (`match_classes`; `map_classes`: by
    name)."""
    if (scores is None) == (pred_dir is None):
        raise SegcompareError("score either a model or a folder of predictions, not both")
    check("--batch", batch_size, name="batch_size")
    check("--workers", workers, name="workers")
    start = time.perf_counter()
    if pred_dir is not None:
        if save_pred_dir is not None:
            raise SegcompareError("--pred-dir scores existing files: drop --save-pred")
        dataset = eval_dataset(data_root, split, None, layout, reduce_zero_label, ignore_index)
        results = evaluate_prediction_files(pred_dir, dataset, workers)
        meta = {"model": None, "weights": None, "mode": "pred-dir", "size": None,
                "pred_dir": str(pred_dir), **(meta or {})}  # fmt: skip
    else:
        from segcompare.data.transforms import build_test_transform

        dataset = eval_dataset(data_root, split, build_test_transform(), layout,
                               reduce_zero_label, ignore_index)
        model_name = (meta or {}).get("weights") or (meta or {}).get("model") or "the model"
        order = match_classes(
            model_classes, _table(dataset).names, map_classes, model=str(model_name)
        )
        results = evaluate_model(
            scores, dataset, batch_size, workers, save_pred_dir, class_order=order
        )
    seconds = time.perf_counter() - start
    results.update(meta or {}, data=str(data_root), split=split, seconds=round(seconds, 3))
    results["images_per_s"] = round(results["num_images"] / seconds, 3)
    return results
