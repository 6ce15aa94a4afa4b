"""The three folder layouts a data set may have, and the one way each is read.

A layout is a small value (`Layout`): where the images and the masks of a split lie, how an image
and its mask are paired, and which class table applies. `detect_layout` finds it from the folder,
`data.layout` / `--layout` forces it; `list_pairs` lists a split's (image, mask) pairs for any of
them, and `read_mask` / `mask_to_train_ids` are the one rule by which a mask file becomes train
ids (check, prepare, eval and train all read masks through them).

    cityscapes  ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
                ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png  (+ labelTrainIds, prepare)
    ade20k      ROOT/images/{training,validation}/<name>.jpg   (ROOT = ADEChallengeData2016, or
                ROOT/annotations/{training,validation}/<name>.png     a folder that holds it)
    folder      ROOT/img_dir/<split>/<name>.<jpg|png|...>  ROOT/ann_dir/<split>/<name>.png
                ROOT/id2label.json  ({"0": "background", ...}, HuggingFace's format)
                ROOT/palette.json   (optional: one [r, g, b] per class)

Masks of ade20k and folder: single-channel index PNGs (L, or P whose indices are the classes),
255 ignored; ADE20K's 0 ("other") becomes ignore and every other value moves down by one
(reduce_zero_label, mmseg's rule). 16-bit masks are read by value (0..255 allowed).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from segcompare.data.labels import (
    ADE20K,
    CITYSCAPES,
    IGNORE_INDEX,
    ClassTable,
    _bit_interleaved,
)
from segcompare.utils import SegcompareError, worker_message

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)



class BadSampleError(SegcompareError):
    """A file of a sample is missing, unreadable, of the wrong size or holds unknown ids.

    Raised in a DataLoader worker, PyTorch re-raises it in the main process with the worker's
    traceback as its message; the message is taken back to the one line a user needs."""

    def __init__(self, message: str = "") -> None:
        super().__init__(worker_message(message))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Layout:
    """Where a split's images and masks lie. `{split}` in a folder is the split's folder name."""

    name: str  # cityscapes | ade20k | folder
    image_dir: str  # relative to the root
    mask_dir: str
    image_suffixes: tuple[str, ...]  # an image file ends with one of these
    mask_suffix: str  # its mask: the same key + this suffix
    folder_of_split: tuple[tuple[str, str], ...] = ()  # the split a user names -> its folder
    recursive: bool = False  # images lie in subfolders (Cityscapes' cities)

    def split_folder(self, split: str) -> str:
        return dict(self.folder_of_split).get(split, split)


CITYSCAPES_LAYOUT = Layout(
    "cityscapes", "leftImg8bit/{split}", "gtFine/{split}", ("_leftImg8bit.png",),
    "_gtFine_labelIds.png", recursive=True,
)  # fmt: skip
ADE20K_LAYOUT = Layout(
    "ade20k", "images/{split}", "annotations/{split}", (".jpg",), ".png",
    folder_of_split=(("train", "training"), ("val", "validation")),
)  # fmt: skip
FOLDER_LAYOUT = Layout("folder", "img_dir/{split}", "ann_dir/{split}", IMAGE_SUFFIXES, ".png")

LAYOUTS = {lay.name: lay for lay in (CITYSCAPES_LAYOUT, ADE20K_LAYOUT, FOLDER_LAYOUT)}
ADE20K_FOLDER = "ADEChallengeData2016"


def resolve_root(root: PathLike, layout: Layout) -> Path:
    """The folder a layout's paths are relative to: ADE20K's root may be the folder holding
    ADEChallengeData2016/."""
    root = Path(root)
    if layout is ADE20K_LAYOUT and (root / ADE20K_FOLDER / "images").is_dir():
        return root / ADE20K_FOLDER
    return root


def detect_layout(root: PathLike, name: Optional[str] = None) -> Layout:
    """The layout `name` (cityscapes | ade20k | folder), or the one whose folders `root` has."""
    root = Path(root)
    if name is not None:
        if name not in LAYOUTS:
            raise SegcompareError(
                f"layout {name!r}: expected one of {', '.join(LAYOUTS)}"
            )
        return LAYOUTS[name]
    if not root.is_dir():
        raise SegcompareError(f"{root}: data folder not found")
    for layout in LAYOUTS.values():
        base = resolve_root(root, layout)
        if (base / layout.image_dir.split("/")[0]).is_dir():
            return layout
    raise SegcompareError(
        f"{root}: not a data set folder: expected leftImg8bit/ (cityscapes), images/ + "
        f"annotations/ or {ADE20K_FOLDER}/ (ade20k), or img_dir/ + ann_dir/ (folder)"
    )


def split_dirs(root: PathLike, layout: Layout, split: str) -> tuple[Path, Path]:
    """(image folder, mask folder) of a split."""
    base = resolve_root(root, layout)
    folder = layout.split_folder(split)
    return (base / layout.image_dir.format(split=folder),
            base / layout.mask_dir.format(split=folder))  # fmt: skip


def available_splits(root: PathLike, layout: Layout) -> list[str]:
    """The splits whose image folder exists, by the names a user gives (train, val, ...)."""
    base = resolve_root(root, layout)
    parent = base / layout.image_dir.split("/")[0]
    by_folder = {folder: split for split, folder in layout.folder_of_split}
    order = {"train": 0, "val": 1, "test": 2}
    found = [by_folder.get(p.name, p.name) for p in parent.iterdir()] if parent.is_dir() else []
    return sorted(found, key=lambda s: (order.get(s, 3), s))


def _key(path: Path, base: Path, suffixes: tuple[str, ...]) -> Optional[str]:
    """The pairing key of a file under `base`: its relative path without the suffix."""
    rel = path.relative_to(base).as_posix()
    for suffix in suffixes:
        if rel.lower().endswith(suffix.lower()):
            return rel[: -len(suffix)]
    return None


def _files(folder: Path, recursive: bool) -> list[Path]:
    pattern = "*/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def scan_split(
    root: PathLike, layout: Layout, split: str
) -> tuple[list[tuple[Path, Path]], list[Path], list[Path]]:
    """(pairs, images without a mask, masks without an image) of a split, each sorted.

    An error when the split's image folder is missing or is a file."""
    images_dir, masks_dir = split_dirs(root, layout, split)
    for folder in (images_dir, masks_dir):
        if folder.exists() and not folder.is_dir():
            raise SegcompareError(f"{folder}: split {split!r} is a file, not a folder")
    if not images_dir.is_dir():
        have = available_splits(root, layout)
        raise SegcompareError(
            f"{images_dir}: no such folder: split {split!r} not found "
            f"({layout.name} layout; splits here: {', '.join(have) or 'none'})"
        )
    images: dict[str, Path] = {}
    for path in _files(images_dir, layout.recursive):
        key = _key(path, images_dir, layout.image_suffixes)
        if key is not None:
            images[key] = path
    masks: dict[str, Path] = {}
    if masks_dir.is_dir():
        suffixes = (layout.mask_suffix,)
        if layout is CITYSCAPES_LAYOUT:  # labelTrainIds (prepare) stand in for labelIds too
            suffixes = ("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")
        for path in _files(masks_dir, layout.recursive):
            key = _key(path, masks_dir, suffixes)
            if key is not None and key not in masks:
                masks[key] = path
    pairs = [(images[k], masks[k]) for k in sorted(images) if k in masks]
    lonely_images = [images[k] for k in sorted(images) if k not in masks]
    lonely_masks = [masks[k] for k in sorted(masks) if k not in images]
    return pairs, lonely_images, lonely_masks


