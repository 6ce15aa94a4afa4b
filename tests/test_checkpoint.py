"""Checkpoint formats, each made with its real layout and checked against the official outputs.

Every file is synthesised from the fixtures' manifests and the seeded-weights rule of
tests/fixtures/REFERENCE.md (or written by transformers itself for the HuggingFace formats);
after loading, the model must give the official `logits_quarter` (within the bounds of
`reference.OFFICIAL_ERROR`), or, for backbones, hold exactly the backbone tensors and leave the
head as initialised. mmsegmentation files follow the layouts written from mmseg's own source
(fixtures/mmseg_*.keys.json, made by fixtures/mmseg_layouts.py), never our inverse converters.
"""

from __future__ import annotations

import json
import logging
import pickle
import time

import pytest
import torch
from reference import load_io, load_manifest, official_error, seeded_state_dict
from torch import nn

from segcompare import cli
from segcompare.data.labels import CLASS_NAMES, PALETTE
from segcompare.models import build_model, convert
from segcompare.models.checkpoint import (
    describe_weights,
    detect_format,
    load_weights,
    read_checkpoint,
)
from segcompare.models.save import save_weights
from segcompare.utils import SegcompareError, is_temporary

B0 = "segformer_b0"
SMALL_V1 = "hrnet_w18_small_v1"
SMALL_V2 = "hrnet_w18_small_v2"
MMSEG_B0 = "mmseg_segformer_b0"  # mmseg's segformer_mit-b0, from the official B0
MMSEG_HR18S = "mmseg_hrnet_w18_small"  # mmseg's fcn_hr18s, from the official W18-Small-v2


@pytest.fixture(scope="module")
def b0_state() -> dict[str, torch.Tensor]:
    """The official B0 checkpoint's state dict (conv_seg included) behind the fixture outputs."""
    return seeded_state_dict(load_manifest(B0), "segformer")


@pytest.fixture(scope="module")
def hrnet_state() -> dict[str, torch.Tensor]:
    return seeded_state_dict(load_manifest(SMALL_V1), "hrnet")


def _assert_official(model: nn.Module, stem: str) -> float:
    """The model's logits on the fixture input are the official ones, within `stem`'s bound."""
    io = load_io(stem)
    with torch.no_grad():
        return official_error(model.eval()(io["input"]), io["logits_quarter"], stem)


def _fresh(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, **kwargs)


# --- SegFormer formats ----------------------------------------------------------------------
def test_nvlabs_segformer_release(tmp_path, b0_state):
    # segformer.b0.1024x1024.city.160k.pth: {"meta": ..., "state_dict": ...} with conv_seg
    path = tmp_path / "segformer.b0.1024x1024.city.160k.pth"
    meta = {"CLASSES": CLASS_NAMES, "PALETTE": PALETTE.tolist(), "iter": 160000}
    torch.save({"meta": meta, "state_dict": b0_state}, path)
    model = build_model(weights=path)  # the variant comes from the keys
    assert model.variant == "segformer-b0"
    _assert_official(model, B0)


