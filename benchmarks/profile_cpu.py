"""Where the time of one prepared forward goes on the CPU: every convolution geometry with its
achieved GMAC/s and memory traffic, and every other op.

    python benchmarks/profile_cpu.py --model hrnet-w18-small-v2
    python benchmarks/profile_cpu.py --model hrnet-w48 --runs 2 --top 12

Ours is `prepare_for_inference(model)` (segcompare/infer/fast.py), fp32, on one random
1×3×H×W input, weights random but scaled like trained ones (inference_cpu.trained_like).

- **Convolutions**: forward hooks on the prepared model's FusedConvs time each call (the oneDNN
  calls are synchronous); calls of one geometry (kernel, channels in/out, groups, stride, output
  size, whether a residual is added in the kernel) are summed per run, and the median run is
  shown. MACs = output pixels × C_out × C_in/groups × kh × kw; "MB" counts what the call must at
  least read and write once: input, output, the residual it adds, the weights.
- **Everything else**: `torch.profiler` of one more forward, self CPU time per op name.
- **The floor**: the model's MACs at the rate this CPU reaches in one large fp32 matmul
  (4096², measured here, in the same process): what a perfect implementation could approach.

The forward itself is timed without hooks or profiler (median of --runs, after --warmup and
the hooked runs).
Rows are merged into benchmarks/results/profile_cpu.json by (model, size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="hrnet-w18-small-v2", help="a segcompare model name")
    p.add_argument("--size", default="1024x2048", help="input HxW")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed forwards (and hooked ones)")
    p.add_argument("--top", type=int, default=15, help="convolution geometries to print")
    p.add_argument("--no-thp", action="store_true", help="leave PyTorch's allocator as it is")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/profile_cpu.json"))
    return p.parse_args()


if "--no-thp" not in sys.argv:  # read by torch once, when it loads: set before the import below
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from inference_cpu import trained_like, write_rows  # noqa: E402

from segcompare import bench  # noqa: E402
from segcompare.infer.fast import FusedConv, prepare_for_inference, tune_cpu_allocator  # noqa: E402
from segcompare.models import build_model  # noqa: E402

CONV_OPS = ("mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_")


def matmul_gmacs() -> float:
    """Multiply-accumulates per second (G) of a 4096² fp32 matmul: best of 5."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 4096**3 / best / 1e9


def geometry(conv: FusedConv, out: torch.Tensor, residual: bool) -> tuple:
    o, i, kh, kw = conv.weight.shape
    return (
        f"{kh}x{kw}",
        i * conv.groups,
        o,
        conv.groups,
        conv.stride[0],
        f"{out.shape[-2]}x{out.shape[-1]}",
        residual,
    )


def hooked_runs(model: torch.nn.Module, x: torch.Tensor, runs: int) -> list[dict]:
    """Per run: geometry -> [calls, seconds, MACs, bytes]."""
    per_run: list[dict] = []
    current: dict = {}
    starts: dict[int, float] = {}

    def pre(module, args, kwargs):
        starts[id(module)] = time.perf_counter()

    def post(module, args, kwargs, out):
        dt = time.perf_counter() - starts.pop(id(module))
        x_in = args[0]
        residual = len(args) > 1 and args[1] is not None or kwargs.get("residual") is not None
        key = geometry(module, out, residual)
        o, i, kh, kw = module.weight.shape
        macs = out.numel() // out.shape[1] * o * i * kh * kw
        size = out.element_size()
        moved = (x_in.numel() + out.numel() * (2 if residual else 1)) * size
        moved += module.weight.numel() * module.weight.element_size()
        rec = current.setdefault(key, [0, 0.0, 0, 0])
        rec[0] += 1
        rec[1] += dt
        rec[2] += macs
        rec[3] += moved

    handles = []
    for m in model.modules():
        if isinstance(m, FusedConv):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        for _ in range(runs):
            current = {}
            model(x)
            per_run.append(current)
    finally:
        for h in handles:
            h.remove()
    return per_run


