"""int8 inference (segcompare/infer/quantize.py): onnxruntime's static QDQ model of a tiny HRNet
against the float32 eager model, the cache that reloads without code, and the refusal where int8
is not offered."""

from __future__ import annotations

import pickle

import pytest
import torch
from test_fast import TINY, seeded

from segcompare.infer import quantize
from segcompare.utils import SegcompareError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = (64, 128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str):
    name, overrides = TINY[family]
    return seeded(name, **overrides)


def images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, *SIZE, generator=g) for _ in range(n)]


def test_int8_agrees_with_fp32_and_reloads_without_code(tmp_path, monkeypatch):
    model = tiny("hrnet")
    calib = images(2, seed=0)
    run = quantize.int8_model(model, calib, cache=tmp_path)
    x = images(1, seed=1)[0]
    with torch.inference_mode():
        ref = model(x)  # the eager float32 model: no export, no onnxruntime
    out = run(x)
    assert out.shape == ref.shape
    # int8 activations and weights: logits within a few quantization steps of the range, and
    # the same class almost everywhere (measured: 98.6 %, max diff 0.017 of a range of 1.04)
    span = (ref.max() - ref.min()).item()
    assert (out - ref).abs().max().item() <= 0.025 * span
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.98
    # the model really is quantized: int8 weights behind QDQ pairs around every conv
    graph = onnx.load(str(run.path))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") >= ops.count("Conv") > 0
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # standard ops only

    # the second call reads the cached file: no calibration, and no code from the file (no
    # pickle, no torch.load): an ONNX file is a protobuf of standard ops and tensors
    def refuse(*args, **kwargs):
        raise AssertionError("code would run")

    monkeypatch.setattr(quantize, "quantize_to_onnx", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    again = quantize.int8_model(model, calib, cache=tmp_path)
    assert again.path == run.path
    assert torch.equal(again(x), out)
    assert len(list(tmp_path.glob("*.onnx"))) == 1


def test_cache_key_follows_weights_and_calibration():
    model = tiny("hrnet")
    calib = images(2, seed=0)
    key = quantize.cache_key(model, calib)
    assert quantize.cache_key(model, calib) == key
    assert quantize.cache_key(model, [x[..., :64] for x in calib]) != key
    assert quantize.cache_key(model, images(2, seed=3)) != key
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert quantize.cache_key(model, calib) != key


def test_int8_is_refused_where_it_is_not_offered(tmp_path):
    with pytest.raises(SegcompareError, match="int8 is not offered for segformer"):
        quantize.int8_model(tiny("segformer"), images(1, seed=0), cache=tmp_path)
    with pytest.raises(SegcompareError, match="no calibration images"):
        quantize.int8_model(tiny("hrnet"), [], cache=tmp_path)
    assert not list(tmp_path.iterdir())


def test_one_int8_model_serves_other_sizes(tmp_path):
    model = tiny("hrnet")
    run = quantize.int8_model(model, images(2, seed=0), cache=tmp_path)
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(x)
    out = run(x)
    assert out.shape == ref.shape == (2, 19, 24, 16)
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.95
