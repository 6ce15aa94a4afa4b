"""The side-by-side video: input | model 1 | model 2 ..., each panel titled with the model and its
latency, a class legend below; written as a GIF (Pillow) or an MP4 (imageio + imageio-ffmpeg).

    render_video([Predictor(b0), Predictor(w48)], "stuttgart_00/", "demo.gif")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from segcompare.data.images import to_rgb8
from segcompare.data.labels import NUM_CLASSES, ClassTable, generic_table
from segcompare.infer.predictor import IMAGE_SUFFIXES, Predictor, load_image, render_prediction
from segcompare.utils import PathLike, SegcompareError, atomic_path, synchronize
from segcompare.values import check

# The widest video written by default (all panels together): a GIF small enough for a README.
# The models still run at the frame size (or --size); only the drawing is scaled down.
MAX_WIDTH = 1024
BOUNDARY_RGB = (255, 255, 255)  # class boundaries drawn over the overlay


def iter_frames(
    source: PathLike, every: int = 1, max_frames: Optional[int] = None
) -> Iterator[np.ndarray]:
    """H×W×3 uint8 RGB frames, one at a time: the images of a folder in name order
    (leftImg8bit_demoVideo/stuttgart_00/) or a video file (needs imageio-ffmpeg). Every
    `every`-th frame, at most `max_frames`."""
    source = Path(source)
    if every < 1:
        raise SegcompareError(f"--every must be at least 1, got {every}")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SegcompareError(f"no image frames in folder {source}")
        frames: Iterator[np.ndarray] = (load_image(p) for p in files)
    elif source.is_file():
        frames = _video_frames(source)
    else:
        raise SegcompareError(f"frames source {source} is neither a folder nor a file")
    count = 0
    for i, frame in enumerate(frames):
        if i % every:
            continue
        if max_frames is not None and count >= max_frames:
            return
        yield frame
        count += 1


def _need_ffmpeg(what: str) -> None:
    try:  # the 'video' extra: imageio and its ffmpeg plugin
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise SegcompareError(
            f"{what} needs imageio and imageio-ffmpeg: pip install 'segcompare[video]' (or pip "
            "install imageio imageio-ffmpeg), or use a folder of frames / a .gif"
        ) from None


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    _need_ffmpeg(f"reading the video {path}")
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        for frame in reader:
            yield to_rgb8(np.asarray(frame), f"a frame of {path}")
    finally:
        reader.close()


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _title_bar(text: str, width: int, height: int) -> np.ndarray:
    from PIL import ImageDraw

    bar = Image.new("RGB", (width, height), (24, 24, 24))
    ImageDraw.Draw(bar).text(
        (6, height // 2),
        text,
        fill=(255, 255, 255),
        anchor="lm",
        font=_font(max(8, height * 2 // 3)),
    )
    return np.asarray(bar)


def class_boundaries(train_ids: np.ndarray) -> np.ndarray:
    """H×W bool: the pixels whose right or lower neighbour has another class. Under the 50 %
    overlay car, truck and bus are three dark blues; their outlines tell the segments apart."""
    edges = np.zeros(train_ids.shape, dtype=bool)
    edges[:, :-1] |= train_ids[:, :-1] != train_ids[:, 1:]
    edges[:-1, :] |= train_ids[:-1, :] != train_ids[1:, :]
    return edges


def overlay_panel(
    frame: np.ndarray, train_ids: np.ndarray, hw: tuple[int, int], num_classes: int = NUM_CLASSES,
    table: Optional[ClassTable] = None,
) -> np.ndarray:
    """The overlay at 50 % (`palette(num_classes)`: the official one for 19 classes) at display
    size `hw`, class boundaries drawn."""
    if frame.shape[:2] != tuple(hw):
        frame = np.asarray(Image.fromarray(frame).resize(hw[::-1], Image.BILINEAR))
        train_ids = np.asarray(Image.fromarray(train_ids).resize(hw[::-1], Image.NEAREST))
    panel = render_prediction(train_ids, frame, "overlay", num_classes, table)
    panel[class_boundaries(train_ids)] = BOUNDARY_RGB
    return panel


def legend(
    width: int, row_h: int = 18, num_classes: int = NUM_CLASSES,
    table: Optional[ClassTable] = None,
) -> np.ndarray:
    """The classes of a `num_classes`-class model (`class_names`, `palette`: Cityscapes' 19 by
    default) as colour swatches (twice as wide as high) with names, in rows that fit `width`
    pixels."""
    from PIL import ImageDraw

    table = table or generic_table(num_classes)  # the data set's names and colours, if known
    names, colors = table.names, table.palette
    font = _font(max(8, row_h * 2 // 3))
    swatch_w = 2 * row_h
    entry_w = max(font.getbbox(name)[2] for name in names) + swatch_w + 12
    per_row = max(1, width // entry_w)
    rows = -(-len(names) // per_row)
    im = Image.new("RGB", (width, rows * row_h + 4), (24, 24, 24))
    draw = ImageDraw.Draw(im)
    for i, name in enumerate(names):
        x, y = (i % per_row) * entry_w + 6, (i // per_row) * row_h + 2
        draw.rectangle(
            (x, y + 2, x + swatch_w - 4, y + row_h - 3), fill=tuple(int(v) for v in colors[i]),
            outline=(230, 230, 230),
        )  # fmt: skip
        draw.text(
            (x + swatch_w + 2, y + row_h // 2), name, fill=(230, 230, 230), anchor="lm", font=font
        )
    return np.asarray(im)


def compose_frame(
    frame: np.ndarray,
    overlays: Sequence[tuple[str, np.ndarray, float]],
    legend_strip: np.ndarray,
    title_h: int,
) -> np.ndarray:
    """[input | overlay 1 | overlay 2 ...] each under a title bar, the legend below."""
    h, w = frame.shape[:2]
    panels = [np.concatenate([_title_bar("input", w, title_h), frame])]
    for name, overlay, latency_ms in overlays:
        title = _title_bar(f"{name}  {latency_ms:.0f} ms", w, title_h)
        panels.append(np.concatenate([title, overlay]))
    return np.concatenate([np.concatenate(panels, axis=1), legend_strip])


class GifWriter:
    """Writes an animated GIF one frame at a time (memory stays flat): Pillow encodes each frame
    with its own 256-colour palette; the file loops forever."""

    def __init__(self, fp: IO[bytes], fps: float) -> None:
        self.fp = fp
        self.duration_ms = max(20, round(1000 / fps))  # GIF delays are in 1/100 s
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        from PIL import GifImagePlugin

        im = Image.fromarray(frame).quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        if self.frames == 0:
            header, _ = GifImagePlugin.getheader(im, info={"loop": 0, "duration": self.duration_ms})
            self.fp.write(b"".join(header))
        data = GifImagePlugin.getdata(im, duration=self.duration_ms, include_color_table=True)
        self.fp.write(b"".join(data))
        self.frames += 1

    def close(self) -> None:
        self.fp.write(b";")  # GIF trailer


def render_video(
    predictors: Sequence[Predictor],
    source: PathLike,
    out: PathLike,
    fps: float = 17.0,
    size: Optional[tuple[int, int]] = None,
    every: int = 1,
    max_frames: Optional[int] = None,
    progress: bool = True,
    max_width: Optional[int] = MAX_WIDTH,
) -> int:
    """Segment each frame of `source` with every predictor and write the side-by-side video
    (.gif through Pillow, .mp4 through imageio-ffmpeg) to `out`. Frames are resized to `size`
    (H, W) first (default: the first frame's size) and segmented at that size; the panels are
    drawn smaller when all of them together would be wider than `max_width` (None: never).
    Returns the number of frames written."""
    from tqdm import tqdm

    check("--fps", fps, name="fps")  # the rows of the command-line options (values.RULES)
    check("--every", every, name="every")
    if max_frames is not None:
        check("--max-frames", max_frames, name="max_frames")
    if max_width is not None:
        check("--max-width", max_width, name="max_width")
    if size is not None:
        size = check("--size", size, name="size")
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise SegcompareError(f"video output {out} must end in .gif or .mp4")
    if suffix == ".mp4":
        _need_ffmpeg(f"writing {out}")
    if not predictors:
        raise SegcompareError("no models to run")
    _class_count(predictors)  # models of different class counts: refused before any frame

    frames = iter_frames(source, every, max_frames)
    count = 0
    num_classes = NUM_CLASSES
    table: Optional[ClassTable] = None
    legend_strip: Optional[np.ndarray] = None
    with atomic_path(out) as tmp:
        writer: Any = None
        try:
            for frame in tqdm(frames, desc="video", unit="frame", disable=not progress):
                size = size or frame.shape[:2]  # every frame as large as the first
                if frame.shape[:2] != tuple(size):
                    frame = np.array(Image.fromarray(frame).resize(size[::-1], Image.BILINEAR))
                overlays = []
                panel_hw = _panel_hw(frame.shape[:2], len(predictors) + 1, max_width)
                if count == 0:  # one untimed pass each: the first call pays one-time costs
                    for predictor in predictors:
                        predictor.predict(frame)
                    num_classes = _class_count(predictors)  # every count known now
                    table = predictors[0].class_table  # the first model's data set names
                for predictor in predictors:
                    synchronize(predictor.device)
                    start = time.perf_counter()
                    train_ids = predictor.predict(frame)
                    latency_ms = 1000 * (time.perf_counter() - start)
                    panel = overlay_panel(frame, train_ids, panel_hw, num_classes, table)
                    overlays.append((predictor.name, panel, latency_ms))
                title_h = max(14, panel_hw[0] // 16)
                if legend_strip is None:
                    legend_strip = legend(
                        panel_hw[1] * (len(predictors) + 1), max(16, title_h), num_classes, table
                    )
                if frame.shape[:2] != panel_hw:
                    shown = Image.fromarray(frame).resize(panel_hw[::-1], Image.BILINEAR)
                    frame = np.asarray(shown)
                canvas = compose_frame(frame, overlays, legend_strip, title_h)
                if writer is None:
                    writer = _open_writer(tmp, suffix, fps)
                writer.append(_even(canvas) if suffix == ".mp4" else canvas)
                count += 1
        finally:
            if writer is not None:
                writer.close()
        if count == 0:
            raise SegcompareError(f"no frames read from {source}")
    return count


def _class_count(predictors: Sequence[Predictor]) -> int:
    """The class count the models share (the one legend names their classes); SegcompareError
    when they differ. A count not known yet (a module's before its first call) counts as 19."""
    known = [(p.name, p.num_classes) for p in predictors if p.num_classes is not None]
    if len({k for _, k in known}) > 1:
        found = ", ".join(f"{name}: {k}" for name, k in known)
        raise SegcompareError(
            f"the models predict different numbers of classes ({found}); one legend cannot "
            "name the classes of all: render them in separate videos"
        )
    return known[0][1] if known else NUM_CLASSES


def _panel_hw(hw: tuple[int, int], panels: int, max_width: Optional[int]) -> tuple[int, int]:
    """The drawn size of one panel: the frame's, scaled down so `panels` fit in `max_width`."""
    h, w = hw
    if max_width is None or panels * w <= max_width:
        return (h, w)
    panel_w = max(1, max_width // panels)
    return (max(1, round(h * panel_w / w)), panel_w)


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even height and width (H.264 with yuv420p needs them)."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


class _Mp4Writer:
    def __init__(self, path: Path, fps: float) -> None:
        import imageio.v2 as imageio

        self.writer = imageio.get_writer(
            str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=1
        )

    def append(self, frame: np.ndarray) -> None:
        self.writer.append_data(frame)

    def close(self) -> None:
        self.writer.close()


class _GifFileWriter(GifWriter):
    def __init__(self, path: Path, fps: float) -> None:
        super().__init__(open(path, "wb"), fps)

    def close(self) -> None:
        super().close()
        self.fp.close()


def _open_writer(path: Path, suffix: str, fps: float) -> Any:
    return _GifFileWriter(path, fps) if suffix == ".gif" else _Mp4Writer(path, fps)
