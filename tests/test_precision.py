"""The bfloat16 self-check (segcompare.models.precision) and the guard that runs the layers it
finds in float32: in the eager model under autocast, and in prepare_for_inference's model.

Which convolutions oneDNN gets wrong depends on the CPU, so these tests make a layer "wrong" by
hand (the verdict cache) and check what the guard does with it; none of them depends on how this
CPU computes bfloat16, except the last, which measures the oneDNN bug on this CPU and demands that
the self-check finds exactly what it measured."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcompare.infer.fast import FusedConv, prepare_for_inference
from segcompare.models import build_model, precision

TINY_B0 = {"embed_dims": (32, 32, 40, 64), "depths": (1, 1, 1, 1), "decoder_dim": 32}


@pytest.fixture
def verdicts(monkeypatch):
    """The self-check's answers, to be set by the test: geometry -> wrong."""
    table: dict = {}
    monkeypatch.setattr(precision, "_VERDICTS", table)
    return table


def _wrong_if_patchify(verdicts, model: nn.Module, channels_last: bool) -> list[str]:
    """Declare every conv whose stride equals its kernel (patch embeddings, reductions) wrong."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            for cl in (False, True):
                key = (tuple(m.weight.shape), tuple(m.stride), tuple(m.padding), tuple(m.dilation),
                       m.groups, cl, "cpu")
                verdicts[key] = m.stride == m.kernel_size and m.stride != (1, 1)
            if verdicts[key]:
                names.append(name)
    return names


def test_the_probe_finds_a_conv_that_computes_wrongly(monkeypatch, verdicts):
    """A bfloat16 conv that returns garbage (as oneDNN does for some shapes on some CPUs) is found;
    the same geometry computed right is not."""
    conv = nn.Conv2d(16, 16, 8, stride=8)
    real = F.conv2d

    def broken(x, w, *args):
        out = real(x, w, *args)
        return out.flip(1) if x.dtype == torch.bfloat16 else out

    monkeypatch.setattr(precision.F, "conv2d", broken)
    assert precision.bf16_is_wrong(conv)
    monkeypatch.setattr(precision.F, "conv2d", lambda x, w, *a: real(x.float(), w.float(), *a))
    verdicts.clear()
    assert not precision.bf16_is_wrong(conv)


def test_guard_runs_the_wrong_convs_in_float32_under_autocast(verdicts):
    torch.manual_seed(0)
    model = build_model("segformer-b0", **TINY_B0).eval()
    keys = list(model.state_dict())
    wrong = _wrong_if_patchify(verdicts, model, channels_last=False)
    assert wrong  # the four patch embeddings and the reductions
    assert precision.guard_bf16(model) == wrong
    assert list(model.state_dict()) == keys  # names and parameters unchanged
    conv = model.get_submodule(wrong[0])
    assert isinstance(conv, precision.Float32Conv2d)
    x = torch.randn(1, conv.in_channels, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))
    right = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    assert right and not set(right) & set(wrong)


def test_prepared_bfloat16_model_keeps_the_wrong_convs_in_float32(verdicts):
    torch.manual_seed(0)
    model = build_model("segformer-b0", **TINY_B0).eval()
    _wrong_if_patchify(verdicts, model, channels_last=True)
    fast = prepare_for_inference(model, dtype=torch.bfloat16)
    fused = [m for m in fast.modules() if isinstance(m, FusedConv)]
    patchify = [m for m in fused if m.stride == list(m.weight.shape[-2:]) and m.stride != [1, 1]]
    assert patchify and all(m.weight.dtype == torch.float32 for m in patchify)
    assert all(m.weight.dtype == torch.bfloat16 for m in fused if m not in patchify)
    # a float32 layer in a bfloat16 model: float32 maths on the bfloat16 input, bfloat16 out
    m = patchify[0]
    x = torch.randn(1, m.weight.shape[1], 16, 16).bfloat16()
    with torch.inference_mode():
        y = m(x)
    expected = F.conv2d(x.float(), m.weight, m.bias, m.stride, m.padding).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    with torch.inference_mode():
        ref, out = model(torch.randn(1, 3, 64, 64)), fast(torch.randn(1, 3, 64, 64))
    assert out.shape == ref.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kernel", [4, 8])
def test_onednn_bfloat16_small_strided_conv_is_found_and_guarded(verdicts, kernel):
    """oneDNN computes 16-channel bfloat16 convs with stride = kernel 4 or 8 wrongly on some CPUs
    (an Intel Xeon with AMX, torch 2.13) and right on others. Whichever this CPU does, the
    self-check must say it, and the guarded layer must then be right under autocast."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4 * kernel, 6 * kernel, generator=g).bfloat16()
    w = (torch.randn(16, 16, kernel, kernel, generator=g) * 0.05).bfloat16()
    ref = F.conv2d(x.float(), w.float(), stride=kernel)

    def relative_error(out: torch.Tensor) -> float:
        return ((out.float() - ref).norm() / ref.norm()).item()

    wrong_here = relative_error(F.conv2d(x, w, stride=kernel)) > precision.WRONG_RELATIVE_ERROR
    conv = nn.Conv2d(16, 16, kernel, stride=kernel, bias=False)
    conv.weight.data = w.float()
    model = nn.Sequential(conv).eval()
    assert precision.guard_bf16(model) == (["0"] if wrong_here else [])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.float())
    assert relative_error(out) < 0.01  # bfloat16 rounding (~0.002), or float32 when guarded


