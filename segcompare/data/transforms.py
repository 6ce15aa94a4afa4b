"""The training and test pipelines of both papers, as small functions on (image, label) pairs.

A transform is called as ``image, label = transform(image, label, rng=rng)``:

* ``image``: H×W×3 uint8 RGB numpy array, ``label``: H×W uint8 train ids (255 = ignore);
* returns a float32 tensor 3×h×w (normalised) and an int64 tensor h×w;
* ``rng``: a ``numpy.random.Generator``; every random draw of the pipeline comes from it, so
  ``np.random.default_rng((seed, epoch, index))`` gives the same sample on any machine and with
  any number of workers. Left out, a fresh generator (OS entropy) is used.

Both pipelines follow their official recipe step by step (numbers cited below), with one change
that does not alter the result beyond interpolation rounding: the random crop window is chosen
first and only the source pixels under it are resampled (bilinear image, nearest label), so a
2x upscale never materialises a 4096×2048 image. Photometric distortion runs on the uint8 crop
through lookup tables, bit-exact to mmseg's float32 arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from segcompare.data.labels import IGNORE_INDEX
from segcompare.utils import SegcompareError

# Both papers normalise RGB 0-255 with these numbers: SegFormer's `img_norm_cfg`
# (local_configs/_base_/datasets/cityscapes_1024x1024_repeat.py) and HRNet's ImageNet
# mean/std on RGB/255 (lib/datasets/base_dataset.py: 0.485, 0.456, 0.406 / 0.229, 0.224, 0.225).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
_MEAN_T = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_T = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)

PIPELINES = ("segformer", "hrnet")


def _rng(rng: Optional[np.random.Generator]) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


# --- normalise ---------------------------------------------------------------------------------
def normalize(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 RGB -> 3×H×W float32 tensor, (x - MEAN) / STD per channel."""
    h, w = image.shape[:2]
    out = torch.empty((3, h, w), dtype=torch.float32)
    out.copy_(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    return out.sub_(_MEAN_T).div_(_STD_T)


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """H×W uint8 train ids -> H×W int64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(label)).long()


# --- resize + crop in one step ---------------------------------------------------------------
def mmseg_rescale_hw(hw: Sequence[int], scale: Sequence[int]) -> tuple[int, int]:
    """Output size of mmcv.imrescale(img, scale) with keep_ratio: fit inside (long, short)."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def hrnet_rescale_hw(hw: Sequence[int], long_size: int) -> tuple[int, int]:
    """Output size of HRNet's `image_resize`: the long side becomes `long_size`, ratio kept."""
    h, w = hw
    if h > w:
        return long_size, int(w * long_size / h + 0.5)
    return int(h * long_size / w + 0.5), long_size


def _nearest_index(out_len: int, src_len: int, start: int, length: int) -> np.ndarray:
    # cv2.INTER_NEAREST picks floor(dst * (1 / (dst_len / src_len))), clamped to the last pixel.
    inv = 1.0 / (out_len / src_len)
    idx = np.floor(np.arange(start, start + length, dtype=np.float64) * inv).astype(np.intp)
    return np.minimum(idx, src_len - 1)


def resized_label_window(
    label: np.ndarray, out_hw: Sequence[int], y0: int, x0: int, h: int, w: int
) -> np.ndarray:
    """label resized (nearest, as cv2.resize) to out_hw, then cut at [y0:y0+h, x0:x0+w].

    The window must lie inside out_hw. Only the h×w output pixels are gathered.
    """
    ys = _nearest_index(out_hw[0], label.shape[0], y0, h)
    xs = _nearest_index(out_hw[1], label.shape[1], x0, w)
    return np.take(np.take(label, ys, axis=0), xs, axis=1)


def resized_image_window(
    image: np.ndarray, out_hw: Sequence[int], y0: int, x0: int, h: int, w: int
) -> np.ndarray:
    """image resized (bilinear, half-pixel centres as cv2.resize) to out_hw, then cut.

    Resamples only the window with an affine warp, so the cost is that of the h×w output,
    not of the whole resized image. Equal to cv2.resize + crop up to interpolation rounding
    (cv2's warp quantises positions to 1/32 pixel).
    """
    src_h, src_w = image.shape[:2]
    if (out_hw[0], out_hw[1]) == (src_h, src_w):
        return image[y0 : y0 + h, x0 : x0 + w]
    sy, sx = src_h / out_hw[0], src_w / out_hw[1]
    # dst pixel (x, y) of the window samples src ((x0 + x + 0.5) * sx - 0.5, ...)
    m = np.array([[sx, 0.0, (x0 + 0.5) * sx - 0.5], [0.0, sy, (y0 + 0.5) * sy - 0.5]])
    return cv2.warpAffine(
        image, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def random_crop_window(
    out_hw: Sequence[int],
    crop_hw: Sequence[int],
    rng: np.random.Generator,
    label: Optional[np.ndarray] = None,
    cat_max_ratio: float = 1.0,
) -> tuple[tuple[int, int, int, int], Optional[np.ndarray]]:
    """mmseg's RandomCrop on an image of size out_hw: (y0, x0, h, w) and the label window.

    With cat_max_ratio < 1 the window is redrawn while one class covers >= cat_max_ratio of
    the non-ignored pixels (or fewer than two classes are present); as mmseg, 10 checks and
    then the 11th draw is taken unchecked. `label` is the label *before* resizing; its
    window is gathered at out_hw (nearest) and returned so the caller need not cut it again.
    """
    h, w = min(crop_hw[0], out_hw[0]), min(crop_hw[1], out_hw[1])

    def draw() -> tuple[int, int, int, int]:
        y0 = int(rng.integers(0, max(out_hw[0] - crop_hw[0], 0) + 1))
        x0 = int(rng.integers(0, max(out_hw[1] - crop_hw[1], 0) + 1))
        return y0, x0, h, w

    box = draw()
    if label is None:
        return box, None
    window = resized_label_window(label, out_hw, *box)
    if cat_max_ratio < 1.0:
        for _ in range(10):  # mmseg: "Repeat 10 times"
            counts = np.bincount(window.ravel(), minlength=256)[:IGNORE_INDEX]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
            window = resized_label_window(label, out_hw, *box)
    return box, window


# --- photometric distortion (mmseg PhotoMetricDistortion) -----------------------------------
@dataclass(frozen=True)
class PhotometricParams:
    """One draw of mmseg's PhotoMetricDistortion; None = that step is skipped."""

    brightness: Optional[float]  # beta added, in [-32, 32]
    contrast: Optional[float]  # alpha, in [0.5, 1.5]
    contrast_first: bool  # mmseg's `mode == 1`
    saturation: Optional[float]  # alpha on the HSV S channel, in [0.5, 1.5]
    hue: Optional[int]  # added to the HSV H channel (0..179), in [-18, 18)


def draw_photometric(
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> PhotometricParams:
    """Draw the parameters; defaults are mmseg's PhotoMetricDistortion defaults, which the
    SegFormer Cityscapes config uses (`dict(type='PhotoMetricDistortion')`)."""
    delta = brightness_delta
    brightness = float(rng.uniform(-delta, delta)) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = float(rng.uniform(*contrast_range)) if rng.integers(2) else None
    saturation = float(rng.uniform(*saturation_range)) if rng.integers(2) else None
    # mmseg draws np.random.randint(-hue_delta, hue_delta): the upper end is excluded (-18..17)
    hue = int(rng.integers(-hue_delta, hue_delta)) if rng.integers(2) else None
    return PhotometricParams(brightness, contrast, contrast_first, saturation, hue)


def _affine_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg `convert`: uint8(clip(float32(x) * alpha + beta, 0, 255)), as a 256-entry table.
    values = np.arange(256, dtype=np.float32) * alpha + beta
    return np.clip(values, 0, 255).astype(np.uint8)


def apply_photometric(image: np.ndarray, p: PhotometricParams) -> np.ndarray:
    """H×W×3 uint8 RGB -> distorted uint8, in mmseg's order: brightness, contrast (mode 1),
    saturation, hue, contrast (mode 0). HSV as cv2 (H in 0..179)."""
    if p.brightness is not None:
        image = cv2.LUT(image, _affine_lut(beta=p.brightness))
    if p.contrast is not None and p.contrast_first:
        image = cv2.LUT(image, _affine_lut(alpha=p.contrast))
    if p.saturation is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = cv2.LUT(hsv[..., 1], _affine_lut(alpha=p.saturation))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p.hue is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hue_lut = ((np.arange(256) + p.hue) % 180).astype(np.uint8)
        hsv[..., 0] = cv2.LUT(hsv[..., 0], hue_lut)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p.contrast is not None and not p.contrast_first:
        image = cv2.LUT(image, _affine_lut(alpha=p.contrast))
    return image


# --- padding -----------------------------------------------------------------------------------
def pad_bottom_right(
    image: torch.Tensor, label: torch.Tensor, crop_hw: Sequence[int], image_fill: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 3×h×w / h×w up to crop_hw at the bottom and right (label with 255)."""
    h, w = label.shape
    if h >= crop_hw[0] and w >= crop_hw[1]:
        return image, label
    out_img = image_fill.view(3, 1, 1).expand(3, crop_hw[0], crop_hw[1]).clone()
    out_img[:, :h, :w] = image
    out_lab = torch.full((crop_hw[0], crop_hw[1]), IGNORE_INDEX, dtype=label.dtype)
    out_lab[:h, :w] = label
    return out_img, out_lab


# --- the two training pipelines ------------------------------------------------------------------
@dataclass
class SegFormerTrainTransform:
    """NVlabs SegFormer, local_configs/_base_/datasets/cityscapes_1024x1024_repeat.py:
    Resize(img_scale=(2048, 1024), ratio_range=(0.5, 2.0)) -> RandomCrop(crop_size=(1024, 1024),
    cat_max_ratio=0.75) -> RandomFlip(prob=0.5) -> PhotoMetricDistortion -> Normalize ->
    Pad(size=crop_size, pad_val=0, seg_pad_val=255)."""

    crop_size: tuple[int, int] = (1024, 1024)  # (h, w)
    scale: tuple[int, int] = (2048, 1024)  # mmseg img_scale (long, short)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def largest_hw(self, image_hw: Sequence[int]) -> tuple[int, int]:
        """The size an image of `image_hw` is resized to at the largest ratio."""
        hi = self.ratio_range[1]
        return mmseg_rescale_hw(image_hw, (int(self.scale[0] * hi), int(self.scale[1] * hi)))

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = _rng(rng)
        # Resize: ratio = random_sample() * (max - min) + min; scale = int(s * ratio) per side.
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        out_hw = mmseg_rescale_hw(image.shape[:2], scale)
        # RandomCrop (window chosen on the resized label), then resample only that window.
        box, lab = random_crop_window(out_hw, self.crop_size, rng, label, self.cat_max_ratio)
        img = resized_image_window(image, out_hw, *box)
        if rng.random() < self.flip_prob:  # RandomFlip, horizontal
            img, lab = img[:, ::-1], lab[:, ::-1]
        img = np.ascontiguousarray(img)
        if self.photometric:
            img = apply_photometric(img, draw_photometric(rng))
        # Normalize, then Pad: the image with 0 (after normalising), the label with 255.
        zero = torch.zeros(3)
        return pad_bottom_right(normalize(img), label_to_tensor(lab), self.crop_size, zero)


@dataclass
class HRNetTrainTransform:
    """HRNet/HRNet-Semantic-Segmentation, lib/datasets/base_dataset.py (`gen_sample`,
    `multi_scale_aug`, `rand_crop`) with experiments/cityscapes/seg_hrnet_w48_train_512x1024_*
    .yaml: BASE_SIZE 2048, CROP (h, w) = (512, 1024), SCALE_FACTOR 16, FLIP true.

    s = 0.5 + randint(0, 16) / 10 (inclusive, so s in {0.5, ..., 2.1}); long side
    int(2048 * s + 0.5); bilinear image, nearest label; pad bottom/right to the crop (image 0,
    label 255); random crop; normalise; flip 0.5. No photometric distortion in the official
    recipe (`photometric=True` adds mmseg's).
    """

    crop_size: tuple[int, int] = (512, 1024)  # (h, w)
    base_size: int = 2048
    scale_range: tuple[float, float] = (0.5, 2.1)  # step 0.1: 0.5 + randint(0, 16) / 10
    flip_prob: float = 0.5
    photometric: bool = False

    def largest_hw(self, image_hw: Sequence[int]) -> tuple[int, int]:
        """The size an image of `image_hw` is resized to at the largest scale."""
        return hrnet_rescale_hw(image_hw, int(self.base_size * self.scale_range[1] + 0.5))

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = _rng(rng)
        lo, hi = self.scale_range
        steps = int(round((hi - lo) * 10))  # SCALE_FACTOR
        s = lo + int(rng.integers(0, steps + 1)) / 10.0
        out_hw = hrnet_rescale_hw(image.shape[:2], int(self.base_size * s + 0.5))
        # rand_crop: pad to at least the crop, then a window anywhere in the padded image.
        ch, cw = self.crop_size
        padded_hw = (max(out_hw[0], ch), max(out_hw[1], cw))
        x0 = int(rng.integers(0, padded_hw[1] - cw + 1))
        y0 = int(rng.integers(0, padded_hw[0] - ch + 1))
        # The part of the window inside the resized image; the rest is padding.
        h, w = min(ch, out_hw[0] - y0), min(cw, out_hw[1] - x0)
        img = resized_image_window(image, out_hw, y0, x0, h, w)
        lab = resized_label_window(label, out_hw, y0, x0, h, w)
        if self.photometric:
            img = apply_photometric(np.ascontiguousarray(img), draw_photometric(rng))
        # HRNet pads with black before normalising: the fill is normalize(0).
        black = -_MEAN_T.view(3) / _STD_T.view(3)
        img_t, lab_t = pad_bottom_right(normalize(img), label_to_tensor(lab), (ch, cw), black)
        if rng.random() < self.flip_prob:  # gen_sample flips after padding and cropping
            img_t, lab_t = img_t.flip(-1), lab_t.flip(-1)
        return img_t, lab_t


@dataclass
class TestTransform:
    """Both papers test on the whole normalised image (resizing and sliding windows belong
    to inference, segcompare.evaluate)."""

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(image), label_to_tensor(label)


def build_train_transform(
    pipeline: str,
    crop_size: Optional[Sequence[int]] = None,
    scale_range: Optional[Sequence[float]] = None,
    base_size: Optional[int] = None,
    *,
    scale: Optional[Sequence[int]] = None,
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: Optional[bool] = None,
):
    """The training pipeline of one paper, with its official numbers as defaults.

    pipeline: "segformer" or "hrnet".
    crop_size: (h, w); official (1024, 1024) for segformer, (512, 1024) for hrnet.
    scale_range: segformer's ratio_range (0.5, 2.0); hrnet's (0.5, 2.1) in steps of 0.1.
    base_size: long side of the base scale, 2048 officially; segformer uses the mmseg scale
        (base_size, base_size // 2) unless `scale=(long, short)` is given. For the 256×512
        synthetic set, base_size=512 scales both recipes down by 4.
    cat_max_ratio: segformer only (0.75 official). photometric: default True for segformer,
        False for hrnet (as the official recipes).
    """
    if pipeline == "segformer":
        if scale is None:
            scale = (base_size, base_size // 2) if base_size else (2048, 1024)
        return SegFormerTrainTransform(
            crop_size=tuple(crop_size or (1024, 1024)),
            scale=(int(scale[0]), int(scale[1])),
            ratio_range=tuple(scale_range or (0.5, 2.0)),
            cat_max_ratio=cat_max_ratio,
            flip_prob=flip_prob,
            photometric=True if photometric is None else photometric,
        )
    if pipeline == "hrnet":
        return HRNetTrainTransform(
            crop_size=tuple(crop_size or (512, 1024)),
            base_size=int(base_size or 2048),
            scale_range=tuple(scale_range or (0.5, 2.1)),
            flip_prob=flip_prob,
            photometric=bool(photometric),
        )
    raise SegcompareError(f"unknown pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")


def build_test_transform() -> TestTransform:
    """Normalise only; the label becomes an int64 tensor."""
    return TestTransform()
