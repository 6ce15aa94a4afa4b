"""Training: both papers' recipes, one loop you can read top to bottom.

    segcompare train configs/synthcity_segformer_b0.yaml --set data.root=/tmp/s --out /tmp/run
    torchrun --nproc-per-node 2 -m segcompare train CONFIG --out OUT      # many processes
    segcompare train CONFIG --out OUT --resume                            # continue a run

The file reads in the order a run happens:

1. the config: four dataclasses (`model`, `data`, `optim`, `train`) loaded from a YAML recipe
   with `--set a.b=value` overrides; a wrong key or value is one error naming it;
2. the losses of the two papers (cross-entropy, class weights, HRNet's OHEM);
3. the optimizer's parameter groups (SegFormer: head lr x10, no decay on norms) and the poly
   schedule with linear warmup;
4. the data order, made so that a resumed run sees exactly the samples and augmentations an
   uninterrupted run sees;
5. validation, the training checkpoint and the run folder;
6. `train()`: processes, model, data, optimizer, then the loop.

Batch size and learning rate are stated for the TOTAL batch over all processes: a run on fewer
processes gives each process more images (and says so in its log), the recipe's numbers stay.

Run folder `OUT/`: `config.yaml` (the resolved config), `log.jsonl` (one JSON object per log step
and per validation), `checkpoints/iter_N.pt` (everything needed to continue bit-identically),
`best.safetensors` (best val mIoU), `final.safetensors`, and TensorBoard events in `tb/` when
tensorboard is installed. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from segcompare.data.labels import NUM_CLASSES
from segcompare.utils import SegcompareError, atomic_path, atomic_write_text

log = logging.getLogger(__name__)


# =================================================================================================
# 1. Config
# =================================================================================================
@dataclass
class ModelConfig:
    name: str = ""  # a name of `segcompare models`, e.g. segformer-b0, hrnet-w48
    num_classes: int = 19
    # ImageNet weights for the backbone (a path or hub id the Checkpoints loader accepts); None:
    # random init.
    pretrained: Optional[str] = None
    # keyword settings of the variant, passed to build_model (drop_path_rate, depths, ...)
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    root: str = "data/cityscapes"  # a folder in the Cityscapes layout (leftImg8bit/, gtFine/)
    pipeline: str = "segformer"  # which paper's training augmentation: segformer | hrnet
    crop_size: Tuple[int, int] = (1024, 1024)  # (h, w) of the training crops
    # random rescale ratios; null: the pipeline's official range (segformer: mmseg's ratio_range
    # (0.5, 2.0); hrnet: 0.5 + random.randint(0, 16) / 10, 0.5 to 2.1 in steps of 0.1)
    scale_range: Optional[Tuple[float, float]] = None
    base_size: int = 2048  # long side of the image at scale 1.0 (Cityscapes: 2048)
    train_split: str = "train"
    val_split: str = "val"
    ignore_index: int = 255


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
    class_weights: Optional[List[float]] = None  # one per class, or None
    ohem_threshold: float = 0.7  # keep pixels whose target-class probability is below this ...
    ohem_min_kept: int = 100000  # ... but at least this many per process
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
_CHOICES = {
    "data.pipeline": ("segformer", "hrnet"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("poly",),
    "train.amp": ("off", "bf16", "fp16"),
    "train.loss": ("ce", "ohem"),
    "train.loss_average": ("labelled", "all"),
}
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


def load_config(path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> Config:
    """Read a recipe, apply `a.b=value` overrides (values parsed as YAML), validate it."""
    path = Path(path)
    if not path.is_file():
        raise SegcompareError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SegcompareError(f"config {path} is not valid YAML: {err}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SegcompareError(f"config {path}: expected a mapping of sections, got {raw!r}")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return config_from_dict(raw)
    except SegcompareError as err:
        raise SegcompareError(f"config {path}: {err}") from None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SegcompareError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_iters=200")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SegcompareError(f"--set {key}: the value {text!r} is not valid YAML: {err}") from None
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
        hints = get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in valid:
                raise SegcompareError(
                    f"unknown key {name}.{key}; valid keys in {name}: {', '.join(valid)}"
                )
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    _check_values(cfg)
    return cfg


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` of a config field, or a SegcompareError naming `key`."""
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SegcompareError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SegcompareError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        # YAML 1.1 reads 6e-5 (no dot) as a string, so numeric strings are accepted
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise SegcompareError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if key == "train.amp" and value is False:  # YAML reads a bare `off` as false
            return "off"
        if isinstance(value, str):
            return value
        raise SegcompareError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SegcompareError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SegcompareError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SegcompareError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"no rule for the type {hint} of {key}")  # a bug in this file, not user input