def test_mit_imagenet_backbone_loads_the_backbone_only(tmp_path, b0_state, caplog):
    # mit_b0.pth: the encoder without prefix + a 1000-class `head`
    mit = {k[len("backbone.") :]: v for k, v in b0_state.items() if k.startswith("backbone.")}
    mit["head.weight"] = torch.randn(1000, 256)
    mit["head.bias"] = torch.randn(1000)
    path = tmp_path / "mit_b0.pth"
    torch.save(mit, path)
    model, untouched = _fresh("segformer-b0"), _fresh("segformer-b0")
    with caplog.at_level(logging.WARNING):
        fmt = load_weights(model, path)
    assert fmt.name == "NVlabs MiT ImageNet backbone"
    assert len(caplog.records) == 1 and "backbone only" in caplog.records[0].getMessage()
    for key, value in model.state_dict().items():
        expected = b0_state[key] if key.startswith("backbone.") else untouched.state_dict()[key]
        assert torch.equal(value, expected), key
    io = load_io(B0)
    with torch.no_grad():
        features = model.eval().forward_features(io["input"])
    for got, want in zip(features, io["backbone_features"]):
        official_error(got, want, B0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, b0_state):
    """A directory written by transformers' `save_pretrained`, holding the official B0 weights."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    staging = tmp_path_factory.mktemp("staging")
    transformers.SegformerConfig(num_labels=19).save_pretrained(staging)  # its defaults are B0
    save_file(convert.official_segformer_to_hf(b0_state), staging / "model.safetensors")
    hf = transformers.SegformerForSemanticSegmentation.from_pretrained(staging)
    out = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(out)
    torch.save(hf.state_dict(), out / "pytorch_model.bin")  # transformers 5's in-memory names
    return out


def test_huggingface_directory_and_files(hf_dir, tmp_path):
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
    ]
    _assert_official(build_model("segformer-b0", weights=hf_dir), B0)
    _assert_official(build_model(weights=hf_dir / "model.safetensors"), B0)
    _assert_official(build_model(weights=hf_dir / "pytorch_model.bin"), B0)


def test_huggingface_hub_id_from_the_cache(hf_dir, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    repo = tmp_path / "models--nvidia--segformer-b0-finetuned-cityscapes-1024-1024"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((hf_dir / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # never the network
    model = build_model(weights="hf://nvidia/segformer-b0-finetuned-cityscapes-1024-1024")
    assert model.variant == "segformer-b0"
    _assert_official(model, B0)


@pytest.mark.parametrize("offline", [True, False])
def test_huggingface_hub_id_fails_at_once_without_the_hub(tmp_path, monkeypatch, offline):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a hub that refuses connections: the probe answers instead of 30 s of retries
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(SegcompareError, match="nvidia/segformer-b0.*pass a local path"):
        read_checkpoint("hf://nvidia/segformer-b0-finetuned-cityscapes-1024-1024")
    assert time.monotonic() - start < 5


def _mmseg_state(official: dict[str, torch.Tensor], stem: str) -> dict[str, torch.Tensor]:
    """The state dict of an mmseg checkpoint as the manifest `stem` (written from mmseg's source)
    lays it out: each tensor taken from the official state dict by the manifest's rule (its
    official tensors joined on dim 0, reshaped), mmseg's own layers (SegformerHead) seeded."""
    manifest = load_manifest(stem)
    own = [[key, shape] for key, shape, sources in manifest["state_dict"] if not sources]
    seeded = seeded_state_dict({"state_dict": own}, "segformer")
    out = {}
    for key, shape, sources in manifest["state_dict"]:
        if not sources:
            out[key] = seeded[key]
        elif len(sources) == 1:
            out[key] = official[sources[0]].reshape(shape)
        else:
            out[key] = torch.cat([official[k] for k in sources]).reshape(shape)
    for key, bias in manifest["bias_folds"].items():  # its head conv has no bias: folded into BN
        out[key] = out[key] - official[bias]
    return out


def _assert_same_state(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)  # the order of keys is no part of a layout
    for key, value in expected.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def small_v2_state() -> dict[str, torch.Tensor]:
    return seeded_state_dict(load_manifest(SMALL_V2), "hrnet")


def test_mmseg_segformer_converters_follow_mmseg_layout(b0_state):
    """Both directions against mit2mmseg.py's rules: a swapped pair of names fails here."""
    mmseg = _mmseg_state(b0_state, MMSEG_B0)
    backbone = {k: v for k, v in b0_state.items() if k.startswith("backbone.")}
    _assert_same_state(convert.mmseg_segformer_to_official(mmseg), backbone)
    mmseg_backbone = {k: v for k, v in mmseg.items() if k.startswith("backbone.")}
    _assert_same_state(convert.official_segformer_to_mmseg(b0_state), mmseg_backbone)


def test_mmseg_hrnet_converters_follow_mmseg_layout(small_v2_state):
    """Both directions against mmseg's HRNet + FCNHead names; the head's conv bias is folded."""
    manifest = load_manifest(MMSEG_HR18S)
    mmseg = _mmseg_state(small_v2_state, MMSEG_HR18S)
    _assert_same_state(convert.official_hrnet_to_mmseg(small_v2_state), mmseg)
    expected = dict(small_v2_state)
    sources = {key: src for key, _, src in manifest["state_dict"]}
    for key, bias in manifest["bias_folds"].items():  # the same function, another parametrisation
        (mean,) = sources[key]
        expected[mean] = small_v2_state[mean] - small_v2_state[bias]
        expected[bias] = torch.zeros_like(small_v2_state[bias])
    _assert_same_state(convert.mmseg_hrnet_to_official(mmseg), expected)


