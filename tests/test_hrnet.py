"""HRNetV2 against the official layout and outputs (tests/fixtures, see REFERENCE.md there)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import load_io, load_manifest, official_error, seeded_state_dict

from segcompare.models import build_model, count_parameters, family_of
from segcompare.models.hrnet import VARIANTS

HRNETS = list(VARIANTS)
# a 2-module, few-channel HRNet for the odd-size checks: quick, yet every fusion path is there
TINY = {
    "stage1": {**VARIANTS["hrnet-w18-small-v1"]["stage1"], "num_channels": (8,)},
    "stage2": {**VARIANTS["hrnet-w18-small-v1"]["stage2"], "num_channels": (4, 8)},
    "stage3": {**VARIANTS["hrnet-w18-small-v1"]["stage3"], "num_channels": (4, 8, 16)},
    "stage4": {
        **VARIANTS["hrnet-w18-small-v1"]["stage4"],
        "num_modules": 2,
        "num_channels": (4, 8, 16, 32),
    },
}


def _stem(name: str) -> str:
    return name.replace("-", "_")  # hrnet-w18-small-v1 -> fixtures/hrnet_w18_small_v1.*


def test_all_five_variants_are_registered():
    assert HRNETS == [
        "hrnet-w18-small-v1",
        "hrnet-w18-small-v2",
        "hrnet-w18",
        "hrnet-w32",
        "hrnet-w48",
    ]
    assert all(family_of(name) == "hrnet" for name in HRNETS)


@pytest.mark.parametrize("name", HRNETS)
def test_state_dict_layout_equals_official(name):
    manifest = load_manifest(_stem(name))
    with torch.device("meta"):  # no memory, no init cost: W48 builds in well under a second
        model = build_model(name, num_classes=manifest["num_classes"])
    ours = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert ours == manifest["state_dict"]
    assert count_parameters(model) == manifest["num_parameters"]


def test_w48_parameter_count_as_segcompare_models_prints_it():
    with torch.device("meta"):
        model = build_model("hrnet-w48")
    assert f"{count_parameters(model):,}" == "65,859,379"


@pytest.mark.parametrize("name", ["hrnet-w18-small-v1", "hrnet-w18-small-v2"])
def test_seeded_weights_give_official_logits(name):
    stem = _stem(name)
    io = load_io(stem)
    model = build_model(name).eval()
    model.load_state_dict(seeded_state_dict(load_manifest(stem), "hrnet"))
    with torch.no_grad():
        logits = model(io["input"])
    max_diff = official_error(logits, io["logits_quarter"], stem)  # bound and measured: there
    print(f"{name}: max |ours - official| = {max_diff:.3g}")


def test_official_initialisation():
    model = build_model("hrnet-w18-small-v1")
    conv = model.stage4[0].branches[3][0].conv1.weight  # 128×128×3×3: enough samples for a std
    assert abs(conv.std().item() - 0.001) < 0.0001
    bn = model.last_layer[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_training_step_gradients_flow_and_are_finite():
    torch.manual_seed(0)
    model = build_model("hrnet-w18-small-v1", num_classes=5).train()
    images = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 5, (2, 16, 24))
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    for key, p in model.named_parameters():
        assert p.grad is not None, key
        assert torch.isfinite(p.grad).all(), key
    # every branch of the last module reaches the loss through the fusion and the head
    assert all(branch[0].conv1.weight.grad.abs().sum() > 0 for branch in model.stage4[0].branches)


@pytest.mark.parametrize("hw", [(203, 329), (33, 47), (64, 128)])
def test_odd_input_sizes(hw):
    h, w = hw
    model = build_model("hrnet-w18-small-v1", num_classes=7, **TINY).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, h, w)
        features = model.forward_features(x)
        logits = model(x)
    # each stride-2 3×3 conv (padding 1) maps n to ceil(n / 2)
    sizes = [(math.ceil(h / 2**k), math.ceil(w / 2**k)) for k in (2, 3, 4, 5)]
    assert [tuple(f.shape[-2:]) for f in features] == sizes
    assert [f.shape[1] for f in features] == [4, 8, 16, 32]
    assert logits.shape == (1, 7, *sizes[0])


def test_full_variant_on_odd_size():
    model = build_model("hrnet-w18-small-v2").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 203, 329))
    assert logits.shape == (1, 19, 51, 83)
    assert torch.isfinite(logits).all()


def test_overrides_change_the_stages():
    stage4 = {**VARIANTS["hrnet-w18"]["stage4"], "num_modules": 1}
    with torch.device("meta"):
        model = build_model("hrnet-w18", stage4=stage4)
    assert len(model.stage4) == 1
    assert model.settings["stage4"]["num_modules"] == 1
    assert VARIANTS["hrnet-w18"]["stage4"]["num_modules"] == 3  # the table is untouched


@pytest.mark.parametrize(
    "stage2, message",
    [
        ({"num_modules": 1}, "must be a mapping with the keys"),
        ({**VARIANTS["hrnet-w18"]["stage2"], "block": "RESNEXT"}, "block must be one of"),
        ({**VARIANTS["hrnet-w18"]["stage2"], "num_blocks": (4,)}, "num_blocks must be a list of 2"),
    ],
)
def test_bad_stage_settings_are_value_errors(stage2, message):
    with pytest.raises(ValueError, match=message):
        build_model("hrnet-w18", stage2=stage2)


def test_unknown_override_is_a_value_error():
    with pytest.raises(ValueError, match="stage2"):
        build_model("hrnet-w18", stage5={})


@pytest.mark.parametrize(
    "name, momentum",
    # seg_hrnet.py BN_MOMENTUM: 0.01 on branch pytorch-v1.1 (the small models), 0.1 on HRNet-OCR
    [("hrnet-w18-small-v1", 0.01), ("hrnet-w18-small-v2", 0.01), ("hrnet-w18", 0.1),
     ("hrnet-w32", 0.1), ("hrnet-w48", 0.1)],
)
def test_bn_momentum_per_variant(name, momentum):
    with torch.device("meta"):
        model = build_model(name)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == momentum for m in bns)
    assert model.settings["bn_momentum"] == momentum


def test_small_model_running_stats_move_by_one_hundredth():
    torch.manual_seed(0)
    model = build_model("hrnet-w18-small-v1").train()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    # the stem's first BN sees conv1(x): running_mean = 0.99 * 0 + 0.01 * batch mean
    batch_mean = model.conv1(x).mean(dim=(0, 2, 3))
    assert torch.allclose(model.bn1.running_mean, 0.01 * batch_mean, rtol=1e-4, atol=1e-9)
