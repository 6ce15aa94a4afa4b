"""ONNX export (segcompare/export.py): onnxruntime reproduces the eager PyTorch logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fast import TINY, seeded

from segcompare.cli import main
from segcompare.export import export_onnx
from segcompare.models.save import save_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


def max_diff(model, path, shape) -> float:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model(x).numpy()
    out = run_onnx(path, x)
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max())


@pytest.mark.parametrize("family", ["hrnet", "segformer"])
def test_static_export_matches_pytorch(family, tmp_path):
    model = seeded(TINY[family][0], **TINY[family][1])
    path = export_onnx(model, tmp_path / "m.onnx", size_hw=(64, 96))
    assert max_diff(model, path, (1, 3, 64, 96)) <= 1e-3
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["model"] == model.variant and props["num_classes"] == "19"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left behind


@pytest.mark.parametrize("family", ["hrnet", "segformer"])
def test_dynamic_export_runs_other_sizes(family, tmp_path):
    model = seeded(TINY[family][0], **TINY[family][1])
    path = export_onnx(model, tmp_path / "m.onnx", size_hw=(64, 128), dynamic=True)
    for shape in [(2, 3, 203, 329), (1, 3, 96, 160)]:
        assert max_diff(model, path, shape) <= 1e-3


def test_cli_export_from_weights(tmp_path, capsys):
    model = seeded(TINY["segformer"][0], **TINY["segformer"][1])
    weights = save_weights(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "tiny.onnx"
    code = main(["export", "--weights", str(weights), "--size", "64x96", "--dynamic", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "onnxruntime vs PyTorch" in printed
    assert max_diff(model, out, (1, 3, 75, 101)) <= 1e-3


def test_cli_export_needs_a_model(tmp_path, capsys):
    assert main(["export", str(tmp_path / "x.onnx")]) == 1
    assert "name a model" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