def other_ops(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[int, float]]:
    """op name -> (calls, self CPU ms) of one profiled forward, convolutions included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    ops = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            ops[e.key] = (e.count, e.self_cpu_time_total / 1000)
    return ops


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    h, w = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    model = prepare_for_inference(trained_like(build_model(args.model)))
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x)
        runs = hooked_runs(model, x, args.runs)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
        ops = other_ops(model, x)
        rate = matmul_gmacs()
    forward_ms = statistics.median(times) * 1000
    run = sorted(runs, key=lambda r: sum(v[1] for v in r.values()))[len(runs) // 2]
    convs = []
    for key, (calls, sec, macs, moved) in run.items():
        kernel, cin, cout, groups, stride, out_hw, residual = key
        convs.append(
            {
                "kernel": kernel, "c_in": cin, "c_out": cout, "groups": groups,
                "stride": stride, "out": out_hw, "residual": residual, "calls": calls,
                "ms": round(sec * 1000, 2), "gmac": round(macs / 1e9, 3),
                "gmac_per_s": round(macs / sec / 1e9, 1), "mb": round(moved / 2**20, 1),
                "gb_per_s": round(moved / sec / 2**30, 1),
            }
        )  # fmt: skip
    convs.sort(key=lambda c: -c["ms"])
    conv_ms = sum(c["ms"] for c in convs)
    conv_gmac = sum(c["gmac"] for c in convs)
    others = sorted(
        ((k, n, ms) for k, (n, ms) in ops.items() if k not in CONV_OPS), key=lambda t: -t[2]
    )
    row = {
        "model": args.model,
        "size": args.size,
        "forward_ms": round(forward_ms, 1),
        "conv_ms": round(conv_ms, 1),
        "conv_gmac": round(conv_gmac, 2),
        "matmul_gmac_per_s": round(rate, 1),
        "floor_ms": round(conv_gmac / rate * 1000, 1),
        "convs": convs,
        "other_ops": [{"op": k, "calls": n, "ms": round(ms, 2)} for k, n, ms in others],
        "profiled_total_ms": round(sum(ms for _, ms in ops.values()), 1),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(report(row, args.top))
    meta = bench.machine_info(torch.device("cpu"), args.threads, "fp32")
    write_rows(Path(args.out), meta, [row], keys=("model", "size"))
    print(f"\n{meta['cpu']}, {args.threads} threads, torch {meta['torch']}, {row['date']}")
    return 0


def report(row: dict, top: int) -> str:
    fwd = row["forward_ms"]
    lines = [
        f"{row['model']} at {row['size']}: forward {fwd:.0f} ms; convolutions {row['conv_ms']:.0f}"
        f" ms for {row['conv_gmac']:.1f} GMAC ({row['conv_gmac'] / row['conv_ms'] * 1000:.0f}"
        f" GMAC/s); a 4096² matmul here: {row['matmul_gmac_per_s']:.0f} GMAC/s, so the floor is"
        f" {row['floor_ms']:.0f} ms and the forward takes {fwd / row['floor_ms']:.2f}× it.",
        "",
        "| conv | C in → out | stride | output | residual | calls | ms | share | GMAC | GMAC/s"
        " | MB | GB/s |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in row["convs"][:top]:
        groups = f" g{c['groups']}" if c["groups"] > 1 else ""
        lines.append(
            f"| {c['kernel']}{groups} | {c['c_in']} → {c['c_out']} | {c['stride']} | {c['out']}"
            f" | {'add' if c['residual'] else ''} | {c['calls']} | {c['ms']:.1f}"
            f" | {c['ms'] / fwd:.1%} | {c['gmac']:.2f} | {c['gmac_per_s']:.0f} | {c['mb']:.0f}"
            f" | {c['gb_per_s']:.1f} |"
        )
    rest = row["convs"][top:]
    if rest:
        ms = sum(c["ms"] for c in rest)
        gmac = sum(c["gmac"] for c in rest)
        lines.append(
            f"| {len(rest)} more | | | | | {sum(c['calls'] for c in rest)} | {ms:.1f}"
            f" | {ms / fwd:.1%} | {gmac:.2f} | {gmac / ms * 1000 if ms else 0:.0f} | | |"
        )
    lines += ["", "| other op | calls | ms (profiled) | share |", "| --- | ---: | ---: | ---: |"]
    for o in row["other_ops"]:
        if o["ms"] >= 0.5:
            lines.append(f"| {o['op']} | {o['calls']} | {o['ms']:.1f} | {o['ms'] / fwd:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