def test_mmseg_segformer(tmp_path, b0_state, caplog):
    mmseg = _mmseg_state(b0_state, MMSEG_B0)
    path = tmp_path / "segformer_mit-b0_8xb1-160k_cityscapes-1024x1024.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ("road",)}}, "state_dict": mmseg}, path)

    # Its head is mmseg's own design: refused by default, with what to do instead.
    with pytest.raises(SegcompareError, match="SegformerHead.*backbone_only=True"):
        load_weights(_fresh("segformer-b0"), path)
    model, untouched = _fresh("segformer-b0"), _fresh("segformer-b0")
    with caplog.at_level(logging.WARNING):
        load_weights(model, path, backbone_only=True)
    assert len(caplog.records) == 1
    for key, value in model.state_dict().items():
        expected = b0_state[key] if key.startswith("backbone.") else untouched.state_dict()[key]
        assert torch.equal(value, expected), key

    # A backbone converted by mmseg's mit2mmseg.py (no prefix, no head) loads as a backbone.
    backbone = {k[len("backbone.") :]: v for k, v in mmseg.items() if k.startswith("backbone.")}
    model = _fresh("segformer-b0")
    assert load_weights(model, backbone).name == "mmsegmentation SegFormer"
    io = load_io(B0)
    with torch.no_grad():
        features = model.eval().forward_features(io["input"])
    for got, want in zip(features, io["backbone_features"]):
        official_error(got, want, B0)


# --- HRNet formats --------------------------------------------------------------------------
def test_official_hrnet_release_with_and_without_prefix(tmp_path, hrnet_state):
    # hrnet_w18_small_v1_cityscapes_cls19_1024x2048.pth: HRNet's FullModel (model.* + loss.*)
    release = {f"model.{k}": v for k, v in hrnet_state.items()}
    release["loss.criterion.weight"] = torch.rand(19)
    torch.save(release, tmp_path / "release.pth")
    model = build_model(weights=tmp_path / "release.pth")
    assert model.variant == "hrnet-w18-small-v1"
    _assert_official(model, SMALL_V1)
    torch.save(hrnet_state, tmp_path / "bare.pth")
    _assert_official(build_model("hrnet-w18-small-v1", weights=tmp_path / "bare.pth"), SMALL_V1)


_BN = ("weight", "bias", "running_mean", "running_var")


def _imagenet_head(channels: tuple[int, ...]) -> list[tuple[str, list[int]]]:
    """A layout like cls_hrnet.py's ImageNet head (incre/downsamp modules, final_layer, fc)."""
    head = [32, 64, 128, 256]
    layout = []
    for i, c in enumerate(channels):
        layout.append((f"incre_modules.{i}.0.conv1.weight", [head[i], c, 1, 1]))
        layout += [(f"incre_modules.{i}.0.bn1.{t}", [head[i]]) for t in _BN]
    for i in range(3):
        layout.append((f"downsamp_modules.{i}.0.weight", [head[i + 1] * 4, head[i] * 4, 3, 3]))
        layout.append((f"downsamp_modules.{i}.0.bias", [head[i + 1] * 4]))
    layout += [("final_layer.0.weight", [2048, 1024, 1, 1]), ("final_layer.0.bias", [2048])]
    layout += [("classifier.weight", [1000, 2048]), ("classifier.bias", [1000])]
    return layout


def test_hrnet_imagenet_checkpoint_loads_the_backbone(tmp_path, hrnet_state, caplog):
    # hrnet_w18_small_model_v1.pth: the backbone under the same names + the ImageNet head
    backbone = {k: v for k, v in hrnet_state.items() if not k.startswith("last_layer.")}
    head = seeded_state_dict({"state_dict": _imagenet_head((16, 32, 64, 128))}, "hrnet")
    torch.save({**backbone, **head}, tmp_path / "hrnet_w18_small_model_v1.pth")
    model, untouched = _fresh("hrnet-w18-small-v1"), _fresh("hrnet-w18-small-v1")
    with caplog.at_level(logging.WARNING):
        fmt = load_weights(model, tmp_path / "hrnet_w18_small_model_v1.pth")
    assert fmt.name == "official HRNet ImageNet"
    assert len(caplog.records) == 1 and "last_layer" in caplog.records[0].getMessage()
    for key, value in model.state_dict().items():
        expected = backbone[key] if key in backbone else untouched.state_dict()[key]
        assert torch.equal(value, expected), key


def test_mmseg_hrnet_fcn(tmp_path, small_v2_state):
    mmseg = _mmseg_state(small_v2_state, MMSEG_HR18S)
    torch.save({"meta": {}, "state_dict": mmseg}, tmp_path / "fcn_hr18s.pth")
    model = build_model(weights=tmp_path / "fcn_hr18s.pth")
    assert model.variant == "hrnet-w18-small-v2"
    _assert_official(model, SMALL_V2)


