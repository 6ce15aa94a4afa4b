"""int8 inference on the CPU, measured before it is offered: our fp32 prepared model against two
post-training static int8 paths, side by side in one process.

    fp32        prepare_for_inference(model) (segcompare/infer/fast.py)
    pt2e        that model exported (torch.export, strict), quantized with torchao's PT2E and the
                X86InductorQuantizer (int8 activations per tensor, int8 weights per channel),
                then torch.compile (inductor, freezing on): oneDNN int8 convs with fused epilogues
    ort         that model exported to ONNX (segcompare.export), quantized by onnxruntime's
                quantize_static to QDQ (u8 activations, s8 weights per channel), run by
                onnxruntime's CPU provider

Only the convolutions (and, in the PT2E path, the ops the quantizer may fuse into them: add,
ReLU, cat, upsampling) run in int8: LayerNorm, softmax and the attention's scores (SegFormer's
fused scaled-dot-product attention) stay in float32 on both paths.

Calibration: --calib training images of a synthetic set (`segcompare data synth`, or the demo's
cache), resized to the timed size (PT2E's exported graph has static shapes) or to --ort-calib-size
for onnxruntime (its graph is exported with dynamic sizes; min/max statistics do not depend on the
size much, and onnxruntime's calibration holds every conv output of every image in memory: the
default, 256x512, is the synthetic set's own size).
Weights: random at the scale of trained ones (`inference_cpu.trained_like`) for the timing;
the mIoU change is measured on trained weights (--trained MODEL=FILE, e.g. the demo's run folders)
on the synthetic val split, whole image at its own size, fp32 against each int8 path.

    python benchmarks/int8_cpu.py --models hrnet-w18-small-v2 --size 512x1024 --calib 4
    python benchmarks/int8_cpu.py --data $SYNTH \\
        --trained segformer-b0=segcompare-demo/runs/segformer_b0/final.safetensors

Needs torchao (PT2E lives there since torch 2.10) and onnxruntime. Rows are merged into
benchmarks/results/int8_cpu.json by (model, size, path).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as inference_cpu.py: before torch loads

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from inference_cpu import calibration_images, hw, miou, trained_like, write_rows  # noqa: E402

from segcompare import bench  # noqa: E402
from segcompare.infer.fast import prepare_for_inference, tune_cpu_allocator  # noqa: E402
from segcompare.models import build_model  # noqa: E402

PATHS = ("pt2e", "ort")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="segformer-b0,hrnet-w18-small-v2")
    p.add_argument("--size", default="1024x2048", help="HxW timed")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--calib", type=int, default=32, help="calibration images")
    p.add_argument("--data", default=None, help="synthetic Cityscapes root (train: calibration)")
    p.add_argument("--ort-calib-size", default="256x512", help="HxW of onnxruntime's calibration")
    p.add_argument("--trained", action="append", default=[], help="MODEL=WEIGHTS for the mIoU")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/int8_cpu.json"))
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# The two int8 paths: each returns (run, calibration s, compile s)


def pt2e_int8(fp32: torch.nn.Module, calib: list[torch.Tensor]):
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.inductor_passes.x86  # noqa: F401  (the int8 lowerings)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    t0 = time.perf_counter()
    # strict: dynamo records which module / function made each node, which the quantizer reads
    graph = torch.export.export(fp32, (calib[0],), strict=True).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    observed = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in calib:
            observed(x)
    q = convert_pt2e(observed)
    calib_s = time.perf_counter() - t0
    inductor_config.freezing = True  # constant weights: prepacked int8 oneDNN kernels
    t0 = time.perf_counter()
    compiled = torch.compile(q)
    with torch.inference_mode():  # as segcompare.bench runs it (else it compiles again there)
        compiled(calib[0])
    return compiled, calib_s, time.perf_counter() - t0


class Reader:
    """onnxruntime's CalibrationDataReader protocol over our calibration images."""

    def __init__(self, images: list[torch.Tensor]):
        self.images = iter(images)

    def get_next(self):
        x = next(self.images, None)
        return None if x is None else {"images": x.numpy()}


def ort_int8(model: torch.nn.Module, calib: list[torch.Tensor], threads: int, work: Path):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from segcompare.export import export_onnx

    fp32_path, int8_path = work / "fp32.onnx", work / "int8.onnx"
    t0 = time.perf_counter()
    export_onnx(model, fp32_path, size_hw=tuple(calib[0].shape[-2:]), dynamic=True)
    quantize_static(
        str(fp32_path), str(int8_path), Reader(calib),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],  # LayerNorm, Softmax, the attention's MatMuls: float
        calibrate_method=CalibrationMethod.MinMax,
    )  # fmt: skip
    calib_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # no busy-waiting after a run: it would take the cores from the fp32 model timed next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(int8_path), opts, providers=["CPUExecutionProvider"])
    compile_s = time.perf_counter() - t0

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

    return run, calib_s, compile_s


def build_int8(path, model, fp32, data, n, calib_hw, ort_hw, threads, work: Path):
    """(run, calibration s, compile s) of int8 path `path` ('pt2e' | 'ort') for `model`
    (`fp32`: its prepared model), calibrated on `n` training images of `data`."""
    if path == "pt2e":
        return pt2e_int8(fp32, calibration_images(data, n, calib_hw))
    return ort_int8(model, calibration_images(data, n, ort_hw), threads, work)


