"""Any decoded image -> H×W×3 uint8 RGB, by its value range: the one conversion that the data
pipeline, `predict`, `video` and `Predictor` share.

Pillow and OpenCV decode a file into many layouts: 1-bit (bool), 8-bit grey (L), grey + alpha
(LA), palette (P), 16-bit grey (I;16), 32-bit integer (I), RGB, RGBA and 16-bit RGB. A plain
`convert("RGB")` clips a 16-bit grey image to white; here each is scaled from the range its
type holds to 0..255:

    bool        0/1          -> 0/255
    uint8       0..255       -> as is
    uint16      0..65535     -> round(v * 255 / 65535)
    int32 (I)   0..65535     -> as uint16 (what a 16-bit PNG or TIFF decodes to); other
                                ranges are refused: the range of the data is not known
    float       0..1         -> round(v * 255); any other float is refused

Alpha is dropped (the colour under it is what a camera saw); grey is repeated into R, G, B.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from segcompare.utils import SegcompareError

ACCEPTED = (
    "an H×W or H×W×C array (C = 1, 2 grey+alpha, 3 RGB or 4 RGBA) of uint8, uint16, bool, "
    "int32 in 0..65535 or float in [0, 1]"
)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def load_image(path: Any) -> np.ndarray:
    """An image file of any mode (grey, palette, 16-bit, alpha) -> H×W×3 uint8 RGB; one clear
    error if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return pil_to_rgb8(im, str(path))
    except SegcompareError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise SegcompareError(f"cannot read image {path}: {err}") from None


def to_rgb8(image: np.ndarray, what: str = "image", bgr: bool = False) -> np.ndarray:
    """H×W or H×W×C pixels of any type above -> H×W×3 uint8 RGB; `bgr`: colour channels are in
    OpenCV's order. SegcompareError naming `what` for anything else."""
    if not isinstance(image, np.ndarray):
        raise SegcompareError(
            f"{what}: a {type(image).__name__}, not an image; expected {ACCEPTED}"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (2, 3, 4)):
        raise SegcompareError(f"{what}: shape {image.shape}; expected {ACCEPTED}")
    if image.ndim == 3 and image.shape[2] == 2:  # grey + alpha
        image = image[..., 0]
    if image.ndim == 3:
        image = image[..., :3]  # RGBA -> RGB
        if bgr:
            image = image[..., ::-1]
    if min(image.shape[:2]) < 1:
        raise SegcompareError(f"{what}: empty image of shape {image.shape}")
    rgb = _to_uint8(image, what)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return np.ascontiguousarray(rgb)


def _to_uint8(image: np.ndarray, what: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if image.dtype == np.uint16:
        return _from16(image)
    if image.dtype == np.int32:
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 65535:
            raise SegcompareError(
                f"{what}: 32-bit integer pixels from {low} to {high}; only 0..65535 (16-bit) "
                "is read: convert it to 8 or 16 bits"
            )
        return _from16(image)
    if np.issubdtype(image.dtype, np.floating):
        low, high = float(np.min(image)), float(np.max(image))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
            raise SegcompareError(
                f"{what}: float pixels from {low:g} to {high:g}; floats must be in [0, 1] "
                "(or pass uint8 0..255)"
            )
        return np.round(image.astype(np.float64) * 255).astype(np.uint8)
    raise SegcompareError(f"{what}: pixels of type {image.dtype}; expected {ACCEPTED}")


def _from16(image: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (v * 255 / 65535, so k * 257 -> k exactly)."""
    return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def pil_to_rgb8(im: Any, what: str = "image") -> np.ndarray:
    """A Pillow image of any mode -> H×W×3 uint8 RGB (see the module docstring)."""
    if im.mode in ("P", "PA"):  # palette indices -> the colours they stand for
        im = im.convert("RGBA")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):  # colour spaces Pillow converts itself
        im = im.convert("RGB")
    elif im.mode.startswith("I;16"):
        return to_rgb8(np.array(im, dtype=np.uint16), what)
    return to_rgb8(np.array(im), what)  # a copy: writable, unlike a view of Pillow's data


def decode_rgb8(data: np.ndarray, what: str = "image") -> Optional[np.ndarray]:
    """Encoded bytes (a uint8 array) decoded by OpenCV -> H×W×3 uint8 RGB, or None if OpenCV
    cannot decode them (not an image, truncated, or more pixels than it allows)."""
    import cv2

    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:
        return None
    if image is None:
        return None
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # the common case, without a copy more
    return to_rgb8(image, what, bgr=True)
