"""`data check` for any layout (a dataset doctor) and `data convert-masks`.

Every finding is one line that names the file, the value and what to do. `check_layout` reads
each mask by the rule train and eval use (`layouts.read_mask`, `mask_to_train_ids`), so what it
passes, they read, and what it refuses, they refuse with the same line.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from segcompare.data.labels import IGNORE_INDEX, ClassTable
from segcompare.data.layouts import (
    ADE20K_LAYOUT,
    CITYSCAPES_LAYOUT,
    BadSampleError,
    Layout,
    available_splits,
    class_table,
    detect_layout,
    mask_to_train_ids,
    palette_size,
    read_mask,
    resolve_root,
    scan_split,
    split_dirs,
)
from segcompare.utils import (
    SegcompareError,
    atomic_write_bytes,
    make_dirs,
    publish_folder,
    temporary_folder,
    write_error,
)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class DoctorReport:
    root: str
    layout: str
    table: ClassTable
    counts: dict[str, int] = field(default_factory=dict)  # split -> pairs
    problems: list[str] = field(default_factory=list)  # one line each: file, value, what to do
    warnings: list[str] = field(default_factory=list)  # worth a look; eval still runs
    # split -> pixels per train id (K) and, last, ignored pixels
    histogram: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _image_size(path: Path) -> tuple[int, int]:
    """(h, w) of a decodable image; BadSampleError otherwise."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.size[1], im.size[0]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadSampleError(f"{path}: cannot decode the image ({err})") from None


def _train_ids(mask_path: Path, table: ClassTable, layout: Layout) -> np.ndarray:
    """The mask as train and eval read it."""
    if layout is CITYSCAPES_LAYOUT:
        from segcompare.data.cityscapes import read_train_ids

        return read_train_ids(mask_path)
    return mask_to_train_ids(read_mask(mask_path), table, mask_path)


def check_pair(image: Path, mask: Path, table: ClassTable, layout: Layout,
               root: Path) -> tuple[list[str], list[str], Optional[np.ndarray]]:
    """(problems, warnings, pixels per train id + ignored) of one image and its mask."""
    problems: list[str] = []
    warnings: list[str] = []
    try:
        hw = _image_size(image)
    except BadSampleError as err:
        problems.append(str(err))
        hw = None
    try:
        stored = read_mask(mask)
    except BadSampleError as err:
        text = str(err)
        if "colour mask" in text:
            text = (f"{mask}: an RGB colour mask, not class indices: run `segcompare data "
                    f"convert-masks {root} NEW_ROOT` (colours -> indices by the palette)")
        problems.append(text)
        return problems, warnings, None
    if hw is not None and stored.shape != hw:
        problems.append(f"{mask}: size {stored.shape[1]}x{stored.shape[0]} differs from its "
                        f"image {image.name} ({hw[1]}x{hw[0]})")
    values = np.bincount(stored.ravel(), minlength=256)
    if values[255] and not values[1:255].any() and table.num_classes >= 2:
        problems.append(
            f"{mask}: only 0 and 255 ({values[255]} px of 255, ignored): a binary mask? map its "
            f"255 to class 1 with `segcompare data convert-masks {root} NEW_ROOT --map 255:1`"
        )
    try:
        ids = _train_ids(mask, table, layout)
    except BadSampleError as err:
        problems.append(str(err))
        return problems, warnings, None
    colours = palette_size(mask)
    used = [v for v in np.flatnonzero(values) if v != IGNORE_INDEX and v != table.ignore_index]
    if colours is not None and used and used[-1] >= colours:
        warnings.append(
            f"{mask}: a palette mask with {colours} colour(s) holds index {used[-1]}: read by "
            "index, as train and eval read it (its colours are not used; palette.json gives "
            "the classes' colours)"
        )
    counts = np.bincount(ids.ravel(), minlength=256)
    hist = np.append(counts[: table.num_classes], counts[IGNORE_INDEX])
    return problems, warnings, hist


