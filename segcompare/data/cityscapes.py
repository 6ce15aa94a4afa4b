"""The dataset of every layout (`CityscapesDataset`: Cityscapes, ADE20K or a folder set, see
`segcompare.data.layouts`), and for Cityscapes on disk its own check and the labelTrainIds
conversion.

The layout (as downloaded from cityscapes-dataset.com; the synthetic set uses it too)::

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,color,instanceIds}.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (`data prepare`)
    ROOT/gtCoarse/train_extra/...  (labels of the train_extra split)
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import cv2
import numpy as np

from segcompare.data.images import decode_rgb8
from segcompare.data.labels import (
    ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    NUM_CLASSES,
    VALID_LABEL_IDS,
)
from segcompare.data.layouts import (
    CITYSCAPES_LAYOUT,
    BadSampleError,
    Layout,
    class_table,
    detect_layout,
    list_pairs,
    mask_to_train_ids,
    read_mask,
    resolve_root,
)
from segcompare.utils import SegcompareError, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "train_extra")
# Image counts of the official release (leftImg8bit_trainvaltest.zip, leftImg8bit_trainextra.zip).
OFFICIAL_COUNTS = {"train": 2975, "val": 500, "test": 1525, "train_extra": 19998}
IMAGE_SUFFIX = "_leftImg8bit.png"
_NAME_RE = re.compile(r"^([a-z_]+)_(\d{6})_(\d{6})$")

# 256-entry tables: 1 where a pixel value is not allowed.
_BAD_ID = np.ones(256, dtype=np.uint8)
_BAD_ID[sorted(VALID_LABEL_IDS)] = 0
_BAD_TRAIN_ID = np.ones(256, dtype=np.uint8)
_BAD_TRAIN_ID[:NUM_CLASSES] = 0
_BAD_TRAIN_ID[IGNORE_INDEX] = 0

PathLike = Union[str, "os.PathLike[str]"]


def label_dir(split: str) -> str:
    return "gtCoarse" if split == "train_extra" else "gtFine"


def label_path(root: PathLike, split: str, city: str, name: str, kind: str) -> Path:
    """kind: labelIds, labelTrainIds, color, instanceIds, polygons (.json)."""
    gt = label_dir(split)
    ext = ".json" if kind == "polygons" else ".png"
    return Path(root) / gt / split / city / f"{name}_{gt}_{kind}{ext}"


# --- reading --------------------------------------------------------------------------------------
def _decode(path: PathLike, flags: int) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise BadSampleError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        array = cv2.imdecode(data, flags) if data.size else None
    except cv2.error:  # e.g. a header claiming more pixels than OpenCV allows (a bomb)
        array = None
    if array is None:
        raise BadSampleError(f"{path}: cannot decode (truncated, not an image, or too large)")
    return array


def read_image(path: PathLike) -> np.ndarray:
    """A leftImg8bit PNG (any mode: grey, palette, 16-bit, alpha) -> H×W×3 uint8 RGB."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise BadSampleError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        image = decode_rgb8(data, str(path))
    except SegcompareError as err:  # a type of pixels no camera image has
        raise BadSampleError(str(err)) from None
    if image is None:
        raise BadSampleError(f"{path}: cannot decode (truncated, not an image, or too large)")
    return image


def read_label(path: PathLike) -> np.ndarray:
    """A labelIds / labelTrainIds PNG -> H×W uint8, as stored (no mapping), by the one rule of
    `layouts.read_mask` (palette PNGs by index, 16-bit by value)."""
    return read_mask(path)


def read_train_ids(path: PathLike) -> np.ndarray:
    """labelTrainIds as stored, or labelIds mapped through ID_TO_TRAIN_ID; unknown values raise."""
    label = read_label(path)
    is_train_ids = str(path).endswith("_labelTrainIds.png")
    bad = _BAD_TRAIN_ID if is_train_ids else _BAD_ID
    if cv2.LUT(label, bad).any():
        values = np.flatnonzero(np.bincount(label.ravel(), minlength=256) * bad)
        kind = "train ids" if is_train_ids else "label ids"
        raise BadSampleError(f"{path}: unknown {kind} {values.tolist()}")
    return label if is_train_ids else cv2.LUT(label, ID_TO_TRAIN_ID)


