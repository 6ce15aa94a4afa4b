"""The label tables: the one place for the Cityscapes labels (35 labels, 19 train classes, the
palette), the 150 ADE20K classes, and the class table of a data set (`ClassTable`: names, colours,
ignore index, reduce_zero_label and the data set's own label ids, one value held by the dataset and
written into checkpoints). The colours and names of a model's classes (`palette`, `class_names`,
`colorize`) read it: Cityscapes' for a 19-class model, generic ones for any other class count.

The values equal `cityscapesscripts.helpers.labels` (tests/test_labels.py compares them), but the
package does not need cityscapesscripts at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class ClassTable:
    """The classes of a data set, as one value: index = train id (what a model predicts).

    `label_ids` are the data set's own id per class, what its label files and its benchmark
    server use: Cityscapes labelIds, ADE20K 1..150 (before reduce_zero_label), a folder data
    set's class indices. `reduce_zero_label` (mmseg's name, transformers' `do_reduce_labels`):
    the label files' 0 is ignore and every other value moves down by one."""

    name: str  # "cityscapes" | "ade20k" | "folder"
    names: tuple[str, ...]  # K class names, index = train id
    palette: tuple[tuple[int, int, int], ...]  # K RGB colours
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False
    label_ids: tuple[int, ...] | None = None  # None: the class index itself

    def __post_init__(self) -> None:
        k = len(self.names)
        _check_class_count(k)
        if len(self.palette) != k:
            raise SegcompareError(
                f"class table {self.name!r}: {k} names but {len(self.palette)} colours"
            )
        for colour in self.palette:
            if len(colour) != 3 or not all(
                isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in colour
            ):
                raise SegcompareError(
                    f"class table {self.name!r}: colour {list(colour)!r} is not [r, g, b] in 0..255"
                )
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < k:
            raise SegcompareError(
                f"class table {self.name!r}: ignore index {self.ignore_index} must lie in "
                f"{k}..255 (above the {k} class indices)"
            )
        if self.label_ids is not None and len(self.label_ids) != k:
            raise SegcompareError(
                f"class table {self.name!r}: {k} names but {len(self.label_ids)} label ids"
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def own_ids(self) -> tuple[int, ...]:
        """The data set's own id of each class (`label_ids`, or the index itself)."""
        return self.label_ids if self.label_ids is not None else tuple(range(self.num_classes))

    def palette_256(self) -> np.ndarray:
        """Train id -> RGB, 256×3 uint8: black at the ignore index and at ids with no class."""
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: self.num_classes] = self.palette
        return table

    def train_id_to_label_id(self) -> np.ndarray:
        """256 uint8 lookup: train id -> the data set's own id; the ignore index and ids with no
        class -> 0 (Cityscapes' "unlabeled", ADE20K's "other")."""
        table = np.zeros(256, dtype=np.uint8)
        table[: self.num_classes] = self.own_ids
        return table

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (checkpoint metadata, HF export's id2label via `id2label`)."""
        return {
            "name": self.name,
            "names": list(self.names),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "reduce_zero_label": self.reduce_zero_label,
            "label_ids": None if self.label_ids is None else list(self.label_ids),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClassTable:
        """The inverse of `to_json`; a malformed value is one `SegcompareError`."""
        try:
            label_ids = d.get("label_ids")
            return cls(
                name=str(d["name"]),
                names=tuple(str(n) for n in d["names"]),
                palette=tuple((int(c[0]), int(c[1]), int(c[2])) for c in d["palette"]),
                ignore_index=int(d.get("ignore_index", IGNORE_INDEX)),
                reduce_zero_label=bool(d.get("reduce_zero_label", False)),
                label_ids=None if label_ids is None else tuple(int(i) for i in label_ids),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise SegcompareError(f"class table: malformed JSON ({type(e).__name__}: {e})") from e

    def id2label(self) -> dict[str, str]:
        """HuggingFace's `id2label`: {"0": name, ...}."""
        return {str(i): n for i, n in enumerate(self.names)}


CITYSCAPES = ClassTable(
    name="cityscapes",
    names=CLASS_NAMES,
    palette=tuple(lb.color for lb in TRAIN_LABELS),
    label_ids=tuple(lb.id for lb in TRAIN_LABELS),
)

# ADE20K (SceneParsing, ADEChallengeData2016): the 150 classes with the names and colours of mmseg's
# ADE20KDataset (mmseg/datasets/ade.py; its "bed " carries a stray trailing space, dropped here).
# The annotation files hold 1..150 and 0 for "other", which reduce_zero_label makes ignore.
# fmt: off
_ADE20K_ROWS: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    # id  name                     colour
    (  1, "wall",                   (120, 120, 120)),
    (  2, "building",               (180, 120, 120)),
    (  3, "sky",                    (  6, 230, 230)),
    (  4, "floor",                  ( 80,  50,  50)),
    (  5, "tree",                   (  4, 200,   3)),
    (  6, "ceiling",                (120, 120,  80)),
    (  7, "road",                   (140, 140, 140)),
    (  8, "bed",                    (204,   5, 255)),
    (  9, "windowpane",             (230, 230, 230)),
    ( 10, "grass",                  (  4, 250,   7)),
    ( 11, "cabinet",                (224,   5, 255)),
    ( 12, "sidewalk",               (235, 255,   7)),
    ( 13, "person",                 (150,   5,  61)),
    ( 14, "earth",                  (120, 120,  70)),
    ( 15, "door",                   (  8, 255,  51)),
    ( 16, "table",                  (255,   6,  82)),
    ( 17, "mountain",               (143, 255, 140)),
    ( 18, "plant",                  (204, 255,   4)),
    ( 19, "curtain",                (255,  51,   7)),
    ( 20, "chair",                  (204,  70,   3)),
    ( 21, "car",                    (  0, 102, 200)),
    ( 22, "water",                  ( 61, 230, 250)),
    ( 23, "painting",               (255,   6,  51)),
    ( 24, "sofa",                   ( 11, 102, 255)),
    ( 25, "shelf",                  (255,   7,  71)),
    ( 26, "house",                  (255,   9, 224)),
    ( 27, "sea",                    (  9,   7, 230)),
    ( 28, "mirror",                 (220, 220, 220)),
    ( 29, "rug",                    (255,   9,  92)),
    ( 30, "field",                  (112,   9, 255)),
    ( 31, "armchair",               (  8, 255, 214)),
    ( 32, "seat",                   (  7, 255, 224)),
    ( 33, "fence",                  (255, 184,   6)),
    ( 34, "desk",                   ( 10, 255,  71)),
    ( 35, "rock",                   (255,  41,  10)),
    ( 36, "wardrobe",               (  7, 255, 255)),
    ( 37, "lamp",                   (224, 255,   8)),
    ( 38, "bathtub",                (102,   8, 255)),
    ( 39, "railing",                (255,  61,   6)),
    ( 40, "cushion",                (255, 194,   7)),
    ( 41, "base",                   (255, 122,   8)),
    ( 42, "box",                    (  0, 255,  20)),
    ( 43, "column",                 (255,   8,  41)),
    ( 44, "signboard",              (255,   5, 153)),
    ( 45, "chest of drawers",       (  6,  51, 255)),
    ( 46, "counter",                (235,  12, 255)),
    ( 47, "sand",                   (160, 150,  20)),
    ( 48, "sink",                   (  0, 163, 255)),
    ( 49, "skyscraper",             (140, 140, 140)),
    ( 50, "fireplace",              (250,  10,  15)),
    ( 51, "refrigerator",           ( 20, 255,   0)),
    ( 52, "grandstand",             ( 31, 255,   0)),
    ( 53, "path",                   (255,  31,   0)),
    ( 54, "stairs",                 (255, 224,   0)),
    ( 55, "runway",                 (153, 255,   0)),
    ( 56, "case",                   (  0,   0, 255)),
    ( 57, "pool table",             (255,  71,   0)),
    ( 58, "pillow",                 (  0, 235, 255)),
    ( 59, "screen door",            (  0, 173, 255)),
    ( 60, "stairway",               ( 31,   0, 255)),
    ( 61, "river",                  ( 11, 200, 200)),
    ( 62, "bridge",                 (255,  82,   0)),
    ( 63, "bookcase",               (  0, 255, 245)),
    ( 64, "blind",                  (  0,  61, 255)),
    ( 65, "coffee table",           (  0, 255, 112)),
    ( 66, "toilet",                 (  0, 255, 133)),
    ( 67, "flower",                 (255,   0,   0)),
    ( 68, "book",                   (255, 163,   0)),
    ( 69, "hill",                   (255, 102,   0)),
    ( 70, "bench",                  (194, 255,   0)),
    ( 71, "countertop",             (  0, 143, 255)),
    ( 72, "stove",                  ( 51, 255,   0)),
    ( 73, "palm",                   (  0,  82, 255)),
    ( 74, "kitchen island",         (  0, 255,  41)),
    ( 75, "computer",               (  0, 255, 173)),
    ( 76, "swivel chair",           ( 10,   0, 255)),
    ( 77, "boat",                   (173, 255,   0)),
    ( 78, "bar",                    (  0, 255, 153)),
    ( 79, "arcade machine",         (255,  92,   0)),
    ( 80, "hovel",                  (255,   0, 255)),
    ( 81, "bus",                    (255,   0, 245)),
    ( 82, "towel",                  (255,   0, 102)),
    ( 83, "light",                  (255, 173,   0)),
    ( 84, "truck",                  (255,   0,  20)),
    ( 85, "tower",                  (255, 184, 184)),
    ( 86, "chandelier",             (  0,  31, 255)),
    ( 87, "awning",                 (  0, 255,  61)),
    ( 88, "streetlight",            (  0,  71, 255)),
    ( 89, "booth",                  (255,   0, 204)),
    ( 90, "television receiver",    (  0, 255, 194)),
    ( 91, "airplane",               (  0, 255,  82)),
    ( 92, "dirt track",             (  0,  10, 255)),
    ( 93, "apparel",                (  0, 112, 255)),
    ( 94, "pole",                   ( 51,   0, 255)),
    ( 95, "land",                   (  0, 194, 255)),
    ( 96, "bannister",              (  0, 122, 255)),
    ( 97, "escalator",              (  0, 255, 163)),
    ( 98, "ottoman",                (255, 153,   0)),
    ( 99, "bottle",                 (  0, 255,  10)),
    (100, "buffet",                 (255, 112,   0)),
    (101, "poster",                 (143, 255,   0)),
    (102, "stage",                  ( 82,   0, 255)),
    (103, "van",                    (163, 255,   0)),
    (104, "ship",                   (255, 235,   0)),
    (105, "fountain",               (  8, 184, 170)),
    (106, "conveyer belt",          (133,   0, 255)),
    (107, "canopy",                 (  0, 255,  92)),
    (108, "washer",                 (184,   0, 255)),
    (109, "plaything",              (255,   0,  31)),
    (110, "swimming pool",          (  0, 184, 255)),
    (111, "stool",                  (  0, 214, 255)),
    (112, "barrel",                 (255,   0, 112)),
    (113, "basket",                 ( 92, 255,   0)),
    (114, "waterfall",              (  0, 224, 255)),
    (115, "tent",                   (112, 224, 255)),
    (116, "bag",                    ( 70, 184, 160)),
    (117, "minibike",               (163,   0, 255)),
    (118, "cradle",                 (153,   0, 255)),
    (119, "oven",                   ( 71, 255,   0)),
    (120, "ball",                   (255,   0, 163)),
    (121, "food",                   (255, 204,   0)),
    (122, "step",                   (255,   0, 143)),
    (123, "tank",                   (  0, 255, 235)),
    (124, "trade name",             (133, 255,   0)),
    (125, "microwave",              (255,   0, 235)),
    (126, "pot",                    (245,   0, 255)),
    (127, "animal",                 (255,   0, 122)),
    (128, "bicycle",                (255, 245,   0)),
    (129, "lake",                   ( 10, 190, 212)),
    (130, "dishwasher",             (214, 255,   0)),
    (131, "screen",                 (  0, 204, 255)),
    (132, "blanket",                ( 20,   0, 255)),
    (133, "sculpture",              (255, 255,   0)),
    (134, "hood",                   (  0, 153, 255)),
    (135, "sconce",                 (  0,  41, 255)),
    (136, "vase",                   (  0, 255, 204)),
    (137, "traffic light",          ( 41,   0, 255)),
    (138, "tray",                   ( 41, 255,   0)),
    (139, "ashcan",                 (173,   0, 255)),
    (140, "fan",                    (  0, 245, 255)),
    (141, "pier",                   ( 71,   0, 255)),
    (142, "crt screen",             (122,   0, 255)),
    (143, "plate",                  (  0, 255, 184)),
    (144, "monitor",                (  0,  92, 255)),
    (145, "bulletin board",         (184, 255,   0)),
    (146, "shower",                 (  0, 133, 255)),
    (147, "radiator",               (255, 214,   0)),
    (148, "glass",                  ( 25, 194, 194)),
    (149, "clock",                  (102, 255,   0)),
    (150, "flag",                   ( 92,   0, 255)),
)
# fmt: on

ADE20K = ClassTable(
    name="ade20k",
    names=tuple(name for _, name, _ in _ADE20K_ROWS),
    palette=tuple(colour for _, _, colour in _ADE20K_ROWS),
    reduce_zero_label=True,
    label_ids=tuple(i for i, _, _ in _ADE20K_ROWS),
)


def nameless_table(k: int) -> ClassTable:
    """The table of K classes known by count only: class_0, class_1, ... and K distinct colours
    of the bit-interleaving colour map (PASCAL VOC's, from its colour 1: none is black); never
    Cityscapes' (no iIoU or categories), whatever K is."""
    _check_class_count(k)
    return ClassTable(
        name="folder",
        names=tuple(f"class_{i}" for i in range(k)),
        palette=tuple(_bit_interleaved(i + 1) for i in range(k)),
    )


def generic_table(k: int) -> ClassTable:
    """The table of a K-class model with no names: `nameless_table(k)`, but Cityscapes' for
    K = 19, so a 19-class model keeps the official palette and names."""
    _check_class_count(k)
    return CITYSCAPES if k == NUM_CLASSES else nameless_table(k)


def palette(num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Train id -> RGB for a model of `num_classes` classes: 256×3 uint8, black at 255 (ignore)
    and at ids the model has no class for; `generic_table(num_classes)`'s colours (the official
    Cityscapes palette for 19 classes)."""
    return generic_table(num_classes).palette_256()


def class_names(num_classes: int = NUM_CLASSES) -> tuple[str, ...]:
    """The names of a model's classes: `generic_table(num_classes)`'s (Cityscapes' 19 train
    classes for a 19-class model, else class_0, class_1, ...)."""
    return generic_table(num_classes).names


def colorize(train_ids: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """H×W train ids (255 = ignore) -> H×W×3 uint8 RGB in `palette(num_classes)`: the official
    Cityscapes palette for 19 classes (the default), distinct generic colours otherwise."""
    table = PALETTE_256 if num_classes == NUM_CLASSES else palette(num_classes)
    return table[train_ids]