def check_layout(
    root: PathLike,
    layout: Optional[str] = None,
    splits: Optional[Sequence[str]] = None,
    reduce_zero_label: Optional[bool] = None,
    ignore_index: Optional[int] = None,
    progress: bool = True,
) -> DoctorReport:
    """Check every image and mask of the given splits (default: all present) of any layout."""
    from tqdm import tqdm

    lay = detect_layout(root, layout)
    base = resolve_root(root, lay)
    table = class_table(root, lay, reduce_zero_label, ignore_index)
    report = DoctorReport(str(base), lay.name, table)
    splits = list(splits) if splits else available_splits(base, lay)
    if not splits:
        raise SegcompareError(f"{base}: no split folders under {lay.image_dir.split('/')[0]}/")
    for split in splits:
        images_dir, masks_dir = split_dirs(base, lay, split)
        try:
            pairs, lonely_images, lonely_masks = scan_split(base, lay, split)
        except SegcompareError as err:
            report.problems.append(str(err))
            continue
        if not masks_dir.is_dir() and lay is not CITYSCAPES_LAYOUT:
            report.problems.append(f"{masks_dir}: no such folder: the masks of split {split!r}")
        report.problems += [f"{p}: image without a mask in {masks_dir}" for p in lonely_images]
        report.problems += [f"{p}: mask without an image in {images_dir}" for p in lonely_masks]
        report.counts[split] = len(pairs)
        total = np.zeros(table.num_classes + 1, dtype=np.int64)
        for image, mask in tqdm(pairs, desc=f"checking {split}", unit="pair",
                                disable=not progress):
            problems, warnings, hist = check_pair(image, mask, table, lay, base)
            report.problems += problems
            report.warnings += warnings
            if hist is not None:
                total += hist
        report.histogram[split] = total
        if not pairs and not lonely_images:
            report.problems.append(f"{images_dir}: no images in split {split!r} "
                                   f"(suffixes {', '.join(lay.image_suffixes)})")
        elif pairs and not total[:-1].any():
            report.problems.append(
                f"{masks_dir}: split {split!r} has no labelled pixel (every mask value is "
                "ignore): eval would have nothing to score"
            )
        elif pairs and not total[:-1].all():
            empty = [f"{k} {table.names[k]!r}" for k in np.flatnonzero(total[:-1] == 0)]
            more = f" and {len(empty) - 8} more" if len(empty) > 8 else ""
            report.warnings.append(
                f"{masks_dir}: {len(empty)} class(es) with no pixels in split {split!r}: "
                f"{', '.join(empty[:8])}{more} (no IoU there: a model that predicts one "
                "scores 0 on it, else it is left out of the mean)"
            )
    return report


def histogram_table(report: DoctorReport) -> str:
    """Pixels per class and split, as a text table (percent of the split's labelled pixels)."""
    splits = list(report.histogram)
    names = list(report.table.names) + ["(ignored)"]
    width = max(12, max(len(n) for n in names) + 1)
    head = f"{'id':>3} {'class':<{width}}" + "".join(f"{s:>14} {'%':>6}" for s in splits)
    lines = [head, "-" * len(head)]
    for k, name in enumerate(names):
        row = f"{k if k < len(names) - 1 else '':>3} {name:<{width}}"
        for s in splits:
            hist = report.histogram[s]
            labelled = hist[:-1].sum()
            pct = 100.0 * hist[k] / labelled if labelled and k < len(names) - 1 else float("nan")
            row += f"{int(hist[k]):>14} " + (f"{pct:>6.2f}" if pct == pct else " " * 6)
        lines.append(row)
    return "\n".join(lines)


def plot_histogram(report: DoctorReport, path: PathLike) -> None:
    """class_histogram.png: pixels per class (log scale), one bar per split, class colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segcompare.utils import atomic_path

    names = report.table.names
    splits = list(report.histogram)
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * k + 2), 4.0))
    width = 0.8 / max(len(splits), 1)
    x = np.arange(k)
    for i, split in enumerate(splits):
        ax.bar(x + i * width, np.maximum(report.histogram[split][:k], 0.5), width,
               label=split, color=[tuple(c / 255 for c in col) for col in report.table.palette],
               edgecolor="black", linewidth=0.3, alpha=1.0 if i == 0 else 0.55)
    ax.set_yscale("log")
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=90, fontsize=7)
    ax.set_ylabel("pixels")
    ax.set_title(f"{report.root}: pixels per class ({', '.join(splits)})", fontsize=9)
    if len(splits) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --- data convert-masks --------------------------------------------------------------------------
def parse_maps(items: Sequence[str]) -> dict[int, int]:
    """["255:1", ...] -> {255: 1}; one error naming the item."""
    out: dict[int, int] = {}
    for item in items:
        a, sep, b = item.partition(":")
        try:
            src, dst = int(a), int(b)
        except ValueError:
            src = dst = -1
        if not sep or not (0 <= src <= 255 and 0 <= dst <= 255):
            raise SegcompareError(f"--map {item!r}: expected OLD:NEW, two values in 0..255, "
                                  "e.g. 255:1")
        out[src] = dst
    return out


def _colour_to_index(rgb: np.ndarray, table: ClassTable, path: Path,
                     unknown: dict[tuple[int, int, int], list]) -> np.ndarray:
    """H×W×3 colours -> H×W class indices by the table's palette; colours not in it are counted
    into `unknown` (colour -> [pixels, first file]). Black is 0 where no class is black."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(code.shape, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(code.shape, dtype=bool)
    for k, (r, g, b) in enumerate(table.palette):
        hit = code == ((r << 16) | (g << 8) | b)
        if hit.any() and not (known & hit).any():
            out[hit] = k + (1 if table.reduce_zero_label else 0)
            known |= hit
    if table.reduce_zero_label and (0, 0, 0) not in table.palette:
        known |= code == 0  # black: the stored 0 ("other", ignored)
        out[code == 0] = 0
    if not known.all():
        colours, counts = np.unique(code[~known], return_counts=True)
        for c, n in zip(colours.tolist(), counts.tolist()):
            key = (c >> 16, (c >> 8) & 255, c & 255)
            entry = unknown.setdefault(key, [0, path])
            entry[0] += n
    return out