# --- ours -----------------------------------------------------------------------------------
def test_ours_round_trip_rebuilds_from_the_file_alone(tmp_path, hrnet_state):
    model = build_model("hrnet-w18-small-v1", num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    names = ["sky", "road", "car"]
    path = save_weights(model, tmp_path / "model.safetensors", class_names=names)
    spec = describe_weights(path)
    assert (spec.variant, spec.num_classes, spec.class_names) == ("hrnet-w18-small-v1", 3, names)
    meta = read_checkpoint(path).metadata
    assert meta["version"] and json.loads(meta["settings"])["stage2"]["num_channels"] == [16, 32]
    again = build_model(weights=path)
    assert again.variant == model.variant and again.settings == model.settings
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    assert not [p for p in tmp_path.iterdir() if is_temporary(p)]  # through a temporary


def test_ours_to_huggingface_to_transformers(tmp_path, b0_state):
    transformers = pytest.importorskip("transformers")
    ours = build_model("segformer-b0", weights=b0_state)
    save_weights(ours, tmp_path / "b0.safetensors")
    assert cli.main(["convert", str(tmp_path / "b0.safetensors"), str(tmp_path / "hf")]) == 0
    hf, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info
    assert hf.config.id2label[0] == "road" and hf.config.num_labels == 19
    # as exported, eps 1e-5 in its LayerNorms included (README: the official MiT uses 1e-6)
    io = load_io(B0)
    with torch.no_grad():
        logits = hf.eval()(pixel_values=io["input"]).logits
        ours_logits = ours.eval()(io["input"])
    assert (logits - ours_logits).abs().max().item() < 1e-4
    assert (logits - io["logits_quarter"]).abs().max().item() < 1e-4


def test_huggingface_mit_imagenet_loads_the_backbone(tmp_path, hf_dir, b0_state):
    # nvidia/mit-b0 is a SegformerForImageClassification: the encoder + a 1000-class classifier
    transformers = pytest.importorskip("transformers")
    seg = transformers.SegformerForSemanticSegmentation.from_pretrained(hf_dir)
    config = transformers.SegformerConfig(num_labels=1000)
    mit = transformers.SegformerForImageClassification(config)
    mit.segformer.load_state_dict(seg.segformer.state_dict())
    mit.save_pretrained(tmp_path)
    model, untouched = _fresh("segformer-b0"), _fresh("segformer-b0")
    assert load_weights(model, tmp_path).name == "HuggingFace SegFormer"
    for key, value in model.state_dict().items():
        expected = b0_state[key] if key.startswith("backbone.") else untouched.state_dict()[key]
        assert torch.equal(value, expected), key


def test_convert_any_format_to_ours(tmp_path, small_v2_state, capsys):
    torch.save({"state_dict": _mmseg_state(small_v2_state, MMSEG_HR18S)}, tmp_path / "mm.pth")
    assert cli.main(["convert", str(tmp_path / "mm.pth"), str(tmp_path / "ours.safetensors")]) == 0
    assert "hrnet-w18-small-v2, 19 classes" in capsys.readouterr().out
    assert detect_format([], read_checkpoint(tmp_path / "ours.safetensors").metadata).name == (
        "segcompare safetensors"
    )
    _assert_official(build_model(weights=tmp_path / "ours.safetensors"), SMALL_V2)


# --- refusals -------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_pickle_with_code_is_refused_and_runs_nothing(tmp_path, b0_state, container):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"backbone.patch_embed1.proj.bias": torch.zeros(32)}}
    payload["meta"] = _Payload(str(marker))
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(SegcompareError, match="may contain code.*not loaded"):
        load_weights(_fresh("segformer-b0"), path)
    assert not marker.exists()


def test_wrong_variant_is_refused_naming_keys_and_the_likely_variant(tmp_path):
    b1 = seeded_state_dict(load_manifest("segformer_b1"), "segformer")
    torch.save({"state_dict": b1}, tmp_path / "b1.pth")
    with pytest.raises(SegcompareError) as err:
        build_model("segformer-b0", weights=tmp_path / "b1.pth")
    message = str(err.value)
    assert "NVlabs SegFormer" in message
    assert "backbone.patch_embed1.proj.weight: file [64, 3, 7, 7], model [32, 3, 7, 7]" in message
    assert "this looks like segformer-b1 weights; you asked for segformer-b0" in message
    assert "\n" not in message


def test_other_number_of_classes_reinitialises_the_classifier(tmp_path, b0_state, caplog):
    model, untouched = _fresh("segformer-b0", num_classes=5), _fresh("segformer-b0", num_classes=5)
    with caplog.at_level(logging.WARNING):
        load_weights(model, b0_state, num_classes=5)
    assert len(caplog.records) == 1 and "19 classes, the model 5" in caplog.records[0].getMessage()
    for key, value in model.state_dict().items():
        cls = key.startswith("decode_head.linear_pred.")
        assert torch.equal(value, untouched.state_dict()[key] if cls else b0_state[key]), key


def test_other_mismatch_is_an_error(b0_state):
    broken = dict(b0_state)
    del broken["backbone.block2.1.mlp.fc2.bias"]
    with pytest.raises(SegcompareError, match=r"1 missing.*mlp\.fc2\.bias \[64\] missing"):
        load_weights(_fresh("segformer-b0"), broken)


def _cli_error(capsys, src, tmp_path) -> str:
    assert cli.main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1, captured.err
    assert not (tmp_path / "out.safetensors").exists()
    return captured.err


def test_truncated_empty_and_unknown_files_give_one_line(tmp_path, hrnet_state, capsys):
    from safetensors.torch import save_file

    torch.save(hrnet_state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _cli_error(capsys, tmp_path / "truncated.pth", tmp_path)
    torch.save(hrnet_state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pth").read_bytes()
    (tmp_path / "legacy_truncated.pth").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _cli_error(capsys, tmp_path / "legacy_truncated.pth", tmp_path)
    save_file(hrnet_state, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 1000])
    assert "corrupt or truncated" in _cli_error(
        capsys, tmp_path / "truncated.safetensors", tmp_path
    )
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in _cli_error(capsys, tmp_path / "empty.pth", tmp_path)
    (tmp_path / "notes.txt").write_text("not weights")
    assert "neither a PyTorch file" in _cli_error(capsys, tmp_path / "notes.txt", tmp_path)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    assert "any known layout" in _cli_error(capsys, tmp_path / "other.pth", tmp_path)
    assert "no such file" in _cli_error(capsys, tmp_path / "missing.pth", tmp_path)


def test_big_variants_are_told_apart_on_the_meta_device():
    # The variant guess builds every variant on the meta device: B5 and W48 cost nothing.
    from segcompare.models.checkpoint import guess_variant

    for name in ("segformer-b5", "hrnet-w48"):
        with torch.device("meta"):
            state = build_model(name).state_dict()
        assert guess_variant(state) == name
        backbone = {
            k: v for k, v in state.items() if not k.startswith(("decode_head", "last_layer"))
        }
        assert guess_variant(backbone) == name


def test_huggingface_export_runs_in_transformers_pipeline(tmp_path):
    transformers = pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    from segcompare.evaluate import InferenceSettings
    from segcompare.infer import Predictor

    torch.manual_seed(0)
    tiny = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)
    ours = build_model("segformer-b0", **tiny).eval()
    save_weights(ours, tmp_path / "tiny.safetensors")
    assert cli.main(["convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "hf")]) == 0
    processor = transformers.SegformerImageProcessor.from_pretrained(tmp_path / "hf")
    assert not processor.do_resize  # each image at its own size, as `segcompare predict`
    segment = transformers.pipeline("image-segmentation", model=str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    hf_pred = np.full(image.shape[:2], 255, np.uint8)  # 128x256, the size
    names = list(segment.model.config.id2label.values())
    for item in segment(Image.fromarray(image)):
        hf_pred[np.array(item["mask"]) > 0] = names.index(item["label"])
    assert names[0] == "road"
    whole = Predictor(ours, InferenceSettings(mode="whole", device="cpu", optimize=False))
    agree = (whole.predict(image) == hf_pred).mean()
    assert agree > 0.999, agree  # transformers' LayerNorm eps 1e-5 vs 1e-6 moves a tie or two
    # predict's default (sliding windows) differs where windows overlap: the README's figure
    default = Predictor(ours, InferenceSettings(device="cpu"))
    assert 0.85 < (default.predict(image) == hf_pred).mean() < 0.99  # measured 0.918


@pytest.mark.parametrize("dst", ["b0.pt", "b0.pth", "b0.bin"])
def test_convert_refuses_a_torch_file_name(tmp_path, capsys, dst):
    rc = cli.main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / dst)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert dst in err and "b0.safetensors" in err
    assert not (tmp_path / dst).exists()
