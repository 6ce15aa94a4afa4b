"""Checkpoint files: read every supported layout safely and load it strictly (writing our own
files is `save.py`).

    load_weights(model, "segformer.b0.1024x1024.city.160k.pth")  # any format of FORMATS
    build_model(weights="model.safetensors")                      # rebuilt from the file alone

Reading never runs code from a file: `.pth/.pt/.bin` go through `torch.load(weights_only=True)`
(tensors, dicts, lists, numbers, strings), safetensors through safetensors; which of the two a
file is comes from its first bytes. Its layout comes from its keys (`detect_format`), never from
its name; each foreign layout is one pure function of `convert.py`. Loading is strict: a key
missing, left over or of another shape is an error that names the format, the keys with both
shapes and the variant the file looks like. Known-unused keys (mmseg's `conv_seg`, ImageNet
heads, HRNet's loss weights) are dropped by name in `convert.py`; the two tolerated differences
are a backbone-only file (the head stays initialised) and another number of classes (the
classifier stays initialised); each is logged in one line. Which family a model is, and where
its head and classifier are, come from `variants.py`; a hub id (`hf://owner/name`, never a
bare name) is fetched by `hub.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from segcompare.data.labels import ADE20K, CITYSCAPES, ClassTable, generic_table
from segcompare.models import convert, hub
from segcompare.models.hub import HF_BIN_NAME, HF_CONFIG_NAME, HF_INDEX_NAME, WEIGHTS_NAME
from segcompare.models.variants import (
    FAMILIES,
    Family,
    create,
    family_of,
    list_models,
)
from segcompare.utils import PathLike, SegcompareError, first_line
from segcompare.values import shown

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# `metadata["format"]` of the safetensors files `save_weights` writes.
OUR_FORMAT_TAG = "segcompare"
# The weight files of a HuggingFace model directory, in the order they are looked for.
_HF_WEIGHT_FILES = (WEIGHTS_NAME, HF_INDEX_NAME, HF_BIN_NAME)


# --- formats --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Format:
    """A checkpoint layout: what messages call it, and its conversion to our names."""

    name: str
    to_official: Callable[[StateDict], StateDict]
    # A raw-key prefix of a head that our (the official) architecture cannot hold, and why;
    # such a file loads only with backbone_only=True.
    foreign_head: str = ""
    foreign_head_why: str = ""


def _same(state_dict: StateDict) -> StateDict:
    return dict(state_dict)


FORMATS: dict[str, Format] = {
    "segcompare": Format("segcompare safetensors", _same),
    "segformer": Format("NVlabs SegFormer", convert.segformer_release_to_official),
    "mit": Format("NVlabs MiT ImageNet backbone", convert.mit_to_official),
    "hf-segformer": Format("HuggingFace SegFormer", convert.hf_segformer_to_official),
    "mmseg-segformer": Format(
        "mmsegmentation SegFormer",
        convert.mmseg_segformer_to_official,
        foreign_head="decode_head.",
        foreign_head_why=(
            "its decode head is mmseg's SegformerHead (a 1×1 conv + BatchNorm + ReLU per stage, "
            "stages concatenated c1..c4), which the official all-MLP head (one Linear per stage, "
            "c4..c1) cannot hold"
        ),
    ),
    "hrnet": Format("official HRNet", convert.hrnet_release_to_official),
    "hrnet-imagenet": Format("official HRNet ImageNet", convert.hrnet_imagenet_to_official),
    "mmseg-hrnet": Format("mmsegmentation HRNet + FCN head", convert.mmseg_hrnet_to_official),
}


def detect_format(keys: Any, metadata: Optional[Mapping[str, str]] = None) -> Format:
    """The format of a state dict, from its keys (and our metadata tag); SegcompareError if none."""
    keys = list(keys)

    def has(pattern: str) -> bool:
        regex = re.compile(pattern)
        return any(regex.match(k) for k in keys)

    if metadata and metadata.get("format") == OUR_FORMAT_TAG:
        return FORMATS["segcompare"]
    if has(r"(segformer\.)?(encoder\.(patch_embeddings|block)\.|stages\.\d+\.)"):
        return FORMATS["hf-segformer"]
    if has(r"(backbone\.)?layers\.\d+\.0\.projection\."):
        return FORMATS["mmseg-segformer"]
    if has(r"backbone\.patch_embed1\."):
        return FORMATS["segformer"]
    if has(r"patch_embed1\."):
        return FORMATS["mit"]
    if has(r"(model\.|backbone\.)?stage2\.0\.branches\."):
        if has(r"(model\.)?(ocr_distri_head|ocr_gather_head|aux_head|cls_head|conv3x3_ocr)\."):
            raise SegcompareError(
                "an HRNet + OCR checkpoint: the OCR head is not supported, only HRNetV2 with its "
                "plain last_layer head"
            )
        if has(r"(backbone\.)?norm1\."):
            return FORMATS["mmseg-hrnet"]
        if has(r"(incre_modules|downsamp_modules|final_layer|classifier)\."):
            return FORMATS["hrnet-imagenet"]
        return FORMATS["hrnet"]
    shown = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
    raise SegcompareError(
        f"not a SegFormer or HRNet checkpoint of any known layout ({len(keys)} keys: {shown}); "
        "see the Checkpoints table of the README"
    )


# --- reading --------------------------------------------------------------------------------
@dataclasses.dataclass
class Checkpoint:
    """The tensors of a checkpoint as stored (not yet converted) and what came with them."""

    state_dict: StateDict
    metadata: dict[str, str]  # ours: model, num_classes, ...; a HuggingFace dir: hf_config
    source: str  # for messages: the path, hub id or "state dict"


def read_checkpoint(src: Union[PathLike, Mapping[str, torch.Tensor], Checkpoint]) -> Checkpoint:
    """Read a file, a HuggingFace directory, a hub id or an in-memory state dict.

    Raises SegcompareError (one line) for a missing, empty, truncated, corrupt, unknown or
    unsafe file.
    """
    if isinstance(src, Checkpoint):
        return src
    if isinstance(src, Mapping):
        return Checkpoint(_as_state_dict(dict(src), "state dict"), {}, "state dict")
    repo_id = hub.hub_id(str(src))  # only an explicit hf://owner/name goes to the hub
    if repo_id is not None:
        return _read_hf_dir(hub.download(repo_id), source=str(src))
    path = Path(src)
    if path.is_dir():
        return _read_hf_dir(path)
    if path.is_file():
        state, metadata = _read_file(path)
        return Checkpoint(state, metadata, str(path))
    raise SegcompareError(
        f"{src}: no such file or directory (a HuggingFace Hub model is named "
        f"{hub.HUB_PREFIX}owner/name)"
    )


def _read_file(path: Path) -> tuple[StateDict, dict[str, str]]:
    size = path.stat().st_size
    if size == 0:
        raise SegcompareError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header (its first byte
    # may be 0x80 too, so this test goes first)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return _read_safetensors(path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip (torch >= 1.6), pickle
        return _read_torch(path)
    raise SegcompareError(
        f"{path}: not a checkpoint: neither a PyTorch file (.pth/.pt/.bin) nor safetensors"
    )


def _read_torch(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        # a file object, not the name: torch.load hands a name ending in .safetensors to
        # safetensors, whatever the bytes are (this function reads PyTorch files by their bytes)
        with warnings.catch_warnings(), open(path, "rb") as f:
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says it
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise SegcompareError(f"{path}: corrupt or truncated ({first_line(err)})") from None
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        needs = f" (it refers to {needs.group(1)})" if needs else ""
        raise SegcompareError(
            f"{path}: refused: unpickling it needs more than tensors, dicts, lists, numbers and "
            f"strings{needs}, so it may contain code; it was not loaded"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, struct.error, zipfile.BadZipFile) as err:  # fmt: skip
        raise SegcompareError(f"{path}: corrupt or truncated ({first_line(err)})") from None
    return _as_state_dict(obj, str(path)), _mmseg_class_metadata(obj, str(path))


def _mmseg_class_metadata(obj: Any, source: str) -> dict[str, str]:
    """The class names and palette an mmseg / mmcv checkpoint carries, as our metadata keys
    `class_names` and `palette` (JSON): mmseg 0.x (and NVlabs SegFormer, HRNet's mmseg ports)
    write `meta["CLASSES"]` and `meta["PALETTE"]` (tools/train.py, checkpoint_config.meta);
    mmseg 1.x (mmengine) writes `meta["dataset_meta"]["classes" / "palette"]`. {} when absent."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return {}
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    found: dict[str, str] = {}
    wanted = (("class_names", ("CLASSES", "classes")), ("palette", ("PALETTE", "palette")))
    for ours, keys in wanted:
        value = next(
            (d[k] for d in (meta, dataset_meta) for k in keys if d.get(k) is not None), None
        )
        if value is None:
            continue
        if ours == "class_names":
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(c, (list, tuple))
                and len(c) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in value
            )
        if not ok or not value:
            raise SegcompareError(
                f"{source}: its meta {keys[0]} is not a list of "
                f"{'class names' if ours == 'class_names' else '[r, g, b] colours'}: "
                f"{str(value)[:120]}"
            )
        found[ours] = json.dumps([list(v) if ours == "palette" else v for v in value])
    return found


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SegcompareError(f"{path}: corrupt or truncated ({first_line(err)})") from None
    return _as_state_dict(state, str(path)), metadata


