"""Writing checkpoints: our safetensors file with its metadata (`save_weights`), the HuggingFace
directory transformers loads (`export_hf`), and `convert_checkpoint`, which reads any format
`segcompare.models.checkpoint` reads and writes one of these two.

    save_weights(model, "model.safetensors")        # ours, with its metadata
    export_hf(model, "segformer-b0-hf/")            # config.json + model.safetensors + preprocessor
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from torch import nn

from segcompare import __version__
from segcompare.data.labels import NUM_CLASSES, ClassTable, generic_table
from segcompare.models import convert
from segcompare.models.checkpoint import (
    HF_FIXED,
    HF_SETTINGS,
    OUR_FORMAT_TAG,
    StateDict,
    _variant_of,
    classes_table,
    describe_weights,
    load_weights,
    model_family,
)
from segcompare.models.hub import HF_CONFIG_NAME, WEIGHTS_NAME
from segcompare.models.variants import (
    OFFICIAL_TEST_HW,
    check_num_classes,
    create,
    list_models,
)
from segcompare.utils import PathLike, SegcompareError, atomic_path

log = logging.getLogger(__name__)


def num_classes_of(model: nn.Module) -> int:
    """The number of classes a model predicts (the classifier's output channels)."""
    classifier = model_family(model).classifier_prefix
    return int(model.state_dict()[classifier + "weight"].shape[0])


def model_classes(model: nn.Module, class_names: Optional[list[str]] = None) -> ClassTable:
    """The table of a model's classes: one of `class_names` (colours: generated, or Cityscapes'
    / ADE20K's where the names are theirs), else the model's own (`model.class_table`: its file's,
    or the data set it was trained on), else Cityscapes' for 19 classes, ADE20K's for 150 and
    `generic_table(K)` for any other K."""
    num_classes = num_classes_of(model)
    if class_names is not None:
        if len(class_names) != num_classes:
            raise SegcompareError(
                f"{len(class_names)} class names for a model with {num_classes} classes"
            )
        named = classes_table([str(n) for n in class_names], None, num_classes)
        return named or generic_table(num_classes)  # placeholder names class_0, ...
    table = getattr(model, "class_table", None)
    if table is not None and table.num_classes == num_classes:
        return table
    # no names: Cityscapes' for 19 classes, ADE20K's for 150, else class_0, class_1, ...
    return classes_table(None, None, num_classes) or generic_table(num_classes)


def save_weights(
    model: nn.Module,
    path: PathLike,
    class_names: Optional[list[str]] = None,
    class_table: Optional[ClassTable] = None,
) -> Path:
    """Write `model` as our safetensors file, with the metadata that rebuilds it alone.

    Metadata (all strings): format, model (the variant name), num_classes, settings (JSON: the
    `build_model` settings), version (of segcompare), and its classes: class_table (JSON:
    `ClassTable.to_json`, names, colours, ignore index, reduce_zero_label, label ids),
    class_names and palette (JSON lists, the same names and colours for readers of the names
    alone). `class_table` (a table) or `class_names`, else `model_classes(model)`.
    """
    if not getattr(model, "variant", None) or getattr(model, "settings", None) is None:
        raise ValueError("save_weights needs a model made by build_model (variant, settings)")
    table = class_table if class_table is not None else model_classes(model, class_names)
    if table.num_classes != num_classes_of(model):
        raise SegcompareError(
            f"a table of {table.num_classes} classes for a model with {num_classes_of(model)}"
        )
    metadata = {
        "format": OUR_FORMAT_TAG,
        "model": model.variant,
        "num_classes": str(table.num_classes),
        "class_names": json.dumps(list(table.names)),
        "palette": json.dumps([list(c) for c in table.palette]),
        "class_table": json.dumps(table.to_json()),
        "settings": json.dumps(model.settings),
        "version": __version__,
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    write_safetensors(path, state, metadata)
    return path


def write_safetensors(path: PathLike, state: StateDict, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend only on the tensors and metadata, written atomically
    with the mode a plain open() gives (umask).

    safetensors keeps the metadata in a hash map, so its writer orders the keys differently in
    every process: the same weights would give different bytes and checksums. The tensors' part
    (ordered by safetensors itself, by dtype and name) is kept; the JSON header is written again
    with sorted keys, padded with spaces to a multiple of 8 bytes as the format asks.
    """
    from safetensors.torch import save

    data = save(state, metadata=metadata)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # atomic_path's file: the umask mode
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            f.write(memoryview(data)[8 + header_len :])


def hf_config(model: nn.Module, class_names: Optional[list[str]] = None) -> dict[str, Any]:
    """The config.json of transformers' SegformerForSemanticSegmentation for our SegFormer."""
    if model_family(model).name != "segformer":
        raise SegcompareError(
            f"{_variant_of(model)}: only SegFormer has a HuggingFace transformers counterpart"
        )
    s = model.settings
    if not s.get("qkv_bias", True):
        raise SegcompareError("transformers' SegFormer always has q/k/v biases; qkv_bias=False")
    names = list(model_classes(model, class_names).names)
    return {
        "architectures": ["SegformerForSemanticSegmentation"],
        **HF_FIXED,  # what checkpoint.check_hf_config reads back
        "num_encoder_blocks": len(s["depths"]),
        **{key: _listed(s[name]) for key, name in HF_SETTINGS.items()},
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout_prob": s.get("dropout", 0.1),
        "drop_path_rate": s.get("drop_path_rate", 0.1),
        "initializer_range": 0.02,
        "semantic_loss_ignore_index": 255,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# What transformers' SegformerImageProcessor.from_pretrained and pipeline() read.
HF_PREPROCESSOR_NAME = "preprocessor_config.json"
HF_FILES = (WEIGHTS_NAME, HF_CONFIG_NAME, HF_PREPROCESSOR_NAME)  # what `export_hf` writes


def hf_preprocessor_config() -> dict[str, Any]:
    """The preprocessor_config.json of transformers' SegformerImageProcessor: our test
    normalisation (data/transforms.py MEAN, STD on 0..255, i.e. /255 after its rescale), no
    resize (`segcompare predict` runs each image at its own size; `size` says the Cityscapes
    test size, for a user who turns do_resize on), labels as they are (no reduce_labels).
    pipeline("image-segmentation") then equals `predict --mode whole`; predict's default,
    sliding windows, differs where windows overlap (README, Checkpoints)."""
    from segcompare.data.transforms import MEAN, STD  # imports cv2: only when exporting

    return {
        "image_processor_type": "SegformerImageProcessor",
        "do_resize": False,
        "size": {"height": OFFICIAL_TEST_HW[0], "width": OFFICIAL_TEST_HW[1]},
        "resample": 2,  # PIL.Image.BILINEAR
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [m / 255 for m in MEAN],
        "image_std": [s / 255 for s in STD],
        "do_reduce_labels": False,
    }


def export_hf(model: nn.Module, out_dir: PathLike, class_names: Optional[list[str]] = None) -> Path:
    """Write a HuggingFace model directory: config.json + model.safetensors in hub names, which
    `SegformerForSemanticSegmentation.from_pretrained(out_dir)` loads, and
    preprocessor_config.json, which `pipeline("image-segmentation", model=out_dir)` needs.
    Each file is atomic."""
    config = hf_config(model, class_names)
    official = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    state = {k: v.contiguous() for k, v in convert.official_segformer_to_hf(official).items()}
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SegcompareError(f"{out_dir}: exists and is not a directory")
    write_safetensors(out_dir / WEIGHTS_NAME, state, {"format": "pt"})
    with atomic_path(out_dir / HF_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    with atomic_path(out_dir / HF_PREPROCESSOR_NAME) as tmp:
        tmp.write_text(json.dumps(hf_preprocessor_config(), indent=2) + "\n")
    return out_dir


def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    model_name: Optional[str] = None,
    num_classes: Optional[int] = None,
    backbone_only: bool = False,
) -> str:
    """Any supported checkpoint -> our safetensors (`dst` ending in .safetensors) or a
    HuggingFace directory (any other `dst`). Returns a one-line summary for the CLI.

    The variant comes from `model_name`, else our metadata, else the keys and shapes.
    """
    check_num_classes(num_classes)
    if Path(dst).suffix.lower() in (".pt", ".pth", ".bin"):
        raise SegcompareError(
            f"{dst}: convert writes our .safetensors or a HuggingFace directory, not a "
            f"{Path(dst).suffix} file: name it {Path(dst).with_suffix('.safetensors').name} or a "
            "directory"
        )
    spec = describe_weights(src, model_name)
    name = spec.variant
    if name is None:
        raise SegcompareError(
            f"{src}: its keys match no variant; name one with --model ({', '.join(list_models())})"
        )
    classes = num_classes or spec.num_classes or NUM_CLASSES
    model = create(name, num_classes=classes, **spec.settings)
    fmt = load_weights(model, spec.checkpoint, backbone_only=backbone_only, num_classes=num_classes)
    # the file's own classes, unless its classifier (and so its classes) starts anew
    table = spec.classes if spec.num_classes == classes else None
    names = list(table.names) if table is not None else None
    if str(dst).endswith(".safetensors"):
        save_weights(model, dst, class_table=table)
        what = "segcompare safetensors"
    else:
        export_hf(model, dst, class_names=names)
        what = "HuggingFace directory"
    return f"{src} ({fmt.name}) -> {dst} ({what}): {name}, {classes} classes"
