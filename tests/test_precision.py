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


# ---------------------------------------------------------------------------------------------
# bfloat16 where it pays: the timing probe (segcompare.models.precision.probe_ms / time_each)
# and BF16Probe, which picks each layer's way. What this CPU's bfloat16 costs must not decide
# these tests: the timings are injected (or the clock is).


def _fake_probe(monkeypatch, conv_ms, attention_ms, whole_ms, calls=None):
    """Make the probe 'measure' given timings: conv_ms(key) and attention_ms(key) -> {way: ms}
    for each layer (key: what `_probe_layer` names it by), whole_ms -> {way: ms} for the whole
    model. Checks the ways offered are the ones the rule chooses among."""
    from segcompare.infer import fast

    def probe_ms(key, ways):
        if calls is not None:
            calls.append(key)
        if key[0] == "attention":
            assert tuple(ways) == fast.ATTENTION_WAYS
            return attention_ms(key)
        assert tuple(ways) == ("fp32", "bf16")
        return conv_ms(key)

    def time_each(ways):
        assert tuple(ways) == ("fp32", "bf16")
        if calls is not None:
            calls.append("whole")
        return whole_ms

    monkeypatch.setattr(fast, "probe_ms", probe_ms)
    monkeypatch.setattr(fast, "time_each", time_each)


def _tiny_b0(num_classes=5):
    torch.manual_seed(0)
    return build_model("segformer-b0", num_classes=num_classes, **TINY_B0).eval()


def test_each_layer_runs_the_way_the_probe_found_fastest(monkeypatch):
    """Depthwise convs slower in bf16, attention fastest as bf16 matmuls, every other conv
    faster in bf16: the model runs each so, and the report says it in one line."""
    from segcompare.infer.fast import FastAttention, FusedConv, describe_layer_precision

    def conv_ms(key):  # key: ("conv", weight shape, stride, padding, groups, ...)
        return {"fp32": 1.0, "bf16": 2.0} if key[4] > 1 else {"fp32": 2.0, "bf16": 1.0}

    _fake_probe(monkeypatch, conv_ms, lambda key: {"fp32": 3.0, "bf16": 2.0, "bf16 matmuls": 1.0},
                {"fp32": 2.0, "bf16": 1.0})
    fast_model = prepare_for_inference(_tiny_b0(), torch.bfloat16)
    fast_model(torch.randn(1, 3, 64, 64))
    ways = {name: m.way for name, m in fast_model.net.named_modules()
            if isinstance(m, (FusedConv, FastAttention))}
    assert ways["stages.0.blocks.0.dwconv"] == "fp32"
    assert ways["stages.0.blocks.0.attn"] == "bf16 matmuls"
    assert ways["stages.0.blocks.0.fc1"] == ways["head.linear_pred"] == "bf16"
    assert sum(w == "fp32" for w in ways.values()) == 4  # one depthwise conv per block
    line = describe_layer_precision(fast_model.layer_precision()[0])
    assert line.startswith("layer precision at 1x3x64x64: bf16: ")
    assert "4 attention (as bf16 matmuls, faster here)" in line
    assert "fp32: 4 Mix-FFN depthwise (slower in bf16 here)" in line


def _runs_as_float32(model: nn.Module) -> nn.Module:
    """`model` prepared in bfloat16 and run as Predictor runs it (bf16 autocast): its logits are
    float32 and equal the float32 model's; returns the prepared model."""
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = prepare_for_inference(model, torch.bfloat16)
        logits = got(x)
    with torch.inference_mode():
        want = prepare_for_inference(model)(x)
    assert logits.dtype == torch.float32 and torch.equal(logits, want)
    return got


def test_the_whole_model_runs_in_fp32_where_that_is_faster(monkeypatch):
    """A CPU without bfloat16 units: the float32 model runs, and gives float32's logits."""
    _fake_probe(monkeypatch, lambda key: {"fp32": 1.0, "bf16": 2.0},
                lambda key: {"fp32": 2.0, "bf16": 1.0, "bf16 matmuls": 3.0},
                {"fp32": 1.0, "bf16": 2.0})
    model = _tiny_b0()
    got = _runs_as_float32(model)
    report = got.layer_precision()[0]
    assert {row["precision"] for row in report["layers"]} == {"fp32"}
    assert report["whole_ms"] == {"fp32": 1.0, "bf16": 2.0}


@pytest.mark.parametrize("variant", ["segformer", "hrnet-w18-small-v1"])
def test_bf16_runs_the_float32_model_on_a_cpu_without_bf16_units(monkeypatch, variant):
    """No AVX512-BF16, no AMX: bfloat16 is emulated, slower than float32 for both families, so
    the float32 model runs (no probe), gives float32's logits, and the report says why;
    probe=False still runs bfloat16, as asked."""
    from segcompare.infer.fast import NO_BF16_UNITS, describe_layer_precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(precision, "probe_ms", lambda *a: pytest.fail("probed"))
    torch.manual_seed(0)
    model = _tiny_b0() if variant == "segformer" else build_model(variant, num_classes=5).eval()
    got = _runs_as_float32(model)
    assert {p.dtype for p in got.parameters()} == {torch.float32}
    (report,) = got.layer_precision()
    assert report["layers"] and {(r["precision"], r["why"]) for r in report["layers"]} == {
        ("fp32", NO_BF16_UNITS)}
    assert f"({NO_BF16_UNITS})" in describe_layer_precision(report)
    forced = prepare_for_inference(model, torch.bfloat16, probe=False)
    assert torch.bfloat16 in {p.dtype for p in forced.parameters()}


