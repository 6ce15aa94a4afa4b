"""Input corruptions for the robustness study: noise, blur, JPEG and brightness at the ImageNet-C
levels of Hendrycks & Dietterich (ICLR 2019), as the SegFormer paper's robustness study
(Cityscapes-C) used them.

    corrupt(image, "blur", 3)          # H×W×3 uint8 RGB -> the same image, blurred at level 3
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from segcompare.utils import SegcompareError

# The ImageNet-C parameters of levels 1..5 (hendrycks/robustness, ImageNet-C/create_c/
# make_imagenet_c.py); the report uses levels SEVERITIES. Noise: std of Gaussian noise on [0, 1];
# blur: Gaussian sigma in pixels (kept in pixels, as the Cityscapes-C benchmark the SegFormer paper
# uses kept them); jpeg: JPEG quality; brightness: added to V of HSV on [0, 1].
CORRUPTION_LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "blur": (1, 2, 3, 4, 6),
    "jpeg": (25, 18, 15, 10, 7),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
}
CORRUPTIONS = tuple(CORRUPTION_LEVELS)
SEVERITIES = (1, 3, 5)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of H×W×3 float32, kernel truncated at 4 sigma, edges replicated
    (skimage.filters.gaussian's defaults, which ImageNet-C calls)."""
    radius = max(1, math.ceil(4 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # 1×3×H×W
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x[0].permute(1, 2, 0).numpy()


def _brighten(image: np.ndarray, amount: float) -> np.ndarray:
    """Add `amount` to V of HSV (on [0, 1]) and clip: with hue and saturation fixed, RGB scales
    by V'/V; a black pixel (V = 0, saturation 0) becomes grey V'."""
    v = image.max(axis=2, keepdims=True)
    v_new = np.minimum(v + amount, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(v > 0, image * (v_new / np.where(v > 0, v, 1.0)), v_new)
    return scaled


def corrupt(image: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """H×W×3 uint8 RGB -> the same image under corruption `kind` at ImageNet-C level `severity`
    (1..5), H×W×3 uint8. Deterministic: the noise is drawn from `np.random.default_rng(seed)`."""
    if kind not in CORRUPTION_LEVELS:
        raise SegcompareError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise SegcompareError(f"severity must be 1..5 (ImageNet-C levels), got {severity}")
    c = CORRUPTION_LEVELS[kind][severity - 1]
    if kind == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as im:
            return np.array(im.convert("RGB"))
    x = image.astype(np.float32) / 255.0
    if kind == "noise":
        rng = np.random.default_rng(seed)
        x = x + rng.normal(0.0, c, size=x.shape).astype(np.float32)
    elif kind == "blur":
        x = _gaussian_blur(x, float(c))
    else:  # brightness
        x = _brighten(x, float(c))
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def parse_corruptions(text: str) -> list[str]:
    """'noise,blur' -> ['noise', 'blur']; 'all' -> every corruption; unknown names are an error."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTION_LEVELS]
    if unknown:
        raise SegcompareError(
            f"unknown corruption {unknown[0]!r}; valid: {', '.join(CORRUPTIONS)} or all"
        )
    return list(dict.fromkeys(names))
