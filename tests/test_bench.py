"""segcompare.bench: timing rows, the memory column, and `segcompare bench --reference`."""

import json

import pytest
import torch

from segcompare import bench
from segcompare.cli import main


def test_rows_and_memory_of_a_known_allocation():
    def make(x):
        a = torch.ones(1024, 512)  # 2 MiB
        b = torch.ones(1024, 512)  # 2 MiB more: 4 MiB live, the peak
        del a
        return b[:512].clone()  # 1 MiB more while b lives: 3 MiB

    rows = bench.benchmark([bench.Candidate("alloc", make)], torch.zeros(2, 3), 1, 3, False)
    (row,) = rows
    assert row["name"] == "alloc"
    assert row["p10_ms"] <= row["latency_ms"] <= row["p90_ms"]
    # latency_ms is rounded to 0.01 ms, a large part of this tiny call's time
    assert row["images_per_s"] == pytest.approx(2000 / row["latency_ms"], rel=0.2)
    assert row["memory_mb"] == pytest.approx(4.0, abs=0.01)


@pytest.mark.parametrize("flags, labels", [
    ({"avx2", "fma"}, ["AVX2"]),  # an AMD EPYC VM of 2026-12 (Zen, no AVX-512)
    ({"avx2", "avx512f", "avx512_vnni"}, ["AVX-512", "VNNI"]),
    ({"avx2", "avx_vnni"}, ["AVX2", "VNNI"]),
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, ["AVX-512", "VNNI", "AVX512-BF16"]),
    ({"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"},
     ["AVX-512", "VNNI", "AVX512-BF16", "AMX"]),
    ({"sse4_2"}, []),
])
def test_cpu_features_name_what_decides_bf16_and_int8(flags, labels):
    """What each published figure says of its CPU: every label comes from its own flag."""
    from segcompare.utils import cpu_features

    assert cpu_features(flags) == labels


def test_memory_is_measured_again_after_warmup():
    """A warmed-up allocator keeps its memory: the column must still show the call's tensors."""
    model = torch.nn.Conv2d(3, 64, 3, padding=1).eval()
    x = torch.zeros(1, 3, 128, 128)
    rows = bench.benchmark([bench.Candidate("conv", model)], x, 2, 2, False)
    assert rows[0]["memory_mb"] == pytest.approx(64 * 128 * 128 * 4 / 2**20, abs=0.05)  # 4 MiB


def test_cli_bench_reference_rows(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    argv = ["bench", "segformer-b0", "hrnet-w18-small-v1", "--size", "64x128", "--warmup", "0",
            "--iters", "1", "--reference", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["models"]
    names = [r["name"] for r in rows]
    assert names == ["segformer-b0", "segformer-b0 (transformers)", "hrnet-w18-small-v1",
                     "hrnet-w18-small-v1 (eager)"]
    assert all(r["latency_ms"] > 0 and r["memory_mb"] > 0 for r in rows)
    assert "segformer-b0 (transformers)" in capsys.readouterr().out
