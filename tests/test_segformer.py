"""SegFormer equals the official NVlabs code (fixtures) and HuggingFace transformers.

The official checkpoints carry `decode_head.conv_seg.*` (mmseg's unused classifier); our model
does not, so the manifests are compared without their `unused_keys`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from reference import load_io, load_manifest, official_error, seeded_state_dict
from torch import nn

from segcompare.models import build_model, count_parameters
from segcompare.models.convert import hf_segformer_to_official, official_segformer_to_hf
from segcompare.models.segformer import UNUSED_OFFICIAL_KEYS, VARIANTS, SegFormer

NAMES = [f"segformer-b{i}" for i in range(6)]


def _official_layout(manifest: dict) -> list[tuple[str, list[int]]]:
    unused = set(manifest["unused_keys"])
    return [(key, shape) for key, shape in manifest["state_dict"] if key not in unused]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_the_official_layout(name):
    manifest = load_manifest(name.replace("-", "_"))
    assert set(manifest["unused_keys"]) == set(UNUSED_OFFICIAL_KEYS)
    with torch.device("meta"):  # no memory, no init cost: only names and shapes matter here
        model = build_model(name)
    layout = [(key, list(t.shape)) for key, t in model.state_dict().items()]
    assert layout == _official_layout(manifest)

    unused_params = sum(
        math.prod(shape) for key, shape in manifest["state_dict"] if key in UNUSED_OFFICIAL_KEYS
    )
    assert count_parameters(model) == manifest["num_parameters"] - unused_params
    assert count_parameters(model.backbone) == manifest["backbone_parameters"]


def test_b5_parameter_count_is_the_papers():
    # REFERENCE.md: HuggingFace's B5 with 19 labels and the official model without conv_seg.
    with torch.device("meta"):
        assert count_parameters(build_model("segformer-b5")) == 84_607_955


def test_seeded_b0_gives_the_official_outputs():
    manifest = load_manifest("segformer_b0")
    state = seeded_state_dict(manifest, "segformer")
    for key in UNUSED_OFFICIAL_KEYS:
        del state[key]
    model = build_model("segformer-b0").eval()
    model.load_state_dict(state, strict=True)
    io = load_io("segformer_b0")

    with torch.no_grad():
        features = model.forward_features(io["input"])
        logits = model(io["input"])

    assert len(features) == len(io["backbone_features"]) == 4
    for ours, official in zip(features, io["backbone_features"]):
        official_error(ours, official, "segformer_b0")
    official_error(logits, io["logits_quarter"], "segformer_b0")


# Small random configurations of transformers' SegformerConfig, with odd input sizes.
HF_CASES = [
    dict(
        config=dict(
            depths=[1, 2, 1, 2],
            hidden_sizes=[16, 32, 48, 64],
            num_attention_heads=[1, 2, 3, 4],
            sr_ratios=[8, 4, 2, 1],
            mlp_ratios=[4, 4, 4, 4],
            decoder_hidden_size=32,
            num_labels=5,
        ),
        input_shape=(2, 3, 67, 93),
    ),
    dict(
        config=dict(
            depths=[2, 1, 1, 1],
            hidden_sizes=[8, 16, 40, 32],
            num_attention_heads=[1, 2, 5, 8],
            sr_ratios=[4, 2, 2, 1],
            mlp_ratios=[2, 4, 3, 4],
            decoder_hidden_size=24,
            num_labels=3,
        ),
        input_shape=(1, 3, 45, 77),
    ),
    dict(
        config=dict(
            depths=[1, 1, 2, 1],
            hidden_sizes=[12, 24, 36, 48],
            num_attention_heads=[2, 2, 3, 6],
            sr_ratios=[8, 4, 2, 1],
            mlp_ratios=[4, 4, 4, 4],
            patch_sizes=[5, 3, 3, 3],
            strides=[4, 2, 2, 2],
            decoder_hidden_size=16,
            num_labels=19,
        ),
        input_shape=(1, 3, 101, 63),
    ),
]


def _hf_model(config_kwargs: dict, seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(**config_kwargs)
    )
    # Random norms and BN statistics too: with the default ones (1, 0) a mix-up of norm
    # parameters would go unseen.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        bn = model.decode_head.batch_norm
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _ours_like(config_kwargs: dict) -> SegFormer:
    c = config_kwargs
    model = SegFormer(
        c["num_labels"],
        embed_dims=c["hidden_sizes"],
        depths=c["depths"],
        num_heads=c["num_attention_heads"],
        mlp_ratios=c["mlp_ratios"],
        sr_ratios=c["sr_ratios"],
        decoder_dim=c["decoder_hidden_size"],
        patch_sizes=c.get("patch_sizes", (7, 3, 3, 3)),
        strides=c.get("strides", (4, 2, 2, 2)),
    )
    # transformers builds every LayerNorm with the default eps 1e-5 (its config's layer_norm_eps
    # is unused); the official MiT uses 1e-6 in the blocks and stage norms. Align ours to theirs
    # so the comparison measures the architecture, not this known constant.
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5
    return model.eval()


@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_equals_transformers_after_conversion(case, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    config, shape = HF_CASES[case]["config"], HF_CASES[case]["input_shape"]
    hf = _hf_model(config, seed=case)
    hf.save_pretrained(tmp_path)
    on_disk = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("segformer.encoder.block.") for k in on_disk)  # the hub names

    ours = _ours_like(config)
    ours.load_state_dict(hf_segformer_to_official(on_disk), strict=True)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(case))
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        got = ours(x)
    assert got.shape == expected.shape == (shape[0], config["num_labels"], *_quarter(shape))
    assert (got - expected).abs().max().item() < 1e-4

    # transformers 5's in-memory names convert to the same state dict.
    in_memory = hf_segformer_to_official(hf.state_dict())
    assert list(in_memory) == list(ours.state_dict())
    assert all(torch.equal(in_memory[k], v) for k, v in ours.state_dict().items())


def _load_hf(transformers, folder) -> nn.Module:
    """`from_pretrained(folder)`, every tensor of the file used and every parameter loaded."""
    model, info = transformers.SegformerForSemanticSegmentation.from_pretrained(
        folder, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def test_export_to_transformers_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    config = HF_CASES[0]["config"]
    hf = _hf_model(config, seed=10)
    hf.save_pretrained(tmp_path)
    on_disk = safetensors_torch.load_file(tmp_path / "model.safetensors")
    official = hf_segformer_to_official(on_disk)

    exported = official_segformer_to_hf(official)
    assert sorted(exported) == sorted(on_disk)
    assert all(torch.equal(exported[k], on_disk[k]) for k in on_disk)

    # What ours exports loads into transformers and predicts what ours predicts.
    ours = _ours_like(config)
    ours.load_state_dict(official, strict=True)
    with torch.no_grad():
        for p in ours.decode_head.linear_pred.parameters():  # make the export differ from `hf`
            p.mul_(-1.0)
    export_dir = tmp_path / "export"
    hf.config.save_pretrained(export_dir)
    safetensors_torch.save_file(
        official_segformer_to_hf(ours.state_dict()), export_dir / "model.safetensors"
    )
    reloaded = _load_hf(transformers, export_dir)
    x = torch.randn(1, 3, 53, 71, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (reloaded.eval()(pixel_values=x).logits - ours(x)).abs().max().item() < 1e-4


def test_official_weights_exported_to_transformers_give_the_official_outputs(tmp_path):
    # The fixture's official B0 (conv_seg included, as official checkpoints) -> HF hub names ->
    # transformers' own model reproduces the official logits.
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    exported = official_segformer_to_hf(
        seeded_state_dict(load_manifest("segformer_b0"), "segformer")
    )
    assert not any("conv_seg" in k for k in exported)
    transformers.SegformerConfig(num_labels=19).save_pretrained(tmp_path)  # its defaults are B0
    safetensors_torch.save_file(exported, tmp_path / "model.safetensors")
    hf = _load_hf(transformers, tmp_path)
    for name, m in hf.named_modules():  # the official eps 1e-6 (see `_ours_like`)
        if re.fullmatch(
            r".*\.(layernorm_before|layernorm_after)|segformer\.stages\.\d\.layer_norm", name
        ):
            m.eps = 1e-6
    io = load_io("segformer_b0")
    with torch.no_grad():
        logits = hf.eval()(pixel_values=io["input"]).logits
    official_error(logits, io["logits_quarter"], "segformer_b0")


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="decode_head.aux"):
        hf_segformer_to_official({"decode_head.aux.weight": torch.zeros(1)})


def _quarter(shape) -> tuple[int, int]:
    return math.ceil(shape[2] / 4), math.ceil(shape[3] / 4)


def test_odd_input_size_gives_quarter_resolution_logits():
    model = build_model("segformer-b0").eval()
    x = torch.randn(1, 3, 203, 329)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (1, 19, 51, 83)
    assert [f.shape[2:] for f in features] == [(51, 83), (26, 42), (13, 21), (7, 11)]


def test_training_step_gradients_flow_and_are_finite():
    torch.manual_seed(0)
    model = build_model("segformer-b0", num_classes=7, depths=(1, 2, 1, 2), decoder_dim=96).train()
    x = torch.randn(2, 3, 61, 75)
    target = torch.randint(0, 7, (2, 61, 75))
    target[:, :5] = 255  # ignored pixels, as Cityscapes' void
    logits = model(x)  # N×7×16×19
    assert logits.shape == (2, 7, 16, 19)
    logits = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, target, ignore_index=255)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_initialisation_is_the_official_one():
    # mix_transformer.py `_init_weights`: Linear trunc-normal std 0.02 with zero bias, conv
    # normal std sqrt(2 / fan_out) with fan_out = k·k·out / groups; mmcv ConvModule: kaiming
    # fan_out for linear_fuse.
    torch.manual_seed(0)
    model = SegFormer(**VARIANTS["segformer-b0"])
    fc1 = model.backbone.block3[0].mlp.fc1  # 640×160
    assert abs(fc1.weight.std().item() - 0.02) < 0.001 and not fc1.bias.any()
    dw = model.backbone.block3[0].mlp.dwconv.dwconv  # 640 groups, 3×3: fan_out 9
    assert abs(dw.weight.std().item() - math.sqrt(2 / 9)) < 0.03
    embed = model.backbone.patch_embed1.proj  # 32×3×7×7: fan_out 7·7·32
    assert abs(embed.weight.std().item() - math.sqrt(2 / (49 * 32))) < 0.003
    fuse = model.decode_head.linear_fuse.conv  # 256×1024×1×1: fan_out 256
    assert abs(fuse.weight.std().item() - math.sqrt(2 / 256)) < 0.003
    assert model.backbone.block1[0].norm1.eps == 1e-6 and model.backbone.norm4.eps == 1e-6
    assert model.backbone.patch_embed1.norm.eps == 1e-5