# ---------------------------------------------------------------------------------------------
# mIoU on trained weights


def miou_rows(name: str, weights: str, paths: list[str]) -> list[dict]:
    model = build_model(name, weights=weights).eval()
    fp32 = prepare_for_inference(model)
    from segcompare.evaluate import eval_dataset

    size = tuple(eval_dataset(ARGS.data, "val")[0]["image"].shape[:2])
    base = miou(fp32, ARGS.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            run, calib_s, _ = build_int8(
                path, model, fp32, ARGS.data, ARGS.calib, size, size, ARGS.threads, Path(tmp)
            )
            got = miou(run, ARGS.data)
            rows.append(
                {
                    "model": name,
                    "size": "x".join(map(str, size)),
                    "path": path,
                    "weights": weights,
                    "miou_fp32": round(base, 2),
                    "miou_int8": round(got, 2),
                    "miou_change": round(got - base, 2),
                    "calib_images": ARGS.calib,
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                }
            )
            print(f"{name} {path}: mIoU fp32 {base:.2f} int8 {got:.2f}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# Speed


def speed_rows(name: str, size_hw: tuple[int, int], paths: list[str]) -> list[dict]:
    torch.manual_seed(0)
    model = trained_like(build_model(name))
    fp32 = prepare_for_inference(model)
    x = torch.randn(1, 3, *size_hw, generator=torch.Generator().manual_seed(1))
    candidates, built = [bench.Candidate("fp32", fp32)], {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            print(f"{name} {path}: calibrating and compiling ...", file=sys.stderr, flush=True)
            run, calib_s, compile_s = build_int8(
                path, model, fp32, ARGS.data, ARGS.calib, size_hw, hw(ARGS.ort_calib_size),
                ARGS.threads, Path(tmp),
            )  # fmt: skip
            built[path] = (calib_s, compile_s)
            candidates.append(bench.Candidate(path, run))
        with torch.no_grad():
            ref = fp32(x)
            agree = {c.name: (c.run(x).argmax(1) == ref.argmax(1)).float().mean().item()
                     for c in candidates[1:]}  # fmt: skip
        load = os.getloadavg()[0]
        timings = {r["name"]: r for r in bench.benchmark(candidates, x, ARGS.warmup, ARGS.iters)}
    rows = []
    for path in paths:
        t, f = timings[path], timings["fp32"]
        rows.append({
            "model": name, "size": f"{size_hw[0]}x{size_hw[1]}", "path": path,
            "fp32_ms": f["latency_ms"], "int8_ms": t["latency_ms"],
            "speedup": round(f["latency_ms"] / t["latency_ms"], 3),
            "speedup_p10": round(f["p10_ms"] / t["p10_ms"], 3),
            "calib_s": round(built[path][0], 1), "compile_s": round(built[path][1], 1),
            "calib_images": ARGS.calib, "argmax_agree_random_weights": round(agree[path], 4),
            "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            "timings": [f, t], "date": time.strftime("%Y-%m-%d %H:%M"),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | input | path | fp32 ms | int8 ms | speedup | p10 speedup | calib s"
        " | compile s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "fp32_ms" in r:
            lines.append(
                f"| {r['model']} | {r['size']} | {r['path']} | {r['fp32_ms']:.0f} |"
                f" {r['int8_ms']:.0f} | {r['speedup']:.2f}× | {r['speedup_p10']:.2f}× |"
                f" {r['calib_s']:.0f} | {r['compile_s']:.0f} |"
            )
    acc = [r for r in rows if "miou_fp32" in r]
    if acc:
        lines += ["", "| model | input | path | mIoU fp32 | mIoU int8 | change |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
        for r in acc:
            lines.append(
                f"| {r['model']} | {r['size']} | {r['path']} | {r['miou_fp32']:.2f} |"
                f" {r['miou_int8']:.2f} | {r['miou_change']:+.2f} |"
            )
    return "\n".join(lines)


def main() -> int:
    global ARGS
    ARGS = parse_args()
    torch.set_num_threads(ARGS.threads)
    tune_cpu_allocator()
    paths = [p for p in ARGS.paths.split(",") if p]
    rows = []
    for spec in ARGS.trained:
        name, weights = spec.split("=", 1)
        if ARGS.data is None:
            raise SystemExit("--trained needs --data (the synthetic set's val split)")
        rows += miou_rows(name, weights, paths)
    for name in [m for m in ARGS.models.split(",") if m]:
        rows += speed_rows(name, hw(ARGS.size), paths)
        print(table(rows[-len(paths) :]), file=sys.stderr, flush=True)
    meta = bench.machine_info(torch.device("cpu"), ARGS.threads, "int8")
    meta.update(warmup=ARGS.warmup, iters=ARGS.iters, calib=ARGS.calib)
    if rows:
        write_rows(Path(ARGS.out), meta, rows, keys=("model", "size", "path"))
    print(table(rows))
    print(
        f"\n{meta['cpu']}, {meta['cores']} cores, {ARGS.threads} threads, torch {meta['torch']}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
