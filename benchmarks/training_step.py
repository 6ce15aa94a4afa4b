"""One training iteration of our SegFormer against transformers', same weights, same step.

Both models start from the same weights and take the same step: forward in train mode (dropout
and stochastic depth on), logits upsampled to the label size, cross-entropy (ignore 255),
backward, AdamW step (SegFormer's optimiser, lr 6e-5, weight decay 0.01). The steps are timed in
interleaved rounds (median), as `segcompare.bench` times inference, with the allocator settings
of inference_cpu.py (--no-thp, --no-tune-alloc).

    python benchmarks/training_step.py                      # B0, 2×3×512×512, 2 threads
    python benchmarks/training_step.py --model segformer-b1 --iters 7

Writes benchmarks/results/training_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="segformer-b0")
    p.add_argument("--size", default="512x512", help="HxW")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
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
from inference_cpu import trained_like  # noqa: E402

from segcompare import bench  # noqa: E402
from segcompare.data.labels import IGNORE_INDEX  # noqa: E402
from segcompare.infer.fast import tune_cpu_allocator  # noqa: E402
from segcompare.models import build_model  # noqa: E402
from segcompare.utils import atomic_write_text  # noqa: E402


def make_step(logits_of, model, images, labels):
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)

    def step() -> float:
        logits = logits_of(images)  # N×C×H/4×W/4
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main() -> int:
    global ARGS
    ARGS = parse_args()
    torch.set_num_threads(ARGS.threads)
    tuned = False if ARGS.no_tune_alloc else tune_cpu_allocator()
    h, w = (int(v) for v in ARGS.size.split("x"))
    torch.manual_seed(0)
    ours = trained_like(build_model(ARGS.model))
    ref = bench.transformers_segformer(ours).train()
    ours.train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(ARGS.batch, 3, h, w, generator=g)
    labels = torch.randint(0, 19, (ARGS.batch, h, w), generator=g)
    labels[:, :8] = IGNORE_INDEX
    steps = {
        "ours": make_step(ours, ours, images, labels),
        "transformers": make_step(lambda x: ref(pixel_values=x).logits, ref, images, labels),
    }
    for _ in range(ARGS.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(ARGS.iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1000)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": ARGS.model,
        "input": f"{ARGS.batch}x3x{h}x{w}",
        "ours_ms": round(median["ours"], 1),
        "transformers_ms": round(median["transformers"], 1),
        "ratio": round(median["ours"] / median["transformers"], 3),
        # the fastest step of each: less sensitive to other processes on a shared machine
        "ratio_best": round(min(times["ours"]) / min(times["transformers"]), 3),
        "times_ms": {k: [round(t, 1) for t in v] for k, v in times.items()},
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "meta": {
            **bench.machine_info(torch.device("cpu"), ARGS.threads, "fp32"),
            "thp": not ARGS.no_thp,
            "tuned_malloc": tuned,
        },
    }
    atomic_write_text(ARGS.out, json.dumps(result, indent=1) + "\n")
    print("| model | input | ours ms | transformers ms | ratio | ratio of the fastest steps |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print(
        f"| {ARGS.model} | {result['input']} | {result['ours_ms']:.0f} |"
        f" {result['transformers_ms']:.0f} | {result['ratio']:.2f}× | {result['ratio_best']:.2f}× |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
