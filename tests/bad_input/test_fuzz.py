"""Property tests at five boundaries (issue 22, 4.E): recipe and --set values (E1), the command
line's numeric options (E2), safetensors headers (E3), image files (E4), dataset folders (E5).

The property everywhere: the right answer, or a SegcompareError of one line with every input
untouched; never another exception, never a changed answer. "The right answer" is computed
independently of the code under test: the value as written, numpy's reading of the bytes the
header points at, the pixels an image was made from.

Profiles (conftest.py): "fast" by default (25 examples per property, the same every run);
SEGCOMPARE_HYPOTHESIS=deep for 2000 random ones. A failing example Hypothesis finds goes into the
plain cases at the end of each group (`@example` or a parametrised test)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from segcompare.utils import SegcompareError
from segcompare.values import RULES


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message and len(message) < 600, message
    return message


def _digest(path: Path) -> str:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# --- E1: recipe and --set values ----------------------------------------------------------------
def _yaml(value) -> str:
    """A value written as YAML flow text (JSON is YAML, but NaN and infinity are spelled .nan)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf") if math.isinf(
            value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return json.dumps(value)


SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=20), max_leaves=25)
RECIPE_KEYS = sorted(k for k in RULES if not k.startswith("--") and k not in (
    "model.name", "model.overrides"))
RECIPE = {"model": {"name": "segformer-b0"}, "train": {"max_iters": 10}}


def _same(got, given) -> bool:
    """The value a Config holds equals the value written (a list may come back a tuple, an
    integer as a float)."""
    if isinstance(given, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(given) and all(
            _same(a, b) for a, b in zip(got, given))
    if isinstance(given, bool) or isinstance(got, bool):
        return got is given
    if isinstance(given, (int, float)) and isinstance(got, (int, float)):
        return float(got) == float(given)
    return got == given


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@given(key=st.sampled_from(RECIPE_KEYS), value=VALUES)
@example(key="train.num_workers", value=100000)
@example(key="optim.lr", value=math.inf)
@example(key="train.class_weights", value=[math.nan] + [1.0] * 18)
@example(key="train.amp", value=False)  # YAML's `off`: accepted as "off"
@example(key="data.root", value="\U00010000")  # found: YAML reads "\ud800\udc00" as two halves
def test_a_set_value_is_kept_as_written_or_refused_naming_the_key(recipe, key, value):
    from segcompare.config import load_config

    before = _digest(recipe)
    try:
        cfg = load_config(recipe, [f"{key}={_yaml(value)}"])
    except SegcompareError as err:
        assert key in _one_line(err)
        return
    finally:
        assert _digest(recipe) == before
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert _same(got, "off" if key == "train.amp" and value is False else value), (got, value)
    for number in (got if isinstance(got, (list, tuple)) else [got]):
        assert not isinstance(number, float) or math.isfinite(number)


@given(text=st.text(max_size=300) | st.binary(max_size=300).map(
    lambda b: b.decode("latin-1")))
@example(text="train: {max_iters: 3}\ntrain: {max_iters: 4}\n")
@example(text="a: &a [1, 2]\nb: *a\n")
@example(text="[" * 3000)
def test_any_recipe_text_is_a_config_or_one_line(tmp_path, text):
    from segcompare.config import load_config

    path = tmp_path / "any.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    before = _digest(path)
    try:
        load_config(path)
    except SegcompareError as err:
        _one_line(err)
    assert _digest(path) == before


# --- E2: the command line's numeric options ----------------------------------------------------
def _option_types() -> dict:
    """option -> the argparse type every subcommand gives it (all the same function of RULES)."""
    from segcompare.cli import build_parser

    found, stack = {}, [build_parser()]
    while stack:
        parser = stack.pop()
        for action in parser._actions:
            if isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            for flag in action.option_strings:
                if flag in RULES and action.type is not None:
                    found[flag] = action.type
    return found


OPTION_TYPES = _option_types()
NUMBER_TEXT = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_000", " 3", "", ",", "1,,2"]),
    st.lists(st.floats(allow_nan=True, allow_infinity=True).map(repr), min_size=1,
             max_size=4).map(",".join),
    st.tuples(st.integers(-5, 10**7), st.integers(-5, 10**7)).map(lambda t: f"{t[0]}x{t[1]}"),
    st.text(max_size=10),
)


