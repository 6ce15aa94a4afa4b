"""The training config: four dataclasses loaded from a YAML recipe with `--set` overrides.

    cfg = load_config("configs/synthcity_segformer_b0.yaml", ["train.max_iters=200"])

`model`, `data`, `optim` and `train` are plain dataclasses; a recipe in configs/ sets their keys,
`--set a.b=value` overrides one (the value read as YAML), and a wrong key or value is one error
naming it. `config_to_dict` is what a run folder's config.yaml holds; `changed_keys` says which
keys a resumed run may not change.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from segcompare.data.labels import IGNORE_INDEX
from segcompare.data.layouts import LAYOUTS
from segcompare.utils import SegcompareError
from segcompare.values import check, shown


@dataclass
class ModelConfig:
    name: str = ""  # a name of `segcompare models`, e.g. segformer-b0, hrnet-w48
    num_classes: Optional[int] = None  # null: the data set's class count (its class table)
    # ImageNet weights for the backbone: a file or folder the checkpoint loader reads, or a hub
    # id written hf://owner/name; None: random init.
    pretrained: Optional[str] = None
    # A whole segmentation checkpoint to start from (fine-tuning): a file, folder or
    # hf://owner/name. Where its class count differs from num_classes only the classifier is
    # initialised anew (the log names its tensors once). Not together with `pretrained`.
    init: Optional[str] = None
    # keyword settings of the variant, passed to build_model (drop_path_rate, depths, ...)
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    root: str = "data/cityscapes"  # a data set folder (segcompare.data.layouts)
    layout: Optional[str] = None  # cityscapes | ade20k | folder; null: detected from the folder
    # null: the layout's rule (ADE20K: true, mmseg's; the others: false)
    reduce_zero_label: Optional[bool] = None
    pipeline: str = "segformer"  # which paper's training augmentation: segformer | hrnet
    crop_size: Tuple[int, int] = (1024, 1024)  # (h, w) of the training crops
    # random rescale ratios; null: the pipeline's official range (segformer: mmseg's ratio_range
    # (0.5, 2.0); hrnet: 0.5 + random.randint(0, 16) / 10, 0.5 to 2.1 in steps of 0.1)
    scale_range: Optional[Tuple[float, float]] = None
    base_size: int = 2048  # long side of the image at scale 1.0 (Cityscapes: 2048)
    # segformer: mmseg's Resize img_scale (long, short) at ratio 1.0; null: (base_size,
    # base_size // 2), Cityscapes' (2048, 1024). ADE20K: (2048, 512), the short side to 512.
    img_scale: Optional[Tuple[int, int]] = None
    train_split: str = "train"
    val_split: str = "val"
    ignore_index: int = IGNORE_INDEX  # the mask value that is ignored (255 always is)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 6e-5  # for the total batch
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: Tuple[float, float] = (0.9, 0.999)  # adamw
    # Parameter-wise rules of mmcv's `paramwise_cfg.custom_keys`: a parameter whose name contains
    # "head" gets lr x head_lr_mult; one whose name contains a `no_decay` string gets no weight
    # decay ("bias" is a valid entry too).
    head_lr_mult: float = 1.0
    no_decay: List[str] = field(default_factory=list)
    schedule: str = "poly"  # the only schedule of both papers
    power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 0  # linear warmup, as mmcv's `warmup='linear'`
    warmup_ratio: float = 1e-6


@dataclass
class TrainConfig:
    max_iters: int = 1000
    batch_size: int = 8  # TOTAL over all processes
    num_workers: int = 2  # data loading processes per training process
    # CPU threads of each training process (torch.set_num_threads); null: torch's default, one
    # per core. On a CPU shared with other jobs, 1 is far faster than 2: OpenMP threads that
    # wait for a descheduled sibling at every operator stall the whole step.
    threads: Optional[int] = None
    seed: int = 0
    amp: str = "off"  # off | bf16 | fp16
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU runs that must resume
    #                              bit-identically; the CPU is deterministic anyway)
    loss: str = "ce"  # ce | ohem
    # "labelled": mean over labelled pixels (torch's CrossEntropyLoss, the HRNet code);
    # "all": sum over labelled pixels / all pixels (mmseg's CrossEntropyLoss, the SegFormer code).
    loss_average: str = "labelled"
    # one per class; "auto": median-frequency weights from the training labels' histogram
    # (losses.median_frequency_weights); None: no weights
    class_weights: Optional[Union[List[float], str]] = None
    ohem_threshold: float = 0.7  # keep pixels whose target-class probability is below this ...
    ohem_min_kept: int = 100000  # ... but at least this many per process of ...
    # ... this many images: a process with another number keeps min_kept scaled by the ratio
    # (HRNet's LOSS.OHEMKEEP 131072 is for BATCH_SIZE_PER_GPU 3; train.ohem_min_kept_for)
    ohem_min_kept_images: int = 3
    log_every: int = 50
    eval_every: int = 0  # validate every N iterations and at the end; 0: never
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # the newest N iter_*.pt are kept


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
# keys a resumed run may change: they do not change the weights
_RESUME_MAY_CHANGE = {
    "data.root",
    "train.num_workers",
    "train.threads",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
}


def shipped_recipe(name: str) -> Path:
    """A recipe that ships with segcompare, e.g. 'synthcity_segformer_b0.yaml': package data
    (`segcompare/configs` is a link to the checkout's `configs/`, and a wheel holds the files)."""
    from importlib.resources import files

    path = Path(str(files("segcompare") / "configs" / name))
    if not path.is_file():  # a checkout whose link did not survive (git without symlinks)
        path = Path(__file__).resolve().parent.parent / "configs" / name
    if not path.is_file():
        raise SegcompareError(
            f"recipe {name} not found in the segcompare package ({path.parent}): reinstall it"
        )
    return path


def shipped_recipes() -> dict[str, Path]:
    """Every recipe that ships with segcompare: {name without .yaml: path}."""
    folder = shipped_recipe("synthcity_segformer_b0.yaml").parent  # the demo's: always shipped
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_config(path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> Config:
    """Read a recipe, apply `a.b=value` overrides (values parsed as YAML), validate it."""
    path = Path(path)
    if not path.is_file():
        raise SegcompareError(f"config file {path} not found")
    raw = read_yaml(path.read_bytes(), f"config {path}")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SegcompareError(f"config {path}: expected a mapping of sections, got {raw!r}")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return config_from_dict(raw)
    except SegcompareError as err:
        raise SegcompareError(f"config {path}: {err}") from None


# A recipe is a few kB; a larger file is not one (and YAML parsing holds all of it in memory).
MAX_RECIPE_BYTES = 1 << 20


class _RecipeLoader(yaml.SafeLoader):
    """YAML as recipes are written: no key twice in a mapping (PyYAML keeps the last one
    silently) and no aliases (`*name`): a few hundred bytes of nested aliases expand to
    gigabytes (an "alias bomb"), and no recipe needs one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                problem=f"an alias (*{event.anchor}): recipes write every value out",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}  # key -> its line
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise yaml.MarkedYAMLError(
                        problem=f"the key {shown(key)} is given twice (lines {first} and "
                        f"{line}); give each key once",
                        problem_mark=key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 6e-5 (an exponent, no dot) as a string; recipes mean the number (YAML 1.2).
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(data: bytes, where: str) -> Any:
    """Parse a recipe or a --set value: UTF-8 text, no key twice, no aliases, at most
    MAX_RECIPE_BYTES; a SegcompareError of one line naming `where` (and the line) otherwise."""
    if len(data) > MAX_RECIPE_BYTES:
        raise SegcompareError(
            f"{where}: {len(data)} bytes, more than a recipe's {MAX_RECIPE_BYTES} at most"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SegcompareError(
            f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(x) for x in (err.context, err.problem) if x)
        raise SegcompareError(f"{where}: not valid YAML: {at}{shown(what)[1:-1]}") from None
    except yaml.YAMLError as err:
        raise SegcompareError(f"{where}: not valid YAML: {shown(str(err))[1:-1]}") from None
    except RecursionError:
        raise SegcompareError(f"{where}: not valid YAML: nested too deeply") from None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SegcompareError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_iters=200")
    value = read_yaml(text.encode("utf-8", "surrogateescape"), f"--set {key}")
    parts = key.split(".")
    # model.overrides.<setting> reaches into the free-form dict; everything else is section.key
    if len(parts) < 2 or (len(parts) > 2 and parts[:2] != ["model", "overrides"]):
        raise SegcompareError(
            f"--set {key}: expected SECTION.KEY with SECTION one of {', '.join(_SECTIONS)}"
        )
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SegcompareError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict) -> Config:
    """Validate a nested dict into a `Config`; an error names the key and what was expected."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise SegcompareError(
            f"unknown section {unknown[0]!r}; valid sections: {', '.join(_SECTIONS)}"
        )
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise SegcompareError(f"section {name!r} must be a mapping, got {values!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in valid:
                raise SegcompareError(
                    f"unknown key {name}.{key}; valid keys in {name}: {', '.join(valid)}"
                )
            if f"{name}.{key}" == "train.amp" and value is False:  # YAML reads a bare off as false
                value = "off"
            if f"{name}.{key}" == "train.class_weights" and value == "auto":
                kwargs[key] = value  # median-frequency weights, made when the data is read
                continue
            kwargs[key] = check(f"{name}.{key}", value)
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    _check_values(cfg)
    return cfg


def check_config(cfg: Config) -> Config:
    """A `Config` built or changed in Python, checked by the rules a recipe and --set pass
    (`config_from_dict`: each value by its row of values.RULES, then the relations between
    keys), so `train(cfg)` refuses what `segcompare train` refuses, with the same line. Returns
    the checked Config (values as a recipe gives them: lists as tuples where a row says so)."""
    if not isinstance(cfg, Config):
        raise SegcompareError(
            f"a training configuration must be a segcompare.config.Config (load_config or "
            f"config_from_dict make one), got {type(cfg).__name__}"
        )
    return config_from_dict(config_to_dict(cfg))


def _check_values(cfg: Config) -> None:
    """Relations between keys and facts of other rooms; each key's own range is `values.RULES`."""

    def bad(key: str, expected: str) -> SegcompareError:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        return SegcompareError(f"{key} must be {expected}, got {shown(value)}")

    if not cfg.model.name:
        raise SegcompareError("model.name is required (see `segcompare models`)")
    if cfg.data.layout is not None and cfg.data.layout not in LAYOUTS:
        raise bad("data.layout", "one of " + ", ".join(LAYOUTS) + " or null")
    if cfg.model.init and cfg.model.pretrained:
        raise SegcompareError(
            "model.init (a whole segmentation checkpoint) and model.pretrained (ImageNet "
            "backbone weights) both given: keep one"
        )
    from segcompare.models.variants import MIN_INPUT_SIDE, check_settings  # torch: only now

    if min(cfg.data.crop_size) < MIN_INPUT_SIDE:
        raise bad("data.crop_size", f"at least {MIN_INPUT_SIDE} on each side (the smallest input "
                  "both model families accept)")
    scale_range = cfg.data.scale_range
    if scale_range is not None and not scale_range[0] <= scale_range[1]:
        raise bad("data.scale_range", "(low, high) with 0 < low <= high, or null")
    if cfg.optim.warmup_iters >= cfg.train.max_iters:
        raise bad("optim.warmup_iters", f"smaller than train.max_iters ({cfg.train.max_iters})")
    if not 0 < cfg.train.ohem_threshold <= 1:
        raise bad("train.ohem_threshold", "a probability in (0, 1]")
    _check_classes(cfg, cfg.model.num_classes)
    check_settings(cfg.model.name, cfg.model.overrides, prefix="model.overrides.")


def _check_classes(cfg: Config, num_classes: Optional[int]) -> None:
    """The values that depend on the class count, once it is known (null: the data set's)."""
    check_class_weights(cfg.train.class_weights, num_classes)
    if not 0 <= cfg.data.ignore_index <= IGNORE_INDEX or cfg.data.ignore_index < (num_classes or 0):
        raise SegcompareError(f"data.ignore_index must be in [num_classes, {IGNORE_INDEX}], got "
                              f"{cfg.data.ignore_index!r}")


def with_data_classes(cfg: Config, num_classes: int, source: str) -> Config:
    """`cfg` with model.num_classes set to the data set's count `num_classes` when it is null; a
    recipe that names another count is an error naming both (`source`: the data set's file)."""
    given = cfg.model.num_classes
    if given is not None and given != num_classes:
        raise SegcompareError(
            f"model.num_classes is {given} but {source} has {num_classes} classes: pass "
            f"--set model.num_classes=null (the data set's count) or --set "
            f"model.num_classes={num_classes}"
        )
    weights = cfg.train.class_weights
    if isinstance(weights, (list, tuple)) and len(weights) != num_classes:
        raise SegcompareError(
            f"train.class_weights has {len(weights)} values (one per class of the data set the "
            f"recipe was written for) but {source} has {num_classes} classes: pass --set "
            "train.class_weights=auto (this data set's median-frequency weights) or --set "
            "train.class_weights=null"
        )
    _check_classes(cfg, num_classes)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))


