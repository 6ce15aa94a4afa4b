"""Latency, throughput and memory of models, measured side by side in one process.

All candidates are warmed up, then timed in interleaved rounds (model A, B, C, A, B, C, …) so that
a slow moment of the machine hurts every model alike. Memory is measured per model afterwards, as
the peak size of the tensors one call creates: the CUDA allocator's peak on a GPU, the live
tensors tracked op by op on the CPU (`measure_memory_mb`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from segcompare.utils import cpu_model_name, synchronize
from segcompare.values import check


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
        info["cpu"] = cpu_model_name() or info["cpu"]
    return info


def measure_memory_mb(cand: Candidate, x: torch.Tensor) -> float:
    """Peak memory of one call, in MB (2**20 bytes), input and weights not included.

    CUDA: growth of the allocator's max allocated bytes. Elsewhere: the peak total size of the
    tensors created during the call and still alive (`segcompare.stats.LiveTensorBytes`), which
    is what a caching allocator would have to hold; the process's RSS says nothing here, as a
    warmed-up allocator reuses the memory of earlier calls.
    """
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        cand.run(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from segcompare.stats import LiveTensorBytes

    with LiveTensorBytes() as tracker:
        cand.run(x)
    return tracker.peak / 2**20


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
        synchronize(device)
        for _ in range(iters):
            for c in candidates:
                synchronize(device)
                t0 = time.perf_counter()
                c.run(x)
                synchronize(device)
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
                "memory_mb": round(memory[c.name], 1),
            }
        )
    return rows


def model_candidate(
    name: str,
    model: nn.Module,
    dtype: torch.dtype,
    call: Callable[[torch.Tensor], object] | None = None,
) -> Candidate:
    """A candidate that runs `model` (already on its device, in eval mode), or `call` when the
    model needs another calling convention, under autocast for dtypes other than fp32."""
    device_type = next(model.parameters()).device.type
    forward = call or model

    def run(x: torch.Tensor) -> object:
        if dtype == torch.float32:
            return forward(x)
        with torch.autocast(device_type, dtype=dtype):
            return forward(x)

    return Candidate(name, run)


def transformers_segformer(model: nn.Module) -> nn.Module:
    """transformers' `SegformerForSemanticSegmentation` with the config and weights of our
    SegFormer `model`, loaded the way its users load it (`from_pretrained` on the directory
    `export_hf` writes), in eval mode; for the `--reference` rows (needs transformers)."""
    import tempfile

    from segcompare.models.save import export_hf
    from segcompare.utils import SegcompareError

    try:
        from transformers import SegformerForSemanticSegmentation
        from transformers.utils import logging as hf_logging
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SegcompareError("--reference needs transformers: pip install transformers") from err
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        ref = SegformerForSemanticSegmentation.from_pretrained(tmp)
    return ref.eval()


def hf_logits(ref: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: ref(pixel_values=x).logits


def reference_for(model: nn.Module) -> tuple[str, nn.Module, Callable[[torch.Tensor], object]]:
    """(what, module, run) of the implementation our `model` is timed against: its family's
    `reference` (segcompare.models.variants), "transformers" (its SegFormer with the same
    weights) or "eager" (`model` itself, which equals the official code)."""
    from segcompare.models.variants import FAMILIES, family_of

    what = FAMILIES[family_of(model)].reference
    if what == "transformers":
        ref = transformers_segformer(model)
        return what, ref, hf_logits(ref)
    return what, model, model


def bench_models(
    names: Sequence[str],
    size_hw: tuple[int, int],
    batch: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    warmup: int = 2,
    iters: int = 5,
    num_classes: int = 19,
    *,
    optimize: bool = True,
    reference: bool = False,
    calib: Optional[str] = None,
    calib_images: int = 32,
) -> tuple[list[dict], dict]:
    """`segcompare bench`: time each variant of `names` (untrained weights: speed does not
    depend on them) on a random batch; with `reference`, also each one's reference
    implementation (`reference_for`). `precision` (`segcompare.precision.TABLE`): below fp32
    every model runs under autocast, and ours is prepared in that dtype, as `Predictor` runs it.
    int8 (`segcompare.infer.quantize`) quantizes ours after a calibration on `calib_images`
    images of `calib`, and adds our float32 model as a row ("NAME (fp32)"), the ratio's base.
    Returns the table rows and the machine's description."""
    from segcompare.infer.fast import prepare_for_inference
    from segcompare.models import build_model
    from segcompare.precision import precision_for
    from segcompare.stats import check_forward_memory
    from segcompare.utils import select_device

    size_hw = check("--size", size_hw, name="size_hw")  # the options' rows (values.RULES)
    for flag, value in (("--batch", batch), ("--warmup", warmup), ("--iters", iters)):
        check(flag, value, name=flag[2:])
    dev = select_device(device)
    dtype = getattr(torch, precision_for(precision, dev.type).dtype)
    if dev.type in ("cpu", "cuda"):  # refuse, with the figure, a size that would not fit
        for name in names:
            check_forward_memory(name, size_hw, batch, num_classes, dev)
    candidates, layers = [], {}
    for name in names:
        model = build_model(name, num_classes=num_classes).eval()
        if precision == "int8":
            from segcompare.infer.quantize import int8_forward

            runnable = int8_forward(model, dev, calib, calib_images, optimize)
            candidates.append(Candidate(name, runnable))
            candidates.append(model_candidate(f"{name} (fp32)", runnable.prepared, dtype))
            layers[name] = runnable
        else:
            runnable = prepare_for_inference(model.to(dev), dtype) if optimize else model
            candidates.append(model_candidate(name, runnable.to(dev), dtype))
        if dtype != torch.float32:  # what each layer ran in, once the benchmark has run
            layers[name] = runnable
        if not reference:
            continue
        what, ref, run = reference_for(model)
        if ref is not model or optimize:  # else the eager model is the row above
            candidates.append(model_candidate(f"{name} ({what})", ref.to(dev), dtype, run))
    x = torch.randn(batch, 3, *size_hw, device=dev)
    rows = benchmark(candidates, x, warmup, iters)
    meta = machine_info(dev, torch.get_num_threads(), precision)
    meta.update(batch=batch, size=list(size_hw), optimized=optimize)
    if layers:
        from segcompare.infer.fast import Prepared, layer_precision
        from segcompare.infer.quantize import Int8Model

        meta["layer_precision"] = {
            name: m.layer_precision() if isinstance(m, (Prepared, Int8Model))
            else [layer_precision(m, dtype)]
            for name, m in layers.items()
        }  # fmt: skip
    return rows, meta


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