@given(flag=st.sampled_from(sorted(OPTION_TYPES)), text=NUMBER_TEXT)
@example(flag="--fps", text="nan")
@example(flag="--scales", text="1,inf")
@example(flag="--seed", text="-1")
@example(flag="--workers", text="100000")
def test_an_option_is_the_number_written_or_refused(flag, text):
    import argparse

    try:
        value = OPTION_TYPES[flag](text)
    except argparse.ArgumentTypeError as err:
        _one_line(err)
        return
    rule = RULES[flag]
    parts = text.lower().split("x" if rule.form.startswith("HxW") else ",") if rule.items else [
        text]
    values = list(value) if rule.items else [value]
    assert len(values) == len(parts)
    for got, part in zip(values, parts):
        written = float(part)  # what the user wrote, read by Python itself
        assert math.isfinite(written) and float(got) == written, (flag, text, value)
        assert rule.low is None or got >= rule.low
        assert rule.high is None or got <= rule.high


def test_an_option_refused_by_the_parser_is_one_line_after_the_usage(capsys):
    from segcompare.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["video", "frames", "--out", "v.gif", "--fps", "nan"])
    assert stop.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith("segcompare video: error: argument --fps: must be")


# --- E3: safetensors headers ----------------------------------------------------------------
TENSORS = {  # name -> (dtype, shape); written by safetensors itself
    "backbone.a.weight": ("float32", (2, 3)),
    "backbone.b.bias": ("float16", (4,)),
    "backbone.bn.num_batches_tracked": ("int64", ()),
}
NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
         "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory) -> bytes:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g).to(getattr(torch, d)) if d != "int64"
             else torch.tensor(7) for k, (d, shape) in TENSORS.items()}
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    save_file(state, str(path))
    return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


HEADER_EDITS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(sorted(TENSORS)),
              st.sampled_from([*NUMPY, "BF16", "F8_E4M3", "X", ""])),
    st.tuples(st.just("shape"), st.sampled_from(sorted(TENSORS)),
              st.lists(st.integers(-2, 12), max_size=4)),
    st.tuples(st.just("data_offsets"), st.sampled_from(sorted(TENSORS)),
              st.lists(st.integers(-5, 80), min_size=0, max_size=3)),
    st.tuples(st.just("truncate"), st.just(""), st.integers(0, 400)),
    st.tuples(st.just("length"), st.just(""), st.integers(0, 2**64 - 1)),
)


@given(edit=HEADER_EDITS)
@example(edit=("dtype", "backbone.a.weight", "I32"))  # issue 22: F32 bytes called I32
@example(edit=("dtype", "backbone.b.bias", "I16"))
@example(edit=("length", "", 2**64 - 1))
def test_a_safetensors_header_is_what_the_bytes_are_or_one_line(small_safetensors, tmp_path,
                                                                edit):
    from segcompare.models.checkpoint import read_checkpoint

    kind, name, value = edit
    header, data = _split(small_safetensors)
    if kind == "truncate":
        raw = small_safetensors[: min(value, len(small_safetensors) - 1)]
    elif kind == "length":
        raw = value.to_bytes(8, "little") + small_safetensors[8:]
    else:
        header[name][kind] = value
        text = json.dumps(header).encode()
        raw = len(text).to_bytes(8, "little") + text + data
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw)
    try:
        state = read_checkpoint(path).state_dict
    except SegcompareError as err:
        _one_line(err)
        assert path.read_bytes() == raw
        return
    assert path.read_bytes() == raw
    written, payload = _split(raw)
    for key, tensor in state.items():  # the right answer: numpy's reading of the same bytes
        info = written[key]
        start, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            assert tensor.dtype.is_floating_point
            continue
        expected = np.frombuffer(payload[start:end], NUMPY[info["dtype"]]).reshape(info["shape"])
        assert tensor.dtype.is_floating_point or key.endswith("num_batches_tracked"), key
        np.testing.assert_array_equal(tensor.float().numpy(), expected.astype(np.float32))
        assert np.isfinite(expected.astype(np.float64)).all()


# --- E4: image files ---------------------------------------------------------------------------
MODES = ["RGB", "L", "RGBA", "LA", "P", "1", "I;16"]


