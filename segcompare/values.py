"""The one value rule: every number and list a user gives, checked once against one table.

    check("train.num_workers", 100000)   # SegcompareError: train.num_workers must be ...
    cli_type("--fps")                    # an argparse type: text -> a checked float

A value comes from a recipe or `--set` (config.py), a command-line option (cli/) or the Python
API (InferenceSettings, build_model's settings, render_video, run_eval, ...); wherever it comes
from, its row in `RULES` says its type, its finite range and its shape (one value, a list of so
many, a list of one or more), and `check` is the only code that applies a row. The message names
the key and shows at most `SHOWN` characters of the value. Relations between keys (warmup shorter
than the run, one class weight per class) stay with the code that owns both keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Optional, Union

from segcompare.utils import SegcompareError

SHOWN = 200  # characters of a bad value a message shows

# Loader processes and CPU threads: beyond a few per core they only cost memory (each loader
# worker is a forked copy of the process); 100000 of them fork until the OOM killer fires.
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
MAX_WORKERS = 4 * CPUS
MAX_COUNT = 2**31 - 1  # iterations, images, frames: what an int32 index holds
# Pixels of an image side: a bound against overflow only; what fits in memory is decided by the
# memory estimates (utils.check_memory), which name the figure.
MAX_SIDE = 1 << 20
MAX_SCALE = 1e4  # a test scale; what fits in memory is decided by the memory estimate
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_CLASSES = 65535
MAX_BATCH = 65536
MIN_OPSET = 17  # ONNX has LayerNormalization from opset 17 on; onnxruntime >= 1.11 runs it
MAX_OPSET = 20  # the newest torch's TorchScript-based exporter writes (torch 2.13); export.py
# also asks the installed torch (`max_opset`), which may write fewer
MAX_RESAMPLES = 100_000  # bootstrap resamples: each keeps C IoUs per model (metrics.py)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one key takes.

    kind: bool | int | float | str | dict (a float is always finite; an int is never a bool).
    low / high: the range (inclusive; `low_open` / `high_open` exclude the bound).
    items: None: one value; N: a list of exactly N values; "+": one or more; "*": any number.
    choices: the strings allowed (empty: any string).
    optional: None is allowed (null in YAML).
    why: said after the range in the message (where a bound is not obvious).
    form: how the shape is written, for the message (e.g. "HxW"); default: "a list of N".
    """

    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    items: Union[None, int, str] = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    why: str = ""
    form: str = ""


def _count(low: int = 0, high: int = MAX_COUNT, **kw: Any) -> Rule:
    return Rule(int, low, high, **kw)


def _number(low: float, high: float, **kw: Any) -> Rule:
    return Rule(float, low, high, **kw)


def _choice(*choices: str) -> Rule:
    return Rule(str, choices=choices)


_WORKERS = _count(0, MAX_WORKERS, why=f"at most 4 per CPU, and this machine has {CPUS}")
_THREADS = _count(1, MAX_WORKERS, why=f"at most 4 per CPU, and this machine has {CPUS}")
_SEED = _count(0, MAX_SEED, why="numpy's seeds are 32-bit")
_HW = _count(1, MAX_SIDE, items=2, form="HxW, two integers")
_PROBABILITY = _number(0, 1)

