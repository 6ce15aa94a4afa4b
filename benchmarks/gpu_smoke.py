"""Every GPU path of segcompare in one short run, with its figures (issue 26).

    PYTHONPATH=. python3 benchmarks/gpu_smoke.py --device cuda --json OUT/gpu_smoke.json
    python benchmarks/gpu_smoke.py --device cpu --tiny     # the same sequence, tiny, on a CPU

Each step runs the command line in a process of its own (`sys.executable -m segcompare ...`;
torchrun as `sys.executable -m torch.distributed.run`), with its own timeout, so that a crash,
a hang or an out-of-memory in one step is recorded (exit code, last lines of stderr) and the run
goes on. Steps run in order of value; one whose estimate no longer fits in `--budget-s` is
skipped, saying so. The JSON is rewritten (atomically) after every step, so a run killed from
outside still leaves the figures so far; the table is printed at the end.

The steps: synthesise a small data set (`data synth`); train SegFormer-B0 and
HRNetV2-W18-Small-v1 with the demo recipes (`configs/synthcity_*.yaml`, 20 iterations) in fp32,
bf16, fp16 and with torch.compile, and resume one run from its middle checkpoint (its final
weights are compared with the uninterrupted run's); torchrun with 2 processes (NCCL where there
are 2 GPUs, gloo on one) and SyncBatchNorm; `eval`, `predict`, `video` and `compare`, each with
and without `--amp`; inference of SegFormer-B0 (and HRNetV2-W18-Small-v1) at 1024x2048, batch 1
and 8, eager and prepared (`prepare_for_inference`), fp32 / TF32 / bf16 / fp16 / torch.compile,
images/s and the max |logit| difference to the eager model in strict fp32 (`--measure`, below);
`bench --reference` (transformers' SegFormer, the eager HRNet = the official code); the training
speed of the official Cityscapes recipes' crops at batch 2.

`--tiny` shrinks every size (64x128 images, 4 iterations) so the sequence runs on a CPU in about
a minute (tests/test_gpu_smoke.py); there torch.compile runs with the aot_eager backend
(TORCH_COMPILE_OVERRIDE_BACKENDS), as inductor's C++ build of a training graph takes minutes on
a CPU. Nothing here is a figure typed in: every number in the JSON and the table was measured
in this run.

`--measure inference` is one step's work, run in its own process by the sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 15  # of a failed step's stderr, kept in the JSON
TINY_COMPILE_BACKEND = ">=0:aot_eager"  # TORCH_COMPILE_OVERRIDE_BACKENDS in --tiny


# =================================================================================================
# Sizes: the GPU run and the tiny CPU run differ only here
# =================================================================================================
@dataclass(frozen=True)
class Sizes:
    synth: List[str]  # `data synth` options
    train: List[str]  # --set overrides for every demo-recipe run
    iters: int  # training iterations per run
    half: int  # the checkpoint a resumed run continues from
    official_iters: int
    official_crops: Dict[str, List[int]]  # model -> crop (the official recipes' crops)
    bench_size: str  # HxW of the inference measurements
    bench_batches: List[int]
    warmup: int
    timed: int
    video_frames: int
    train_timeout: int
    compile_timeout: int


GPU_SIZES = Sizes(
    synth=["--train", "16", "--val", "4", "--video", "8", "--size", "256x512"],
    train=["train.num_workers=4", "train.log_every=5", "train.eval_every=20",
           "train.checkpoint_every=10", "optim.warmup_iters=5"],
    iters=20, half=10, official_iters=12,
    official_crops={"segformer-b0": [1024, 1024], "hrnet-w18-small-v1": [512, 1024]},
    bench_size="1024x2048", bench_batches=[1, 8], warmup=3, timed=10, video_frames=8,
    train_timeout=150, compile_timeout=300,
)
TINY_SIZES = Sizes(
    synth=["--train", "4", "--val", "2", "--video", "3", "--size", "64x128"],
    train=["train.batch_size=2", "train.num_workers=0", "train.log_every=2", "train.eval_every=4",
           "train.checkpoint_every=2", "optim.warmup_iters=1", "data.crop_size=[64,64]",
           "data.base_size=128"],
    iters=4, half=2, official_iters=2,
    official_crops={"segformer-b0": [64, 64], "hrnet-w18-small-v1": [64, 64]},
    bench_size="64x128", bench_batches=[1], warmup=1, timed=1, video_frames=3,
    train_timeout=120, compile_timeout=180,
)

RECIPES = {
    "segformer-b0": "configs/synthcity_segformer_b0.yaml",
    "hrnet-w18-small-v1": "configs/synthcity_hrnet_w18_small_v1.yaml",
}
OFFICIAL = {
    "segformer-b0": "configs/segformer_b0_cityscapes_1024x1024_160k.yaml",
    "hrnet-w18-small-v1": "configs/hrnet_w18_small_v1_cityscapes_512x1024.yaml",
}
SHORT = {"segformer-b0": "b0", "hrnet-w18-small-v1": "w18s"}


# =================================================================================================
# Steps
# =================================================================================================
@dataclass
class Step:
    """One command of the sequence. `argv` runs in its own process; `before` prepares (and may
    raise to skip the step, naming why), `after` reads the step's figures from its outputs."""

    name: str
    argv: List[str]
    timeout_s: int
    estimate_s: int  # skipped when less than this is left of the budget
    needs: List[str] = field(default_factory=list)  # steps that must have succeeded first
    env: Dict[str, str] = field(default_factory=dict)
    before: Optional[Callable[[], None]] = None
    after: Optional[Callable[[], dict]] = None