def test_the_probe_runs_once_per_input_shape(monkeypatch):
    calls: list = []
    _fake_probe(monkeypatch, lambda key: {"fp32": 2.0, "bf16": 1.0},
                lambda key: {"fp32": 2.0, "bf16": 1.0, "bf16 matmuls": 3.0},
                {"fp32": 2.0, "bf16": 1.0}, calls)
    fast_model = prepare_for_inference(_tiny_b0(), torch.bfloat16)
    with torch.inference_mode():
        fast_model(torch.randn(1, 3, 64, 64))
        first = len(calls)
        fast_model(torch.randn(1, 3, 64, 64))
        assert len(calls) == first > 0
        fast_model(torch.randn(1, 3, 64, 96))
    assert len(calls) == 2 * first
    assert "whole" not in calls  # every layer was faster in bf16: no need to time the whole
    # each conv and attention is probed at the shape it really meets: stage 1 of a 64×96
    # image is 16×24 tokens
    assert ("attention", (1, 1, 16 * 24, 32), (1, 1, 2 * 3, 32)) in calls
    assert [r["input"] for r in fast_model.layer_precision()] == [[1, 3, 64, 64], [1, 3, 64, 96]]


def test_time_each_keeps_the_fastest_run_of_each_way(monkeypatch):
    """A clock that each run advances by a set amount: the fastest run of each counts, the ways
    alternate, and a small op runs until PROBE_MS have passed (not beyond PROBE_MAX_RUNS)."""
    now = [0.0]
    order = []
    costs = {"a": iter([9.0, 5.0, 4.0, 6.0] + [7.0] * 30), "b": iter([9.0, 2.0, 3.0] + [8.0] * 30)}

    def run(way):
        order.append(way)
        now[0] += next(costs[way]) / 1000

    monkeypatch.setattr(precision.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(precision, "PROBE_MS", 30.0)
    got = precision.time_each({"a": lambda: run("a"), "b": lambda: run("b")})
    assert got == pytest.approx({"a": 4.0, "b": 2.0})  # rounds 1-2: 25 ms; 3 ends past 30
    assert order == ["a", "b"] * 3
    monkeypatch.setattr(precision, "PROBE_MS", 1e9)
    costs = {"a": iter([1.0] * 100), "b": iter([1.0] * 100)}
    order.clear()
    precision.time_each({"a": lambda: run("a"), "b": lambda: run("b")})
    assert len(order) == 2 * precision.PROBE_MAX_RUNS


def test_the_rule_prefers_fp32_at_equal_times():
    assert precision.fastest({"fp32": 1.0, "bf16": 1.0}) == "fp32"
    assert precision.fastest({"fp32": 1.0, "bf16": 0.9, "bf16 matmuls": 0.5}) == "bf16 matmuls"


# ---------------------------------------------------------------------------------------------
# Accuracy: bfloat16 logits against a float64 reference, within a bound from bfloat16's unit
# roundoff (2^-8), whatever way each layer takes. Measured on this CPU (2026-12-04): at most
# 0.011 of the largest logit (2.8 units), for every combination; the bound is 6 units.

BF16_UNIT = 2.0**-8
LOGIT_BOUND = 6 * BF16_UNIT  # × the largest |logit|


@pytest.mark.parametrize("conv_way", ["bf16", "fp32"])
@pytest.mark.parametrize("attention_way", ["fp32", "bf16", "bf16 matmuls"])
def test_bf16_logits_are_within_the_bound_of_float64(conv_way, attention_way):
    from segcompare.infer.fast import FastAttention, FusedConv

    model = _tiny_b0()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fast_model = prepare_for_inference(model, torch.bfloat16, probe=False)
        for m in fast_model.net.modules():
            if isinstance(m, FusedConv):
                m.way = conv_way
            elif isinstance(m, FastAttention):
                m.way = attention_way
        logits = fast_model(x).double()
        ref = copy_double(model)(x.double())
    scale = ref.abs().max()
    assert (logits - ref).abs().max() <= LOGIT_BOUND * scale
    # hence every pixel whose two best classes lie more than twice the bound apart keeps its
    # class; on these random weights that is most of them
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_BOUND * scale
    assert clear.float().mean() > 0.5
    assert torch.equal(logits.argmax(1)[clear], ref.argmax(1)[clear])


def copy_double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def test_attention_as_bf16_matmuls_equals_the_float64_formula(monkeypatch):
    """softmax(q kᵀ/√d) v in float64 on the same bfloat16 numbers, in several chunks of
    queries: within bfloat16's rounding of the scores, the probabilities and the output."""
    from segcompare.infer import fast

    monkeypatch.setattr(fast, "SCORES_PER_CHUNK", 3 * 2 * 24)  # chunks of 3 query rows
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g).bfloat16() for n in (10, 24, 24))
    out = fast._attention(q, k, v, "bf16 matmuls").double()
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / 8**0.5, -1) @ vd
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 4 * BF16_UNIT * vd.abs().max()
