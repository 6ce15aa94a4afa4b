"""CPU inference latency of our prepared models against the references, side by side.

    ours        prepare_for_inference(model) (segcompare/infer/fast.py)
    reference   SegFormer: transformers' SegformerForSemanticSegmentation with the same weights;
                HRNet: our eager model (it equals the official code, tests/test_hrnet.py)

Both run in one process, on one input, timed in interleaved rounds by `segcompare.bench`
(median of --iters after --warmup), so a busy moment of the machine hurts both alike. The max
absolute logit difference and the argmax agreement of the two are printed with the timings.
Weights are random but scaled like trained ones (BatchNorm statistics included), seed 0.

    python benchmarks/inference_cpu.py                                 # everything (long)
    python benchmarks/inference_cpu.py --models segformer-b0 --cases 512x1024x1
    python benchmarks/inference_cpu.py --models hrnet-w48 --bf16       # adds an "ours bf16" row
    python benchmarks/inference_cpu.py --cases 1024x2048x1 --precision fp32,bf16,int8 \\
        --data $SYNTH --trained hrnet-w18-small-v1=runs/hrnet_w18_small_v1/final.safetensors

--precision adds our model in each precision (`segcompare.precision`; int8 as
`--precision int8` runs it (`segcompare.infer.quantize`, HRNet, calibrated on --calib training
images of --data), for other families or without --data by `int8_cpu.py`'s --int8-path (pt2e:
at the timed size; ort: at --calib-size) on those images, else smooth random images)
and prints the precision table; with --trained (weights of the demo's models) it also scores
each precision on --data's val split (whole image at its own size) and prints the mIoU change
against fp32.

Large tensors go on transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE) and glibc keeps
freed memory for reuse (`tune_cpu_allocator`), for both models, as the segcompare CLI does;
--no-thp and --no-tune-alloc turn them off. Rows are merged into
benchmarks/results/inference_cpu.json by (model, size, batch), so subsets can be rerun.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["segformer-b0", "hrnet-w18-small-v2", "hrnet-w48", "segformer-b5"]
CASES = ["1024x2048x1", "512x1024x1", "512x1024x4"]  # HxWxbatch
TARGETS = {"segformer-b0": 0.5, "hrnet-w18-small-v2": 0.75, "hrnet-w48": 0.9, "segformer-b5": 0.6}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated HxWxBATCH")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="also time ours in bfloat16")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, int8")
    p.add_argument("--data", default=None, help="synthetic Cityscapes root: int8 calibration, mIoU")
    p.add_argument("--calib", type=int, default=32, help="int8 calibration images")
    p.add_argument("--calib-size", default="256x512", help="HxW of ort's calibration images")
    p.add_argument("--int8-path", default="segcompare", choices=("segcompare", "pt2e", "ort"),
                   help="segcompare: --precision int8 as the commands run it (HRNet; needs "
                   "--data), other families by pt2e; pt2e, ort: see int8_cpu.py")
    p.add_argument("--trained", action="append", default=[], help="MODEL=WEIGHTS: mIoU change")
    p.add_argument("--no-thp", action="store_true", help="leave PyTorch's allocator as it is")
    p.add_argument(
        "--no-tune-alloc", action="store_true", help="leave glibc's malloc settings as they are"
    )
    p.add_argument("--out", default=None,
                   help="JSON file (default: results/inference_cpu.json; with --precision other "
                   "than fp32: results/precision_cpu.json, the precision table's file)")
    return p.parse_args()


if "--no-thp" not in sys.argv:  # read by torch once, when it loads: set before the import below
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(ROOT))
from segcompare import bench  # noqa: E402
from segcompare.infer.fast import prepare_for_inference, tune_cpu_allocator  # noqa: E402
from segcompare.models import build_model, family_of  # noqa: E402
from segcompare.precision import PRECISIONS, TABLE  # noqa: E402
from segcompare.utils import atomic_write_text  # noqa: E402


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights at the scale of trained ones, so the logits are O(1) and BN folding really
    changes the weights: conv/linear N(0, gain/fan_in), norm scales U(0.5, 1.5), shifts
    N(0, 0.05); then the BatchNorm running statistics are measured on a random image."""
    g = torch.Generator().manual_seed(seed)
    gain = 2.0 if family_of(model) == "hrnet" else 1.0
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or "running" in name:
                continue
            if t.ndim == 1 and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            else:
                fan_in = math.prod(t.shape[1:])
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(gain / fan_in))
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the calibration batch
        model.train()(torch.randn(2, 3, 256, 512, generator=g))
        for bn in bns:
            bn.momentum = 0.1
    return model.eval()


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, share of pixels with the same argmax class) against `reference`."""
    diff = (logits - reference).abs().max().item()
    agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    return diff, agree


def run_case(name: str, h: int, w: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = trained_like(build_model(name))
    ours = prepare_for_inference(model)
    reference, _, run = bench.reference_for(model)
    candidates = [bench.Candidate("ours", ours), bench.Candidate("reference", run)]
    if ARGS.bf16:
        ours_bf16 = prepare_for_inference(model, dtype=torch.bfloat16)
        candidates.append(bench.Candidate("ours bf16", ours_bf16))
    if "int8" in ARGS.precisions:
        int8 = build_int8(model, ours, (h, w), hw(ARGS.calib_size))
        candidates.append(bench.Candidate("ours int8", int8))
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = {c.name: c.run(x).float() for c in candidates}
    diff, agree = agreement(logits["ours"], logits["reference"])
    load_before = os.getloadavg()[0]
    timings = {r["name"]: r for r in bench.benchmark(candidates, x, ARGS.warmup, ARGS.iters)}
    row = {
        "model": name,
        "size": f"{h}x{w}",
        "batch": batch,
        "reference": reference,
        "ours_ms": timings["ours"]["latency_ms"],
        "reference_ms": timings["reference"]["latency_ms"],
        "ratio": round(timings["ours"]["latency_ms"] / timings["reference"]["latency_ms"], 3),
        # the fastest tenth of each: less sensitive to other processes on a shared machine
        "ratio_p10": round(timings["ours"]["p10_ms"] / timings["reference"]["p10_ms"], 3),
        "target": TARGETS.get(name),
        "max_abs_diff": float(f"{diff:.3g}"),
        "argmax_agree": round(agree, 6),
        "logit_abs_max": round(logits["reference"].abs().max().item(), 3),
        "timings": list(timings.values()),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if ARGS.bf16:
        row["bf16_ms"] = timings["ours bf16"]["latency_ms"]
        row["bf16_ratio"] = round(row["bf16_ms"] / row["reference_ms"], 3)
        diff, agree = agreement(logits["ours bf16"], logits["reference"])
        row["bf16_max_abs_diff"] = float(f"{diff:.3g}")
        row["bf16_argmax_agree"] = round(agree, 6)
    if "ours int8" in timings:
        row["int8_ms"] = timings["ours int8"]["latency_ms"]
        diff, agree = agreement(logits["ours int8"], logits["ours"])
        row["int8_argmax_agree_fp32"] = round(agree, 6)
    return row


def hw(text: str) -> tuple[int, int]:
    h, w = text.split("x")
    return int(h), int(w)


def build_int8(model: nn.Module, fp32: nn.Module, size_hw, ort_hw):
    """--int8-path for `model` (`fp32`: its prepared model): segcompare's `Int8Model` (what
    `--precision int8` runs, calibrated on --calib images of --data, statistics cached in a
    temporary folder so that the calibration is always measured), or `int8_cpu.py`'s paths."""
    from int8_cpu import build_int8 as build  # here: int8_cpu imports this module

    from segcompare.infer.quantize import INT8_FAMILIES, Calibration, Int8Model
    from segcompare.models import family_of

    path = ARGS.int8_path
    if path == "segcompare" and family_of(model) in INT8_FAMILIES and ARGS.data:
        cache = tempfile.mkdtemp(prefix="int8-")
        atexit.register(shutil.rmtree, cache, True)
        q = Int8Model(fp32, model, Calibration(ARGS.data, ARGS.calib), cache=Path(cache))
        with torch.inference_mode():
            q(torch.zeros(1, 3, *size_hw))  # calibrate and compile here, not in the timing
        return q
    path = "pt2e" if path == "segcompare" else path

    with tempfile.TemporaryDirectory() as tmp:  # the model is in memory once built
        run, _, _ = build(path, model, fp32, ARGS.data, ARGS.calib, size_hw, ort_hw,
                          ARGS.threads, Path(tmp))  # fmt: skip
    return run