def segcompare(*args: str) -> List[str]:
    return [sys.executable, "-m", "segcompare", *args]


def train_figures(run: Path, batch: Optional[int] = None) -> Callable[[], dict]:
    """it/s (mean over the log windows after the first, which holds the warm-up and any
    compilation), images/s, memory, last loss and val mIoU, from the run's log.jsonl."""

    def read() -> dict:
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                   if line.strip()]
        steps = [r for r in records if "time_per_iter" in r]
        start = next((r for r in records if r.get("event") == "start"), {})
        summary = next((r for r in records if "summary" in r), {})
        timed = steps[1:] or steps
        per_iter = sum(r["time_per_iter"] for r in timed) / len(timed) if timed else None
        per_process = batch or start.get("batch_per_process")
        out = {
            "it_per_s": round(1 / per_iter, 3) if per_iter else None,
            "images_per_s_per_process": round(per_process / per_iter, 2)
            if per_iter and per_process else None,
            "first_window_s_per_iter": round(steps[0]["time_per_iter"], 3) if steps else None,
            "memory_mb": round(steps[-1]["memory_mb"], 1) if steps and "memory_mb" in steps[-1]
            else None,
            "final_loss": summary.get("final_loss"),
            "val_mIoU": summary.get("val_mIoU"),
            "device": start.get("device"),
            "world_size": start.get("world_size"),
        }
        return {k: v for k, v in out.items() if v is not None}

    return read


def read_json(path: Path, keys: List[str]) -> Callable[[], dict]:
    def read() -> dict:
        doc = json.loads(path.read_text())
        return {k: doc[k] for k in keys if k in doc}

    return read