# ---------------------------------------------------------------------------------------------
# --precision (segcompare.precision): one value in InferenceSettings; --amp stays its alias


def _settings(argv: list[str]):
    """The InferenceSettings `segcompare predict` builds from its options."""
    from segcompare.cli import build_parser
    from segcompare.cli.args import _inference_settings

    args = build_parser().parse_args(["predict", "x.png", "--out", "o", "--device", "cpu", *argv])
    return _inference_settings(args)


def test_amp_is_bf16_on_the_cpu_as_before():
    """--amp meant bfloat16 autocast on a CPU (README, 'bf16'): it is --precision bf16 there."""
    assert _settings([]).precision == "fp32"
    assert _settings(["--amp"]).precision == "bf16"
    assert _settings(["--amp", "--precision", "bf16"]).precision == "bf16"
    assert _settings(["--precision", "fp16"]).precision == "fp16"
    from segcompare.evaluate import InferenceSettings

    assert InferenceSettings(device="cpu", amp=True).precision == "bf16"  # the Python API too


def test_amp_and_another_precision_is_one_clear_error():
    from segcompare.utils import SegcompareError

    with pytest.raises(SegcompareError, match="--amp means --precision bf16 here, not fp16"):
        _settings(["--amp", "--precision", "fp16"])


@pytest.mark.parametrize("command", ["predict", "eval", "compare", "video", "bench"])
def test_every_inference_command_offers_every_precision(command, capsys):
    from segcompare.cli import build_parser
    from segcompare.precision import PRECISIONS

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--precision {{{','.join(PRECISIONS)}}}" in text and "--amp" in text


def test_an_unknown_precision_names_the_choices():
    from segcompare.evaluate import InferenceSettings
    from segcompare.utils import SegcompareError

    with pytest.raises(SegcompareError, match="'fp8': valid: fp32, bf16, fp16"):
        InferenceSettings(precision="fp8")


def test_settings_written_before_precision_still_read():
    """eval's and compare's JSON said `"amp": true` before `precision` existed."""
    from segcompare.compare.report import describe_inference

    old = {"mode": "slide", "scales": [1.0], "amp": True, "optimize": True}
    new = {"mode": "slide", "scales": [1.0], "precision": "bf16", "optimize": True}
    assert "mixed precision" in describe_inference(old)
    assert "bf16 precision" in describe_inference(new)
    assert "precision" not in describe_inference({**old, "amp": False})


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_the_predictor_prepares_the_model_in_its_precision(name):
    """The prepared model's weights are in the precision's dtype (bf16 ones kept in float32 by
    the self-check aside) and the logits come back as float32."""
    from segcompare.evaluate import InferenceSettings
    from segcompare.infer import Predictor

    torch.manual_seed(0)
    model = build_model("segformer-b0", num_classes=5, **TINY_B0)
    predictor = Predictor(model, InferenceSettings(device="cpu", precision=name, mode="whole"))
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    dtypes = {p.dtype for m in predictor.forward.modules()
              if not getattr(m, "keep_float32", False) for p in m.parameters(recurse=False)}
    assert dtypes == {want}
    assert predictor.describe()["precision"] == name
    assert predictor.run_model(torch.randn(1, 3, 64, 64)).dtype == torch.float32


def test_bench_dtype_is_the_older_name_of_precision(tmp_path):
    import json

    from segcompare.cli import main

    out = tmp_path / "b.json"
    argv = ["bench", "segformer-b0", "--size", "64x64", "--warmup", "0", "--iters", "1",
            "--device", "cpu", "--json", str(out)]
    assert main([*argv, "--dtype", "bf16"]) == 0
    assert json.loads(out.read_text())["meta"]["dtype"] == "bf16"
    assert main([*argv, "--precision", "fp16", "--dtype", "bf16", "--overwrite"]) != 0