def calibration_images(root: str | None, n: int, size_hw: tuple[int, int]) -> list[torch.Tensor]:
    """`n` normalised 1×3×H×W images: the first `n` training images of `root` resized to
    `size_hw`, or (no root) smooth random colour fields, seed 0."""
    if root is None:
        g = torch.Generator().manual_seed(0)
        low = [torch.randn(1, 3, 8, 16, generator=g) for _ in range(n)]
        return [F.interpolate(x, size_hw, mode="bilinear", align_corners=False) for x in low]
    from segcompare.data.transforms import normalize
    from segcompare.evaluate import eval_dataset

    data = eval_dataset(root, "train")
    out = []
    for i in range(min(n, len(data))):
        x = normalize(data[i]["image"])[None]
        out.append(F.interpolate(x, size_hw, mode="bilinear", align_corners=False))
    return out


def miou(run, root: str) -> float:
    """mIoU (%) of `run` on the val split of `root`: whole image at its own size, logits
    upsampled bilinearly to it (the same for every precision: only the change is read)."""
    from segcompare.data.transforms import normalize
    from segcompare.evaluate import eval_dataset
    from segcompare.metrics import ConfusionMatrix

    data = eval_dataset(root, "val")
    cm = ConfusionMatrix()
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            x = normalize(item["image"])[None]
            logits = F.interpolate(run(x), x.shape[-2:], mode="bilinear", align_corners=False)
            labels = torch.from_numpy(np.asarray(item["label"])).long()[None]
            cm.update(logits.argmax(1), labels)
    return 100 * cm.compute()["miou"]