def _as_state_dict(obj: Any, source: str) -> StateDict:
    """The state dict inside a loaded object: itself, or under `state_dict` / `model` / `module`
    (mmseg/mmcv, timm-style and DataParallel wrappers); a `module.` prefix on every key goes."""
    if not isinstance(obj, dict):
        raise SegcompareError(f"{source}: holds a {type(obj).__name__}, not a state dict")

    def is_state(d: Any) -> bool:
        return (
            isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())
        )

    state = obj if is_state(obj) else None
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if state is None and is_state(obj.get(key)):
            state = obj[key]
    if state is None:
        shown = ", ".join(f"{k}: {type(v).__name__}" for k, v in list(obj.items())[:6])
        raise SegcompareError(f"{source}: holds no state dict of tensors ({shown or 'empty'})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    _check_tensors(state, source)
    return dict(state)


# What weights are stored as; BatchNorm's `num_batches_tracked` counter is the one integer.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COUNTER_SUFFIX = "num_batches_tracked"


def _check_tensors(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose weights are not floating point, or hold a NaN or an infinite
    value: either gives a wrong answer with no error of its own (a safetensors header that
    calls float32 bytes int32 loads as integers up to 1e9; NaN weights predict one class)."""
    for key, value in state.items():
        if key.endswith(_COUNTER_SUFFIX):  # any real type: a state dict cast whole casts it too
            count = value.double() if value.numel() == 1 and not value.is_complex() else None
            if count is None or not (count.isfinite() and count >= 0 and count == count.round()):
                raise SegcompareError(
                    f"{source}: tensor {key} {list(value.shape)} ({_dtype_name(value)}) is not "
                    "one whole number, as a BatchNorm counter is: the file is corrupt"
                )
            continue
        if value.dtype not in WEIGHT_DTYPES:
            raise SegcompareError(
                f"{source}: tensor {key} {list(value.shape)} is {_dtype_name(value)}; weights "
                "are floating point (float32, float16, bfloat16 or float64): the file is "
                "corrupt, or its header misstates the type"
            )
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            raise SegcompareError(
                f"{source}: tensor {key} {list(value.shape)} holds {int(bad.sum())} non-finite "
                "value(s) (NaN or inf); these weights cannot give a meaningful prediction"
            )


def _dtype_name(value: torch.Tensor) -> str:
    return str(value.dtype).replace("torch.", "")


def _read_hf_dir(path: Path, source: Optional[str] = None) -> Checkpoint:
    """A HuggingFace model directory: config.json + model.safetensors (or sharded, or a
    pytorch_model.bin); a directory holding just our model.safetensors works too."""
    source = source or str(path)
    metadata: dict[str, str] = {}
    if (path / HF_CONFIG_NAME).is_file():
        metadata["hf_config"] = (path / HF_CONFIG_NAME).read_text()
    found = [name for name in _HF_WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise SegcompareError(
            f"{source}: a directory without {' or '.join(_HF_WEIGHT_FILES)}: not a model directory"
        )
    if found[0].endswith(".index.json"):  # sharded: {"weight_map": {key: file}}
        try:
            shards = sorted(set(json.loads((path / found[0]).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SegcompareError(f"{path / found[0]}: not a shard index ({err})") from None
        for shard in shards:
            if not _plain_file_name(shard):
                raise SegcompareError(
                    f"{path / found[0]}: weight_map names {shard!r}; a shard must be a plain file "
                    "name inside the model directory"
                )
        state: StateDict = {}
        for shard in shards:
            state.update(_read_file(path / shard)[0])
    else:
        state, file_metadata = _read_file(path / found[0])
        metadata.update(file_metadata)
    if "hf_config" in metadata:
        check_hf_config(metadata["hf_config"], f"{source}/{HF_CONFIG_NAME}")
    elif metadata.get("format") != OUR_FORMAT_TAG:
        raise SegcompareError(
            f"{source}: a HuggingFace model directory without {HF_CONFIG_NAME}: which model the "
            f"weights are for cannot be checked; put back the {HF_CONFIG_NAME} that came with them"
        )
    return Checkpoint(state, metadata, source)


# --- a HuggingFace directory's config.json -------------------------------------------------------
# transformers' SegformerConfig keys -> our SegFormer settings (save.hf_config writes them too);
# a key that config.json leaves out has transformers' default, which is segformer-b0's value.
HF_SETTINGS = {
    "depths": "depths",
    "hidden_sizes": "embed_dims",
    "num_attention_heads": "num_heads",
    "sr_ratios": "sr_ratios",
    "mlp_ratios": "mlp_ratios",
    "patch_sizes": "patch_sizes",
    "strides": "strides",
    "decoder_hidden_size": "decoder_dim",
}
# What is true of every SegFormer we build (the official mit_b*: GELU, LayerNorm eps 1e-6 in the
# blocks, the last stage reshaped to a map), with transformers' defaults for a missing key.
HF_FIXED = {
    "model_type": "segformer",
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "reshape_last_stage": True,
}
HF_ARCHITECTURE_PREFIX = "Segformer"  # SegformerForSemanticSegmentation, ...ForImageClassification


def check_hf_config(text: str, source: str, settings: Optional[Mapping[str, Any]] = None) -> None:
    """SegcompareError (one line, naming the key) unless a config.json describes a SegFormer our
    model computes as transformers does; with `settings` (a built model's), also that its
    per-stage settings are these. Its labels are the class table's business."""
    try:
        config = json.loads(text)
    except ValueError as err:
        raise SegcompareError(f"{source}: not valid JSON ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise SegcompareError(f"{source}: holds a {type(config).__name__}, not a mapping")
    for arch in config.get("architectures") or []:
        if not (isinstance(arch, str) and arch.startswith(HF_ARCHITECTURE_PREFIX)):
            raise SegcompareError(
                f"{source}: architectures names {shown(arch)}; segcompare reads SegFormer "
                "(SegformerForSemanticSegmentation) and its own files only"
            )
    for key, ours in HF_FIXED.items():
        if config.get(key, ours) != ours:
            raise SegcompareError(
                f"{source}: {key} is {shown(config[key])}; the SegFormer segcompare builds has "
                f"{shown(ours)}, so these weights would compute something else"
            )
    if settings is None:
        return
    b0 = FAMILIES["segformer"].variants["segformer-b0"]
    for key, name in HF_SETTINGS.items():
        ours = settings[name]
        theirs = config.get(key, b0[name])
        if _plain(theirs) != _plain(ours):
            raise SegcompareError(
                f"{source}: {key} is {shown(theirs)} but the model has {name}={_plain(ours)}; "
                "the weights are for another model"
            )
    blocks = config.get("num_encoder_blocks", len(settings["depths"]))
    if blocks != len(settings["depths"]):
        raise SegcompareError(
            f"{source}: num_encoder_blocks is {shown(blocks)} but the model has "
            f"{len(settings['depths'])} stages"
        )


def _plain(value: Any) -> Any:
    """Lists and tuples alike, for comparing a config's values with a model's settings."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _plain_file_name(name: Any) -> bool:
    """A file name with no directory part: nothing a shard index can use to leave its folder."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


# --- loading --------------------------------------------------------------------------------
def model_family(model: nn.Module) -> Family:
    """The family of a model whose state dict is in our (official) names: a SegFormer or an
    HRNet itself, not a rewrite of one (`prepare_for_inference`) that only carries its name."""
    family = FAMILIES[family_of(model)]
    if not isinstance(model, family.model_class):
        raise TypeError(f"not a segcompare model: {type(model).__name__}")
    return family


def _variant_of(model: nn.Module) -> str:
    return getattr(model, "variant", None) or type(model).__name__


def to_official(checkpoint: Checkpoint, backbone_only: bool = False) -> tuple[Format, StateDict]:
    """(format, state dict in our names) of a checkpoint; SegcompareError for an unknown layout."""
    try:
        fmt = detect_format(checkpoint.state_dict, checkpoint.metadata)
    except SegcompareError as err:
        raise SegcompareError(f"{checkpoint.source}: {err}") from None
    if fmt.foreign_head and not backbone_only:
        if any(k.startswith(fmt.foreign_head) for k in checkpoint.state_dict):
            raise SegcompareError(
                f"{checkpoint.source}: {fmt.name} checkpoint: {fmt.foreign_head_why}; load only "
                "its backbone with load_weights(model, src, backbone_only=True) or "
                "`segcompare convert SRC DST --backbone-only`"
            )
    try:
        state = fmt.to_official(checkpoint.state_dict)
    except (ValueError, KeyError, RuntimeError) as err:
        raise SegcompareError(f"{checkpoint.source}: {fmt.name} checkpoint: {err}") from None
    return fmt, state


def load_weights(
    model: nn.Module,
    src: Union[PathLike, Mapping[str, torch.Tensor], Checkpoint],
    backbone_only: bool = False,
    num_classes: Optional[int] = None,
) -> Format:
    """Load a checkpoint of any supported format into `model` (strictly); return its format.

    `src`: a file, a HuggingFace directory, a hub id `hf://owner/name`, a state dict or a
    `Checkpoint`.
    `backbone_only`: load the backbone and leave the head initialised.
    `num_classes`: the number of classes the caller asked for (the model's). A file whose
    classifier has another number is an error unless it was asked for; then everything but the
    classifier loads, which stays initialised (said in one log line).
    """
    checkpoint = read_checkpoint(src)
    fmt, state = to_official(checkpoint, backbone_only)
    family = model_family(model)
    if "hf_config" in checkpoint.metadata and family.name == "segformer":
        check_hf_config(
            checkpoint.metadata["hf_config"], f"{checkpoint.source}/{HF_CONFIG_NAME}",
            model.settings,
        )  # fmt: skip
    head, classifier = family.head_prefix, family.classifier_prefix
    if backbone_only:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    expected = model.state_dict()
    with_head = any(k.startswith(head) for k in state)
    differences = _differences(state, expected, head)
    missing, unexpected, reshaped = differences
    other_classes = bool(reshaped) and all(
        k.startswith(classifier) and state[k].shape[1:] == expected[k].shape[1:] for k in reshaped
    )
    if missing or unexpected or (reshaped and not other_classes):
        raise SegcompareError(
            _mismatch_message(model, checkpoint, fmt, state, expected, differences)
        )
    if other_classes and num_classes != expected[reshaped[0]].shape[0]:
        raise SegcompareError(
            f"{checkpoint.source}: its classifier has {state[reshaped[0]].shape[0]} classes, the "
            f"model {expected[reshaped[0]].shape[0]}; to train a new classifier on these weights "
            f"ask for that number (--num-classes K / num_classes=K)"
        )
    if other_classes:
        file_classes = state[reshaped[0]].shape[0]
        # as transformers' ignore_mismatched_sizes: each tensor that is initialised anew, once
        tensors = ", ".join(
            f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
            for k in expected
            if k in reshaped
        )
        state = {k: v for k, v in state.items() if not k.startswith(classifier)}
        log.warning(
            "%s has %d classes, the model %d: the classifier stays initialised: %s",
            checkpoint.source,
            file_classes,
            expected[reshaped[0]].shape[0],
            tensors,
        )
    model.load_state_dict(state, strict=False)  # every difference was checked above
    if not with_head:
        log.warning(
            "%s (%s): loaded the backbone only; the head (%s*) stays initialised",
            checkpoint.source,
            fmt.name,
            head,
        )
    return fmt


def _differences(
    state: StateDict, expected: Mapping[str, torch.Tensor], head: str
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, of another shape) keys of `state` against the model's `expected`.

    Not missing: `num_batches_tracked` (a counter that old checkpoints lack) and, when `state`
    has no head at all, the head (a backbone-only file).
    """
    with_head = any(k.startswith(head) for k in state)
    missing = [
        k
        for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")
        and (with_head or not k.startswith(head))
    ]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    return missing, unexpected, reshaped


def _mismatch_message(
    model: nn.Module,
    checkpoint: Checkpoint,
    fmt: Format,
    state: StateDict,
    expected: Mapping[str, torch.Tensor],
    differences: tuple[list[str], list[str], list[str]],
) -> str:
    """One line: what does not fit, the first few keys with both shapes, the likely variant."""
    missing, unexpected, reshaped = differences

    def shape(t: torch.Tensor) -> list[int]:
        return list(t.shape)

    examples = [f"{k}: file {shape(state[k])}, model {shape(expected[k])}" for k in reshaped[:3]]
    examples += [f"{k} {shape(expected[k])} missing from the file" for k in missing[:3]]
    examples += [f"{k} {shape(state[k])} not in the model" for k in unexpected[:3]]
    counts = ", ".join(
        f"{n} {what}"
        for n, what in (
            (len(reshaped), "of another shape"),
            (len(missing), "missing"),
            (len(unexpected), "unexpected"),
        )
        if n
    )
    asked = _variant_of(model)
    guess = guess_variant(state)
    if guess and guess != asked:
        cause = f"this looks like {guess} weights; you asked for {asked}"
    elif guess:
        cause = f"this looks like {guess} weights, but the model was built with other settings"
    else:
        cause = f"it matches no known variant (closest: {closest_variant(state)})"
    return (
        f"{checkpoint.source}: {fmt.name} weights do not fit {asked} ({counts} keys): "
        f"{'; '.join(examples)}; {cause}"
    )


@functools.cache
def _signature(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of variant `name` (19 classes, default settings), built on the meta device."""
    with torch.device("meta"):
        model = create(name)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fits(name: str, state: StateDict) -> tuple[int, int]:
    """(matching, compared): the keys of `state` that variant `name` has with that shape, and
    the keys the variant needs plus those of `state` it lacks. The classifier may have any
    number of classes; without head keys in `state` the variant's head is not needed."""
    family = FAMILIES[family_of(name)]
    head, classifier = family.head_prefix, family.classifier_prefix
    sig = _signature(name)
    with_head = any(k.startswith(head) for k in state)
    good = 0
    for key, value in state.items():
        want = sig.get(key)
        shape = tuple(value.shape)
        if want == shape or (want and key.startswith(classifier) and want[1:] == shape[1:]):
            good += 1
    needed = [
        k
        for k in sig
        if not k.endswith("num_batches_tracked") and (with_head or not k.startswith(head))
    ]
    return good, len(needed) + sum(1 for k in state if k not in sig)


def guess_variant(state: StateDict) -> Optional[str]:
    """The variant whose keys and shapes a state dict in our names has (the head optional, the
    classifier of any size), or None."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name in list_models():
        good, total = _fits(name, state)
        if good == len(state) == total:
            return name
    return None


def closest_variant(state: StateDict) -> str:
    """The variant that shares the most keys and shapes with a state dict, with the share."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    scores = {name: _fits(name, state) for name in list_models()}
    name = max(scores, key=lambda n: scores[n][0] / max(scores[n][1], 1))
    good, total = scores[name]
    return f"{name}, {good} of {total} keys"


# --- what a checkpoint builds ---------------------------------------------------------------
@dataclasses.dataclass
class WeightsSpec:
    """What `build_model(weights=...)` needs to know about a checkpoint before building."""

    checkpoint: Checkpoint
    variant: Optional[str]  # our metadata's model name, else guessed from the keys
    num_classes: Optional[int]  # None for a backbone-only file
    settings: dict[str, Any]  # our metadata's settings, else {}
    # The file's own class names (our metadata, mmseg's meta CLASSES, HuggingFace's id2label)
    # and colours (ours, mmseg's meta PALETTE), one per class; None where the file has none.
    class_names: Optional[list[str]]
    palette: Optional[list[list[int]]] = None
    class_table: Optional[ClassTable] = None  # our metadata's data set classes (train saves it)

    @property
    def classes(self) -> Optional[ClassTable]:
        """The file's classes as one table: our metadata's, else `classes_table` of its names;
        None where nothing says what they are."""
        if self.class_table is not None and not _placeholder(self.class_table.names):
            return self.class_table
        return classes_table(self.class_names, self.palette, self.num_classes)


def _placeholder(names: Sequence[str]) -> bool:
    """The names generic_table gives a K-class model that names none: class_0, class_1, ..."""
    return len(names) != CITYSCAPES.num_classes and tuple(names) == generic_table(len(names)).names


def classes_table(
    names: Optional[Sequence[str]],
    palette: Optional[Sequence[Sequence[int]]],
    num_classes: Optional[int],
) -> Optional[ClassTable]:
    """A checkpoint's classes: Cityscapes' or ADE20K's table where its names are theirs (or where
    it names none and has 19 or 150 classes: the data sets those counts are released for), else a
    table of its own names and colours (generated where it has none); None for a file without
    names of another count, or with only the placeholder names class_0, class_1, ... ."""
    if names is None or _placeholder(names):
        return {CITYSCAPES.num_classes: CITYSCAPES, ADE20K.num_classes: ADE20K}.get(num_classes)
    for known in (CITYSCAPES, ADE20K):
        if tuple(names) == known.names and (palette is None or _same_colours(palette, known)):
            return known
    colours = palette or generic_table(len(names)).palette
    return ClassTable(
        name="folder",
        names=tuple(str(n) for n in names),
        palette=tuple((int(c[0]), int(c[1]), int(c[2])) for c in colours),
    )


def _same_colours(palette: Sequence[Sequence[int]], table: ClassTable) -> bool:
    return [list(c) for c in palette] == [list(c) for c in table.palette]


def describe_weights(
    src: Union[PathLike, Mapping[str, torch.Tensor], Checkpoint], name: Optional[str] = None
) -> WeightsSpec:
    """Read a checkpoint once and say which model it builds (see `build_model`).

    With `name` given only the number of classes is read from the file; else the variant comes
    from our metadata, or is guessed from the keys and shapes (None if nothing fits).
    """
    checkpoint = read_checkpoint(src)
    meta = checkpoint.metadata
    if meta.get("format") == OUR_FORMAT_TAG:
        try:
            same = name in (None, meta["model"])
            num_classes = int(meta["num_classes"])
            classifier = FAMILIES[family_of(meta["model"])].classifier_prefix + "weight"
            if classifier in checkpoint.state_dict:  # the tensors are the truth
                in_tensors = int(checkpoint.state_dict[classifier].shape[0])
                if in_tensors != num_classes:
                    raise SegcompareError(
                        f"{checkpoint.source}: its metadata says num_classes={num_classes} but "
                        f"its classifier {classifier} has {in_tensors}; the file is inconsistent"
                    )
            return WeightsSpec(
                checkpoint,
                name or meta["model"],
                num_classes,
                _tuples(json.loads(meta["settings"])) if same else {},
                json.loads(meta["class_names"]),
                json.loads(meta["palette"]) if "palette" in meta else None,
                _class_table(meta, num_classes, checkpoint.source),
            )
        except (KeyError, ValueError) as err:
            raise SegcompareError(
                f"{checkpoint.source}: broken segcompare metadata ({err})"
            ) from None
    _, state = _try_convert(checkpoint)
    variant = name or guess_variant(state)
    num_classes = None
    if variant is not None:
        cls_weight = state.get(FAMILIES[family_of(variant)].classifier_prefix + "weight")
        num_classes = int(cls_weight.shape[0]) if cls_weight is not None else None
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    palette = json.loads(meta["palette"]) if "palette" in meta else None
    named = (("class names (meta CLASSES)", names), ("colours (meta PALETTE)", palette))
    for what, values in named:
        if values is not None and num_classes is not None and len(values) != num_classes:
            raise SegcompareError(
                f"{checkpoint.source}: it names {len(values)} {what} but its classifier has "
                f"{num_classes} classes; the file is inconsistent"
            )
    names = names or _hf_class_names(meta, num_classes)
    return WeightsSpec(checkpoint, variant, num_classes, {}, names, palette)


def _class_table(meta: Mapping[str, str], num_classes: int, source: Any) -> Optional[ClassTable]:
    """Our metadata's class table (written by training: the data set's names, colours, label
    ids), checked against the file's class count."""
    if "class_table" not in meta:
        return None
    table = ClassTable.from_json(json.loads(meta["class_table"]))
    if table.num_classes != num_classes:
        raise SegcompareError(f"{source}: its class table has {table.num_classes} classes, its "
                              f"classifier {num_classes}; the file is inconsistent")
    return table


def _try_convert(checkpoint: Checkpoint) -> tuple[Format, StateDict]:
    """The converted state dict with its head where the format allows, else the backbone."""
    try:
        return to_official(checkpoint)
    except SegcompareError:
        return to_official(checkpoint, backbone_only=True)


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples of the VARIANTS tables."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _hf_class_names(metadata: Mapping[str, str], num_classes: Optional[int]) -> Optional[list[str]]:
    try:
        id2label = json.loads(metadata.get("hf_config", "{}")).get("id2label") or {}
        names = [id2label[str(i)] for i in range(len(id2label))]
    except (ValueError, KeyError, AttributeError):
        return None
    return names if names and len(names) == num_classes else None
