"""The official ADE20K checkpoints: recognised by their key layouts, with the class names and
colours they carry.

Each foreign file is built from the fixtures' manifests (the official key layouts) and the layout
rules of the other project's source, written out here: never with our own inverse converter.
- NVlabs SegFormer `segformer.b0.512x512.ade.160k.pth`: mmcv's checkpoint dict, `meta` with
  mmseg 0.x's `CLASSES` and `PALETTE` (tools/train.py: `checkpoint_config.meta`), `state_dict`
  in the official names (manifest `segformer_b0`) with 150 classes.
- mmseg `fcn_hr18s_512x512_160k_ade20k_*.pth`: mmseg/models/backbones/hrnet.py names each
  BatchNorm `norm1`/`norm2`/`norm3` (`build_norm_layer(..., postfix=N)`) where HRNet's own code
  says `bn1`/`bn2`/`bn3`; Sequential indices are the same; `FCNHead` (num_convs=1, kernel 1) is
  `decode_head.convs.0.{conv,bn}` (an mmcv ConvModule: conv without bias) and `conv_seg`.
- HRNet-Semantic-Segmentation `hrnet_ade20k_4312_torch04.pth` (HRNet-OCR README, ADE20K table):
  HRNetV2 saved through train.py's `FullModel` (`model.` prefix), 150 classes, no names, written
  by PyTorch 0.4 (the legacy, non-zip serialisation).
- `hrnet_ocr_ade20k_4451_torch04.pth`: lib/models/seg_hrnet_ocr.py's OCR head (aux_head,
  conv3x3_ocr, ocr_gather_head, ocr_distri_head, cls_head) on the same backbone.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from reference import load_manifest, seeded_state_dict

from segcompare import cli
from segcompare.data.labels import ADE20K
from segcompare.models import build_model
from segcompare.models.checkpoint import describe_weights, read_checkpoint
from segcompare.utils import SegcompareError

ADE = 150
# The first ADE20K classes and colours as mmseg 0.x's ADE20KDataset lists them
# (mmseg/datasets/ade.py, CLASSES and PALETTE); the rest are made up, the test only needs
# a file's own names to come through.
ADE_FIRST = [("wall", [120, 120, 120]), ("building", [180, 120, 120]), ("sky", [6, 230, 230])]
ADE_NAMES = [n for n, _ in ADE_FIRST] + [f"thing{i}" for i in range(3, ADE)]
ADE_PALETTE = [c for _, c in ADE_FIRST] + [[i, 255 - i, (7 * i) % 256] for i in range(3, ADE)]


def _with_classes(manifest: dict, classifier: tuple[str, ...], classes: int) -> dict:
    """The manifest with `classes` outputs in the layers named `classifier`."""
    layout = [
        (key, [classes, *shape[1:]] if key.startswith(classifier) and shape else shape)
        for key, shape in manifest["state_dict"]
    ]
    layout = [(k, [classes] if k.startswith(classifier) and k.endswith("bias") else s)
              for k, s in layout]  # fmt: skip
    return {"state_dict": layout}


def _mmseg_hrnet_name(key: str) -> str:
    """HRNet's name -> mmseg's (see the module docstring)."""
    if key.startswith("last_layer.0."):
        return "decode_head.convs.0.conv." + key.split(".")[-1]
    if key.startswith("last_layer.1."):
        return "decode_head.convs.0.bn." + key.split(".")[-1]
    if key.startswith("last_layer.3."):
        return "decode_head.conv_seg." + key.split(".")[-1]
    return "backbone." + re.sub(r"(^|\.)bn([123])\.", r"\1norm\2.", key)


def test_nvlabs_segformer_ade_release_keeps_its_names(tmp_path):
    state = seeded_state_dict(
        _with_classes(load_manifest("segformer_b0"), ("decode_head.linear_pred.",
                      "decode_head.conv_seg."), ADE), "segformer")  # fmt: skip
    path = tmp_path / "segformer.b0.512x512.ade.160k.pth"
    meta = {"CLASSES": tuple(ADE_NAMES), "PALETTE": ADE_PALETTE, "iter": 160000}
    torch.save({"meta": meta, "state_dict": state}, path)
    spec = describe_weights(path)
    assert (spec.variant, spec.num_classes) == ("segformer-b0", ADE)
    assert spec.class_names == ADE_NAMES and spec.palette == ADE_PALETTE
    model = build_model(weights=path)
    assert torch.equal(model.state_dict()["decode_head.linear_pred.weight"],
                       state["decode_head.linear_pred.weight"])  # fmt: skip

    # convert keeps the file's own names and colours
    out = tmp_path / "b0_ade.safetensors"
    assert cli.main(["convert", str(path), str(out)]) == 0
    metadata = read_checkpoint(out).metadata
    assert json.loads(metadata["class_names"]) == ADE_NAMES
    assert json.loads(metadata["palette"]) == ADE_PALETTE


def test_mmseg_1x_dataset_meta_and_a_count_that_disagrees(tmp_path):
    state = seeded_state_dict(
        _with_classes(load_manifest("hrnet_w18_small_v2"), ("last_layer.3.",), ADE), "hrnet"
    )
    mmseg = {_mmseg_hrnet_name(k): v for k, v in state.items() if k != "last_layer.0.bias"}
    path = tmp_path / "fcn_hr18s_512x512_160k_ade20k.pth"
    dataset_meta = {"classes": tuple(ADE_NAMES), "palette": ADE_PALETTE}
    torch.save({"meta": {"dataset_meta": dataset_meta}, "state_dict": mmseg}, path)
    spec = describe_weights(path)
    assert (spec.variant, spec.num_classes) == ("hrnet-w18-small-v2", ADE)
    assert spec.class_names == ADE_NAMES and spec.palette == ADE_PALETTE

    torch.save({"meta": {"CLASSES": tuple(ADE_NAMES[:19])}, "state_dict": mmseg}, path)
    with pytest.raises(SegcompareError, match="names 19 class names.*150 classes"):
        describe_weights(path)
    torch.save({"meta": {"CLASSES": [1, 2]}, "state_dict": mmseg}, path)
    with pytest.raises(SegcompareError, match="meta CLASSES is not a list of class names"):
        describe_weights(path)


def test_hrnet_ade20k_4312_release(tmp_path):
    state = seeded_state_dict(
        _with_classes(load_manifest("hrnet_w18_small_v1"), ("last_layer.3.",), ADE), "hrnet"
    )
    path = tmp_path / "hrnet_ade20k_4312_torch04.pth"
    # PyTorch 0.4 wrote the legacy (non-zip) format
    torch.save({f"model.{k}": v for k, v in state.items()}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    spec = describe_weights(path)
    assert (spec.variant, spec.num_classes, spec.class_names) == ("hrnet-w18-small-v1", ADE, None)
    model = build_model(weights=path)
    assert model.class_table is ADE20K  # 150 classes without names: ADE20K's table
    assert torch.equal(model.state_dict()["last_layer.3.weight"], state["last_layer.3.weight"])


def _ocr_head(backbone_channels: int, mid: int, key: int, classes: int) -> list:
    """seg_hrnet_ocr.py's head: aux_head, conv3x3_ocr, ocr_distri_head, cls_head."""

    def bn(prefix: str, c: int) -> list:
        return [(f"{prefix}.{t}", [c]) for t in ("weight", "bias", "running_mean", "running_var")]

    c = backbone_channels
    layout = [("conv3x3_ocr.0.weight", [mid, c, 3, 3]), ("conv3x3_ocr.0.bias", [mid])]
    layout += bn("conv3x3_ocr.1", mid)
    block = "ocr_distri_head.object_context_block"
    for part in ("f_pixel", "f_object"):
        layout += [(f"{block}.{part}.0.weight", [key, mid, 1, 1])] + bn(f"{block}.{part}.1.0", key)
        layout += [(f"{block}.{part}.2.weight", [key, key, 1, 1])] + bn(f"{block}.{part}.3.0", key)
    layout += [(f"{block}.f_down.0.weight", [key, mid, 1, 1])] + bn(f"{block}.f_down.1.0", key)
    layout += [(f"{block}.f_up.0.weight", [mid, key, 1, 1])] + bn(f"{block}.f_up.1.0", mid)
    layout += [("ocr_distri_head.conv_bn_dropout.0.weight", [mid, 2 * mid, 1, 1])]
    layout += bn("ocr_distri_head.conv_bn_dropout.1.0", mid)
    layout += [("cls_head.weight", [classes, mid, 1, 1]), ("cls_head.bias", [classes])]
    layout += [("aux_head.0.weight", [c, c, 1, 1]), ("aux_head.0.bias", [c])] + bn("aux_head.1", c)
    layout += [("aux_head.3.weight", [classes, c, 1, 1]), ("aux_head.3.bias", [classes])]
    return layout