def plan(args: argparse.Namespace, work: Path) -> List[Step]:
    """The sequence, in order of value: what the lead needs most runs first."""
    s = TINY_SIZES if args.tiny else GPU_SIZES
    data, runs = work / "data", work / "runs"
    dev = ["--device", args.device]
    steps: List[Step] = [Step("synth data", segcompare("data", "synth", str(data), *s.synth), 120,
                              5)]

    def train_step(model: str, tag: str, sets: List[str], compile_: bool = False) -> Step:
        out = runs / f"{SHORT[model]}_{tag}"
        overrides = [f"data.root={data}", f"train.max_iters={s.iters}", *s.train, *sets]
        argv = segcompare("train", RECIPES[model], *dev, "--out", str(out),
                          *[a for o in overrides for a in ("--set", o)])
        timeout = s.compile_timeout if compile_ else s.train_timeout
        return Step(f"train {model} {tag}", argv, timeout, timeout // 4 if compile_ else 20,
                    ["synth data"], after=train_figures(out))

    def run_weights(model: str) -> str:
        return str(runs / f"{SHORT[model]}_fp32" / "final.safetensors")

    b0, w18 = "segformer-b0", "hrnet-w18-small-v1"
    steps += [train_step(b0, "fp32", ["train.amp=off"]), train_step(w18, "fp32", ["train.amp=off"])]

    # inference: eval with and without --amp first (the fp16 prepared path of crash 1)
    def eval_step(model: str, amp: bool, optimize: bool = True) -> Step:
        tag = ("amp" if amp else "fp32") + ("" if optimize else " eager")
        out = work / f"eval_{SHORT[model]}_{tag.replace(' ', '_')}.json"
        argv = segcompare("eval", "--weights", run_weights(model), "--data", str(data), *dev,
                          "--json", str(out), "--workers", "2",
                          *(["--amp"] if amp else []), *([] if optimize else ["--no-optimize"]))
        return Step(f"eval {model} {tag}", argv, 120, 15, [f"train {model} fp32"],
                    after=read_json(out, ["miou", "images_per_s", "num_images"]))

    steps += [eval_step(b0, False), eval_step(b0, True), eval_step(w18, True)]

    def measure_step(model: str, compiled: bool = False) -> Step:
        tag = "torch.compile" if compiled else "eager and prepared"
        out = work / f"inference_{SHORT[model]}{'_compile' if compiled else ''}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--measure", "inference",
                "--model", model, "--size", s.bench_size, "--batches",
                ",".join(map(str, s.bench_batches)), "--warmup", str(s.warmup), "--iters",
                str(s.timed), "--device", args.device, "--out", str(out),
                *(["--compiled"] if compiled else [])]
        return Step(f"inference {model} {s.bench_size} {tag}", argv, 300 if compiled else 180,
                    90 if compiled else 40, [],
                    after=read_json(out, ["rows", "reference", "precision"]))

    steps.append(measure_step(b0))

    # training in the other precisions, with a resume; torchrun + SyncBatchNorm
    steps += [train_step(b0, "bf16", ["train.amp=bf16"]),
              train_step(w18, "bf16", ["train.amp=bf16"]),
              train_step(b0, "fp16", ["train.amp=fp16"]),
              train_step(w18, "fp16", ["train.amp=fp16"])]
    steps.append(resume_step(steps[-2], runs / "b0_fp16", s.iters, s.half))
    steps.append(torchrun_step(args, s, data, runs))

    def bench_step(model: str, dtype: str, batch: int) -> Step:
        out = work / f"bench_{SHORT[model]}_{dtype}_b{batch}.json"
        argv = segcompare("bench", model, "--size", s.bench_size, "--batch", str(batch), *dev,
                          "--dtype", dtype, "--reference", "--warmup", str(s.warmup), "--iters",
                          str(s.timed), "--json", str(out))
        return Step(f"bench --reference {model} {dtype} batch {batch}", argv, 240, 30, [],
                    after=read_json(out, ["models"]))

    steps += [bench_step(b0, "fp32", 1), bench_step(w18, "fp32", 1)]

    # torch.compile (training, inference), then the official recipes' crops
    steps += [train_step(b0, "compile", ["train.amp=bf16", "train.compile=true"], True),
              measure_step(b0, compiled=True)]
    steps += [official_step(args, s, data, runs, model) for model in (b0, w18)]

    # the other commands, with and without --amp (compare --amp scores in fp32 as well)
    both = ["--weights", run_weights(b0), "--weights", run_weights(w18)]
    frames = data / "leftImg8bit_demoVideo" / "stuttgart_00"
    needs = [f"train {b0} fp32", f"train {w18} fp32"]
    for flag, tag in ((["--amp"], "amp"), ([], "fp32")):
        steps += [
            Step(f"predict {tag}", segcompare("predict", "--weights", run_weights(b0),
                                              str(data / "leftImg8bit" / "val"), "--out",
                                              str(work / f"pred_{tag}"), "--format", "color",
                                              *dev, *flag), 120, 12, needs[:1]),
            Step(f"video {tag}", segcompare("video", *both, str(frames), "--out",
                                            str(work / f"video_{tag}.gif"), "--max-frames",
                                            str(s.video_frames), *dev, *flag), 120, 15, needs),
        ]
    steps.append(Step("compare amp", segcompare("compare", *both, "--data", str(data), "--out",
                                                 str(work / "compare_amp"), "--images", "1",
                                                 "--bench-iters", "2", "--bench-warmup", "1",
                                                 *dev, "--amp"), 240, 30, needs,
                      after=compare_figures(work / "compare_amp" / "metrics.json")))

    # what is left, least needed last
    steps += [eval_step(w18, False), eval_step(b0, True, optimize=False),
              bench_step(b0, "fp16", 1),
              train_step(w18, "compile", ["train.amp=bf16", "train.compile=true"], True),
              measure_step(w18)]
    if args.tiny:
        for step in steps:
            step.env.setdefault("TORCH_COMPILE_OVERRIDE_BACKENDS", TINY_COMPILE_BACKEND)
    return steps


