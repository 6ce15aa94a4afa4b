"""Latency, throughput and memory of models, measured side by side in one process.

All candidates are warmed up, then timed in interleaved rounds (model A, B, C, A, B, C, …) so that
a slow moment of the machine hurts every model alike. Memory is measured per model afterwards: the
CUDA allocator's peak on a GPU, the growth of the process's peak RSS on the CPU (Linux's
`/proc/self/clear_refs` resets the peak between models).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Candidate:
    """One row of a benchmark: a name and a callable that runs a batch of images."""

    name: str
    run: Callable[[torch.Tensor], object]


def machine_info(device: torch.device, threads: int, dtype: str) -> dict:
    info = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": threads,
        "dtype": dtype,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = _cpu_model_name() or info["cpu"]
    return info


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_mb(cand: Candidate, x: torch.Tensor) -> float | None:
    """Peak memory of one call: CUDA max allocated, or CPU peak-RSS growth (None if unknown)."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        cand.run(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _reset_peak_rss():
        return None
    base = _peak_rss_kb()
    cand.run(x)
    return max(0, _peak_rss_kb() - base) / 1024


def benchmark(
    candidates: Sequence[Candidate],
    x: torch.Tensor,
    warmup: int = 2,
    iters: int = 5,
    progress: bool = True,
) -> list[dict]:
    """Time every candidate on the batch `x`: median, p10, p90 latency (ms), images/s, memory."""
    from tqdm import tqdm

    device = x.device
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    total = len(candidates) * (warmup + iters)
    with torch.inference_mode(), tqdm(total=total, desc="bench", disable=not progress) as bar:
        for _ in range(warmup):
            for c in candidates:
                c.run(x)
                bar.update()
        _sync(device)
        for _ in range(iters):
            for c in candidates:
                _sync(device)
                t0 = time.perf_counter()
                c.run(x)
                _sync(device)
                times[c.name].append((time.perf_counter() - t0) * 1000)
                bar.update()
        memory = {c.name: measure_memory_mb(c, x) for c in candidates}
    rows = []
    for c in candidates:
        t = sorted(times[c.name])
        q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else [t[0]] * 9
        median = statistics.median(t)
        rows.append(
            {
                "name": c.name,
                "latency_ms": round(median, 2),
                "p10_ms": round(q[0], 2),
                "p90_ms": round(q[-1], 2),
                "images_per_s": round(x.shape[0] * 1000 / median, 3),
                "memory_mb": None if memory[c.name] is None else round(memory[c.name], 1),
            }
        )
    return rows


def model_candidate(name: str, model: nn.Module, dtype: torch.dtype) -> Candidate:
    """A candidate that runs `model` (already on its device, in eval mode) under autocast."""
    device_type = next(model.parameters()).device.type

    def run(x: torch.Tensor) -> object:
        if dtype == torch.float32:
            return model(x)
        with torch.autocast(device_type, dtype=dtype):
            return model(x)

    return Candidate(name, run)


def transformers_segformer(model: nn.Module) -> nn.Module:
    """transformers' `SegformerForSemanticSegmentation` with the same config and weights as
    our SegFormer `model`, for the `--reference` row (needs the transformers package)."""
    from segcompare.models.checkpoint import hf_config_dict
    from segcompare.models.convert import official_segformer_to_hf

    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError as err:  # pragma: no cover - depends on the environment
        from segcompare.utils import SegcompareError

        raise SegcompareError("--reference needs transformers: pip install transformers") from err
    config = SegformerConfig(**hf_config_dict(model))
    ref = SegformerForSemanticSegmentation(config)
    ref.load_state_dict(official_segformer_to_hf(model.state_dict()), strict=True)
    return ref.eval()


def hf_logits(ref: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: ref(pixel_values=x).logits


def format_table(rows: Sequence[dict], meta: dict) -> str:
    """Markdown table of benchmark rows, with a line that says where they were measured."""
    head = "| model | latency ms (median) | p10 | p90 | images/s | memory MB |\n"
    head += "| --- | ---: | ---: | ---: | ---: | ---: |\n"
    lines = []
    for r in rows:
        memory = "-" if r["memory_mb"] is None else f"{r['memory_mb']:.0f}"
        lines.append(
            f"| {r['name']} | {r['latency_ms']:.1f} | {r['p10_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['images_per_s']:.2f} | {memory} |\n"
        )
    body = "".join(lines)
    where = (
        f"\n{meta.get('gpu') or meta.get('cpu')}, torch {meta['torch']}, {meta['device']}, "
        f"{meta['threads']} threads, {meta['dtype']}, batch {meta.get('batch')}, "
        f"size {meta.get('size')}\n"
    )
    return head + body + where
