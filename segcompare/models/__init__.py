"""The model factory: the only entry point to the models.

    model = build_model("segformer-b0", num_classes=19)
    model = build_model("hrnet-w48", weights="hrnet_w48_cityscapes_cls19_1024x2048_trainset.pth")

Each family module (`hrnet.py`, `segformer.py`) holds a `VARIANTS` table (name -> settings dict) and
the model class, which takes `num_classes` and those settings as keyword arguments.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import nn

from segcompare.models import hrnet, segformer

# name -> (model class, default settings). One dict lookup; no registry.
_VARIANTS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    **{name: (segformer.SegFormer, cfg) for name, cfg in segformer.VARIANTS.items()},
    **{name: (hrnet.HRNet, cfg) for name, cfg in hrnet.VARIANTS.items()},
}


def list_models() -> list[str]:
    """The names `build_model` accepts, SegFormers first."""
    return list(_VARIANTS)


def model_family(name: str) -> str:
    """'segformer' or 'hrnet'."""
    _check_name(name)
    return "segformer" if _VARIANTS[name][0] is segformer.SegFormer else "hrnet"


def _check_name(name: str) -> None:
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_VARIANTS)}")


def model_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """The variant's settings with `overrides` applied; an unknown override is a ValueError."""
    _check_name(name)
    defaults = _VARIANTS[name][1]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} for {name}; valid: {', '.join(defaults)}"
        )
    # Deep copy: the stage settings are nested dicts and must never alias the VARIANTS table.
    return copy.deepcopy({**defaults, **overrides})


def build_model(
    name: Optional[str] = None,
    num_classes: Optional[int] = None,
    weights: Any = None,
    **overrides: Any,
) -> nn.Module:
    """Build the variant `name` with `num_classes` outputs, optionally loading `weights`.

    The model maps N×3×H×W images to N×num_classes×ceil(H/4)×ceil(W/4) logits and records
    `model.variant` (the name) and `model.settings` (the resolved settings).

    `weights`: a checkpoint of any format `segcompare.models.checkpoint` reads (file, HuggingFace
    directory or hub id). Without `name` the variant (and settings) come from the file: our
    metadata, else its keys and shapes. `num_classes` defaults to the file's, else 19; another
    number keeps all weights but the classifier, which stays initialised.
    """
    if weights is not None:
        from segcompare.models.checkpoint import describe_weights

        spec = describe_weights(weights, name)
        if spec.variant is None:
            raise ValueError(
                f"{spec.checkpoint.source}: its keys match no model; name one of "
                f"{', '.join(_VARIANTS)}"
            )
        name, weights = spec.variant, spec.checkpoint
        overrides = {**spec.settings, **overrides}
        num_classes = num_classes or spec.num_classes
    elif name is None:
        raise ValueError("build_model needs a model name, or weights= to read it from")
    num_classes = num_classes or 19
    settings = model_settings(name, **overrides)
    cls = _VARIANTS[name][0]
    model = cls(num_classes=num_classes, **settings)
    model.variant = name
    model.settings = settings
    if weights is not None:
        from segcompare.models.checkpoint import load_weights

        load_weights(model, weights)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