def resume_step(done: Step, run: Path, iters: int, half: int) -> Step:
    """Continue a copy of `run` from its middle checkpoint, then compare the final weights with
    the uninterrupted run's (bit-identical on the CPU; on CUDA some kernels are not
    deterministic, README "Reproducibility")."""
    copy = run.with_name(run.name + "_resumed")
    argv = [a if a != str(run) else str(copy) for a in done.argv] + ["--resume"]

    def before() -> None:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        (copy / "checkpoints" / f"iter_{iters}.pt").unlink()
        (copy / "final.safetensors").unlink()
        if not (copy / "checkpoints" / f"iter_{half}.pt").exists():
            raise RuntimeError(f"no checkpoint iter_{half}.pt to resume from")

    def after() -> dict:
        figures = train_figures(copy)()
        figures["max_abs_weight_diff_vs_uninterrupted"] = weight_difference(
            run / "final.safetensors", copy / "final.safetensors")
        return figures

    return Step(f"resume {done.name.removeprefix('train ')} from iter {half}", argv,
                done.timeout_s, done.estimate_s, [done.name], before=before, after=after)


def weight_difference(a: Path, b: Path) -> float:
    """max |a - b| over every tensor of two of our safetensors files."""
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        raise RuntimeError(f"{a} and {b} hold different tensors")
    return max(float(abs(ta[k].astype("float64") - tb[k].astype("float64")).max()) for k in ta)


def torchrun_step(args: argparse.Namespace, s: Sizes, data: Path, runs: Path) -> Step:
    """2 processes of HRNet training (BatchNorm: SyncBatchNorm on CUDA); NCCL where there are 2
    GPUs, gloo where the 2 processes share one (train.py chooses)."""
    out = runs / "w18s_torchrun2"
    overrides = [f"data.root={data}", f"train.max_iters={s.iters}", *s.train, "train.amp=bf16"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "segcompare", "train", RECIPES["hrnet-w18-small-v1"], "--device",
            args.device, "--out", str(out), *[a for o in overrides for a in ("--set", o)]]

    def after() -> dict:
        figures = train_figures(out)()
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        notes = next((r.get("notes", []) for r in records if r.get("event") == "start"), [])
        figures["notes"] = notes
        return figures

    return Step("torchrun 2 processes hrnet-w18-small-v1 bf16", argv, 150, 40, ["synth data"],
                after=after)


def official_step(args: argparse.Namespace, s: Sizes, data: Path, runs: Path, model: str) -> Step:
    """Training speed of the official Cityscapes recipe's crop at batch 2 (one process), fp32
    as the recipe says, no ImageNet weights (speed does not depend on them), no validation."""
    out = runs / f"{SHORT[model]}_official"
    crop = s.official_crops[model]
    overrides = [f"data.root={data}", f"train.max_iters={s.official_iters}",
                 "train.batch_size=2", "model.pretrained=null", "train.eval_every=0",
                 "optim.warmup_iters=1",  # the recipe's warmup is longer than this short run
                 f"train.checkpoint_every={s.official_iters}", "train.log_every=2",
                 f"data.crop_size=[{crop[0]},{crop[1]}]"]
    if args.tiny:
        overrides += ["train.num_workers=0", "data.base_size=128"]
    argv = segcompare("train", OFFICIAL[model], "--device", args.device, "--out", str(out),
                      *[a for o in overrides for a in ("--set", o)])
    return Step(f"train official recipe {model} crop {crop[0]}x{crop[1]} batch 2", argv,
                s.train_timeout, 30, ["synth data"], after=train_figures(out, batch=2))


def compare_figures(path: Path) -> Callable[[], dict]:
    def read() -> dict:
        doc = json.loads(path.read_text())
        return {m["label"]: {k: m.get(k) for k in ("miou", "latency_ms", "miou_fp32")
                             if m.get(k) is not None} for m in doc["models"]}

    return read