def list_pairs(root: PathLike, layout: Layout, split: str) -> list[tuple[Path, Path]]:
    """A split's (image, mask) pairs; an image without a mask or a mask without an image is an
    error naming the file (a gap is never scored silently)."""
    pairs, lonely_images, lonely_masks = scan_split(root, layout, split)
    images_dir, masks_dir = split_dirs(root, layout, split)
    if lonely_images:
        raise SegcompareError(
            f"{lonely_images[0]}: image without a mask in {masks_dir} "
            f"({len(lonely_images)} such image(s); `segcompare data check` lists them)"
        )
    if lonely_masks:
        raise SegcompareError(
            f"{lonely_masks[0]}: mask without an image in {images_dir} "
            f"({len(lonely_masks)} such mask(s); `segcompare data check` lists them)"
        )
    if not pairs:
        raise SegcompareError(f"{images_dir}: no images in split {split!r}")
    return pairs


# --- the class table of a data set ---------------------------------------------------------------
def class_table(
    root: PathLike,
    layout: Layout,
    reduce_zero_label: Optional[bool] = None,
    ignore_index: Optional[int] = None,
) -> ClassTable:
    """The data set's classes: Cityscapes' 19, ADE20K's 150, or a folder's id2label.json (with
    palette.json, or the P-mode masks' own palette, or generated colours). `reduce_zero_label`
    and `ignore_index` (the config keys data.*) override the layout's defaults."""
    from dataclasses import replace

    if layout is CITYSCAPES_LAYOUT:
        table = CITYSCAPES
    elif layout is ADE20K_LAYOUT:
        table = ADE20K
    else:
        table = _folder_table(Path(root))
    changes: dict = {}
    if reduce_zero_label is not None and reduce_zero_label != table.reduce_zero_label:
        if layout is CITYSCAPES_LAYOUT:
            raise SegcompareError("data.reduce_zero_label: Cityscapes labelIds are mapped by "
                                  "its label table; leave it unset")
        changes["reduce_zero_label"] = bool(reduce_zero_label)
    if ignore_index is not None and ignore_index != table.ignore_index:
        changes["ignore_index"] = int(ignore_index)
    return replace(table, **changes) if changes else table


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise SegcompareError(f"{path}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise SegcompareError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def _folder_table(root: Path) -> ClassTable:
    path = root / "id2label.json"
    if not path.is_file():
        raise SegcompareError(
            f"{path}: missing; a folder data set names its classes there, in HuggingFace's "
            'format: {"0": "background", "1": "road", ...}'
        )
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise SegcompareError(f'{path}: expected {{"0": "name", ...}}, got {str(raw)[:80]}')
    try:
        by_index = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise SegcompareError(f"{path}: keys must be class indices 0..K-1") from None
    k = len(by_index)
    if sorted(by_index) != list(range(k)):
        missing = sorted(set(range(k)) - set(by_index))
        raise SegcompareError(
            f"{path}: class indices must be 0..{k - 1} without gaps; missing "
            f"{missing[:5] or sorted(by_index)[-1:]}"
        )
    names = tuple(by_index[i] for i in range(k))
    palette = _folder_palette(root, k)
    return ClassTable("folder", names, palette, label_ids=tuple(range(k)))


def _folder_palette(root: Path, k: int) -> tuple[tuple[int, int, int], ...]:
    path = root / "palette.json"
    if path.is_file():
        raw = _read_json(path)
        ok = isinstance(raw, list) and len(raw) == k and all(
            isinstance(c, list) and len(c) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in raw
        )  # fmt: skip
        if not ok:
            raise SegcompareError(
                f"{path}: expected {k} colours [r, g, b] (0..255), one per class of id2label.json"
            )
        return tuple((c[0], c[1], c[2]) for c in raw)
    from_masks = _p_mode_palette(root, k)
    if from_masks is not None:
        return from_masks
    return tuple(_bit_interleaved(i + 1) for i in range(k))


def palette_size(path: PathLike) -> Optional[int]:
    """The number of colours in a palette (P-mode) PNG's palette; None for any other file. A
    mask's values are its indices whatever this says (`read_mask`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode != "P":
                return None
            return len(im.getpalette() or []) // 3
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _p_mode_palette(root: Path, k: int) -> Optional[tuple[tuple[int, int, int], ...]]:
    """The palette of the first P-mode mask of ann_dir, if it has k distinct first colours (a
    palette shorter than the class count gives none: every class gets a generated colour)."""
    from PIL import Image

    masks = sorted((root / "ann_dir").glob("*/*.png"))[:1]
    for path in masks:
        try:
            with Image.open(path) as im:
                if im.mode != "P":
                    return None
                flat = im.getpalette() or []
        except (OSError, SyntaxError, ValueError):
            return None
        colours = [tuple(flat[3 * i : 3 * i + 3]) for i in range(k)]
        if len(flat) >= 3 * k and len(set(colours)) == k:
            return tuple((int(c[0]), int(c[1]), int(c[2])) for c in colours)
        if len(flat) < 3 * k:
            log.warning("%s: its palette has %d colour(s) for %d classes: the classes' colours "
                        "are generated (palette.json sets them)", path, len(flat) // 3, k)
    return None


# --- masks -------------------------------------------------------------------------------------
def read_mask(path: PathLike, data: Optional[np.ndarray] = None) -> np.ndarray:
    """A mask or labelIds PNG -> H×W uint8 as stored, by one rule for every command: L as is, P as
    its palette indices (not the colours), 16-bit by value (0..255), 1-bit as 0/1. An RGB/RGBA
    colour image, a value above 255 or an undecodable file is a `BadSampleError` naming the file."""
    from PIL import Image

    if data is None:  # the common case (an 8-bit grey PNG) decoded by OpenCV, which is faster
        fast = _decode_grey_cv2(path)
        if fast is not None:
            return fast
    try:
        with Image.open(path if data is None else _bytes_io(data)) as im:
            im.load()
            mode = im.mode
            array = np.array(im)
    except FileNotFoundError:
        raise BadSampleError(f"{path}: missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSampleError(f"{path}: cannot decode ({err})") from None
    if array.ndim != 2:
        hint = " (a colour mask: run `segcompare data convert-masks`)" if array.ndim == 3 else ""
        raise BadSampleError(
            f"{path}: expected a 1-channel index mask (L or P), got mode {mode} shape "
            f"{array.shape}{hint}"
        )
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype != np.uint8:
        high = int(array.max()) if array.size else 0
        if array.min() < 0 or high > 255:
            raise BadSampleError(
                f"{path}: {array.dtype} mask holds value {high}; label values must be 0..255"
            )
        array = array.astype(np.uint8)
    return array


def _decode_grey_cv2(path: PathLike) -> Optional[np.ndarray]:
    """An 8-bit single-channel PNG as stored, by OpenCV; None for anything else (palette images,
    which OpenCV turns into colours, 16-bit, undecodable files: Pillow reads those by the rule)."""
    import cv2

    try:
        raw = np.fromfile(path, dtype=np.uint8)
        array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    except (OSError, cv2.error):
        return None
    if array is None or array.ndim != 2 or array.dtype != np.uint8:
        return None
    if raw[:8].tobytes() == b"\x89PNG\r\n\x1a\n" and raw.size > 25 and raw[25] == 3:
        return None  # a palette PNG (IHDR colour type 3): its indices, never its colours
    return array


def _bytes_io(data: np.ndarray):  # noqa: ANN202
    import io

    return io.BytesIO(data.tobytes())


def train_id_lut(table: ClassTable) -> np.ndarray:
    """256 int16 lookup: stored mask value -> train id (0..K-1), 255 ignore, or -1 (not allowed).

    reduce_zero_label (mmseg's LoadAnnotations): 0 -> ignore, v -> v - 1; 255 stays ignore, and
    so does the table's ignore index."""
    k = table.num_classes
    lut = np.full(256, -1, dtype=np.int16)
    if table.reduce_zero_label:
        lut[0] = IGNORE_INDEX
        lut[1 : k + 1] = np.arange(k)
    else:
        lut[:k] = np.arange(k)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    if table.ignore_index != IGNORE_INDEX:
        lut[table.ignore_index] = IGNORE_INDEX
    return lut


def allowed_values(table: ClassTable) -> str:
    """The stored values a mask of `table` may hold, in words."""
    k = table.num_classes
    classes = f"1..{k}" if table.reduce_zero_label else f"0..{k - 1}"
    zero = ", 0 (ignored: reduce_zero_label)" if table.reduce_zero_label else ""
    extra = f", {table.ignore_index}" if table.ignore_index != IGNORE_INDEX else ""
    return f"{classes}{zero}, 255{extra} (ignore)"


def mask_to_train_ids(mask: np.ndarray, table: ClassTable, path: PathLike) -> np.ndarray:
    """H×W stored values -> H×W uint8 train ids (255 ignore); a value no class has is a
    `BadSampleError` naming the file, the values and their pixel counts."""
    lut = train_id_lut(table)
    mapped = lut[mask]
    if (mapped < 0).any():
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = [int(v) for v in np.flatnonzero(counts * (lut < 0))]
        shown = ", ".join(f"{v} ({counts[v]} px)" for v in bad[:6])
        raise BadSampleError(
            f"{path}: mask value(s) {shown} outside the {table.num_classes} classes; allowed: "
            f"{allowed_values(table)}"
        )
    return mapped.astype(np.uint8)