def test_hrnet_ocr_is_recognised_and_refused_in_one_line(tmp_path, capsys):
    manifest = load_manifest("hrnet_w18_small_v1")
    backbone = [(k, s) for k, s in manifest["state_dict"] if not k.startswith("last_layer.")]
    layout = backbone + _ocr_head(16 + 32 + 64 + 128, 64, 32, ADE)
    state = seeded_state_dict({"state_dict": layout}, "hrnet")
    path = tmp_path / "hrnet_ocr_ade20k_4451_torch04.pth"
    torch.save({f"model.{k}": v for k, v in state.items()}, path)
    assert cli.main(["convert", str(path), str(tmp_path / "x.safetensors")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "OCR" in err and str(path) in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_model_of_other_classes_is_refused_or_mapped_by_name(tmp_path):
    from segcompare.data.labels import CLASS_NAMES
    from segcompare.evaluate import match_classes
    from segcompare.models.save import save_weights

    # our own file whose classes are Cityscapes' in reverse order
    model = build_model("hrnet-w18-small-v1")
    path = tmp_path / "reversed.safetensors"
    save_weights(model, path, class_names=list(reversed(CLASS_NAMES)))
    loaded = build_model(weights=path)
    assert loaded.class_table.names == tuple(reversed(CLASS_NAMES))
    with pytest.raises(SegcompareError, match="class 0 is 'bicycle' in .* 'road' in the data"):
        match_classes(loaded.class_table.names, CLASS_NAMES, model=str(path))
    order = match_classes(loaded.class_table.names, CLASS_NAMES, by_name=True)
    assert order == list(range(18, -1, -1))  # road is the model's last channel, and so on
    # a 150-class ADE20K model on a 3-class data set: by name, where every name is the model's
    assert match_classes(ADE_NAMES, ["sky", "wall"], by_name=True) == [2, 0]
    with pytest.raises(SegcompareError, match="1 class.*not among the 150.*'road'"):
        match_classes(ADE_NAMES, ["sky", "road"], by_name=True)
    with pytest.raises(SegcompareError, match="has 150 classes, the data set 2"):
        match_classes(ADE_NAMES, ADE_NAMES[:2])
    assert match_classes(None, CLASS_NAMES) is None  # a file without names: only its count
    # a classifier that starts anew has no names
    assert build_model(weights=path, num_classes=5).class_table is None


def test_huggingface_ade_directory_keeps_its_id2label(tmp_path):
    # nvidia/segformer-b0-finetuned-ade-512-512: config.json with 150 id2label entries, written
    # here by transformers itself
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        num_labels=ADE, id2label=dict(enumerate(ADE_NAMES)), label2id={n: i for i, n in
                                                                       enumerate(ADE_NAMES)}
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "hf")
    spec = describe_weights(tmp_path / "hf")
    assert (spec.variant, spec.num_classes, spec.class_names) == ("segformer-b0", ADE, ADE_NAMES)
    assert build_model(weights=tmp_path / "hf").class_table.names == tuple(ADE_NAMES)
    out = tmp_path / "b0.safetensors"
    assert cli.main(["convert", str(tmp_path / "hf"), str(out)]) == 0
    assert json.loads(read_checkpoint(out).metadata["class_names"]) == ADE_NAMES
