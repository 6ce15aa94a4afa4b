"""The 11 variants and the facts of their two families, in one place.

    create("segformer-b0", num_classes=19)     # a model, untrained
    family_of("hrnet-w48")                     # 'hrnet'
    family_of(model)                           # by its class, or the variant it carries
    FAMILIES["segformer"].head_prefix          # 'decode_head.'

Each family module (`segformer.py`, `hrnet.py`) holds its model class and its `VARIANTS` table
(name -> settings); a `Family` row here says what else is true of the whole family: where its
head and classifier live in the state dict, which implementation our benchmarks compare it
against, how its official code tests on Cityscapes. "Which family is this?" is answered by
`family_of` and nowhere else. Building with weights is `segcompare.models.build_model`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Union

from torch import nn

from segcompare.models import hrnet, segformer
from segcompare.utils import SegcompareError
from segcompare.values import check, check_like, shown

# The image size the official window and stride numbers are given for (Cityscapes, H×W).
OFFICIAL_TEST_HW = (1024, 2048)

# The smallest image side both families take: SegFormer's first sequence reduction is an 8×8
# convolution with stride 8 on the 1/4-size map, so the input needs 4 × 8 = 32 pixels (HRNet
# halves its lowest branch down to 1/32 too).
MIN_INPUT_SIDE = 32


def check_input_hw(hw: tuple[int, int], what: str) -> None:
    """SegcompareError naming `what` when an input of `hw` (H, W) is too small for the models."""
    if min(hw) < MIN_INPUT_SIDE:
        raise SegcompareError(
            f"{what}: {hw[0]}x{hw[1]} is smaller than {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE}, the "
            "smallest input both model families accept"
        )


@dataclasses.dataclass(frozen=True)
class TestResize:
    """How an official test resizes each image before the model sees it, from the image's size.

    mmcv's keep-ratio `imrescale` to `scale` (long side, short side): the factor is
    min(long / max(h, w), short / min(h, w)) and each side becomes int(side × factor + 0.5);
    then each side is rounded up to a multiple of `size_divisor` (SegFormer's AlignedResize), and
    the image is padded at the bottom and right to `pad_hw` with black (HRNet's pad_image with
    -mean/std after normalisation), the scores cropped back before they are resized to the image.
    A multi-scale test multiplies `scale` by each ratio first (int(side × ratio)), as mmseg's
    MultiScaleFlipAug does.
    """

    scale: tuple[int, int]  # (long, short)
    size_divisor: int = 1
    pad_hw: Optional[tuple[int, int]] = None

    def resized_hw(self, hw: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
        """The (H, W) an image of `hw` is resized to at `ratio`."""
        long_side, short_side = (int(v * ratio) for v in self.scale)
        factor = min(long_side / max(hw), short_side / min(hw))
        d = self.size_divisor
        return tuple(-(-int(v * factor + 0.5) // d) * d for v in hw)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class OfficialTest:
    """How a family's official code tests on one data set. `window_hw` and `stride_hw` are
    given for OFFICIAL_TEST_HW and scaled to each image (slide mode)."""

    window_hw: tuple[int, int]  # slide window
    stride_hw: tuple[int, int]
    score: str  # what is averaged over flips and scales: "softmax" or "exp"
    scales: tuple[float, ...]  # the multi-scale test's scales (`--aug-test`), with ...
    flip: bool  # ... the flipped image averaged in
    mode: str = "slide"  # 'slide' | 'whole'
    resize: Optional[TestResize] = None  # None: each image at its own size


@dataclasses.dataclass(frozen=True)
class Family:
    """What is true of every variant of a model family."""

    name: str  # 'segformer' | 'hrnet'
    model_class: type[nn.Module]
    variants: Mapping[str, dict[str, Any]] = dataclasses.field(repr=False, compare=False)
    head_prefix: str  # state-dict keys of the head (our, i.e. the official, names)
    classifier_prefix: str  # the last layer: its output channels are the classes
    # What `segcompare bench --reference` and benchmarks/inference_cpu.py time ours against:
    # "transformers" (its SegformerForSemanticSegmentation with the same weights) or "eager"
    # (our eager model, which equals the official code: tests/test_hrnet.py).
    reference: str
    # data set ('cityscapes', 'ade20k') -> its official test; any other data set is tested as
    # Cityscapes is (the image at its own size)
    tests: Mapping[str, OfficialTest] = dataclasses.field(repr=False, compare=False)

    def test_for(self, dataset: str = "cityscapes") -> OfficialTest:
        return self.tests.get(dataset, self.tests["cityscapes"])

    @property
    def test(self) -> OfficialTest:
        """The official Cityscapes test."""
        return self.tests["cityscapes"]


SEGFORMER = Family(
    name="segformer",
    model_class=segformer.SegFormer,
    variants=segformer.VARIANTS,
    head_prefix="decode_head.",
    classifier_prefix="decode_head.linear_pred.",
    reference="transformers",
    # NVlabs/SegFormer local_configs/segformer/B*/segformer.b*.1024x1024.city.160k.py: test_cfg
    # mode 'slide', crop_size (1024, 1024), stride (768, 768). mmseg encoder_decoder.py (0.x):
    # slide_inference averages the windows' logits, inference() takes the softmax of each
    # (scale, flip) pass at the original size, aug_test averages those. Multi-scale: tools/test.py
    # (master, 65fa8cf) --aug-test sets img_ratios [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0] and
    # flip=True for CityscapesDataset (lines 90-96).
    tests={
        "cityscapes": OfficialTest(
            (1024, 1024), (768, 768), "softmax", (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0), True
        ),
        # local_configs/segformer/B*/segformer.b*.512x512.ade.160k.py with
        # local_configs/_base_/datasets/ade20k_repeat.py: test_cfg mode 'whole'; test pipeline
        # MultiScaleFlipAug(img_scale=(2048, 512)) + AlignedResize(keep_ratio=True,
        # size_divisor=32) (mmseg/datasets/pipelines/transforms.py): the short side to 512 (the
        # long one at most 2048), the ratio kept, each side rounded up to a multiple of 32.
        # --aug-test: tools/test.py sets img_ratios [0.75, 0.875, 1.0, 1.125, 1.25] and flip for
        # ADE20KDataset. (The B5 640 config tests at img_scale (2048, 640): `--size` or a recipe.)
        "ade20k": OfficialTest(
            (512, 512), (512, 512), "softmax", (0.75, 0.875, 1.0, 1.125, 1.25), True,
            mode="whole", resize=TestResize((2048, 512), size_divisor=32),
        ),
    },  # fmt: skip
)

HRNET = Family(
    name="hrnet",
    model_class=hrnet.HRNet,
    variants=hrnet.VARIANTS,
    head_prefix="last_layer.",
    classifier_prefix=f"last_layer.{hrnet.HEAD_CLS}.",
    reference="eager",
    # HRNet/HRNet-Semantic-Segmentation (HRNet-OCR branch, 0bbb2880): tools/test.py sets the
    # crop size to TEST.IMAGE_SIZE (1024×2048); lib/datasets/cityscapes.py multi_scale_inference
    # runs scales <= 1 on the whole image and larger ones on crop-sized windows with stride =
    # crop (the last window aligned to the border); base_dataset.py inference() averages the
    # logits of the image and its flip, then takes exp(); windows are averaged and scales summed.
    # Multi-scale: README.md (HRNet-OCR) "evaluating ... on the Cityscapes validation set with
    # multi-scale and flip testing": TEST.SCALE_LIST 0.5,0.75,1.0,1.25,1.5,1.75 TEST.FLIP_TEST True.
    tests={
        "cityscapes": OfficialTest(
            (1024, 2048), (1024, 2048), "exp", (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True
        ),
        # experiments/ade20k/seg_hrnet_w48_520x520_ohem_sgd_lr2e-2_wd1e-4_bs_16_epoch120.yaml:
        # TEST.IMAGE_SIZE 520x520, BASE_SIZE 520, no flip, one scale. lib/datasets/base_dataset.py
        # multi_scale_inference: multi_scale_aug resizes the long side to BASE_SIZE × scale
        # (int(x + 0.5), the ratio kept); an image that fits the 520×520 crop is padded to it with
        # -mean/std (black), run whole, its scores cropped back and resized to the label size.
        # --aug-test: README (HRNet-OCR), ADE20K: scales 0.5 to 2.0 with flip. (Above 520 the
        # official code slides 520² windows with a 2/3 stride, padding each; here the windows
        # are not padded.)
        "ade20k": OfficialTest(
            (520, 520), (346, 346), "exp", (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0), True,
            mode="whole", resize=TestResize((520, 520), pad_hw=(520, 520)),
        ),
    },  # fmt: skip
)

FAMILIES: dict[str, Family] = {family.name: family for family in (SEGFORMER, HRNET)}

# variant name -> its family, SegFormers first: one dict lookup, no registry.
FAMILY_OF_VARIANT: dict[str, Family] = {
    name: family for family in FAMILIES.values() for name in family.variants
}


def list_models() -> list[str]:
    """The variant names, SegFormers first."""
    return list(FAMILY_OF_VARIANT)


def _family_of_name(name: str) -> Family:
    if name not in FAMILY_OF_VARIANT:
        valid = ", ".join(FAMILY_OF_VARIANT)
        raise SegcompareError(f"unknown model {name!r}; valid names: {valid}")
    return FAMILY_OF_VARIANT[name]


def family_of(model_or_name: Union[str, nn.Module]) -> str:
    """'segformer' or 'hrnet': of a variant name, or of a model by its class or else by the
    variant name it carries (a prepared or compiled model). SegcompareError for an unknown name,
    TypeError for an object that is neither."""
    if isinstance(model_or_name, str):
        return _family_of_name(model_or_name).name
    for family in FAMILIES.values():
        if isinstance(model_or_name, family.model_class):
            return family.name
    variant = getattr(model_or_name, "variant", None)
    if isinstance(variant, str):
        return _family_of_name(variant).name
    raise TypeError(
        f"not a segcompare model: {type(model_or_name).__name__} (neither a SegFormer nor an "
        "HRNet, and it carries no variant name)"
    )


def model_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """The variant's settings with `overrides` applied; a wrong override is a SegcompareError."""
    defaults = _family_of_name(name).variants[name]
    # Deep copy: the stage settings are nested dicts and must never alias a family's VARIANTS.
    return copy.deepcopy({**defaults, **check_settings(name, overrides)})


def check_settings(name: str, overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`overrides` of variant `name`'s settings, each shaped as the variant's own value
    (`values.check_like`: a per-stage list of as many stages, elements of the same type); a
    SegcompareError naming `prefix` + the setting otherwise. `prefix`: 'model.overrides.' for
    a recipe."""
    family = _family_of_name(name)
    defaults = family.variants[name]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise SegcompareError(
            f"unknown setting(s) {prefix}{', '.join(unknown)} for {name}; valid: "
            f"{', '.join(defaults)}"
        )

    def strings(leaf: str) -> tuple[str, ...]:  # the strings the family uses for a setting
        found: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, Mapping):
                for k, v in node.items():
                    if k == leaf and isinstance(v, str):
                        found.add(v)
                    walk(v)

        for settings in family.variants.values():
            walk(settings)
        return tuple(sorted(found))

    checked = {
        k: check_like(f"{prefix}{k}", v, defaults[k], strings) for k, v in overrides.items()
    }
    for k, v in checked.items():  # HRNet: a stage's branch count is the length of its lists
        if isinstance(v, Mapping) and "num_branches" in v and v["num_branches"] != len(
            v["num_blocks"]
        ):
            raise SegcompareError(
                f"{prefix}{k}.num_branches must be {len(v['num_blocks'])} (one per entry of "
                f"num_blocks), got {shown(v['num_branches'])}"
            )
    settings = {**defaults, **checked}
    if "num_heads" in settings:  # SegFormer: a stage's width is split evenly over its heads
        for i, (dim, heads) in enumerate(zip(settings["embed_dims"], settings["num_heads"])):
            if dim % heads:
                raise SegcompareError(
                    f"{prefix}embed_dims[{i}] = {dim} is not a multiple of num_heads[{i}] = "
                    f"{heads}: each attention head takes an equal share of the channels"
                )
    return checked


def check_num_classes(num_classes: Any) -> None:
    """SegcompareError unless `num_classes` is None (not given) or an integer of at least 1."""
    if num_classes is not None:  # the row of --num-classes (values.RULES)
        check("--num-classes", num_classes, name="num_classes")


def create(name: str, num_classes: int = 19, **overrides: Any) -> nn.Module:
    """The variant `name`, untrained, with `num_classes` outputs and `overrides` of its settings;
    it carries `model.variant` (the name) and `model.settings` (the resolved settings)."""
    settings = model_settings(name, **overrides)
    check_num_classes(num_classes)
    return FAMILY_OF_VARIANT[name].model_class(num_classes, variant=name, **settings)
