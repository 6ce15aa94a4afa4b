"""The Cityscapes label table: the one place for the 35 labels, the 19 train classes, the palette;
and the colours and names of a model's classes (`palette`, `class_names`, `colorize`): Cityscapes'
for a 19-class model, generic ones for any other class count.

The values equal `cityscapesscripts.helpers.labels` (tests/test_labels.py compares them), but the
package does not need cityscapesscripts at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcompare.utils import SegcompareError

IGNORE_INDEX = 255
NUM_CLASSES = 19


@dataclass(frozen=True)
class Label:
    name: str
    id: int
    train_id: int  # 255: not trained on; -1: license plate (not in labelIds images)
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    #     name                    id  trainId  category        catId  inst   ignore  color
    Label("unlabeled",             0, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("ego vehicle",           1, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("rectification border",  2, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("out of roi",            3, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("static",                4, 255, "void",          0, False, True,  (0, 0, 0)),
    Label("dynamic",               5, 255, "void",          0, False, True,  (111, 74, 0)),
    Label("ground",                6, 255, "void",          0, False, True,  (81, 0, 81)),
    Label("road",                  7,   0, "flat",          1, False, False, (128, 64, 128)),
    Label("sidewalk",              8,   1, "flat",          1, False, False, (244, 35, 232)),
    Label("parking",               9, 255, "flat",          1, False, True,  (250, 170, 160)),
    Label("rail track",           10, 255, "flat",          1, False, True,  (230, 150, 140)),
    Label("building",             11,   2, "construction",  2, False, False, (70, 70, 70)),
    Label("wall",                 12,   3, "construction",  2, False, False, (102, 102, 156)),
    Label("fence",                13,   4, "construction",  2, False, False, (190, 153, 153)),
    Label("guard rail",           14, 255, "construction",  2, False, True,  (180, 165, 180)),
    Label("bridge",               15, 255, "construction",  2, False, True,  (150, 100, 100)),
    Label("tunnel",               16, 255, "construction",  2, False, True,  (150, 120, 90)),
    Label("pole",                 17,   5, "object",        3, False, False, (153, 153, 153)),
    Label("polegroup",            18, 255, "object",        3, False, True,  (153, 153, 153)),
    Label("traffic light",        19,   6, "object",        3, False, False, (250, 170, 30)),
    Label("traffic sign",         20,   7, "object",        3, False, False, (220, 220, 0)),
    Label("vegetation",           21,   8, "nature",        4, False, False, (107, 142, 35)),
    Label("terrain",              22,   9, "nature",        4, False, False, (152, 251, 152)),
    Label("sky",                  23,  10, "sky",           5, False, False, (70, 130, 180)),
    Label("person",               24,  11, "human",         6, True,  False, (220, 20, 60)),
    Label("rider",                25,  12, "human",         6, True,  False, (255, 0, 0)),
    Label("car",                  26,  13, "vehicle",       7, True,  False, (0, 0, 142)),
    Label("truck",                27,  14, "vehicle",       7, True,  False, (0, 0, 70)),
    Label("bus",                  28,  15, "vehicle",       7, True,  False, (0, 60, 100)),
    Label("caravan",              29, 255, "vehicle",       7, True,  True,  (0, 0, 90)),
    Label("trailer",              30, 255, "vehicle",       7, True,  True,  (0, 0, 110)),
    Label("train",                31,  16, "vehicle",       7, True,  False, (0, 80, 100)),
    Label("motorcycle",           32,  17, "vehicle",       7, True,  False, (0, 0, 230)),
    Label("bicycle",              33,  18, "vehicle",       7, True,  False, (119, 11, 32)),
    Label("license plate",        -1,  -1, "vehicle",       7, False, True,  (0, 0, 142)),
)
# fmt: on

LABEL_BY_ID = {label.id: label for label in LABELS}
LABEL_BY_NAME = {label.name: label for label in LABELS}

# The 19 evaluated classes in train-id order.
TRAIN_LABELS: tuple[Label, ...] = tuple(
    sorted((lb for lb in LABELS if 0 <= lb.train_id < IGNORE_INDEX), key=lambda lb: lb.train_id)
)
CLASS_NAMES: tuple[str, ...] = tuple(lb.name for lb in TRAIN_LABELS)
# The 7 evaluated categories (void excluded), in category-id order.
CATEGORY_NAMES: tuple[str, ...] = tuple(dict.fromkeys(lb.category for lb in TRAIN_LABELS))
# Classes whose instances are annotated; iIoU is defined for these.
INSTANCE_CLASS_NAMES: tuple[str, ...] = tuple(lb.name for lb in TRAIN_LABELS if lb.has_instances)

# train id -> RGB colour; 19x3 uint8, and a 256x3 version where 255 (ignore) is black.
PALETTE = np.array([lb.color for lb in TRAIN_LABELS], dtype=np.uint8)
PALETTE_256 = np.zeros((256, 3), dtype=np.uint8)
PALETTE_256[:NUM_CLASSES] = PALETTE

# label id (0..255) -> train id lookup table; ids outside the table map to 255.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lb in LABELS:
    if _lb.id >= 0:
        ID_TO_TRAIN_ID[_lb.id] = _lb.train_id if _lb.train_id >= 0 else IGNORE_INDEX
# train id -> label id (for writing predictions the Cityscapes server accepts); 255 -> 0.
TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)
for _lb in TRAIN_LABELS:
    TRAIN_ID_TO_ID[_lb.train_id] = _lb.id
# label id -> RGB colour, as in gtFine_color images.
ID_TO_COLOR = np.zeros((256, 3), dtype=np.uint8)
for _lb in LABELS:
    if _lb.id >= 0:
        ID_TO_COLOR[_lb.id] = _lb.color
VALID_LABEL_IDS = frozenset(lb.id for lb in LABELS if lb.id >= 0)


# The most classes an 8-bit prediction holds: train id 255 is ignore.
MAX_CLASSES = IGNORE_INDEX


def _check_class_count(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise SegcompareError(f"num_classes must be an integer, got {num_classes!r}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise SegcompareError(
            f"num_classes {num_classes}: colours and 8-bit train ids exist for 1 to "
            f"{MAX_CLASSES} classes ({IGNORE_INDEX} is ignore)"
        )


def _bit_interleaved(index: int) -> tuple[int, int, int]:
    """The colour of `index` in PASCAL VOC's colour map: its bits 0, 3, 6 make red's bits 7, 6, 5,
    bits 1, 4, 7 green's, bits 2, 5 blue's. Distinct indices get distinct colours; 0 is black."""
    rgb = [0, 0, 0]
    for shift in range(8):
        for channel in range(3):
            rgb[channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return (rgb[0], rgb[1], rgb[2])


def palette(num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Train id -> RGB for a model of `num_classes` classes: 256×3 uint8, black at 255 (ignore)
    and at ids the model has no class for. 19 classes: the official Cityscapes palette (the
    Cityscapes train classes); any other count: `num_classes` distinct colours of the
    bit-interleaving colour map (PASCAL VOC's, from its colour 1: none is black)."""
    _check_class_count(num_classes)
    if num_classes == NUM_CLASSES:
        return PALETTE_256.copy()
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = [_bit_interleaved(i + 1) for i in range(num_classes)]
    return table


def class_names(num_classes: int = NUM_CLASSES) -> tuple[str, ...]:
    """The names of a model's classes: Cityscapes' 19 train classes for a 19-class model, else
    class_0, class_1, ... (the names the metrics and saved checkpoints give them)."""
    if num_classes == NUM_CLASSES:
        return CLASS_NAMES
    return tuple(f"class_{i}" for i in range(num_classes))


def colorize(train_ids: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """H×W train ids (255 = ignore) -> H×W×3 uint8 RGB in `palette(num_classes)`: the official
    Cityscapes palette for 19 classes (the default), distinct generic colours otherwise."""
    table = PALETTE_256 if num_classes == NUM_CLASSES else palette(num_classes)
    return table[train_ids]