def read_instances(path: PathLike) -> np.ndarray:
    """An instanceIds PNG (16-bit, id*1000+k for instances, else the label id) -> H×W int32."""
    inst = _decode(path, cv2.IMREAD_UNCHANGED)
    if inst.ndim != 2:
        raise BadSampleError(f"{path}: expected a 1-channel instance image, got {inst.shape}")
    return inst.astype(np.int32)


# --- listing --------------------------------------------------------------------------------------
def list_images(root: PathLike, split: str) -> list[Path]:
    """All leftImg8bit images of a split, sorted by city and name."""
    base = Path(root) / "leftImg8bit" / split
    return sorted(base.glob(f"*/*{IMAGE_SUFFIX}"))


def sample_name(image_path: PathLike) -> str:
    """.../aachen_000000_000019_leftImg8bit.png -> aachen_000000_000019"""
    return Path(image_path).name[: -len(IMAGE_SUFFIX)]


def available_splits(root: PathLike) -> list[str]:
    return [s for s in SPLITS if (Path(root) / "leftImg8bit" / s).is_dir()]


def _sample_rng(seed: Optional[int], epoch: int, index: int) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng((int(seed), int(epoch), int(index)))


class CityscapesDataset:
    """A Cityscapes split as a map-style dataset (works with torch's DataLoader).

    ``ds[i]`` -> ``{"image", "label", "name", "image_path"}`` (+ ``"instances"`` when
    with_instances, + ``"skipped"`` when skip_bad):

    * image: H×W×3 uint8 RGB, label: H×W uint8 train ids (255 = ignore), read from
      ``*_labelTrainIds.png`` if present, else ``*_labelIds.png`` mapped on the fly;
    * with a transform, ``image, label = transform(image, label, rng=rng)`` replaces them
      (float32 3×h×w and int64 h×w for the pipelines in `segcompare.data.transforms`).

    Randomness: with ``seed`` set, sample ``index`` of epoch ``epoch`` draws from
    ``np.random.default_rng((seed, epoch, index))``: bit-exact on resume and with any number of
    workers. Tell the dataset the epoch with ``ds.set_epoch(e)`` (workers are re-created each
    epoch unless persistent), or index it with ``ds[(index, epoch)]`` (works with persistent
    workers: a sampler can yield such pairs). With ``seed=None`` each call draws fresh entropy.
    A transform whose ``__call__`` takes no ``rng`` is called as ``transform(image, label)``.

    Bad samples: by default an unreadable file, size mismatch or unknown id raises
    `BadSampleError` naming the file. With ``skip_bad=True`` the dataset logs one warning per
    bad file, returns the next good sample instead and reports how many it skipped in
    ``sample["skipped"]`` (sum it over batches: workers do not share ``ds.bad_files``).

    ``cache_dir``: optional decoded-uint8 cache. The first read of a sample writes its image
    and train-id label as .npy there; later reads memory-map them, so a transform that crops
    touches only the pixels it needs. About 8 MB per 1024×2048 sample.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[Callable[..., Any]] = None,
        with_instances: bool = False,
        *,
        seed: Optional[int] = None,
        skip_bad: bool = False,
        cache_dir: Optional[PathLike] = None,
        layout: Union[None, str, Layout] = None,
        reduce_zero_label: Optional[bool] = None,
        ignore_index: Optional[int] = None,
    ) -> None:
        self.layout = layout if isinstance(layout, Layout) else detect_layout(root, layout)
        self.table = class_table(root, self.layout, reduce_zero_label, ignore_index)
        self.root = resolve_root(root, self.layout)
        self.split = split
        self.transform = transform
        self.with_instances = with_instances
        self.seed = seed
        self.epoch = 0
        self.skip_bad = skip_bad
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.bad_files: set[str] = set()
        self._transform_takes_rng = _takes_rng(transform)
        if self.layout is not CITYSCAPES_LAYOUT:
            if with_instances:
                raise SegcompareError(f"{self.root}: instance masks exist in the Cityscapes "
                                      "layout only")
            pairs = list_pairs(self.root, self.layout, split)
            self.samples = [(str(image), str(mask)) for image, mask in pairs]
            self.names = [Path(image).stem for image, _ in pairs]
            return
        if split not in SPLITS:
            raise SegcompareError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        images = list_images(self.root, split)
        if not images:
            raise SegcompareError(
                f"{self.root / 'leftImg8bit' / split}: no *{IMAGE_SUFFIX} images "
                "(expected leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png)"
            )
        self.samples: list[tuple[str, str]] = []
        for image in images:
            name, city = sample_name(image), image.parent.name
            trainids = label_path(self.root, split, city, name, "labelTrainIds")
            ids = label_path(self.root, split, city, name, "labelIds")
            label = trainids if trainids.exists() else ids
            if not label.exists():
                msg = f"{image}: no label ({ids.name} or {trainids.name} in {ids.parent})"
                if not skip_bad:
                    raise BadSampleError(msg)
                self._warn_bad(str(image), msg)
                continue
            if label is trainids:
                _refuse_stale(trainids, ids)
            self.samples.append((str(image), str(label)))
        if not self.samples:
            raise SegcompareError(f"{self.root}: no usable samples in split {split!r}")
        orphans = _orphan_labels(self.root, split, images)
        if orphans and not skip_bad:
            raise BadSampleError(f"{orphans[0]} ({len(orphans)} such label(s))")
        self.names = [sample_name(image) for image, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Any]:
        index, epoch = (key if isinstance(key, tuple) else (key, self.epoch))
        index = int(index)
        if index < 0:
            index += len(self)
        if not self.skip_bad:
            return self._load(index, epoch)
        skipped = 0
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                sample = self._load(i, epoch, rng_index=index)
            except BadSampleError as err:
                self._warn_bad(str(err).split(": ", 1)[0], str(err))
                skipped += 1
                continue
            sample["skipped"] = skipped
            return sample
        raise SegcompareError(f"{self.root}: every sample of split {self.split!r} is unreadable")

    # --------------------------------------------------------------------------------------------
    def _warn_bad(self, path: str, message: str) -> None:
        if path not in self.bad_files:
            self.bad_files.add(path)
            log.warning("skipping bad sample: %s", message)

    def read_train_ids(self, path: str) -> np.ndarray:
        """A mask file of this data set -> H×W uint8 train ids (255 ignore), checked."""
        if self.layout is CITYSCAPES_LAYOUT:
            return read_train_ids(path)
        return mask_to_train_ids(read_mask(path), self.table, path)

    def _load(self, index: int, epoch: int, rng_index: Optional[int] = None) -> dict[str, Any]:
        image_path, label_file = self.samples[index]
        image = self._cached(image_path, read_image)
        label = self._cached(label_file, self.read_train_ids)
        if image.shape[:2] != label.shape:
            raise BadSampleError(f"{label_file}: size {label.shape[1]}x{label.shape[0]} differs "
                                 f"from its image {image.shape[1]}x{image.shape[0]}")
        name = self.names[index]
        sample: dict[str, Any] = {"name": name, "image_path": image_path}
        if self.with_instances:
            city = Path(image_path).parent.name
            inst_path = label_path(self.root, self.split, city, name, "instanceIds")
            instances = read_instances(inst_path)
            if instances.shape != label.shape:
                raise BadSampleError(f"{inst_path}: size differs from its image")
            sample["instances"] = instances
        if self.transform is None:
            sample["image"], sample["label"] = np.array(image), np.array(label)
            return sample
        if self._transform_takes_rng:
            rng = _sample_rng(self.seed, epoch, index if rng_index is None else rng_index)
            sample["image"], sample["label"] = self.transform(image, label, rng=rng)
        else:
            sample["image"], sample["label"] = self.transform(image, label)
        return sample

    def _cached(self, path: str, reader: Callable[[str], np.ndarray]) -> np.ndarray:
        if self.cache_dir is None:
            return reader(path)
        try:
            st = os.stat(path)
        except OSError as err:
            raise BadSampleError(f"{path}: cannot read ({err.strerror})") from None
        rel = Path(path).relative_to(self.root)
        # the table's rule is part of what a mask decodes to (reduce_zero_label, ignore index)
        table = self.table
        rule = f".{int(table.reduce_zero_label)}{table.ignore_index}"
        rule = "" if reader is read_image else rule
        cache = self.cache_dir / rel.parent / f"{rel.stem}.{st.st_size}.{st.st_mtime_ns}{rule}.npy"
        try:
            return np.load(cache, mmap_mode="r")
        except (FileNotFoundError, ValueError, OSError):
            pass
        array = reader(path)
        from segcompare.utils import atomic_path

        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
        return array


def _refuse_stale(trainids: Path, ids: Path) -> None:
    """labelTrainIds older than the labelIds they were made from would score stale labels."""
    try:
        stale = ids.exists() and trainids.stat().st_mtime_ns < ids.stat().st_mtime_ns
    except OSError:
        return
    if stale:
        raise BadSampleError(
            f"{trainids}: older than {ids.name} (the labels changed after `data prepare`): "
            "rerun `segcompare data prepare`"
        )


def _takes_rng(transform: Optional[Callable[..., Any]]) -> bool:
    if transform is None:
        return False
    try:
        params = inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False
    return "rng" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# --- data check -----------------------------------------------------------------------------------
@dataclass
class CheckReport:
    root: str
    counts: dict[str, int] = field(default_factory=dict)  # split -> images
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode_strict(path: Path) -> np.ndarray:
    """Decode with Pillow, whose errors say what is wrong (truncated, bad CRC, ...)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise BadSampleError(f"{path}: missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSampleError(f"{path}: unreadable PNG ({err})") from None


def check_sample(root: str, split: str, image_path: str) -> list[str]:
    """Decode every file of one sample; return its problems (one line each)."""
    image_file = Path(image_path)
    name, city = sample_name(image_file), image_file.parent.name
    problems: list[str] = []
    if not _NAME_RE.match(name) or not name.startswith(city + "_"):
        problems.append(f"{image_file}: file name is not <city>_<seq>_<frame>{IMAGE_SUFFIX}")

    def load(path: Path) -> Optional[np.ndarray]:
        try:
            return _decode_strict(path)
        except BadSampleError as err:
            problems.append(str(err))
            return None

    image = load(image_file)
    if image is not None and (image.ndim != 3 or image.shape[2] not in (3, 4)):
        problems.append(f"{image_file}: expected an RGB image, got shape {image.shape}")
    size = image.shape[:2] if image is not None else None

    def same_size(path: Path, array: np.ndarray) -> bool:
        if size is not None and array.shape[:2] != size:
            problems.append(f"{path}: size {array.shape[1]}x{array.shape[0]} differs from "
                            f"{image_file.name} ({size[1]}x{size[0]})")
            return False
        return True

    kinds = ["labelIds", "color", "instanceIds"]
    trainids_path = label_path(root, split, city, name, "labelTrainIds")
    if trainids_path.exists():
        kinds.append("labelTrainIds")
    arrays: dict[str, np.ndarray] = {}
    for kind in kinds:
        path = label_path(root, split, city, name, kind)
        if not path.exists():
            problems.append(f"{path}: missing ({kind} of {image_file.name})")
            continue
        if kind in ("labelIds", "labelTrainIds"):  # as eval and train read them (read_mask)
            try:
                array = read_mask(path)
            except BadSampleError as err:
                problems.append(str(err))
                continue
        else:
            array = load(path)
        if array is None or not same_size(path, array):
            continue
        if kind in ("labelIds", "labelTrainIds", "instanceIds") and array.ndim != 2:
            problems.append(f"{path}: expected a 1-channel image, got shape {array.shape}")
            continue
        arrays[kind] = array

    ids = arrays.get("labelIds")
    if ids is not None:
        values = np.unique(ids)
        unknown = [int(v) for v in values if int(v) not in VALID_LABEL_IDS]
        if unknown or ids.dtype != np.uint8:
            problems.append(f"{label_path(root, split, city, name, 'labelIds')}: unknown label "
                            f"ids {unknown or values.tolist()}")
            ids = None
    if ids is not None and "instanceIds" in arrays:
        inst = arrays["instanceIds"].astype(np.int64)
        cls = np.where(inst >= 1000, inst // 1000, inst)
        if (cls != ids).any():
            n = int((cls != ids).sum())
            problems.append(f"{label_path(root, split, city, name, 'instanceIds')}: {n} pixels "
                            f"disagree with labelIds")
    polygons = label_path(root, split, city, name, "polygons")
    if polygons.exists():
        try:
            json.loads(polygons.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{polygons}: truncated or not JSON ({err}); restore it from the "
                            "download")
    ids_path = label_path(root, split, city, name, "labelIds")
    if trainids_path.exists() and ids_path.exists():
        try:
            _refuse_stale(trainids_path, ids_path)
        except BadSampleError as err:
            problems.append(f"{err} (eval and train refuse it)")
    if "labelTrainIds" in arrays:
        train = arrays["labelTrainIds"]
        if ids is not None and not np.array_equal(train, ID_TO_TRAIN_ID[ids]):
            problems.append(f"{trainids_path}: differs from the conversion of labelIds "
                            "(rerun `segcompare data prepare`)")
    return problems


def check_dataset(
    root: PathLike,
    splits: Optional[Sequence[str]] = None,
    workers: Optional[int] = None,
    progress: bool = True,
) -> CheckReport:
    """Verify the layout and decode every file of the given splits (default: all present)."""
    root = Path(root)
    report = CheckReport(str(root))
    if not (root / "leftImg8bit").is_dir():
        raise SegcompareError(f"{root}: no leftImg8bit/ folder; is this a Cityscapes root?")
    for s in SPLITS:  # a split that is a file is not a split: say so rather than skip it
        for folder in (root / "leftImg8bit" / s, root / label_dir(s) / s):
            if folder.exists() and not folder.is_dir():
                report.problems.append(f"{folder}: split {s!r} is a file, not a folder")
    splits = list(splits) if splits else available_splits(root)
    tasks: list[tuple[str, str, str]] = []
    for split in splits:
        if split not in SPLITS:
            raise SegcompareError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        images = list_images(root, split)
        report.counts[split] = len(images)
        if not images:
            report.problems.append(f"{root / 'leftImg8bit' / split}: no *{IMAGE_SUFFIX} images")
            continue
        official = OFFICIAL_COUNTS[split]
        if len(images) >= 0.9 * official:  # looks like the real set: it must be complete
            if len(images) == official:
                report.notes.append(f"{split}: {len(images)} images, the official count")
            else:
                report.problems.append(f"{root / 'leftImg8bit' / split}: {len(images)} images, "
                                       f"the official release has {official}")
        tasks += [(str(root), split, str(p)) for p in images]
        report.problems += _orphan_labels(root, split, images)

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="checking", unit="sample", disable=not progress)
    for problems in _map(check_sample, tasks, workers):
        report.problems += problems
        bar.update(1)
    bar.close()
    return report


def _orphan_labels(root: Path, split: str, images: Iterable[Path]) -> list[str]:
    names = {sample_name(p) for p in images}
    gt = label_dir(split)
    found = []
    for path in sorted((root / gt / split).glob(f"*/*_{gt}_*")):
        name = path.name.split(f"_{gt}_")[0]
        if name not in names:
            found.append(f"{path}: label without an image")
    return found


def _map(fn: Callable[..., Any], tasks: list[tuple], workers: Optional[int]) -> Iterable[Any]:
    """fn(*task) for each task, in order, over a process pool (inline for one worker)."""
    workers = min(workers or os.cpu_count() or 1, max(len(tasks), 1))
    if workers <= 1:
        for task in tasks:
            yield fn(*task)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(fn, *zip(*tasks), chunksize=max(1, len(tasks) // (workers * 16)))


# --- data prepare ---------------------------------------------------------------------------------
@dataclass
class PrepareReport:
    written: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)


def convert_label_file(ids_path: str, overwrite: bool = False) -> str:
    """Write *_labelTrainIds.png beside a *_labelIds.png; 'written', 'skipped' or an error line.

    Equal to cityscapesscripts' createTrainIdLabelImgs: that tool draws the same polygons as the
    labelIds image with each label's trainId instead of its id, so the result is the labelIds
    image mapped pixel by pixel through id -> trainId.
    """
    out = ids_path[: -len("_labelIds.png")] + "_labelTrainIds.png"
    if not overwrite and _up_to_date(out, ids_path):
        return "skipped"
    try:
        train_ids = read_train_ids(ids_path)
    except BadSampleError as err:
        return str(err)
    ok, png = cv2.imencode(".png", train_ids)
    if not ok:
        return f"{out}: cannot encode"
    atomic_write_bytes(out, png.tobytes())
    return "written"


def _up_to_date(out: str, source: str) -> bool:
    """`out` exists and is not older than `source` (an output older than its source is redone)."""
    try:
        return os.stat(out).st_mtime_ns >= os.stat(source).st_mtime_ns
    except OSError:
        return False


def prepare_dataset(
    root: PathLike,
    splits: Optional[Sequence[str]] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PrepareReport:
    """Write labelTrainIds for every labelIds file, in parallel, plus ROOT/lists/<split>.lst.

    A list line is ``leftImg8bit/...png<TAB>gtFine/..._labelTrainIds.png`` (HRNet's .lst format).
    """
    from tqdm import tqdm

    root = Path(root)
    if not (root / "leftImg8bit").is_dir():
        raise SegcompareError(f"{root}: no leftImg8bit/ folder; is this a Cityscapes root?")
    splits = list(splits) if splits else available_splits(root)
    if not splits:
        raise SegcompareError(f"{root / 'leftImg8bit'}: no split folders (train, val, ...)")
    report = PrepareReport()
    tasks = []
    for split in splits:
        if split not in SPLITS:
            raise SegcompareError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        gt = label_dir(split)
        for folder in (root / "leftImg8bit" / split, root / gt / split):
            if not folder.is_dir():
                raise SegcompareError(f"{folder}: no such folder (split {split!r})")
        images = list_images(root, split)
        for image in images:  # gaps are errors: a list that leaves a sample out is never written
            ids = label_path(root, split, image.parent.name, sample_name(image), "labelIds")
            if not ids.exists():
                report.problems.append(f"{image}: image without a label ({ids.name} missing)")
        report.problems += _orphan_labels(root, split, images)
        tasks += [(str(p), overwrite) for p in sorted(
            (root / gt / split).glob(f"*/*_{gt}_labelIds.png"))]
    bar = tqdm(total=len(tasks), desc="labelTrainIds", unit="file", disable=not progress)
    for result in _map(convert_label_file, tasks, workers):
        if result == "written":
            report.written += 1
        elif result == "skipped":
            report.skipped += 1
        else:
            report.problems.append(result)
        bar.update(1)
    bar.close()
    if report.problems:
        return report  # no lists: a list is only written for a split that is complete
    for split in splits:
        lines = []
        for image in list_images(root, split):
            name, city = sample_name(image), image.parent.name
            label = label_path(root, split, city, name, "labelTrainIds")
            if label.exists():
                lines.append(f"{image.relative_to(root)}\t{label.relative_to(root)}\n")
        if lines:
            out = root / "lists" / f"{split}.lst"
            atomic_write_text(out, "".join(lines))
            report.lists.append(str(out))
    return report
