"""Writing a synthetic Cityscapes in the real folder layout: the annotated splits and the video.

    <out>/leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png
    <out>/gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_{color,labelIds,instanceIds}.png
    <out>/gtFine/<split>/<city>/<city>_<seq>_000019_gtFine_polygons.json
    <out>/leftImg8bit_demoVideo/stuttgart_00/stuttgart_00_000000_0000NN_leftImg8bit.png

and the same scenes in the other two layouts of `segcompare.data.layouts` (`make_synthetic_layout`):
ADE20K's (annotations in ADE20K ids, classes ADE20K lacks as 0) and a K-class folder set.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segcompare.data.labels import ADE20K, ID_TO_COLOR, LABEL_BY_NAME
from segcompare.data.synth.render import render
from segcompare.data.synth.street import build_scene
from segcompare.utils import (
    SegcompareError,
    atomic_write_bytes,
    atomic_write_text,
    check_memory,
    publish_folder,
    temporary_folder,
    write_error,
)
from segcompare.values import check

CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau"),
    "test": ("berlin", "bielefeld"),
}
VIDEO_CITY = "stuttgart_00"
# Peak bytes per image pixel while one sample is rendered and encoded (float32 colour, depth
# and object maps, the rays, the PNGs): measured 122 at 512x1024, 212 at 256x512, where the
# fixed part weighs more. Checked before rendering, so that a huge --size is refused with the
# figure rather than killed by the kernel.
BYTES_PER_PIXEL = 200


def _png(array: np.ndarray) -> bytes:
    if array.ndim == 3:  # RGB(A) -> cv2's BGR(A)
        array = array[..., ::-1] if array.shape[2] == 3 else array[..., [2, 1, 0, 3]]
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise SegcompareError("cannot encode PNG")
    return data.tobytes()


def write_sample(root: Path, split: str, city: str, name: str, image: np.ndarray,
                 label_ids: np.ndarray, instance_ids: np.ndarray, polygons: list[dict]) -> None:
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    atomic_write_bytes(img_dir / f"{name}_leftImg8bit.png", _png(image))
    colour = np.concatenate([ID_TO_COLOR[label_ids], np.full(label_ids.shape + (1,), 255,
                                                             np.uint8)], axis=2)
    atomic_write_bytes(gt_dir / f"{name}_gtFine_color.png", _png(colour))
    atomic_write_bytes(gt_dir / f"{name}_gtFine_labelIds.png", _png(label_ids))
    atomic_write_bytes(gt_dir / f"{name}_gtFine_instanceIds.png", _png(instance_ids))
    h, w = label_ids.shape
    doc = {"imgHeight": h, "imgWidth": w, "objects": polygons}
    atomic_write_text(gt_dir / f"{name}_gtFine_polygons.json", json.dumps(doc))


def synthetic_sample(seed: int, index: int, size: tuple[int, int]):
    """The index-th synthetic image of a seed: (image, labelIds, instanceIds, polygons)."""
    rng = np.random.default_rng((int(seed), int(index)))
    scene = build_scene(rng)
    return render(scene, size, noise_seed=int(rng.integers(1 << 31)))


def make_synthetic_cityscapes(
    out: Any,
    train: int = 20,
    val: int = 10,
    test: int = 0,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    video_frames: int = 0,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write a synthetic Cityscapes under `out` in the real layout; returns counts per split.

    `out` must be new or empty unless `overwrite` (then the files of the last synthesis into it
    and those of the same names are replaced, others kept: `segcompare.utils.publish_folder`).
    The set is made in a temporary folder beside `out` and moved into place when complete: a
    synthesis that fails leaves nothing.

    size is (H, W). Deterministic for a seed: sample i of a run depends only on (seed, i), so
    the first N images of a larger set equal a set of N. Images are numbered like the real ones
    (<city>_<seq>_<frame>, frame 000019 as the annotated frame of each sequence).
    """
    from tqdm import tqdm

    for name, flag, value in (("train", "--train", train), ("val", "--val", val),
                              ("test", "--test", test), ("video_frames", "--video", video_frames),
                              ("seed", "--seed", seed)):  # fmt: skip
        check(flag, value, name=name)  # the rows of the command-line options (values.RULES)
    h, w = check("--size", size, name="size")
    if h < 32 or w < 32:
        raise SegcompareError(f"synthetic image size {h}x{w} is too small (at least 32x32)")
    root = Path(out).resolve()
    _check_target(root, overwrite)
    check_memory(h * w * BYTES_PER_PIXEL, f"a synthetic image of {h}x{w}")
    counts = {"train": int(train), "val": int(val), "test": int(test)}
    jobs = _sample_names(counts)

    def fill(tmp: Path) -> None:
        for split, city, name, i in tqdm(jobs, desc="synthesising", unit="image",
                                         disable=not progress):
            image, ids, inst, polys = synthetic_sample(seed, i, (h, w))
            write_sample(tmp, split, city, name, image, ids, inst, polys)
        if video_frames:
            _write_video(tmp, seed, int(video_frames), (h, w), progress)
            counts["video"] = int(video_frames)

    _build_atomically(root, fill)
    return counts