def _check_values(cfg: Config) -> None:
    def bad(key: str, expected: str) -> SegcompareError:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        return SegcompareError(f"{key} must be {expected}, got {value!r}")

    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in choices:
            raise bad(key, "one of " + ", ".join(choices))
    if not cfg.model.name:
        raise SegcompareError("model.name is required (see `segcompare models`)")
    if cfg.model.num_classes < NUM_CLASSES:
        raise bad("model.num_classes", f"at least {NUM_CLASSES} (the Cityscapes train ids)")
    positive = {
        "model.num_classes": cfg.model.num_classes,
        "data.base_size": cfg.data.base_size,
        "train.max_iters": cfg.train.max_iters,
        "train.batch_size": cfg.train.batch_size,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.ohem_min_kept": cfg.train.ohem_min_kept,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if not value > 0:
            raise bad(key, "positive")
    if min(cfg.data.crop_size) <= 0:
        raise bad("data.crop_size", "two positive integers (h, w)")
    scale_range = cfg.data.scale_range
    if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
        raise bad("data.scale_range", "(low, high) with 0 < low <= high, or null")
    if cfg.train.threads is not None and cfg.train.threads < 1:
        raise bad("train.threads", "a positive number of threads or null")
    for key in ("train.num_workers", "train.eval_every", "optim.warmup_iters", "optim.min_lr",
                "optim.weight_decay", "optim.momentum", "optim.power", "optim.head_lr_mult"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise bad(key, "zero or more")
    if not 0 < cfg.optim.warmup_ratio <= 1:
        raise bad("optim.warmup_ratio", "in (0, 1]")
    if cfg.optim.warmup_iters >= cfg.train.max_iters:
        raise bad("optim.warmup_iters", f"smaller than train.max_iters ({cfg.train.max_iters})")
    if not 0 < cfg.train.ohem_threshold <= 1:
        raise bad("train.ohem_threshold", "a probability in (0, 1]")
    weights = cfg.train.class_weights
    if weights is not None and (len(weights) != cfg.model.num_classes or min(weights) < 0):
        raise bad("train.class_weights", f"{cfg.model.num_classes} non-negative numbers or null")
    if not 0 <= cfg.data.ignore_index <= 255 or cfg.data.ignore_index < cfg.model.num_classes:
        raise bad("data.ignore_index", "in [num_classes, 255]")


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


# =================================================================================================
# 2. Losses
# =================================================================================================
# Both official codes compute the loss at label resolution: the 1/4-resolution logits are
# upsampled bilinearly (align_corners=False) to the label's size first.
def cross_entropy(
    logits: torch.Tensor,  # N×C×h×w
    label: torch.Tensor,  # N×H×W int64
    ignore_index: int = 255,
    class_weights: Optional[torch.Tensor] = None,  # C
    average: str = "labelled",
) -> torch.Tensor:
    """Cross-entropy at label resolution.

    average="labelled": torch's CrossEntropyLoss mean (with class weights: sum w_y*l / sum w_y over
    labelled pixels), as HRNet's `CrossEntropy` (lib/core/criterion.py).
    average="all": sum over labelled pixels / number of pixels, as mmseg's `CrossEntropyLoss`
    that SegFormer trained with (its `weight_reduce_loss` averages over every pixel, ignored
    pixels counting as 0).
    """
    logits = _to_label_size(logits, label)
    if average == "labelled":
        return F.cross_entropy(logits, label, weight=class_weights, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(
        logits, label, weight=class_weights, ignore_index=ignore_index, reduction="none"
    )
    return per_pixel.mean()


def ohem_cross_entropy(
    logits: torch.Tensor,  # N×C×h×w
    label: torch.Tensor,  # N×H×W int64
    threshold: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
    class_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HRNet's online hard example mining (`OhemCrossEntropy` of lib/core/criterion.py).

    Over the labelled pixels of the batch, sorted by the softmax probability of their target
    class: keep those below max(threshold, the (min_kept+1)-th smallest probability), i.e. every
    pixel predicted with less than `threshold` confidence and at least `min_kept` pixels; the
    loss is the plain mean of their (class-weighted) per-pixel cross-entropies.
    """
    logits = _to_label_size(logits, label)
    per_pixel = F.cross_entropy(
        logits, label, weight=class_weights, ignore_index=ignore_index, reduction="none"
    ).flatten()
    labelled = label.flatten() != ignore_index
    if not labelled.any():
        return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
    target = label.clamp(max=logits.shape[1] - 1).unsqueeze(1)  # ignored pixels -> any class
    prob = F.softmax(logits, dim=1).gather(1, target).flatten()[labelled]
    sorted_prob = prob.detach().sort().values
    kth = sorted_prob[min(min_kept, sorted_prob.numel() - 1)]
    cutoff = torch.clamp(kth, min=threshold)
    return per_pixel[labelled][prob.detach() < cutoff].mean()


def _to_label_size(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return logits


# =================================================================================================
# 3. Optimizer and learning-rate schedule
# =================================================================================================
def param_groups(model: nn.Module, cfg: OptimConfig) -> List[dict]:
    """Trainable parameters in up to four groups: (backbone | head) x (decay | no decay).

    mmcv's `custom_keys` rule, which the SegFormer config uses as
    `{'pos_block': decay_mult 0, 'norm': decay_mult 0, 'head': lr_mult 10}`: a substring match on
    the parameter's name. With the official names no head parameter contains "norm", so the two
    rules never compete. Each group records its `lr_mult` for the schedule.
    """
    groups: Dict[Tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = "head" in name
        decay = not any(key in name for key in cfg.no_decay)
        if (head, decay) not in groups:
            lr_mult = cfg.head_lr_mult if head else 1.0
            groups[(head, decay)] = {
                "params": [],
                "param_names": [],
                "lr": cfg.lr * lr_mult,
                "lr_mult": lr_mult,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        groups[(head, decay)]["params"].append(param)
        groups[(head, decay)]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )


def learning_rate(it: int, base_lr: float, cfg: OptimConfig, max_iters: int) -> float:
    """The lr of iteration `it` (0-based) for a group whose initial lr is `base_lr`.

    mmcv's PolyLrUpdaterHook (by_epoch=False), computed before iteration `it`:
        regular = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    and, while it < warmup_iters, its linear warmup scales that:
        k = (1 - it / warmup_iters) * (1 - warmup_ratio);  lr = regular * (1 - k)
    HRNet's `adjust_learning_rate` is the same poly with power 0.9, min_lr 0 and no warmup (the
    official loop sets it after each step, so it runs one iteration behind this formula).
    """
    regular = (base_lr - cfg.min_lr) * (1 - it / max_iters) ** cfg.power + cfg.min_lr
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular


def set_learning_rate(optimizer: torch.optim.Optimizer, it: int, cfg: OptimConfig,
                      max_iters: int) -> float:
    """Set every group's lr for iteration `it`; returns the base (lr_mult 1) lr."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(it, cfg.lr * group["lr_mult"], cfg, max_iters)
    return learning_rate(it, cfg.lr, cfg, max_iters)


# =================================================================================================
# 4. Data order: every sample's randomness is a pure function of (seed, epoch, index)
# =================================================================================================
# The DistributedSampler shuffles with a generator seeded by (seed + epoch); each process takes
# its share of the permutation. `EpochSampler` yields (index, epoch) pairs and can start inside
# an epoch, so a resumed run continues the permutation where the checkpoint left it. The dataset,
# made with `seed`, gives sample `ds[(index, epoch)]` the augmentation generator
# `np.random.default_rng((seed, epoch, index))` (every random draw of segcompare.data.transforms
# comes from it): the same sample gets the same crop whichever worker process makes it, so a run
# does not depend on num_workers either.
class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that yields (index, epoch) from position `start`."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0  # samples of this process's share to skip

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


# =================================================================================================
# 5. Validation, the training checkpoint, the run folder
# =================================================================================================
@torch.no_grad()
def validate(
    model: nn.Module, loader: Any, num_classes: int, device: torch.device, family: str
) -> dict:
    """This process's share of the val split, tested as the family's official single-scale test
    (SegFormer: sliding windows; HRNet: the whole image), counts summed over processes.

    Returns {"mIoU": float, "IoU": [per class, None where absent]}. Inference and metrics are
    segcompare.evaluate's, the one place both are computed, so the figure equals `segcompare
    eval` on the same weights.
    """
    from segcompare.evaluate import InferenceSettings, inference
    from segcompare.metrics import ConfusionMatrix

    was_training = model.training
    model.eval()
    settings = InferenceSettings(family=family)
    cm = ConfusionMatrix(num_classes)
    for sample in loader:
        image, label = sample["image"].to(device), sample["label"].to(device)
        scores = inference(model, image, settings, out_hw=tuple(label.shape[-2:]))  # N×C×H×W
        cm.update(scores.argmax(1), label)
    cm.all_reduce()
    model.train(was_training)
    return {"mIoU": cm.miou(), "IoU": [None if math.isnan(v) else v for v in cm.iou().tolist()]}


def _rng_states() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # the Mersenne state as a tensor, so the checkpoint loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(out: Path) -> List[Tuple[int, Path]]:
    """(iteration, path) of OUT/checkpoints/iter_N.pt, oldest first."""
    found = []
    for path in (out / "checkpoints").glob("iter_*.pt"):
        m = re.fullmatch(r"iter_(\d+)\.pt", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process, which checkpoints and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current iteration and exits.

    A second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: checkpointing after this iteration", self.signal)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# =================================================================================================
# 6. The run
# =================================================================================================
def train(cfg: Config, out_dir: Union[str, os.PathLike], resume: bool = False) -> dict:
    """Train as `cfg` says into the run folder `out_dir` (see the module docstring).

    Runs as one process, or as one of WORLD_SIZE processes started by torchrun. Returns the
    summary (also the last line of log.jsonl): iterations, minutes, final loss, val mIoU.
    """
    import torch.distributed as dist
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from segcompare.data.cityscapes import CityscapesDataset
    from segcompare.data.transforms import build_test_transform, build_train_transform
    from segcompare.models import build_model, model_family, model_settings

    t_start = time.time()
    out = Path(out_dir)
    tc, oc = cfg.train, cfg.optim

    # -- processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK ----------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    ddp, master = world > 1, rank == 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads_before = torch.get_num_threads()  # restored at the end: train() is also a library call
    if device.type == "cpu" and tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.batch_size % world:
        raise SegcompareError(
            f"train.batch_size {tc.batch_size} (the total batch) does not split over {world} "
            "processes; choose a multiple"
        )
    per_process = tc.batch_size // world

    # -- everything the user gave is checked before any work starts --------------------------------
    try:
        model_settings(cfg.model.name, **cfg.model.overrides)
    except ValueError as err:
        raise SegcompareError(f"model: {err}") from None
    family = model_family(cfg.model.name)
    train_transform = build_train_transform(
        cfg.data.pipeline,
        crop_size=cfg.data.crop_size,
        scale_range=cfg.data.scale_range,
        base_size=cfg.data.base_size,
    )
    train_set = CityscapesDataset(
        cfg.data.root, split=cfg.data.train_split, transform=train_transform, seed=tc.seed
    )
    if len(train_set) < tc.batch_size:
        raise SegcompareError(
            f"{cfg.data.root}: the {cfg.data.train_split!r} split has {len(train_set)} images, "
            f"fewer than the total batch train.batch_size={tc.batch_size}"
        )
    val_set = None
    if tc.eval_every > 0:
        val_set = CityscapesDataset(
            cfg.data.root, split=cfg.data.val_split, transform=build_test_transform()
        )
    checkpoint = None
    found = _checkpoints(out)
    if found and not resume:
        raise SegcompareError(
            f"{out} already holds a run ({found[-1][1].name}); pass --resume to continue it "
            "or choose another --out"
        )
    if found and resume:
        checkpoint = torch.load(found[-1][1], map_location="cpu", weights_only=True)
        changed = _changed_keys(checkpoint["config"], config_to_dict(cfg))
        if changed:
            raise SegcompareError(
                f"--resume: the config differs from the run's in {', '.join(changed)}; "
                f"resume with {out / 'config.yaml'}"
            )
    torch.manual_seed(tc.seed)  # the same initial weights on every process
    model = build_model(
        cfg.model.name,
        num_classes=cfg.model.num_classes,
        weights=cfg.model.pretrained if checkpoint is None else None,
        **cfg.model.overrides,
    )

    # -- distributed setup: gloo on the CPU, nccl on GPUs ------------------------------------------
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # depthwise-conv gradients come back channels-last on the CPU; DDP copies them into its
        # buckets and warns every step about a cost that is negligible here
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    if tc.deterministic:
        # cuBLAS needs this for deterministic matmuls; CUDA's bilinear-upsampling backward has no
        # deterministic kernel, hence warn_only (the CPU is deterministic without any of this)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    notes = [
        f"total batch {tc.batch_size} = {world} process(es) x {per_process} image(s); "
        f"lr {oc.lr:g} is for the total batch and is not rescaled"
    ]
    if ddp and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # both papers train with SyncBN
    elif ddp:
        notes.append("SyncBatchNorm needs GPUs: on the CPU each process normalises with its own "
                     "batch statistics")
    model.to(device)
    raw_model = model  # what is saved and validated
    optimizer = build_optimizer(raw_model, oc)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if tc.amp == "bf16" else torch.float16)
        if tc.amp != "off" else nullcontext()
    )
    class_weights = (
        torch.tensor(tc.class_weights, dtype=torch.float32, device=device)
        if tc.class_weights is not None else None
    )

    def criterion(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if tc.loss == "ohem":
            return ohem_cross_entropy(logits, label, tc.ohem_threshold, tc.ohem_min_kept,
                                      cfg.data.ignore_index, class_weights)
        return cross_entropy(logits, label, cfg.data.ignore_index, class_weights, tc.loss_average)

    # -- resume: weights, optimizer, scaler, random generators, position in the data order ---------
    start_iter, best, records = 0, {"mIoU": None, "iter": None}, []
    # each process draws its own dropout / drop-path masks
    torch.manual_seed(int(np.random.SeedSequence([tc.seed, rank]).generate_state(1)[0]))
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_iter, best = checkpoint["iter"], checkpoint["best"]
        if checkpoint["world_size"] == world:
            _set_rng_states(checkpoint["rng"][rank])
        else:
            notes.append(
                f"resumed on {world} process(es), the checkpoint was written by "
                f"{checkpoint['world_size']}: training continues, but not bit-identically"
            )
        if (out / "log.jsonl").exists():
            records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                       if line.strip()]
            records = [r for r in records if r.get("iter", 0) <= start_iter and "summary" not in r]
        notes.append(f"resumed from {found[-1][1]} at iteration {start_iter}")
    elif resume:
        notes.append(f"--resume: no checkpoint in {out}, starting from scratch")
    if tc.compile:
        model = torch.compile(model)
    if ddp:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )

    # -- data --------------------------------------------------------------------------------------
    sampler = EpochSampler(train_set, num_replicas=world, rank=rank, seed=tc.seed)
    iters_per_epoch = sampler.num_samples // per_process
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=per_process,
        sampler=sampler,
        num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        # the (index, epoch) keys carry the epoch, so workers can live across epochs
        persistent_workers=tc.num_workers > 0,
        worker_init_fn=_ignore_sigint,
        generator=torch.Generator(),  # keeps the loader off the global torch generator
    )

    def batches(it: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Training batches from iteration `it` on, epoch after epoch."""
        while True:
            epoch, step = divmod(it, iters_per_epoch)
            sampler.set_epoch(epoch)
            sampler.start = step * per_process
            for sample in loader:
                yield sample["image"], sample["label"]
                it += 1

    val_loader = None
    if val_set is not None:
        val_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(val_set, range(rank, len(val_set), world)),
            batch_size=1,
            num_workers=min(tc.num_workers, 2),
            worker_init_fn=_ignore_sigint,
            generator=torch.Generator(),
        )

    # -- the run folder (rank 0 writes) ------------------------------------------------------------
    writer = None
    if master:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        except ImportError:
            writer = None
        records.append({
            "event": "start", "iter": start_iter, "model": cfg.model.name, "family": family,
            "world_size": world, "batch_per_process": per_process, "device": str(device),
            "iters_per_epoch": iters_per_epoch, "notes": notes,
        })
    if master:
        for note in notes:
            log.info(note)

    def sync_buffers() -> None:
        """BN running statistics from rank 0 on every process. With SyncBatchNorm they agree
        anyway; on the CPU, DDP broadcasts them only at the start of each forward pass, so after
        a step each process holds its own batch's update. Validation and checkpoints use one."""
        if ddp:
            for buffer in raw_model.buffers():
                dist.broadcast(buffer, src=0)

    def write_log() -> None:
        if master:
            atomic_write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def save_checkpoint(done: int) -> Path:
        sync_buffers()
        rng = [None] * world
        if ddp:
            dist.all_gather_object(rng, _rng_states())
        else:
            rng = [_rng_states()]
        path = out / "checkpoints" / f"iter_{done}.pt"
        if master:
            state = {
                "iter": done,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "schedule": {"name": oc.schedule, "iter": done, "max_iters": tc.max_iters},
                "rng": rng,
                "data": {"epoch": done // iters_per_epoch, "step": done % iters_per_epoch,
                         "samples_seen": done * tc.batch_size},
                "world_size": world,
                "best": best,
                "config": config_to_dict(cfg),
            }
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            for _, old in _checkpoints(out)[: -tc.keep_checkpoints]:
                old.unlink()
            write_log()
        if ddp:
            dist.barrier()
        return path

    def save_weights_file(name: str) -> None:
        """Our safetensors (loadable by build_model(weights=...)); iteration and mIoU are in
        log.jsonl."""
        if master:
            from segcompare.models.checkpoint import save_weights

            save_weights(raw_model, out / name)

    def run_validation(done: int) -> float:
        t0 = time.time()
        sync_buffers()
        result = validate(raw_model, val_loader, cfg.model.num_classes, device, family)
        miou = result["mIoU"]
        if master:
            records.append({"iter": done, "val_mIoU": miou, "val_IoU": result["IoU"],
                            "val_time": time.time() - t0})
            log.info("iter %d: val mIoU %.4f", done, miou)
            if writer:
                writer.add_scalar("val/mIoU", miou, done)
        if best["mIoU"] is None or miou > best["mIoU"]:
            best.update({"mIoU": miou, "iter": done})
            save_weights_file("best.safetensors")
        return miou

    # -- the loop ----------------------------------------------------------------------------------
    model.train()
    data = batches(start_iter)
    window = {"loss": 0.0, "n": 0, "data_time": 0.0, "t0": time.time()}
    last_loss = next((r["loss"] for r in reversed(records) if "loss" in r), math.nan)
    last_miou = next((r["val_mIoU"] for r in reversed(records) if "val_IoU" in r), None)
    stop, done = None, start_iter
    bar = tqdm(total=tc.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True,
               desc=cfg.model.name, unit="it")
    with _StopRequest() as stop_request, logging_redirect_tqdm():
        for it in range(start_iter, tc.max_iters):
            t0 = time.time()
            image, label = next(data)
            image = image.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True).long()
            window["data_time"] += time.time() - t0
            lr = set_learning_rate(optimizer, it, oc, tc.max_iters)

            with autocast:
                logits = model(image)  # N×C×H/4×W/4
            loss = criterion(logits, label)
            # one collective per step: the mean loss, and whether any process was asked to stop
            stats = torch.tensor([loss.item(), float(stop_request.signal is not None)],
                                 dtype=torch.float64, device=device)
            if ddp:
                dist.all_reduce(stats)
            last_loss = stats[0].item() / world
            if not math.isfinite(last_loss):
                write_log()
                kept = _checkpoints(out)
                raise SegcompareError(
                    f"non-finite loss ({last_loss}) at iteration {it + 1}; stopped. The last good "
                    + (f"checkpoint is {kept[-1][1]}" if kept else "state was never saved")
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done = it + 1

            window["loss"] += last_loss
            window["n"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if done % tc.log_every == 0 or done == tc.max_iters:
                n = window["n"]
                record = {
                    "iter": done, "epoch": it // iters_per_epoch,
                    "loss": window["loss"] / n, "lr": lr,
                    "time_per_iter": (time.time() - window["t0"]) / n,
                    "data_time": window["data_time"] / n, "memory_mb": _memory_mb(device),
                }
                if master:
                    records.append(record)
                    write_log()
                    if writer:
                        for k in ("loss", "lr", "time_per_iter", "data_time"):
                            writer.add_scalar(f"train/{k}", record[k], done)
                window = {"loss": 0.0, "n": 0, "data_time": 0.0, "t0": time.time()}
            if val_loader is not None and (done % tc.eval_every == 0 or done == tc.max_iters):
                last_miou = run_validation(done)
                write_log()
            if stats[1].item() > 0:
                stop = stop_request.signal or "a signal to another process"
            if done % tc.checkpoint_every == 0 or done == tc.max_iters or stop:
                save_checkpoint(done)
            if stop:
                break
    bar.close()

    minutes = (time.time() - t_start) / 60
    if stop is None:
        save_weights_file("final.safetensors")
    summary = {
        "summary": "stopped" if stop else "finished", "iter": done, "max_iters": tc.max_iters,
        "minutes": minutes, "final_loss": last_loss, "val_mIoU": last_miou,
        "best_mIoU": best["mIoU"], "best_iter": best["iter"], "out": str(out),
        "model": cfg.model.name, "stopped_by": stop,
    }
    if master:
        records.append(summary)
        write_log()
        if writer:
            writer.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    torch.set_num_threads(threads_before)
    return summary


def _changed_keys(old: dict, new: dict) -> List[str]:
    """Keys (section.key) whose values differ and that change the weights when they do."""
    old_flat, new_flat = _flat(old), _flat(new)
    keys = sorted(set(old_flat) | set(new_flat))
    return [k for k in keys if old_flat.get(k) != new_flat.get(k) and k not in _RESUME_MAY_CHANGE]


def summary_line(summary: dict) -> str:
    """The line the CLI prints at the end of a run."""
    what = "trained" if summary["summary"] == "finished" else (
        f"stopped by {summary['stopped_by']} (continue with --resume):"
    )
    line = (
        f"{what} {summary['model']} {summary['iter']}/{summary['max_iters']} iterations in "
        f"{summary['minutes']:.1f} min, final loss {summary['final_loss']:.4f}"
    )
    if summary["val_mIoU"] is not None:
        line += f", val mIoU {summary['val_mIoU']:.4f}"
    if summary["best_mIoU"] is not None:
        line += f" (best {summary['best_mIoU']:.4f} at iteration {summary['best_iter']})"
    return line + f"; run folder {summary['out']}"
