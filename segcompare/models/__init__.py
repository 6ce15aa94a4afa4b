"""The models' public API: build a variant, load and convert checkpoints.

    from segcompare.models import build_model, load_weights, convert_checkpoint, list_models
    model = build_model("segformer-b0", num_classes=19)
    model = build_model("hrnet-w48", weights="hrnet_w48_cityscapes_cls19_1024x2048_trainset.pth")
    model = build_model(weights="model.safetensors")  # the variant read from the file

The modules behind it, each importing only those above it in this list (none imports this one):

    segformer.py, hrnet.py   a family each: its blocks, model class and VARIANTS settings table
    variants.py              each family's facts (FAMILIES), the 11 variants (FAMILY_OF_VARIANT),
                             family_of, create
    convert.py               one pure state_dict -> state_dict function per foreign layout
    hub.py                   a HuggingFace Hub id to a local directory (the only network code)
    checkpoint.py            read every format (read_checkpoint), recognise it, load strictly;
                             a file's classes (classes_table)
    save.py                  our safetensors with the class table, HuggingFace's export
                             (config.json id2label from the class table), convert_checkpoint
    precision.py             the bf16 self-check (guard_bf16)

(`prepare_for_inference`, the same model rewritten to run faster, is `segcompare.infer.fast`.)
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from segcompare.models.checkpoint import describe_weights, load_weights
from segcompare.models.save import convert_checkpoint
from segcompare.models.variants import (
    check_num_classes,
    create,
    family_of,
    list_models,
    model_settings,
)
from segcompare.utils import SegcompareError

__all__ = [
    "build_model",
    "convert_checkpoint",
    "count_parameters",
    "family_of",
    "list_models",
    "load_weights",
    "model_settings",
]



def build_model(
    name: Optional[str] = None,
    num_classes: Optional[int] = None,
    weights: Any = None,
    **overrides: Any,
) -> nn.Module:
    """Build the variant `name` with `num_classes` outputs, optionally loading `weights`.

    The model maps N×3×H×W images to N×num_classes×ceil(H/4)×ceil(W/4) logits and carries
    `model.variant` (the name) and `model.settings` (the resolved settings).

    `weights`: a checkpoint of any format `segcompare.models.checkpoint` reads (file, HuggingFace
    directory or hub id). Without `name` the variant (and settings) come from the file: our
    metadata, else its keys and shapes. `num_classes` defaults to the file's (its tensors'), else
    19; another number keeps all weights but the classifier, which stays initialised (said in one
    log line).
    """
    check_num_classes(num_classes)
    asked = num_classes  # the caller's number; the file's is used only when none is asked
    if weights is not None:
        spec = describe_weights(weights, name)
        if spec.variant is None:
            raise SegcompareError(
                f"{spec.checkpoint.source}: its keys match no model; name one of "
                f"{', '.join(list_models())}"
            )
        name, weights = spec.variant, spec.checkpoint
        overrides = {**spec.settings, **overrides}
        num_classes = num_classes or spec.num_classes
    elif name is None:
        raise SegcompareError("build_model needs a model name, or weights= to read it from")
    model = create(name, num_classes or 19, **overrides)
    # The classes (a ClassTable) where the file says what they are for this classifier (None:
    # not known, or a classifier that starts anew): names, colours and label ids for predict,
    # video and export; evaluation checks them against the data set's; save_weights writes them.
    model.class_table = None
    if weights is not None:
        load_weights(model, weights, num_classes=asked)
        if spec.num_classes == (num_classes or 19):
            model.class_table = spec.classes
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