# =================================================================================================
# Running the sequence
# =================================================================================================
def run_step(step: Step, env: dict, left_s: float, timeout_scale: float = 1.0) -> dict:
    """Run one step in its own process group (killed whole on timeout); never raises."""
    result: dict = {"name": step.name, "command": " ".join(step.argv)}
    t0 = time.time()
    try:
        if step.before:
            step.before()
    except Exception as err:  # noqa: BLE001 - recorded, the sequence goes on
        return {**result, "status": "skipped", "reason": f"preparing: {err}"}
    timeout = max(1, int(min(step.timeout_s * timeout_scale, left_s)))
    try:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env={**env, **step.env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except OSError as err:
        return {**result, "status": "failed", "rc": None, "stderr_tail": [str(err)]}
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        status = "timeout"
    result.update(status=status, rc=proc.returncode, seconds=round(time.time() - t0, 1),
                  timeout_s=timeout)
    if status != "ok":
        result["stderr_tail"] = _tail(stderr) or _tail(stdout)
        try:  # what the step wrote before it failed or ran out of time
            result["figures_partial"] = step.after() if step.after else None
        except Exception:  # noqa: BLE001, S110 - nothing written: nothing to keep
            pass
        return result
    result["stdout_tail"] = _tail(stdout, 3)
    if step.after:
        try:
            result["figures"] = step.after()
        except Exception as err:  # noqa: BLE001 - a step whose outputs cannot be read failed
            result.update(status="failed", stderr_tail=[f"reading its figures: {err!r}"])
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers and loader workers too
    except ProcessLookupError:
        pass


def _tail(text: str, lines: int = TAIL_LINES) -> List[str]:
    # progress bars redraw with \r: keep each line's last state
    kept = [line.split("\r")[-1] for line in (text or "").splitlines()]
    return [line for line in kept if line.strip()][-lines:]


def environment(env: dict) -> dict:
    """torch, CUDA and the devices, read in a child process (this one never touches CUDA)."""
    code = (
        "import json, os, platform, torch\n"
        "cuda = torch.cuda.is_available()\n"
        "info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': "
        "platform.python_version(), 'cpu_cores': os.cpu_count(), 'gpus': [\n"
        "    {'name': torch.cuda.get_device_name(i), 'memory_gib': round(\n"
        "     torch.cuda.get_device_properties(i).total_memory / 2**30, 1),\n"
        "     'capability': '.'.join(map(str, torch.cuda.get_device_capability(i)))}\n"
        "    for i in range(torch.cuda.device_count())] if cuda else []}\n"
        "from segcompare.utils import cpu_model_name\n"
        "info['cpu'] = cpu_model_name() or platform.processor()\n"
        "print(json.dumps(info))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
            "error": _tail(out.stderr)}
    except (subprocess.TimeoutExpired, ValueError, IndexError) as err:
        return {"error": repr(err)}


def write_json(doc: dict, path: Optional[Path]) -> None:
    """Write atomically: a temp file beside `path`, then rename."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _figures_text(figures: dict, width: int = 110) -> str:
    """A step's figures on one line: key=value, nested rows shortened."""
    if "rows" in figures:  # the inference measurement: images/s per row and batch, max diff
        parts = [f"{r['name']}: " + ", ".join(
            f"b{b}={v}/s" for b, v in r.get("images_per_s", {}).items())
            + (f", diff {r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "")
            + (f" ERROR {r['error'][:40]}" if r.get("error") else "")
            for r in figures["rows"]]
        return "; ".join(parts)
    if "models" in figures:  # bench rows
        return "; ".join(f"{r['name']}: {r['images_per_s']}/s {r['memory_mb']} MB"
                         for r in figures["models"])
    text = ", ".join(f"{k}={_short(v)}" for k, v in figures.items()
                     if not isinstance(v, (list, dict)))
    nested = [f"{k}: {v}" for k, v in figures.items() if isinstance(v, dict)]
    return "; ".join([text, *nested]) if nested else text[:width * 3]


def _short(v: object) -> object:
    return f"{v:.4g}" if isinstance(v, float) else v


def format_table(doc: dict) -> str:
    lines = ["| step | status | s | figures |", "| --- | --- | ---: | --- |"]
    for r in doc["steps"]:
        if r["status"] == "ok":
            what = _figures_text(r.get("figures", {}))
        elif r["status"] == "skipped":
            what = r.get("reason", "")
        else:
            what = f"rc {r.get('rc')}: " + " / ".join(r.get("stderr_tail", [])[-2:])
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '-')} | {what} |")
    return "\n".join(lines)


