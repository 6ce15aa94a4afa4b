"""benchmarks/gpu_smoke.py, the one command that exercises every GPU path, run on the CPU with
--tiny: every step of the sequence must succeed, and the figures it records must hold what they
claim (a resumed run equal to the uninterrupted one, prepared logits equal to eager ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about thirty CLI processes: minutes on a busy 2-core machine
def test_gpu_smoke_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--device", "cpu", "--tiny",
         "--json", str(out), "--budget-s", "3600", "--timeout-scale", "5",
         "--work", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    bad = [(r["name"], r["status"], r.get("reason") or r.get("stderr_tail"))
           for r in doc["steps"] if r["status"] != "ok"]  # fmt: skip
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = {r["name"]: r for r in doc["steps"]}
    # every path the issue lists is in the sequence
    for word in ("fp32", "bf16", "fp16", "compile", "resume", "torchrun", "eval", "predict",
                 "video", "compare", "bench --reference", "official recipe", "inference"):
        assert any(word in name for name in steps), word
    assert doc["environment"]["torch"] and doc["date"]
    # the resumed run continued from its middle checkpoint to the uninterrupted run's weights
    resumed = next(r for name, r in steps.items() if name.startswith("resume"))
    assert resumed["figures"]["max_abs_weight_diff_vs_uninterrupted"] == 0.0
    # two processes trained (gloo on the CPU)
    torchrun = next(r for name, r in steps.items() if name.startswith("torchrun"))
    assert torchrun["figures"]["world_size"] == 2
    # the inference table: fp32 rows equal the strict eager logits to float rounding; every row ran
    for name, r in steps.items():
        if name.startswith("inference"):
            for row in r["figures"]["rows"]:
                assert "error" not in row, row
                assert row["images_per_s"]["1"] > 0
                if "fp32" in row["name"]:
                    assert row["max_abs_diff"] < 1e-4, row
    assert "| step | status |" in proc.stdout
