"""One training iteration of ours against the reference, same weights, same step.

The reference is the family's (`segcompare.models.variants`): transformers'
`SegformerForSemanticSegmentation` for SegFormer, the eager HRNet (it equals the official code,
tests/test_hrnet.py) for HRNet, each trained the plain way: `torch.optim.AdamW` with torch's
defaults, logits upsampled to the label size, `F.cross_entropy` (ignore 255). Ours is the step
`segcompare train` takes: its model preparation, its optimizer (`train.build_optimizer`) and its
loss (`losses.cross_entropy`). Both: forward in train mode, backward, AdamW step (SegFormer's
optimiser, lr 6e-5, weight decay 0.01), optionally under bf16 autocast (as the demo's recipes).
The steps are timed in interleaved rounds (median), as `segcompare.bench` times inference, with
the allocator settings of inference_cpu.py (--no-thp, --no-tune-alloc).

    python benchmarks/training_step.py                      # B0, 2×3×512×512, 2 threads, fp32
    python benchmarks/training_step.py --models segformer-b0,hrnet-w18-small-v1 \\
        --batch 4 --size 128x256 --threads 1 --bf16        # issue 25: the demo's step
    python benchmarks/training_step.py --profile ...        # also where ours spends the step
    python benchmarks/training_step.py --compile ...        # ours under torch.compile

Writes benchmarks/results/training_step.json (--out): a row per model, input, dtype and
compile, replacing only the rows this run measured again.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="segformer-b0", help="comma-separated variants")
    p.add_argument("--size", default="512x512", help="HxW")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both (as the demo)")
    p.add_argument(
        "--compile", action="store_true",
        help="ours under torch.compile, as `--set train.compile=true` (prints the compile's time)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of a step")
    p.add_argument("--no-thp", action="store_true", help="leave PyTorch's allocator as it is")
    p.add_argument(
        "--no-tune-alloc", action="store_true", help="leave glibc's malloc settings as they are"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/training_step.json"))
    return p.parse_args()


if "--no-thp" not in sys.argv:  # read by torch once, when it loads (see inference_cpu.py)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from inference_cpu import trained_like, write_rows  # noqa: E402

from segcompare import bench, train  # noqa: E402
from segcompare.config import OptimConfig  # noqa: E402
from segcompare.data.labels import IGNORE_INDEX  # noqa: E402
from segcompare.infer.fast import tune_cpu_allocator  # noqa: E402
from segcompare.losses import cross_entropy  # noqa: E402
from segcompare.models import build_model  # noqa: E402

OPTIM = OptimConfig(name="adamw", lr=6e-5, weight_decay=0.01)  # SegFormer's optimiser


def reference_step(logits_of, model, images, labels, amp):
    """The plain step: torch's AdamW defaults, interpolate + F.cross_entropy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, weight_decay=OPTIM.weight_decay)

    def step() -> float:
        with amp():
            logits = logits_of(images)  # N×C×H/4×W/4
        logits = F.interpolate(
            logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def our_step(model, images, labels, amp):
    """The step of `segcompare train`: its model preparation, optimizer and loss."""
    model = train.prepare_for_training(model, amp_dtype=torch.bfloat16 if ARGS.bf16 else None)
    optimizer = train.build_optimizer(model, OPTIM)
    forward = torch.compile(model) if ARGS.compile else model  # as train's `compile: true`

    def step() -> float:
        with amp():
            logits = forward(images)  # N×C×H/4×W/4
        loss = cross_entropy(logits, labels, IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def profile(name: str, step) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n### {name}: one step\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def run_model(name: str, h: int, w: int) -> dict:
    torch.manual_seed(0)
    ours = trained_like(build_model(name)).train()
    what, ref, logits_of = bench.reference_for(copy.deepcopy(ours))
    ref.train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(ARGS.batch, 3, h, w, generator=g)
    labels = torch.randint(0, 19, (ARGS.batch, h, w), generator=g)
    labels[:, :8] = IGNORE_INDEX

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16) if ARGS.bf16 else nullcontext()

    steps = {
        "ours": our_step(ours, images, labels, amp),
        "reference": reference_step(logits_of, ref, images, labels, amp),
    }
    first = {}
    for i in range(ARGS.warmup):
        for who, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i == 0:  # ours compiled: the compile is in its first step
                first[who] = round(time.perf_counter() - t0, 1)
    if ARGS.profile:
        for who, step in steps.items():
            profile(f"{name}, {who}", step)
    times: dict[str, list[float]] = {k: [] for k in steps}
    load = [round(os.getloadavg()[0], 2)]
    for _ in range(ARGS.iters):
        for who, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[who].append((time.perf_counter() - t0) * 1000)
    load.append(round(os.getloadavg()[0], 2))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "reference": what,
        "input": f"{ARGS.batch}x3x{h}x{w}",
        "dtype": "bf16 autocast" if ARGS.bf16 else "fp32",
        "compiled": ARGS.compile,
        "first_step_s": first,
        "ours_ms": round(median["ours"], 1),
        "reference_ms": round(median["reference"], 1),
        "ratio": round(median["ours"] / median["reference"], 3),
        # the fastest step of each: less sensitive to other processes on a shared machine
        "ratio_best": round(min(times["ours"]) / min(times["reference"]), 3),
        "times_ms": {k: [round(t, 1) for t in v] for k, v in times.items()},
        "loadavg_1min": load,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def main() -> int:
    global ARGS
    ARGS = parse_args()
    torch.set_num_threads(ARGS.threads)
    tuned = False if ARGS.no_tune_alloc else tune_cpu_allocator()
    h, w = (int(v) for v in ARGS.size.split("x"))
    rows = [run_model(name, h, w) for name in ARGS.models.split(",")]
    dtype = "bf16" if ARGS.bf16 else "fp32"
    meta = {
        **bench.machine_info(torch.device("cpu"), ARGS.threads, dtype),
        "thp": not ARGS.no_thp,
        "tuned_malloc": tuned,
    }
    # a row per model, input, dtype and compile: runs of the others' rows into one file add up
    write_rows(Path(ARGS.out), meta, rows, keys=("model", "input", "dtype", "compiled"))
    print("\n| model | reference | input | dtype | ours ms | reference ms | ratio | ratio of the "
          "fastest steps |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']}{' (compiled)' if r['compiled'] else ''} | {r['reference']}"
            f" | {r['input']} | {r['dtype']} | {r['ours_ms']:.0f}"
            f" | {r['reference_ms']:.0f} | {r['ratio']:.2f}× | {r['ratio_best']:.2f}× |"
        )
    for r in rows:
        if r["compiled"]:
            print(f"{r['model']}: ours' first step (compiling) {r['first_step_s']['ours']} s")
    print(f"\n{meta.get('cpu', '')}, {ARGS.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