def header(doc: dict) -> str:
    env = doc["environment"]
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or "no GPU"
    return (f"gpu_smoke {doc['date']}: {gpus}; torch {env.get('torch')} (CUDA "
            f"{env.get('cuda')}), Python {env.get('python')}; {env.get('cpu')}, "
            f"{env.get('cpu_cores')} cores; device {doc['device']}"
            f"{', --tiny' if doc['tiny'] else ''}; budget {doc['budget_s']} s")


def run_sequence(args: argparse.Namespace) -> int:
    t_start = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    json_path = Path(args.json) if args.json else None
    doc = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": args.device, "tiny": args.tiny, "budget_s": args.budget_s,
           "work": str(work), "environment": environment(env),
           "compile_backend": "aot_eager (--tiny)" if args.tiny else "inductor",
           "steps": []}
    print(header(doc), flush=True)
    write_json(doc, json_path)
    done_ok: set = set()
    for step in plan(args, work):
        left = args.budget_s - (time.time() - t_start)
        missing = [n for n in step.needs if n not in done_ok]
        if args.only and not any(word in step.name for word in args.only):
            result = {"name": step.name, "status": "skipped", "reason": "not in --only"}
        elif missing:
            result = {"name": step.name, "status": "skipped", "reason": f"needs {missing[0]}"}
        elif left < step.estimate_s:
            result = {"name": step.name, "status": "skipped",
                      "reason": f"budget: {left:.0f} s left, needs about {step.estimate_s}"}
        else:
            print(f"[{time.time() - t_start:6.0f} s] {step.name} ...", flush=True)
            result = run_step(step, env, left, args.timeout_scale)
            print(f"         {result['status']} ({result.get('seconds', '-')} s)", flush=True)
        if result["status"] == "ok":
            done_ok.add(step.name)
        doc["steps"].append(result)
        doc["seconds"] = round(time.time() - t_start, 1)
        write_json(doc, json_path)
    print()
    print(header(doc))
    print(format_table(doc))
    counts = {k: sum(r["status"] == k for r in doc["steps"])
              for k in ("ok", "failed", "timeout", "skipped")}
    print(f"\n{counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timed out, "
          f"{counts['skipped']} skipped in {doc['seconds']} s"
          + (f"; wrote {json_path}" if json_path else ""))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if counts["failed"] == counts["timeout"] == 0 else 1


