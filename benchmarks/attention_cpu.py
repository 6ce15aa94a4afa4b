"""SegFormer's efficient self-attention on the CPU: torch's fused kernel against plain matmuls
with a float32 softmax, in float32 and bfloat16, at the attention shapes of SegFormer-B0 on a
1024×2048 image (queries = the stage's tokens, keys = the tokens after spatial reduction).

    python benchmarks/attention_cpu.py                  # all four stages, both dtypes
    python benchmarks/attention_cpu.py --rows 4096      # query rows per matmul chunk

"plain" computes softmax(q kᵀ / √d) v with two matmuls and the softmax in float32, in chunks of
--rows query rows so that the score matrix fits in memory; "fused" is
F.scaled_dot_product_attention. Both run in one process on the same tensors, interleaved; the
table gives the fastest of --iters runs of each, their ratio, and each one's largest difference
from a float32 fused reference. Writes benchmarks/results/attention_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# SegFormer-B0 at 1024×2048: (heads, query tokens, key tokens, head size) of stages 1-4
B0_1024x2048 = [(1, 256 * 512, 32 * 64, 32), (2, 128 * 256, 32 * 64, 32),
                (5, 64 * 128, 32 * 64, 32), (8, 32 * 64, 32 * 64, 32)]  # fmt: skip


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    out = []
    for i in range(0, q.shape[-2], rows):
        scores = torch.matmul(q[..., i : i + rows, :], k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        out.append(torch.matmul(torch.softmax(scores.float(), -1).to(q.dtype), v))
    return torch.cat(out, -2)


def fastest_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/attention_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| heads | queries | keys | dtype | fused ms | plain ms | plain / fused | "
          "fused max err | plain max err |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for heads, queries, keys, dim in B0_1024x2048:
        g = torch.Generator().manual_seed(0)
        q32, k32, v32 = (torch.randn(1, heads, n, dim, generator=g) for n in (queries, keys, keys))
        with torch.inference_mode():
            ref = F.scaled_dot_product_attention(q32, k32, v32)
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
                fused = partial(F.scaled_dot_product_attention, q, k, v)
                slow = partial(plain, q, k, v, args.rows)
                err = [(f().float() - ref).abs().max().item() for f in (fused, slow)]
                ms = [fastest_ms(f, args.iters) for f in (fused, slow)]
                row = {"heads": heads, "queries": queries, "keys": keys, "head_dim": dim,
                       "dtype": str(dtype).replace("torch.", ""), "fused_ms": round(ms[0], 1),
                       "plain_ms": round(ms[1], 1), "ratio": round(ms[1] / ms[0], 2),
                       "fused_err": err[0], "plain_err": err[1]}  # fmt: skip
                rows.append(row)
                print(f"| {heads} | {queries} | {keys} | {row['dtype']} | {ms[0]:.0f} | "
                      f"{ms[1]:.0f} | {row['ratio']:.1f}x | {err[0]:.1e} | {err[1]:.1e} |")
    from segcompare.bench import machine_info

    meta = machine_info(torch.device("cpu"), args.threads, "fp32+bf16")
    meta.update(date=time.strftime("%Y-%m-%d %H:%M"), load=list(os.getloadavg()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "meta": meta}, indent=2) + "\n")
    print(f"{meta['cpu']}, {meta['cores']} cores, {args.threads} threads, {meta['date']}, "
          f"load {meta['load'][0]:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