def miou_row(name: str, weights: str) -> dict:
    """mIoU of our prepared model in each of --precision on trained weights."""
    from segcompare.evaluate import eval_dataset

    model = build_model(name, weights=weights).eval()
    size = tuple(eval_dataset(ARGS.data, "val")[0]["image"].shape[:2])
    row = {"model": name, "weights": weights, "size": f"{size[0]}x{size[1]}"}
    for p in ARGS.precisions:
        if p == "int8":
            run = build_int8(model, prepare_for_inference(model), size, size)
        else:
            run = prepare_for_inference(model, dtype=getattr(torch, TABLE[p].dtype))
        row[f"miou_{p}"] = round(miou(run, ARGS.data), 2)
    return row


def precision_table(rows: list[dict], accuracy: list[dict]) -> str:
    """Latency in each precision (and against fp32), then the mIoU change on trained weights."""
    lines = [
        "| model | input | fp32 ms | bf16 ms | bf16 vs fp32 | int8 ms | int8 vs fp32 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = []
        for p in ("bf16", "int8"):
            ms = r.get(f"{p}_ms")
            cells += [f"{ms:.0f}", f"{ms / r['ours_ms']:.2f}×"] if ms else ["-", "-"]
        lines.append(
            f"| {r['model']} | {r['batch']}×3×{r['size'].replace('x', '×')} | {r['ours_ms']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    if accuracy:
        lines += [
            "",
            "| model (trained weights) | val size | mIoU fp32 | bf16 change | int8 change |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for a in accuracy:
            base = a["miou_fp32"]
            change = [f"{a[f'miou_{p}'] - base:+.2f}" if f"miou_{p}" in a else "-"
                      for p in ("bf16", "int8")]  # fmt: skip
            lines.append(
                f"| {a['model']} | {a['size']} | {base:.2f} | " + " | ".join(change) + " |"
            )
    return "\n".join(lines)


def write_rows(
    path: Path, meta: dict, rows: list[dict], keys: tuple[str, ...] = ("model", "size", "batch")
) -> None:
    """Write {"meta", "rows"} to the JSON file `path` (atomically): `rows`, after the rows already
    there that none of them replaces (same values of `keys`), so subsets can be rerun."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    new = {tuple(r.get(k) for k in keys) for r in rows}
    kept = [r for r in old["rows"] if tuple(r.get(k) for k in keys) not in new]
    doc = {**old, "meta": meta, "rows": kept + rows}  # other keys ("accuracy") stay
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def table(rows: list[dict]) -> str:
    lines = [
        "| model | input | ours ms | reference | reference ms | ratio | ratio p10 | target |"
        " max abs diff | argmax agree |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        target = f"≤ {r['target']:.2f}×" if r["target"] else "-"
        lines.append(
            f"| {r['model']} | {r['batch']}×3×{r['size'].replace('x', '×')} | {r['ours_ms']:.0f} |"
            f" {r['reference']} | {r['reference_ms']:.0f} | {r['ratio']:.2f}× |"
            f" {r['ratio_p10']:.2f}× | {target} | {r['max_abs_diff']:.1e} |"
            f" {100 * r['argmax_agree']:.3f}% |"
        )
    if any("bf16_ms" in r for r in rows):
        lines += [
            "",
            "| model | input | ours bf16 ms | vs reference | max abs diff | argmax agree |",
        ]
        lines.append("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            if "bf16_ms" in r:
                lines.append(
                    f"| {r['model']} | {r['batch']}×3×{r['size'].replace('x', '×')} |"
                    f" {r['bf16_ms']:.0f} | {r['bf16_ratio']:.2f}× | {r['bf16_max_abs_diff']:.2g} |"
                    f" {100 * r['bf16_argmax_agree']:.2f}% |"
                )
    return "\n".join(lines)


def main() -> int:
    global ARGS
    ARGS = parse_args()
    ARGS.precisions = [p for p in ARGS.precision.split(",") if p]
    for p in ARGS.precisions:
        if p not in (*PRECISIONS, "int8"):
            raise SystemExit(f"--precision {p!r}: valid: {', '.join(PRECISIONS)}, int8")
    ARGS.bf16 = ARGS.bf16 or "bf16" in ARGS.precisions
    if ARGS.trained and (ARGS.data is None or "fp32" not in ARGS.precisions):
        raise SystemExit("--trained needs --data (its val split) and fp32 among --precision")
    torch.set_num_threads(ARGS.threads)
    tuned = False if ARGS.no_tune_alloc else tune_cpu_allocator()
    models = [m for m in ARGS.models.split(",") if m]
    cases = [tuple(int(v) for v in c.split("x")) for c in ARGS.cases.split(",") if c]
    rows = []
    for h, w, batch in cases:
        for name in models:
            print(f"{name} {batch}x3x{h}x{w} ...", file=sys.stderr, flush=True)
            rows.append(run_case(name, h, w, batch))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    meta = bench.machine_info(torch.device("cpu"), ARGS.threads, "fp32")
    meta.update(thp=not ARGS.no_thp, tuned_malloc=tuned, warmup=ARGS.warmup, iters=ARGS.iters)
    out = Path(ARGS.out or ROOT / "benchmarks/results" / (
        "inference_cpu.json" if ARGS.precisions == ["fp32"] else "precision_cpu.json"))
    write_rows(out, meta, rows)
    print(table(rows))
    if ARGS.precisions != ["fp32"]:
        accuracy = [miou_row(*spec.split("=", 1)) for spec in ARGS.trained]
        if accuracy:  # beside the timings, replacing the rows of the same model and weights
            doc = json.loads(out.read_text())
            stamp = {"calib_images": ARGS.calib, "date": time.strftime("%Y-%m-%d %H:%M")}
            new = {(a["model"], a["weights"]) for a in accuracy}
            doc["accuracy"] = [a for a in doc.get("accuracy", [])
                               if (a["model"], a["weights"]) not in new]
            doc["accuracy"] += [{**a, **stamp} for a in accuracy]
            atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
        print("\n" + precision_table(rows, accuracy))
    print(
        f"\n{meta['cpu']}, {meta['cores']} cores, {time.strftime('%Y-%m-%d')}, "
        f"{ARGS.threads} threads, torch {meta['torch']}, THP {meta['thp']}, "
        f"glibc malloc tuned {tuned}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