# =================================================================================================
# --measure inference: one step's work, in its own process
# =================================================================================================
def measure_inference(args: argparse.Namespace) -> int:
    """Rows: eager / prepared (`prepare_for_inference`) x fp32 (strict, torch's default, TF32) /
    bf16 / fp16, or with `--compiled` the torch.compile rows. Each row's max |logit difference|
    against the eager model in strict fp32 (TF32 off for convolutions and matmuls) at batch 1,
    then images/s at each batch, the rows timed interleaved (`segcompare.bench.benchmark`).
    A row that fails records its error; the others go on."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inference_cpu import trained_like

    from segcompare import bench
    from segcompare.infer.fast import prepare_for_inference
    from segcompare.models import build_model
    from segcompare.utils import select_device, synchronize

    dev = select_device(args.device)
    cuda = dev.type == "cuda"
    h, w = (int(v) for v in args.size.split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    amp_low = torch.float16 if cuda else torch.bfloat16  # what Predictor's --amp runs in
    default_conv_tf32 = torch.backends.cudnn.allow_tf32  # torch's defaults, before any change
    default_matmul_tf32 = torch.backends.cuda.matmul.allow_tf32

    def precision(mode: str) -> None:  # strict | default | tf32
        if cuda:
            torch.backends.cudnn.allow_tf32 = {"strict": False, "tf32": True}.get(
                mode, default_conv_tf32)
            torch.backends.cuda.matmul.allow_tf32 = {"strict": False, "tf32": True}.get(
                mode, default_matmul_tf32)

    torch.manual_seed(0)
    model = trained_like(build_model(args.model)).to(dev).eval()
    if cuda:
        torch.backends.cudnn.benchmark = True
    # (name, module factory, autocast dtype or None, precision mode)
    if args.compiled:
        rows_spec = [
            ("compiled eager fp32 TF32", lambda: torch.compile(model), None, "tf32"),
            ("compiled eager bf16 autocast", lambda: torch.compile(model), torch.bfloat16,
             "tf32"),
            ("compiled prepared fp32 TF32", lambda: prepare_for_inference(model, compile=True),
             None, "tf32"),
        ]
    else:
        rows_spec = [
            ("eager fp32 strict", lambda: model, None, "strict"),
            ("eager fp32 torch default", lambda: model, None, "default"),
            ("eager fp32 TF32", lambda: model, None, "tf32"),
            ("prepared fp32 strict", lambda: prepare_for_inference(model), None, "strict"),
            ("prepared fp32 TF32", lambda: prepare_for_inference(model), None, "tf32"),
            ("eager bf16 autocast", lambda: model, torch.bfloat16, "tf32"),
            ("eager fp16 autocast", lambda: model, torch.float16, "tf32"),
            ("prepared bf16 + autocast",
             lambda: prepare_for_inference(model, dtype=torch.bfloat16), torch.bfloat16, "tf32"),
            ("prepared fp16 + autocast",
             lambda: prepare_for_inference(model, dtype=torch.float16), torch.float16, "tf32"),
        ]
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(1, 3, h, w, generator=g).to(dev)
    with torch.inference_mode():
        precision("strict")
        reference = model(x1).float()
    rows, candidates = [], []
    for name, make, amp, mode in rows_spec:
        row: dict = {"name": name, "predictor_amp_path": amp is amp_low and "prepared" in name}
        try:
            module = make()

            def run(x: torch.Tensor, module=module, amp=amp, mode=mode) -> torch.Tensor:
                precision(mode)
                with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    return module(x)

            with torch.inference_mode():
                logits = run(x1).float()
                synchronize(dev)
            row["max_abs_diff"] = float((logits - reference).abs().max())
            same = logits.argmax(1) == reference.argmax(1)
            row["argmax_agreement"] = float(same.float().mean())
            candidates.append(bench.Candidate(name, run))
        except Exception as err:  # noqa: BLE001 - recorded in the row; the others go on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    doc = {"model": args.model, "size": [h, w], "device": str(dev), "torch": torch.__version__,
           "reference": "eager fp32 strict: TF32 off for convolutions and matmuls",
           "reference_max_abs_logit": float(reference.abs().max()),
           "precision": {"torch default": {"cudnn.allow_tf32": default_conv_tf32,
                                           "cuda.matmul.allow_tf32": default_matmul_tf32},
                         "TF32": "both on", "strict": "both off", "cpu": "the same for all"},
           "rows": rows}
    if cuda:
        doc["gpu"] = torch.cuda.get_device_name(dev)
    write_json(doc, Path(args.out))  # again after every batch: a timeout keeps what was timed
    for batch in batches:
        x = torch.randn(batch, 3, h, w, generator=g).to(dev)
        try:
            timed = bench.benchmark(candidates, x, args.warmup, args.iters, progress=False)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at the larger batch
            for c in candidates:
                by_name[c.name].setdefault("errors_by_batch", {})[str(batch)] = repr(err)[:200]
            continue
        for t in timed:
            r = by_name[t["name"]]
            r.setdefault("images_per_s", {})[str(batch)] = t["images_per_s"]
            r.setdefault("latency_ms", {})[str(batch)] = t["latency_ms"]
            r.setdefault("memory_mb", {})[str(batch)] = t["memory_mb"]
        write_json(doc, Path(args.out))
    for r in rows:
        print(r)
    return 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the sequence on a CPU")
    p.add_argument("--json", metavar="PATH", help="write the results here (after every step)")
    p.add_argument("--budget-s", type=float, default=420, help="skip what would not fit (420)")
    p.add_argument("--work", metavar="DIR", help="working folder (default: a temporary one, "
                   "removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="F",
                   help="multiply every step's timeout by F (a busy machine; default 1)")
    p.add_argument("--only", action="append", default=[], metavar="WORD",
                   help="run only the steps whose name contains WORD (repeatable; the steps "
                   "they need must be included too)")
    # one step's work (the sequence starts these itself)
    p.add_argument("--measure", choices=["inference"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="segformer-b0", help=argparse.SUPPRESS)
    p.add_argument("--size", default="1024x2048", help=argparse.SUPPRESS)
    p.add_argument("--batches", default="1,8", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.measure == "inference":
        sys.path.insert(0, str(ROOT))
        return measure_inference(args)
    return run_sequence(args)


if __name__ == "__main__":
    raise SystemExit(main())
