"""prepare_for_inference computes what the eager model computes (segcompare/infer/fast.py).

The eager models are checked against the official code elsewhere (test_hrnet, test_segformer);
here the prepared model is checked against the eager one on odd sizes, with seeded weights and
random BatchNorm statistics (REFERENCE.md's rule), so every folded BN really changes the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import seeded_state_dict
from torch import nn

from segcompare.infer import fast
from segcompare.infer.fast import fold_bn, prepare_for_inference
from segcompare.models import build_model, family_of, hrnet
from segcompare.models.hrnet import VARIANTS as HRNET_VARIANTS

# Small but complete: every fusion path of HRNet (4 branches, 2 modules in stage 4), every
# SegFormer stage with its sequence reduction; both build and run in well under a second.
# SegFormer's first stage is 32 wide, as in every real variant: oneDNN computes bfloat16
# convolutions with fewer channels and stride = kernel wrongly on some CPUs (test_precision.py).
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
        {"embed_dims": (32, 32, 40, 64), "depths": (1, 2, 1, 1), "decoder_dim": 48},
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
    return seeded_module(build_model(name, **overrides), family_of(name))


def seeded_module(module: nn.Module, family: str) -> nn.Module:
    """Any module of `family` with the seeded weights of REFERENCE.md, in eval mode."""
    manifest = {"state_dict": [[k, list(v.shape)] for k, v in module.state_dict().items()]}
    module.load_state_dict(seeded_state_dict(manifest, family))
    return module.eval()


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


# ---------------------------------------------------------------------------------------------
# Block by block: every Fast* module against the eager module it stands for, on the seeded tiny
# models above, so that a change to one block names the twin that drifted. Maps are channels_last
# and the fast blocks' weights too, as prepare_for_inference leaves them. A fast block owns its
# inputs (residuals are added into them in place), so each side gets its own copy.

# Input sizes: HRNet's branches of a 67×93 image (1/4 .. 1/32), SegFormer's stages of the same.
HR_SIZES = [(17, 24), (9, 12), (5, 6), (3, 3)]
MIT_SIZES = HR_SIZES


@pytest.fixture(scope="module")
def tiny() -> dict[str, nn.Module]:
    return {family: seeded(name, **overrides) for family, (name, overrides) in TINY.items()}


def _maps(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [
        torch.randn(2, *shape, generator=g).contiguous(memory_format=torch.channels_last)
        for shape in shapes
    ]


def _branch_maps(channels) -> list[torch.Tensor]:
    return _maps(*((c, *hw) for c, hw in zip(channels, HR_SIZES)))


def _twin(module: nn.Module) -> nn.Module:
    return module.to(memory_format=torch.channels_last).eval()


def _as_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _eager_stage(backbone: nn.Module, s: int, x: torch.Tensor) -> torch.Tensor:
    """Stage s of MixTransformer.forward, written out: patch embedding, blocks, closing norm."""
    tokens, h, w = getattr(backbone, f"patch_embed{s}")(x)
    for block in getattr(backbone, f"block{s}"):
        tokens = block(tokens, h, w)
    return _as_map(getattr(backbone, f"norm{s}")(tokens), h, w)


# Each case: (eager, fast twin, inputs), both called on the list of inputs.
def _residual_block(block: nn.Module) -> tuple:
    twin = _twin(fast.FastResidualBlock(copy.deepcopy(block)))
    return (lambda xs: block(*xs)), (lambda xs: twin(*xs)), _maps((block.conv1.in_channels, 9, 12))


def _hr_module(module: hrnet.HighResolutionModule) -> tuple:
    twin = _twin(fast.FastHRModule(copy.deepcopy(module)))
    return module, twin, _branch_maps(module.out_channels)


def _transition(model: hrnet.HRNet, k: int, in_channels: list[int]) -> tuple:
    paths = getattr(model, f"transition{k}")
    twins = [_twin(fast._transition_path(copy.deepcopy(t))) for t in paths]

    def run(ts):  # as HRNet.forward_features: new branches start from the lowest resolution
        return lambda xs: [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(ts)]

    return run(paths), run(twins), _branch_maps(in_channels)


def _hrnet_head(model: hrnet.HRNet) -> tuple:
    channels = model.stage4[-1].out_channels
    twin = _twin(fast.FastHRNetHead(copy.deepcopy(model.last_layer), channels))
    return model.forward_head, twin, _branch_maps(channels)


def _attention(model: nn.Module, s: int) -> tuple:
    """The eager attention returns attn(x); the fast one residual + attn(x)."""
    attn = getattr(model.backbone, f"block{s}")[0].attn
    twin = _twin(fast.FastAttention(copy.deepcopy(attn)))
    h, w = MIT_SIZES[s - 1]
    inputs = _maps((attn.q.in_features, h, w), (attn.q.in_features, h, w))  # x, residual
    return (
        (lambda xs: xs[1] + _as_map(attn(_as_tokens(xs[0]), h, w), h, w)),
        (lambda xs: twin(*xs)),
        inputs,
    )


def _mit_block(model: nn.Module) -> tuple:
    block = model.backbone.block2[1]
    twin = _twin(fast.FastBlock(copy.deepcopy(block)))
    h, w = MIT_SIZES[1]
    inputs = _maps((block.norm1.normalized_shape[0], h, w))
    return (
        (lambda xs: _as_map(block(_as_tokens(xs[0]), h, w), h, w)),
        (lambda xs: twin(*xs)),
        inputs,
    )


def _mit_stage(model: nn.Module, s: int) -> tuple:
    bb = model.backbone
    parts = [getattr(bb, f"{part}{s}") for part in ("patch_embed", "block", "norm")]
    twin = _twin(fast.FastStage(*copy.deepcopy(parts)))
    in_dim = parts[0].proj.in_channels
    inputs = _maps((in_dim, 67, 93) if s == 1 else (in_dim, *MIT_SIZES[s - 2]))
    return (lambda xs: _eager_stage(bb, s, *xs)), (lambda xs: twin(*xs)), inputs


def _segformer_head(model: nn.Module) -> tuple:
    twin = _twin(fast.FastSegFormerHead(copy.deepcopy(model.decode_head)))
    dims = TINY["segformer"][1]["embed_dims"]
    return model.decode_head, twin, _maps(*((c, *hw) for c, hw in zip(dims, MIT_SIZES)))


BLOCK_CASES = {
    "FastResidualBlock-bottleneck-downsample": lambda m: _residual_block(m["hrnet"].layer1[0]),
    "FastResidualBlock-basic": lambda m: _residual_block(m["hrnet"].stage3[0].branches[1][1]),
    "FastResidualBlock-basic-downsample": lambda m: _residual_block(
        seeded_module(hrnet.BasicBlock(6, 8), "hrnet")
    ),
    "FastResidualBlock-bottleneck": lambda m: _residual_block(
        seeded_module(hrnet.Bottleneck(16, 4), "hrnet")
    ),
    "FastHRModule": lambda m: _hr_module(m["hrnet"].stage4[1]),
    "transition-conv_bn-and-new-branch": lambda m: _transition(m["hrnet"], 1, [32]),
    "transition-identity-and-chain": lambda m: _transition(m["hrnet"], 3, [4, 8, 16]),
    "FastHRNetHead": lambda m: _hrnet_head(m["hrnet"]),
    "FastAttention-sr8": lambda m: _attention(m["segformer"], 1),
    "FastAttention-sr1": lambda m: _attention(m["segformer"], 4),
    "FastBlock": lambda m: _mit_block(m["segformer"]),
    "FastStage-patch7": lambda m: _mit_stage(m["segformer"], 1),
    "FastStage-patch3": lambda m: _mit_stage(m["segformer"], 3),
    "FastSegFormerHead": lambda m: _segformer_head(m["segformer"]),
}


@pytest.mark.parametrize("path", ["onednn", "plain"])
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_equals_its_eager_twin(case, path, tiny, monkeypatch):
    if path == "plain":
        monkeypatch.setattr(fast, "_ONEDNN", False)
    eager, fast_fn, inputs = BLOCK_CASES[case](tiny)
    with torch.inference_mode():
        ref = eager([x.clone() for x in inputs])
        out = fast_fn([x.clone() for x in inputs])
    refs, outs = (ref, out) if isinstance(ref, list) else ([ref], [out])
    assert len(outs) == len(refs)
    for r, o in zip(refs, outs):
        assert o.shape == r.shape and o.dtype == r.dtype
        # fp32 rounding only: ~1e-6 of the magnitude here; 1e-4 of it still catches a LayerNorm
        # scaled by 1.001 or one term of a fusion sum left out
        assert (o - r).abs().max().item() <= 1e-4 * max(1.0, r.abs().max().item())


# ---------------------------------------------------------------------------------------------
# BranchSum: each head term computed high (upsample, then the conv) or low (the conv, then
# upsample). The tiny models above take every term high, the real variants mix both.


@pytest.mark.parametrize("high", [[], [1], [2], [1, 2], [1, 2, 3]], ids=str)
@pytest.mark.parametrize("path", ["onednn", "plain"])
def test_branch_sum_equals_the_conv_over_the_concatenation(high, path, monkeypatch):
    if path == "plain":
        monkeypatch.setattr(fast, "_ONEDNN", False)
    channels, d = [4, 8, 16, 32], 24
    xs = _branch_maps(channels)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(d, sum(channels), 1, 1, generator=g, dtype=torch.float64) / 8
    b = torch.randn(d, generator=g, dtype=torch.float64)
    size = xs[0].shape[-2:]
    ups = [xs[0]] + [F.interpolate(x, size, mode="bilinear", align_corners=False) for x in xs[1:]]
    ref = F.relu(F.conv2d(torch.cat(ups, 1).double(), w, b))
    module = _twin(fast.BranchSum(torch.split(w.float(), channels, dim=1), b.float(), high=high))
    assert module.high == high and module.low == [j for j in (1, 2, 3) if j not in high]
    with torch.inference_mode():
        out = module([x.clone() for x in xs])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "channels, d, high",
    [
        ((18, 36, 72, 144), 270, [1, 2]),  # HRNet-W18 (and both Small variants)
        ((48, 96, 192, 384), 720, [1]),  # HRNet-W48
        ((32, 64, 160, 256), 256, [1]),  # SegFormer-B0 (each term is decoder_dim wide)
        ((64, 128, 320, 512), 768, [1]),  # SegFormer-B2..B5
    ],
)
def test_branch_sum_takes_narrow_near_terms_high(channels, d, high):
    """The cost rule of BranchSum's docstring on the real widths (a decision, not a timing)."""
    slices = [torch.zeros(d, c, 1, 1) for c in channels]
    assert fast.BranchSum(slices, torch.zeros(d)).high == high