def convert_masks(
    src: PathLike,
    dst: PathLike,
    maps: Sequence[str] = (),
    layout: Optional[str] = None,
    copy: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write a new data set root `dst` from `src`: RGB colour masks become class-index PNGs by
    the class table's palette, `--map OLD:NEW` value maps apply, the images are hard-linked (or
    copied: `copy`, or another file system) and id2label.json / palette.json carried over.
    Nothing in `src` changes. A colour not in the palette is an error that names each such
    colour, its pixels and a file.

    `dst` is new or empty, or with `overwrite` a folder whose files of the same names, and those
    the last conversion into it wrote, are replaced (others are kept: the output rule of
    `segcompare.utils.output_folder`). The new set is made whole in a temporary folder beside
    `dst` first, so a conversion that fails leaves `dst` as it was."""
    from PIL import Image
    from tqdm import tqdm

    lay = detect_layout(src, layout)
    if lay is CITYSCAPES_LAYOUT:
        raise SegcompareError(f"{src}: Cityscapes labelIds need no conversion (`data prepare` "
                              "writes labelTrainIds)")
    src_root = resolve_root(src, lay)
    table = class_table(src, lay)
    mapping = parse_maps(maps)
    dst_root = Path(dst).resolve()
    if dst_root == src_root.resolve() or src_root.resolve() in dst_root.parents:
        raise SegcompareError(f"{dst}: the new root must lie outside {src_root} (nothing is "
                              "changed in place)")
    if dst_root.exists() and not dst_root.is_dir():
        raise SegcompareError(f"DST {dst}: exists and is not a folder")
    entries = sorted(p.name for p in dst_root.iterdir()) if dst_root.is_dir() else []
    if entries and not overwrite:
        raise SegcompareError(
            f"DST {dst}: not empty (holds {len(entries)} entries, e.g. {entries[0]}); give "
            "--overwrite to replace its files, or a new folder"
        )
    lut = np.arange(256, dtype=np.uint8)
    for a, b in mapping.items():
        lut[a] = b
    tmp = temporary_folder(dst_root)  # a killed conversion's is removed by the next one
    counts = {"masks": 0, "colour_masks": 0, "images": 0}
    unknown: dict[tuple[int, int, int], list] = {}
    try:
        for split in available_splits(src_root, lay):
            pairs, _, _ = scan_split(src_root, lay, split)
            for image, mask in tqdm(pairs, desc=f"converting {split}", unit="mask",
                                    disable=not progress):
                try:
                    with Image.open(mask) as im:
                        im.load()
                        rgb = im.mode in ("RGB", "RGBA")
                        array = np.array(im.convert("RGB")) if rgb else None
                except (OSError, SyntaxError, ValueError) as err:
                    raise SegcompareError(f"{mask}: cannot decode ({err})") from None
                if rgb:
                    index = _colour_to_index(array, table, mask, unknown)
                    counts["colour_masks"] += 1
                else:
                    index = read_mask(mask)
                index = lut[index]
                rel_mask = mask.relative_to(src_root)
                rel_image = image.relative_to(src_root)
                data = io.BytesIO()
                Image.fromarray(index).save(data, format="PNG")
                atomic_write_bytes(tmp / rel_mask, data.getvalue())
                _carry(image, tmp / rel_image, copy)
                counts["masks"] += 1
                counts["images"] += 1
        if unknown:
            listed = sorted(unknown.items(), key=lambda kv: -kv[1][0])
            text = "; ".join(f"{list(c)} ({n} px, e.g. {p})" for c, (n, p) in listed[:20])
            more = f" and {len(listed) - 20} more" if len(listed) > 20 else ""
            raise SegcompareError(
                f"{len(listed)} colour(s) not in the palette of {table.name} "
                f"({'palette.json' if lay is not ADE20K_LAYOUT else 'ADE20K'}): {text}{more}; "
                "add them to palette.json (one [r, g, b] per class) or fix the masks"
            )
        for name in ("id2label.json", "palette.json"):
            if (src_root / name).is_file():
                shutil.copyfile(src_root / name, tmp / name)
        publish_folder(tmp, dst_root, "DST", [src_root])
    except OSError as err:
        raise write_error(dst_root, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _carry(src: Path, dst: Path, copy: bool) -> None:
    """A hard link to the image (no bytes copied), or a copy when asked or when linking fails."""
    make_dirs(dst.parent)
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