def _image(mode: str, h: int, w: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """A Pillow image of `mode` and the H×W×3 uint8 RGB it shows, computed by hand (Pillow's own
    conversion for a palette)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    if mode == "RGB":
        return Image.fromarray(rgb), rgb
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, grey])), rgb
    if mode == "L":
        return Image.fromarray(grey), np.repeat(grey[..., None], 3, 2)
    if mode == "LA":
        return Image.fromarray(np.dstack([grey, rgb[..., 1]]), "LA"), np.repeat(grey[..., None],
                                                                               3, 2)
    if mode == "1":
        bits = grey > 127
        return Image.fromarray(bits), np.repeat(np.where(bits, 255, 0)[..., None], 3, 2).astype(
            np.uint8)
    if mode == "P":
        im = Image.fromarray(rgb).quantize(colors=8)
        return im, np.asarray(im.convert("RGB"))
    v = rng.integers(0, 65536, (h, w), dtype=np.uint16)  # I;16: v * 255 / 65535, rounded
    expected = ((v.astype(np.uint64) * 255 * 2 + 65535) // (2 * 65535)).astype(np.uint8)
    return Image.fromarray(v), np.repeat(expected[..., None], 3, 2)


@given(mode=st.sampled_from(MODES), h=st.integers(1, 40), w=st.integers(1, 40),
       seed=st.integers(0, 2**16), cut=st.none() | st.floats(0, 1, exclude_max=True))
@example(mode="I;16", h=3, w=5, seed=0, cut=None)
@example(mode="RGB", h=8, w=8, seed=0, cut=0.5)
def test_an_image_file_is_its_pixels_or_one_line(tmp_path, mode, h, w, seed, cut):
    from segcompare.data.images import decode_rgb8
    from segcompare.infer.predictor import load_image

    im, expected = _image(mode, h, w, seed)
    buffer = io.BytesIO()
    im.save(buffer, "PNG")
    raw = buffer.getvalue()
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = tmp_path / "x.png"
    path.write_bytes(raw)
    try:
        got = load_image(path)  # Pillow: predict, video, the Predictor
    except SegcompareError as err:
        _one_line(err)
        assert cut is not None, f"a whole {mode} PNG was refused: {err}"
    else:
        np.testing.assert_array_equal(got, expected)
    decoded = decode_rgb8(np.frombuffer(raw, np.uint8))  # OpenCV: the data pipeline
    if decoded is None:  # its callers name the file
        assert cut is not None, f"OpenCV refused a whole {mode} PNG"
    else:
        np.testing.assert_array_equal(decoded, expected)
    assert path.read_bytes() == raw


# --- E5: dataset folders -----------------------------------------------------------------------
EDITS = st.lists(st.tuples(st.sampled_from(["delete", "truncate", "rename", "extra"]),
                           st.integers(0, 10**6)), min_size=1, max_size=3)


def _apply(root: Path, edits) -> bool:
    """Apply the edits to a copy of the tiny data set; True if one of them breaks an
    image/label pair of the val split (which data check must then report)."""
    broken = False
    for what, n in edits:
        files = sorted(p for p in (root / "leftImg8bit" / "val").rglob("*.png")) + sorted(
            p for p in (root / "gtFine" / "val").rglob("*_labelIds.png"))
        if not files:
            break
        path = files[n % len(files)]
        if what == "delete":
            path.unlink()
            broken = True
        elif what == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: n % max(len(data) - 20, 1)])
            broken = True
        elif what == "rename":
            path.rename(path.with_name(path.name.replace("_", "-", 1)))
            broken = True
        else:
            (path.parent / f"notes{n}.txt").write_text("not an image")
    return broken


@given(edits=EDITS)
@example(edits=[("delete", 0)])
@example(edits=[("delete", 2)])  # a label with no image
def test_a_dataset_folder_is_checked_or_one_line(tiny_data, tmp_path, edits):
    from segcompare.data.cityscapes import check_dataset

    root = tmp_path / "data"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(tiny_data, root)
    broken = _apply(root, edits)
    before = _digest(root)
    try:
        report = check_dataset(root, ["val"], workers=0, progress=False)
    except SegcompareError as err:
        _one_line(err)
    else:
        if broken:  # never "OK" (exit 0) for a set whose files do not pair up
            assert report.problems, edits
        for line in report.problems:
            assert "\n" not in line
    assert _digest(root) == before
