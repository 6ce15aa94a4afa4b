"""bfloat16 layer by layer on this CPU: which layers of a bfloat16 SegFormer pay, and the whole
model against our fp32 in the same run.

    python benchmarks/bf16_layers_cpu.py                          # SegFormer-B0, 1×3×1024×2048
    python benchmarks/bf16_layers_cpu.py --size 512x1024 --threads 1

Part 1, per layer: `prepare_for_inference(model, torch.bfloat16)`'s probe (`BF16Probe` in
segcompare/infer/fast.py) times every convolution and attention at the shape it meets for this
input, in bfloat16 and in float32 with the casts, inside the bfloat16 model; the table sums
them by role (patch embeddings, attention, its projections, the Mix-FFN's linears and depthwise
conv, the decode head) and says how many layers the probe kept in bfloat16.

Part 2, whole model, timed interleaved by `segcompare.bench` (median of --iters after
--warmup): our fp32, bf16 with every layer in bfloat16 (`probe=False`), and bf16 as
`--precision bf16` runs it (the probe's choice), each as a ratio to our fp32, with its largest
logit difference and argmax agreement against our fp32. Weights are random at the scale of
trained ones (inference_cpu.py's `trained_like`), seed 0. Writes
benchmarks/results/bf16_layers_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as inference_cpu.py and the CLI

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from inference_cpu import agreement, trained_like  # noqa: E402

from segcompare import bench  # noqa: E402
from segcompare.infer.fast import (  # noqa: E402
    describe_layer_precision,
    prepare_for_inference,
    tune_cpu_allocator,
)
from segcompare.models import build_model  # noqa: E402
from segcompare.utils import atomic_write_text  # noqa: E402


def by_role(report: dict) -> list[dict]:
    """The probe's per-layer timings summed by role, in the order the roles first appear."""
    roles: dict[str, dict] = {}
    for layer in report["layers"]:
        if "ms" not in layer:
            continue
        r = roles.setdefault(layer["role"], {"role": layer["role"], "layers": 0, "bf16_kept": 0,
                                             "ms": {}})  # fmt: skip
        r["layers"] += 1
        r["bf16_kept"] += layer["fastest"] != "fp32"  # faster in bf16 on its own
        for way, ms in layer["ms"].items():
            r["ms"][way] = r["ms"].get(way, 0.0) + ms
    for r in roles.values():
        r["ms"] = {way: round(ms, 2) for way, ms in r["ms"].items()}
        r["ratio"] = round(r["ms"]["bf16"] / r["ms"]["fp32"], 3)
        if "bf16 matmuls" in r["ms"]:
            r["ratio_matmuls"] = round(r["ms"]["bf16 matmuls"] / r["ms"]["fp32"], 3)
    return list(roles.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="segformer-b0")
    p.add_argument("--size", default="1024x2048", help="HxW")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/bf16_layers_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    h, w = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    model = trained_like(build_model(args.model))
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    fp32 = prepare_for_inference(model)
    every = prepare_for_inference(model, torch.bfloat16, probe=False)
    probed = prepare_for_inference(model, torch.bfloat16)
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        start = time.perf_counter()
        probed(x)  # the first call of this shape: the probe, then the forward pass
        first_s = time.perf_counter() - start
        report = probed.layer_precision()[0]
        ref = fp32(x).float()
        logits = {"bf16, every layer": every(x).float(), "bf16, probed": probed(x).float()}
    roles = by_role(report)
    print(f"Per layer, inside the bfloat16 {args.model} at 1x3x{h}x{w} (probe's fastest runs):\n")
    print("| role | layers | fp32 ms (with casts) | bf16 ms | bf16 / fp32 | "
          "bf16 matmuls / fp32 | faster in bf16 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in roles:
        matmuls = f"{r['ratio_matmuls']:.2f}×" if "ratio_matmuls" in r else "-"
        print(f"| {r['role']} | {r['layers']} | {r['ms']['fp32']:.1f} | {r['ms']['bf16']:.1f} | "
              f"{r['ratio']:.2f}× | {matmuls} | {r['bf16_kept']} |")
    print(f"\n{describe_layer_precision(report)}")
    whole = report.get("whole_ms") or {}
    print("whole model (probe): " + ", ".join(f"{k} {v:.0f} ms" for k, v in whole.items()))
    print(f"first call (probe + forward): {first_s:.1f} s\n")

    candidates = [bench.Candidate("fp32", fp32), bench.Candidate("bf16, every layer", every),
                  bench.Candidate("bf16, probed", probed)]  # fmt: skip
    timings = {r["name"]: r for r in bench.benchmark(candidates, x, args.warmup, args.iters)}
    rows = []
    print("| ours | ms (median) | p10 | vs our fp32 | max abs diff | argmax agree |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t in timings.items():
        diff, agree = agreement(logits[name], ref) if name in logits else (0.0, 1.0)
        row = {"name": name, "latency_ms": t["latency_ms"], "p10_ms": t["p10_ms"],
               "ratio": round(t["latency_ms"] / timings["fp32"]["latency_ms"], 3),
               "max_abs_diff": float(f"{diff:.3g}"), "argmax_agree": round(agree, 6)}  # fmt: skip
        rows.append(row)
        print(f"| {name} | {row['latency_ms']:.0f} | {row['p10_ms']:.0f} | {row['ratio']:.2f}× | "
              f"{diff:.2g} | {100 * agree:.2f}% |")
    meta = bench.machine_info(torch.device("cpu"), args.threads, "fp32+bf16")
    meta.update(model=args.model, size=[h, w], warmup=args.warmup, iters=args.iters,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                loadavg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                first_call_s=round(first_s, 2))  # fmt: skip
    doc = {"meta": meta, "roles": roles, "models": rows, "layer_precision": report}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"\n{meta['cpu']}, {meta['cores']} cores, {args.threads} threads, {meta['date']}, "
          f"load {meta['loadavg_1min']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
