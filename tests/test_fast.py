"""prepare_for_inference computes what the eager model computes (segcompare/infer/fast.py).

The eager models are checked against the official code elsewhere (test_hrnet, test_segformer);
here the prepared model is checked against the eager one on odd sizes, with seeded weights and
random BatchNorm statistics (REFERENCE.md's rule), so every folded BN really changes the weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import seeded_state_dict
from torch import nn

from segcompare.infer import fast
from segcompare.infer.fast import fold_bn, prepare_for_inference
from segcompare.models import build_model, model_family
from segcompare.models.hrnet import VARIANTS as HRNET_VARIANTS

# Small but complete: every fusion path of HRNet (4 branches, 2 modules in stage 4), every
# SegFormer stage with its sequence reduction; both build and run in well under a second.
_SMALL = HRNET_VARIANTS["hrnet-w18-small-v1"]
TINY = {
    "hrnet": (
        "hrnet-w18-small-v1",
        {
            "stage1": {**_SMALL["stage1"], "num_channels": (8,)},
            "stage2": {**_SMALL["stage2"], "num_channels": (4, 8)},
            "stage3": {**_SMALL["stage3"], "num_channels": (4, 8, 16)},
            "stage4": {**_SMALL["stage4"], "num_modules": 2, "num_channels": (4, 8, 16, 32)},
        },
    ),
    "segformer": (
        "segformer-b0",
        {"embed_dims": (16, 32, 40, 64), "depths": (1, 2, 1, 1), "decoder_dim": 48},
    ),
}
SIZES = [(203, 329), (64, 128)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Equality, not speed, is tested here: one thread keeps the many small ops from waiting on
    each other when the machine is busy (2 threads on a loaded 2-core box are ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(name: str, **overrides) -> nn.Module:
    """`name` with the seeded weights of REFERENCE.md: random BN scale, shift, mean and var."""
    model = build_model(name, **overrides)
    manifest = {"state_dict": [[k, list(v.shape)] for k, v in model.state_dict().items()]}
    model.load_state_dict(seeded_state_dict(manifest, model_family(name)))
    return model.eval()


def assert_same_function(ref: torch.Tensor, out: torch.Tensor, tol: float = 1e-3) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).abs().max().item() <= tol
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.999


@pytest.mark.parametrize("family", ["hrnet", "segformer"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_prepared_equals_eager(family, size, channels_last):
    name, overrides = TINY[family]
    model = seeded(name, **overrides)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x)
        out = prepare_for_inference(model, channels_last=channels_last)(x)
    assert_same_function(ref, out)


@pytest.mark.parametrize("name", ["hrnet-w18-small-v1", "segformer-b0"])
def test_real_variant_equals_eager(name):
    model = seeded(name)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert_same_function(model(x), prepare_for_inference(model)(x))


def test_hrnet_with_3x3_classifier():
    name, overrides = TINY["hrnet"]
    model = seeded(name, final_conv_kernel=3, **overrides)
    x = torch.randn(1, 3, 75, 99)
    with torch.inference_mode():
        assert_same_function(model(x), prepare_for_inference(model)(x))


@pytest.mark.parametrize("family", ["hrnet", "segformer"])
def test_plain_ops_path_equals_eager(family, monkeypatch):
    """Where oneDNN's fused ops cannot run (tracing, export, other devices), plain ops do."""
    name, overrides = TINY[family]
    model = seeded(name, **overrides)
    monkeypatch.setattr(fast, "_ONEDNN", False)
    x = torch.randn(1, 3, 67, 93)
    with torch.inference_mode():
        assert_same_function(model(x), prepare_for_inference(model)(x))


def test_input_model_is_untouched():
    name, overrides = TINY["hrnet"]
    model = seeded(name, **overrides).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_inference(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    shared = {p.data_ptr() for p in model.parameters()} & {
        p.data_ptr() for p in prepared.parameters()
    }
    assert not shared
    assert not prepared.training and prepared.variant == model.variant


@pytest.mark.parametrize("family", ["hrnet", "segformer"])
def test_input_tensor_is_untouched(family):
    """Residuals are accumulated in place, but never into the caller's tensor."""
    name, overrides = TINY[family]
    prepared = prepare_for_inference(seeded(name, **overrides))
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode():
        prepared(x)
    assert torch.equal(x, before)


def test_fold_bn_equals_conv_then_bn():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(7)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(7, generator=g))
        bn.running_var.copy_(torch.rand(7, generator=g) + 0.1)
    seq = nn.Sequential(conv, bn).eval()
    w, b = fold_bn(conv.weight, conv.bias, bn)
    x = torch.randn(2, 5, 9, 11, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, w, b, padding=1), seq(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(7, 13), (5, 9)])
def test_bilinear_resize_commutes_with_affine_maps(size):
    """The head rewrites rest on this: resizing (align_corners=False) then a 1×1 conv with bias
    equals the conv then resizing, at the odd ratios of odd input sizes too."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, *size, generator=g, dtype=torch.float64)
    w, b = (
        torch.randn(4, 6, 1, 1, generator=g, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64),
    )
    out_hw = (2 * size[0] + 3, 4 * size[1] - 1)

    def up(t):
        return F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)

    torch.testing.assert_close(F.conv2d(up(x), w, b), up(F.conv2d(x, w, b)))


@pytest.mark.parametrize("family", ["hrnet", "segformer"])
def test_bfloat16_is_opt_in_and_close(family):
    name, overrides = TINY[family]
    model = seeded(name, **overrides)
    x = torch.randn(1, 3, 64, 96)
    prepared = prepare_for_inference(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in prepared.parameters())
    with torch.inference_mode():
        ref, out = model(x), prepared(x)
    assert out.dtype == torch.float32  # the input's dtype
    assert (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.95


def test_other_models_are_copied_as_they_are():
    conv = nn.Conv2d(3, 2, 1).train()
    prepared = prepare_for_inference(conv)
    x = torch.randn(1, 3, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), conv(x))
    assert conv.training and not prepared.training