def check_class_weights(weights: Any, num_classes: Optional[int]) -> None:
    """train.class_weights: "auto", None, or one non-negative number per class (checked once the
    number of classes is known: here, or when training reads the data set)."""
    if weights is None or weights == "auto":
        return
    if isinstance(weights, str):
        raise SegcompareError(f"train.class_weights must be auto, a list or null, got {weights!r}")
    if min(weights) < 0 or (num_classes is not None and len(weights) != num_classes):
        count = f"{num_classes}" if num_classes is not None else "one per class:"
        raise SegcompareError(
            f"train.class_weights must be {count} non-negative numbers, auto or null, got "
            f"{len(weights)} value(s) {str(weights)[:120]}"
        )


def config_to_dict(cfg: Config) -> dict:
    """Plain lists and scalars, as written to OUT/config.yaml."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix.count(".") < 1 and k != "overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: dict, new: dict) -> List[str]:
    """Keys (section.key) whose values differ between two `config_to_dict`s and that change the
    weights when they do: a resumed run may change none of them."""
    old_flat, new_flat = _flat(old), _flat(new)
    keys = sorted(set(old_flat) | set(new_flat))
    return [k for k in keys if old_flat.get(k) != new_flat.get(k) and k not in _RESUME_MAY_CHANGE]