RULES: dict[str, Rule] = {
    # --- recipes and --set (config.py) -----------------------------------------------------
    "model.name": Rule(str),
    "model.num_classes": _count(1, 255, why="255 is the ignore label", optional=True),
    "model.pretrained": Rule(str, optional=True),
    "model.init": Rule(str, optional=True),
    "model.overrides": Rule(dict),  # each setting is checked against the variant's default
    "data.root": Rule(str),
    "data.layout": Rule(str, optional=True),  # one of data.layouts.LAYOUTS (config.py checks)
    "data.reduce_zero_label": Rule(bool, optional=True),
    "data.img_scale": _count(1, MAX_SIDE, items=2, optional=True),
    "data.pipeline": _choice("segformer", "hrnet"),
    "data.crop_size": _HW,
    "data.scale_range": _number(0, MAX_SCALE, low_open=True, items=2, optional=True),
    "data.base_size": _count(1, MAX_SIDE),
    "data.train_split": Rule(str),
    "data.val_split": Rule(str),
    "data.ignore_index": _count(0, 255),
    "optim.name": _choice("adamw", "sgd"),
    "optim.lr": _number(0, 100, low_open=True),
    "optim.weight_decay": _number(0, 1),
    "optim.momentum": _PROBABILITY,
    "optim.nesterov": Rule(bool),
    "optim.betas": _number(0, 1, high_open=True, items=2),
    "optim.head_lr_mult": _number(0, 1000),
    "optim.no_decay": Rule(str, items="*"),
    "optim.schedule": _choice("poly"),
    "optim.power": _number(0, 100),
    "optim.min_lr": _number(0, 100),
    "optim.warmup_iters": _count(0),
    "optim.warmup_ratio": _number(0, 1, low_open=True),
    "train.max_iters": _count(1),
    "train.batch_size": _count(1, MAX_BATCH),
    "train.num_workers": _WORKERS,
    "train.threads": dataclasses.replace(_THREADS, optional=True),
    "train.seed": _SEED,
    "train.amp": _choice("off", "bf16", "fp16"),
    "train.compile": Rule(bool),
    "train.deterministic": Rule(bool),
    "train.loss": _choice("ce", "ohem"),
    "train.loss_average": _choice("labelled", "all"),
    # or "auto" (median-frequency weights; config.py takes that word before this row)
    "train.class_weights": _number(
        0, 1e6, items="+", optional=True, why="or auto: median-frequency weights of the data"),
    "train.ohem_threshold": _number(0, 1, low_open=True),
    "train.ohem_min_kept": _count(1),
    "train.ohem_min_kept_images": _count(1),
    "train.log_every": _count(1),
    "train.eval_every": _count(0),
    "train.checkpoint_every": _count(1),
    "train.keep_checkpoints": _count(1),
    # --- command-line options (cli/) and the Python API's matching arguments -----------------
    "--scales": _number(0, MAX_SCALE, low_open=True, items="+"),
    "--size": _HW,
    "--window": _HW,
    "--stride": _HW,
    "--fps": _number(0, 1000, low_open=True),
    "--every": _count(1),
    "--max-frames": _count(1),
    "--max-width": _count(0, MAX_SIDE),
    "--batch": _count(1, MAX_BATCH),
    "--workers": _WORKERS,
    "--threads": _THREADS,
    "--warmup": _count(0),
    "--iters": _count(1),
    "--num-classes": _count(1, MAX_CLASSES),
    "--images": _count(0),
    "--max-images": _count(1),
    "--corrupt-images": _count(1),
    "--bench-iters": _count(1),
    "--bench-warmup": _count(0),
    "--boundary-frac": _number(0, 1, low_open=True, high_open=True),
    "--train": _count(0),
    "--val": _count(0),
    "--test": _count(0),
    "--video": _count(0),
    "--seed": _SEED,
    "--classes": _count(1, MAX_CLASSES),
    "--ignore-index": _count(0, 255),
    "--opset": _count(MIN_OPSET, MAX_OPSET, why="LayerNormalization is an ONNX op from 17 on; "
                      f"{MAX_OPSET} is the newest torch's exporter writes"),
    "--bootstrap": _count(0, MAX_RESAMPLES, why="0: off"),
    "--calib-images": _count(1),
}


def shown(value: Any) -> str:
    """`repr(value)`, cut to SHOWN characters (a message must stay one short line)."""
    text = repr(value).replace("\n", "\\n")
    if len(text) > SHOWN:
        text = f"{text[:SHOWN]}... ({len(text)} characters)"
    return text


