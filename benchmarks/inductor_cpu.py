"""torch.compile (inductor, with freezing) against prepare_for_inference on the CPU, fp32.

    ours        prepare_for_inference(model) (segcompare/infer/fast.py)
    inductor    torch.compile(model, backend="inductor") of the eager model, with
                torch._inductor.config.freezing = True (weights folded in as constants, BN
                folded, convolutions prepacked for oneDNN), called under inference_mode
    hybrid      (--hybrid) prepare_for_inference(model, compile=True): our rewrites, then
                inductor over them (while compiling, our fused oneDNN calls are plain ops)

Does inductor make fast.py's hand-written blocks unnecessary? Both run in one process, on one
input, timed in interleaved rounds (median of --iters after --warmup), so a busy moment of the
machine hurts both alike. "compile s" is the first call of the compiled model minus its median
latency: tracing, inductor's code generation and the C++ build, with a fresh inductor cache
(a new TORCHINDUCTOR_CACHE_DIR) unless --cache-dir names one. Kernels compiled in the same
process are reused, so for cold figures give one model per run. The max absolute logit
difference and the argmax agreement of inductor against ours, and of each against the eager
model, are printed with the timings. Weights are random but scaled like trained ones
(inference_cpu.trained_like), seed 0.

    python benchmarks/inductor_cpu.py --models segformer-b0
    python benchmarks/inductor_cpu.py --models hrnet-w48 --hybrid

Large tensors go on transparent huge pages and glibc keeps freed memory (`tune_cpu_allocator`),
as in inference_cpu.py. Rows are merged into benchmarks/results/inductor_cpu.json by
(model, size, batch), so subsets can be rerun.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["segformer-b0", "hrnet-w18-small-v2", "hrnet-w48"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--size", default="1024x2048", help="HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--hybrid", action="store_true", help="also time ours compiled by inductor")
    p.add_argument("--cache-dir", help="inductor cache folder (default: a fresh one, removed)")
    p.add_argument("--no-thp", action="store_true", help="leave PyTorch's allocator as it is")
    p.add_argument(
        "--no-tune-alloc", action="store_true", help="leave glibc's malloc settings as they are"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/inductor_cpu.json"))
    return p.parse_args()


if "--no-thp" not in sys.argv:  # read by torch once, when it loads: set before the import below
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from inference_cpu import agreement, trained_like, write_rows  # noqa: E402

from segcompare import bench  # noqa: E402
from segcompare.infer.fast import prepare_for_inference, tune_cpu_allocator  # noqa: E402
from segcompare.models import build_model  # noqa: E402


def compiled(model: torch.nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """`model` compiled by inductor with freezing, and the seconds its first call took."""
    fn = torch.compile(model, backend="inductor")
    start = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return fn, time.perf_counter() - start


def interleaved(candidates: list[bench.Candidate], x: torch.Tensor) -> dict[str, list[float]]:
    """Latencies in ms, candidates run in turn (A, B, A, B, ...) after the warm-up rounds.
    (`bench.benchmark` also measures memory through a dispatch mode, which would make
    the compiled models recompile.)"""
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    with torch.inference_mode():
        for _ in range(ARGS.warmup):
            for c in candidates:
                c.run(x)
        for _ in range(ARGS.iters):
            for c in candidates:
                start = time.perf_counter()
                c.run(x)
                times[c.name].append(1000 * (time.perf_counter() - start))
    return times


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {
        "latency_ms": round(statistics.median(times), 1),
        "p10_ms": round(q[0], 1),
        "p90_ms": round(q[-1], 1),
        "all_ms": [round(t, 1) for t in times],
    }


def run_case(name: str, h: int, w: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = trained_like(build_model(name))
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    load_before = os.getloadavg()[0]
    ours = prepare_for_inference(model)
    inductor, inductor_first_s = compiled(copy.deepcopy(model), x)
    candidates = [bench.Candidate("ours", ours), bench.Candidate("inductor", inductor)]
    if ARGS.hybrid:
        hybrid, hybrid_first_s = compiled(prepare_for_inference(model), x)
        candidates.append(bench.Candidate("hybrid", hybrid))
    with torch.inference_mode():
        logits = {c.name: c.run(x).float() for c in candidates}
        eager = model(x)
    times = {k: summary(v) for k, v in interleaved(candidates, x).items()}
    ours_ms, inductor_ms = times["ours"]["latency_ms"], times["inductor"]["latency_ms"]
    diff, agree = agreement(logits["inductor"], logits["ours"])
    row = {
        "model": name,
        "size": f"{h}x{w}",
        "batch": batch,
        "ours_ms": ours_ms,
        "inductor_ms": inductor_ms,
        "ratio": round(inductor_ms / ours_ms, 3),  # inductor / ours: > 1 means ours is faster
        "ratio_p10": round(times["inductor"]["p10_ms"] / times["ours"]["p10_ms"], 3),
        "compile_s": round(inductor_first_s - inductor_ms / 1000, 1),
        "max_abs_diff": float(f"{diff:.3g}"),
        "argmax_agree": round(agree, 6),
        "ours_vs_eager": float(f"{agreement(logits['ours'], eager)[0]:.3g}"),
        "inductor_vs_eager": float(f"{agreement(logits['inductor'], eager)[0]:.3g}"),
        "timings": times,
        "warmup": ARGS.warmup,
        "iters": ARGS.iters,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if ARGS.hybrid:
        row["hybrid_ms"] = times["hybrid"]["latency_ms"]
        row["hybrid_ratio"] = round(row["hybrid_ms"] / ours_ms, 3)
        row["hybrid_compile_s"] = round(hybrid_first_s - row["hybrid_ms"] / 1000, 1)
        row["hybrid_max_abs_diff"] = float(f"{agreement(logits['hybrid'], logits['ours'])[0]:.3g}")
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | input | ours ms | inductor ms | inductor / ours | p10 ratio | compile s |"
        " max abs diff | argmax agree | load 1 min |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        load = "–".join(f"{v:.1f}" for v in r["loadavg_1min"])
        lines.append(
            f"| {r['model']} | {r['batch']}×3×{r['size'].replace('x', '×')} | {r['ours_ms']:.0f} |"
            f" {r['inductor_ms']:.0f} | {r['ratio']:.2f}× | {r['ratio_p10']:.2f}× |"
            f" {r['compile_s']:.0f} | {r['max_abs_diff']:.1e} | {100 * r['argmax_agree']:.3f}% |"
            f" {load} |"
        )
    if any("hybrid_ms" in r for r in rows):
        lines += ["", "| model | input | hybrid ms | hybrid / ours | compile s | max abs diff |"]
        lines.append("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            if "hybrid_ms" in r:
                lines.append(
                    f"| {r['model']} | {r['batch']}×3×{r['size'].replace('x', '×')} |"
                    f" {r['hybrid_ms']:.0f} | {r['hybrid_ratio']:.2f}× |"
                    f" {r['hybrid_compile_s']:.0f} | {r['hybrid_max_abs_diff']:.1e} |"
                )
    return "\n".join(lines)


def main() -> int:
    global ARGS
    ARGS = parse_args()
    torch.set_num_threads(ARGS.threads)
    tuned = False if ARGS.no_tune_alloc else tune_cpu_allocator()
    torch._inductor.config.freezing = True
    cache_dir = ARGS.cache_dir or tempfile.mkdtemp(prefix="inductor_cpu.")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # read when inductor first needs it
    h, w = (int(v) for v in ARGS.size.split("x"))
    rows = []
    try:
        for name in (m for m in ARGS.models.split(",") if m):
            print(f"{name} {ARGS.batch}x3x{h}x{w} ...", file=sys.stderr, flush=True)
            rows.append(run_case(name, h, w, ARGS.batch))
            print(table(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    finally:
        if not ARGS.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    meta = bench.machine_info(torch.device("cpu"), ARGS.threads, "fp32")
    meta.update(
        thp=not ARGS.no_thp,
        tuned_malloc=tuned,
        inductor_freezing=True,
        cold_cache=not ARGS.cache_dir,
    )
    write_rows(Path(ARGS.out), meta, rows)
    print(table(rows))
    print(
        f"\n{meta['cpu']}, {ARGS.threads} threads, torch {meta['torch']}, THP {meta['thp']}, "
        f"glibc malloc tuned {tuned}, inductor freezing, cold cache {meta['cold_cache']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