def _build_atomically(root: Path, fill: Any) -> None:
    """`fill(tmp)` writes the set into a temporary folder beside `root`, then it is moved into
    place: a synthesis that fails leaves nothing."""
    tmp = temporary_folder(root)  # a killed run's is removed by the next one
    try:
        fill(tmp)
        publish_folder(tmp, root, "OUT")
    except OSError as err:  # a full disk while writing: one line, and nothing left behind
        raise write_error(root, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Cityscapes label -> the ADE20K class of the same thing (mmseg's ADE20K names); a label not
# here (ground, train, ...) has no ADE20K class and becomes 0, "other" (ignored).
CITYSCAPES_TO_ADE20K = {
    "road": "road", "sidewalk": "sidewalk", "building": "building", "wall": "wall",
    "fence": "fence", "pole": "pole", "traffic light": "traffic light",
    "traffic sign": "signboard", "vegetation": "tree", "terrain": "grass", "sky": "sky",
    "person": "person", "rider": "person", "car": "car", "truck": "truck", "bus": "bus",
    "motorcycle": "minibike", "bicycle": "bicycle", "bridge": "bridge",
}  # fmt: skip
# The classes of a K-class folder set, after 0 "background" (every other label): the first
# K - 1 of these Cityscapes train classes, the large ones first.
FOLDER_CLASSES = (
    "road", "building", "vegetation", "sky", "car", "sidewalk", "person", "pole",
    "traffic sign", "terrain", "fence", "wall", "traffic light", "truck", "bus", "rider",
    "bicycle", "motorcycle", "train",
)  # fmt: skip


def _ade20k_lut() -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    ade_id = dict(zip(ADE20K.names, ADE20K.own_ids))
    for cs_name, ade_name in CITYSCAPES_TO_ADE20K.items():
        lut[LABEL_BY_NAME[cs_name].id] = ade_id[ade_name]
    return lut


def _folder_lut(classes: int) -> tuple[np.ndarray, list[str], list[list[int]]]:
    """(labelIds -> class index, names, colours) of a `classes`-class folder set."""
    if not 2 <= classes <= len(FOLDER_CLASSES) + 1:
        raise SegcompareError(
            f"--classes {classes}: a synthetic folder set has 2 to {len(FOLDER_CLASSES) + 1} "
            "classes (background and the street's classes)"
        )
    lut = np.zeros(256, dtype=np.uint8)
    names, colours = ["background"], [[0, 0, 0]]
    for k, name in enumerate(FOLDER_CLASSES[: classes - 1], start=1):
        label = LABEL_BY_NAME[name]
        lut[label.id] = k
        names.append(name)
        colours.append(list(label.color))
    return lut, names, colours


def make_synthetic_layout(
    out: Any,
    layout: str,
    train: int = 20,
    val: int = 10,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    classes: int = 6,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, int]:
    """The synthetic street scenes in the ade20k or folder layout (`segcompare.data.layouts`).

    ade20k: images/{training,validation}/*.jpg, annotations/*.png in ADE20K ids (1..150; the
    Cityscapes labels ADE20K lacks, and unlabelled pixels, are 0). folder: img_dir/{train,val}/
    *.png, ann_dir/{train,val}/*.png P-mode masks of `classes` classes (0 background) whose
    palette holds the colours, and id2label.json. Sample i equals sample i of
    `make_synthetic_cityscapes` with the same seed and size."""
    from PIL import Image
    from tqdm import tqdm

    if layout not in ("ade20k", "folder"):
        raise SegcompareError(f"--layout {layout!r}: synth writes cityscapes, ade20k or folder")
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 32:
        raise SegcompareError(f"synthetic image size {h}x{w} is too small (at least 32x32)")
    root = Path(out).resolve()
    _check_target(root, overwrite)
    check_memory(h * w * BYTES_PER_PIXEL, f"a synthetic image of {h}x{w}")
    counts = {"train": int(train), "val": int(val)}
    if layout == "ade20k":
        lut, folders, image_ext = _ade20k_lut(), ("training", "validation"), ".jpg"
        dirs, palette = ("images", "annotations"), None
    else:
        lut, names, colours = _folder_lut(classes)
        folders, image_ext, dirs = ("train", "val"), ".png", ("img_dir", "ann_dir")
        palette = [v for c in colours for v in c]
        palette += [0] * (768 - len(palette))  # 256 entries: an 8-bit PNG, 255 kept as is

    def fill(tmp: Path) -> None:
        jobs = _sample_names(counts)
        for split, _, name, i in tqdm(jobs, desc="synthesising", unit="image",
                                      disable=not progress):
            folder = folders[0] if split == "train" else folders[1]
            image, ids, *_ = synthetic_sample(seed, i, (h, w))
            quality = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_ext == ".jpg" else []
            ok, data = cv2.imencode(image_ext, np.ascontiguousarray(image[..., ::-1]), quality)
            if not ok:
                raise SegcompareError(f"cannot encode {image_ext}")
            atomic_write_bytes(tmp / dirs[0] / folder / f"{name}{image_ext}", data.tobytes())
            mask = Image.fromarray(lut[ids])
            if palette is not None:
                mask.putpalette(palette)  # L -> P: the same indices, with the classes' colours
            encoded = io.BytesIO()
            mask.save(encoded, format="PNG")
            atomic_write_bytes(tmp / dirs[1] / folder / f"{name}.png", encoded.getvalue())
        if layout == "folder":
            id2label = {str(k): n for k, n in enumerate(names)}
            atomic_write_text(tmp / "id2label.json", json.dumps(id2label, indent=1) + "\n")

    _build_atomically(root, fill)
    return counts


def _check_target(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise SegcompareError(f"{root}: exists and is not a folder")
    if root.is_dir() and not overwrite:
        entries = sorted(p.name for p in root.iterdir())
        if entries:
            raise SegcompareError(
                f"{root}: not empty (holds {len(entries)} entries, e.g. {entries[0]}); "
                "synthesise into a new or empty folder, or pass --overwrite"
            )


def _sample_names(counts: dict[str, int]) -> list[tuple[str, str, str, int]]:
    """(split, city, name, sample index) of every image; cities take turns within a split."""
    jobs = []
    index = 0
    for split, n in counts.items():
        cities = CITIES[split]
        for i in range(n):
            city = cities[i % len(cities)]
            name = f"{city}_{i // len(cities):06d}_000019"
            jobs.append((split, city, name, index))
            index += 1
    return jobs


def _write_video(root: Path, seed: int, frames: int, size: tuple[int, int],
                 progress: bool) -> None:
    """One scene, the camera driving forward ~0.5 m per frame while vehicles and people move."""
    from tqdm import tqdm

    rng = np.random.default_rng((int(seed), 1_000_000))
    speed = rng.uniform(0.4, 0.6)  # m per frame: ~30 km/h at 17 fps
    scene = build_scene(rng, length=speed * frames)
    vdir = root / "leftImg8bit_demoVideo" / VIDEO_CITY
    for f in tqdm(range(frames), desc="video", unit="frame", disable=not progress):
        image, *_ = render(scene, size, frame=f, speed=speed, noise_seed=seed * 7919 + f)
        atomic_write_bytes(vdir / f"{VIDEO_CITY}_000000_{f + 1:06d}_leftImg8bit.png",
                           _png(image))