def describe(rule: Rule) -> str:
    """What a rule takes, in words: 'an integer in [1, 8]', 'a list of 2 numbers > 0 ...'."""
    names = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"),
             float: ("a finite number", "finite numbers"), str: ("a string", "strings"),
             dict: ("a mapping", "mappings")}  # fmt: skip
    one, many = names[rule.kind]
    if rule.choices:
        one = many = "one of " + ", ".join(rule.choices)
    text = one
    if rule.items is not None:
        count = {"+": "one or more", "*": "any number of"}.get(rule.items, str(rule.items))
        text = rule.form or f"a list of {count} {many if not rule.choices else '(' + many + ')'}"
    if rule.low is not None and rule.high is not None:
        left, right = "(" if rule.low_open else "[", ")" if rule.high_open else "]"
        text += f" in {left}{_num(rule.low)}, {_num(rule.high)}{right}"
    if rule.optional:
        text += ", or null"
    return text + (f" ({rule.why})" if rule.why else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def check(key: str, value: Any, rule: Optional[Rule] = None, name: str = "") -> Any:
    """`value` as `key`'s row of RULES (or `rule`) takes it: a float for a float, a tuple for a
    fixed-length list, a list for a list; a SegcompareError naming `key` otherwise (or `name`:
    the Python API's argument that takes the option `key`'s values, e.g. 'scales')."""
    rule = rule or RULES[key]
    key = name or key
    if value is None and rule.optional:
        return None
    if rule.items is None:
        return _one(key, value, rule)
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise _bad(key, value, rule)
    values = list(value)
    if (isinstance(rule.items, int) and len(values) != rule.items) or (
        rule.items == "+" and not values
    ):
        raise _bad(key, value, rule)
    checked = [_one(key, v, rule, whole=value) for v in values]
    return tuple(checked) if isinstance(rule.items, int) else checked


def _bad(key: str, value: Any, rule: Rule) -> SegcompareError:
    return SegcompareError(f"{key} must be {describe(rule)}, got {shown(value)}")


def _one(key: str, value: Any, rule: Rule, whole: Any = None) -> Any:
    """One value (an element of a list: `whole` is the list, shown in the message)."""

    def bad() -> SegcompareError:
        return _bad(key, value if whole is None else whole, rule)

    if rule.kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if rule.kind is str:
        if not isinstance(value, str) or (rule.choices and value not in rule.choices):
            raise bad()
        try:  # YAML's "\ud800" escapes make lone surrogates: no file name or text holds them
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise SegcompareError(
                f"{key} must be valid text; {shown(value)} holds an unpaired surrogate at "
                f"character {err.start}"
            ) from None
        return value
    if rule.kind is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if isinstance(value, bool) or value is None:
        raise bad()
    if rule.kind is int:
        if not isinstance(value, int):
            raise bad()
    else:  # float: an int or a float, finite
        if not isinstance(value, (int, float)):
            raise bad()
        try:
            value = float(value)
        except OverflowError:  # an int beyond a float's range
            raise bad() from None
        if not math.isfinite(value):
            raise bad()
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        raise bad()
    if rule.high is not None and (value > rule.high or (rule.high_open and value == rule.high)):
        raise bad()
    return value


def parse(key: str, text: str) -> Any:
    """A command-line option's text as its row takes it: '0.5,1.0' for a list, '512x1024' for
    an H×W pair, plain text for one value; checked."""
    rule = RULES[key]
    text = text.strip()
    if rule.items is None:
        parts: Any = text
    else:
        sep = "x" if rule is _HW else ","
        parts = [p.strip() for p in text.lower().split(sep)]
    convert = {int: _int, float: _float}.get(rule.kind, str)
    try:
        value = [convert(p) for p in parts] if isinstance(parts, list) else convert(parts)
    except ValueError:
        raise _bad(key, text, rule) from None
    try:
        return check(key, value, rule)
    except SegcompareError:
        raise _bad(key, text, rule) from None


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def cli_type(key: str) -> Callable[[str], Any]:
    """An argparse `type=` for the option `key` of RULES: argparse prints its message as
    'argument --fps: must be ...' (one line after the usage) and exits 2."""
    import argparse

    def convert(text: str) -> Any:
        try:
            return parse(key, text)
        except SegcompareError as err:
            message = str(err)
            raise argparse.ArgumentTypeError(message[len(key) + 1 :]) from None

    convert.__name__ = key  # argparse names the type in its fallback message
    return convert


def check_like(key: str, value: Any, default: Any, strings: Callable[[str], tuple] = tuple) -> Any:
    """A setting whose shape is its default's (a model variant's settings): the same type, a
    list of the same length with elements like the default's, a mapping with the same keys. An
    integer is at least 1, a float a fraction in [0, 1], a string one of `strings(leaf key)`."""
    leaf = key.rsplit(".", 1)[-1].split("[")[0]
    if isinstance(default, dict):
        if not isinstance(value, dict) or set(value) != set(default):
            raise SegcompareError(
                f"{key} must be a mapping with the keys {', '.join(default)}, got {shown(value)}"
            )
        return {k: check_like(f"{key}.{k}", value[k], default[k], strings) for k in default}
    if isinstance(default, (list, tuple)):
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)) or (
            len(value) != len(default)
        ):
            raise SegcompareError(
                f"{key} must be a list of {len(default)} values (one per stage or branch, as "
                f"the variant's {list(default)}), got {shown(value)}"
            )
        for i, (v, d) in enumerate(zip(value, default)):
            try:
                check_like(f"{key}[{i}]", v, d, strings)
            except SegcompareError:
                rule = _like_rule(d, strings(leaf))
                raise SegcompareError(
                    f"{key} must be a list of {len(default)} values, each "
                    f"{describe(rule)}, got {shown(value)}"
                ) from None
        return tuple(value)
    return check(key, value, _like_rule(default, strings(leaf)))


def _like_rule(default: Any, choices: tuple) -> Rule:
    if isinstance(default, bool):
        return Rule(bool)
    if isinstance(default, int):
        return _count(1, 65535)
    if isinstance(default, float):
        return _PROBABILITY
    return Rule(str, choices=tuple(choices))
