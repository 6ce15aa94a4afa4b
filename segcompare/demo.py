"""`segcompare demo`: the whole pipeline on the built-in synthetic Cityscapes, made for a CPU
(where torch sees a CUDA GPU, training, evaluation and the video run on it).

1. synthesise a Cityscapes-layout data set into a cache folder (reused when complete);
2. train SegFormer-B0 and HRNetV2-W18-Small-v1 with the `configs/synthcity_*.yaml` recipes;
3. evaluate both on the val split with the official metrics, count and time them, and write the
   comparison report (`segcompare compare`);
4. render the side-by-side video (input | SegFormer | HRNet) of the synthetic drive as a GIF.

Every step writes its files atomically and is skipped when its output exists, so a rerun takes
seconds and a rerun after Ctrl-C continues (training resumes from its last checkpoint).
With `data` and `weights` the same comparison runs on real data (any layout: Cityscapes, ADE20K,
a folder set) with real weights. With `data` alone, both demo recipes are fine-tuned briefly on it
(`model.init`: the `init` weights, or the synthetic-Cityscapes weights the demo trains when none
are given; only the classifier starts anew where the class counts differ), then compared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from segcompare.config import shipped_recipe
from segcompare.run_folder import list_checkpoints, run_weights
from segcompare.utils import (
    PathLike,
    SegcompareError,
    atomic_write_text,
    cache_dir,
    log_to_console,
    make_dirs,
)

log = logging.getLogger(__name__)

RECIPES = ("synthcity_segformer_b0.yaml", "synthcity_hrnet_w18_small_v1.yaml")


@dataclass(frozen=True)
class DemoPlan:
    """How big each step is. `FULL` is the README's demo; `TINY` the test suite's."""

    train: int  # synthetic images per split
    val: int
    video: int  # frames of the synthetic drive
    size: tuple[int, int]  # H, W of the synthetic images
    train_set: tuple[str, ...] = ()  # `--set` overrides applied to both recipes
    corrupt: tuple[str, ...] = ("noise", "blur", "jpeg", "brightness")
    corrupt_images: int = 10
    hardest: int = 4
    bench_iters: int = 5
    fps: float = 8.0
    extra: dict = field(default_factory=dict)
    # `demo --data DIR` without weights: the fine-tuning of both recipes on DIR (after train_set)
    finetune: tuple[str, ...] = ()


FULL = DemoPlan(
    train=100, val=20, video=48, size=(256, 512),
    finetune=("train.max_iters=200", "train.eval_every=200", "train.checkpoint_every=100",
              "optim.warmup_iters=20"),
)  # fmt: skip
TINY = DemoPlan(
    train=4, val=2, video=3, size=(64, 128),
    train_set=(
        "train.max_iters=4", "train.batch_size=2", "train.num_workers=0", "train.log_every=2",
        "train.eval_every=4", "train.checkpoint_every=4", "optim.warmup_iters=1",
        "data.crop_size=[64,64]", "data.base_size=128",
    ),
    corrupt=("noise",), corrupt_images=1, hardest=1, bench_iters=1,
)  # fmt: skip


def synth_data(plan: DemoPlan, cache: Path, fresh: bool, progress: bool) -> Path:
    """The synthetic set for `plan` under `cache`, made once: a folder appears only complete."""
    from segcompare.data.synth import make_synthetic_cityscapes

    h, w = plan.size
    root = cache / f"synthcity_{h}x{w}_train{plan.train}_val{plan.val}_video{plan.video}_seed0"
    if root.is_dir() and not fresh:
        log.info("data: reusing %s", root)
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_synthetic_cityscapes(
            tmp, train=plan.train, val=plan.val, size=plan.size, seed=0,
            video_frames=plan.video, progress=progress,
        )  # fmt: skip
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def train_model(
    recipe: Path, data_root: Path, run_dir: Path, plan: DemoPlan,
    overrides: Sequence[str] = (), bar_position: int = 0,
) -> Path:  # fmt: skip
    """Train one recipe into `run_dir` (continuing an interrupted run); returns its weights."""
    from segcompare.config import load_config
    from segcompare.train import summary_line, train

    final = run_dir / "final.safetensors"
    if final.exists():
        log.info("train: reusing %s", final)
        return final
    cfg = load_config(recipe, [f"data.root={data_root}", *plan.train_set, *overrides])
    resume = bool(list_checkpoints(run_dir))  # continue an interrupted run; say nothing if none
    summary = train(cfg, run_dir, resume=resume, bar_position=bar_position)
    log.info("%s", summary_line(summary))
    if not final.exists():  # stopped by a signal: train() saved a checkpoint and returned
        raise KeyboardInterrupt
    return final


# Side by side, each run has one core to itself: one compute thread and its data prepared in the
# same process (a loader worker would compete for the cores). The runs are independent and the
# data order does not depend on the number of workers, so the weights are the same bits as
# those of one run after the other.
SIDE_BY_SIDE = ("train.num_workers=0", "train.threads=1")


def side_by_side(runs: int) -> bool:
    """Whether `runs` trainings go faster at once, one per core: on a CPU with a core for each
    (the cores this process may use); not on a GPU, which one run already fills."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return runs > 1 and (cores or 1) >= runs and not torch.cuda.is_available()


def train_models(
    jobs: Sequence[tuple[Path, Path]], data_root: Path, plan: DemoPlan,
    parallel: Optional[bool] = None, overrides: Sequence[Sequence[str]] = (),
) -> list[Path]:  # fmt: skip
    """Train every (recipe, run folder) of `jobs`; returns their weights, in order. `parallel`:
    one process per run at the same time (default: where `side_by_side` says it is faster).
    overrides: each job's own `--set` values (none by default)."""
    extra = {job[1]: tuple(o) for job, o in zip(jobs, overrides)}
    todo = [job for job in jobs if not (job[1] / "final.safetensors").exists()]
    if parallel is None:
        parallel = side_by_side(len(todo))
    if not parallel or len(todo) < 2:
        return [train_model(recipe, data_root, run_dir, plan, extra.get(run_dir, ()))
                for recipe, run_dir in jobs]  # fmt: skip
    log.info("train: %d models side by side, one process and one core each", len(todo))
    with side_by_side_pool(len(todo)) as pool:
        futures = [
            pool.submit(train_model, recipe, data_root, run_dir, plan,
                        (*SIDE_BY_SIDE, *extra.get(run_dir, ())), position)
            for position, (recipe, run_dir) in enumerate(todo)
        ]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            # Ctrl-C reached every process: each run saves a checkpoint and stops; wait for them
            for future in futures:
                future.exception()
            raise
    return [run_dir / "final.safetensors" for _, run_dir in jobs]


def side_by_side_pool(processes: int) -> Any:
    """A pool of fresh interpreters (spawn: no forked torch state) that draw their progress bars
    on this terminal side by side: one tqdm lock for all, and log lines that never land on
    another process's bar (`log_to_console(shared_terminal=True)`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(processes, mp_context=spawn, initializer=_child_logging,
                               initargs=(spawn.RLock(),))


def _child_logging(lock: Any) -> None:
    from tqdm import tqdm

    tqdm.set_lock(lock)  # one process at a time writes to the terminal: no bar split by a line
    log_to_console(logging.INFO, shared_terminal=True)


def render_demo_video(
    weights: Sequence[Path], frames: Path, out: Path, plan: DemoPlan, progress: bool
) -> Optional[Path]:
    from segcompare.infer import Predictor, render_video
    from segcompare.models import build_model

    if not frames.is_dir():
        log.warning("video: %s not found; no video", frames)
        return None
    if out.exists():
        return out
    predictors = [Predictor(build_model(weights=w)) for w in weights]
    render_video(predictors, frames, out, fps=plan.fps, progress=progress)
    return out


def run_demo(
    out: PathLike = "segcompare-demo",
    *,
    fresh: bool = False,
    tiny: bool = False,
    data: Optional[PathLike] = None,
    weights: Sequence[PathLike] = (),
    cache: Optional[PathLike] = None,
    progress: bool = True,
    init: Sequence[PathLike] = (),
) -> dict[str, Any]:
    """Run the demo into `out`; returns the comparison's metrics.json document plus `files`.

    data: a data set of any layout. With `weights`: those are compared on it, nothing trained.
    Without: both recipes are fine-tuned on it from `init` (SegFormer's, HRNet's weights), or
    from the synthetic-Cityscapes weights the demo trains (into out/runs) when none are given."""
    from segcompare.compare import CompareSpec, run_compare

    plan = TINY if tiny else FULL
    out = Path(out)
    if weights and (data is None or init):
        raise SegcompareError("--weights goes with --data alone (the checkpoints to compare); "
                              "--init with --data fine-tunes from given weights")  # fmt: skip
    if init and len(init) != len(RECIPES):
        raise SegcompareError(f"--init takes {len(RECIPES)} weights (SegFormer-B0's, then "
                              f"HRNet-W18-Small-v1's), got {len(init)}")  # fmt: skip
    data_root = None if data is None else Path(data)
    if data_root is not None and not data_root.is_dir():
        raise SegcompareError(f"--data {data_root}: no such directory")
    for w in (*weights, *init):
        if not str(w).startswith("hf://") and not Path(w).exists():
            raise SegcompareError(f"{'--init' if w in init else '--weights'} {w}: no such file")
    recipes = [shipped_recipe(r) for r in RECIPES]
    runs = [r.removesuffix(".yaml").removeprefix("synthcity_") for r in RECIPES]

    cache_root = Path(cache) if cache is not None else cache_dir()
    if data_root is not None:
        from segcompare.data.layouts import detect_layout

        detect_layout(data_root)  # a folder of no known layout fails before anything is written
    if data_root is not None and weights:  # real data, real weights: nothing to train
        model_weights = [run_weights(w) for w in weights]  # a run folder: its final weights
        _open_out(out, fresh)
    elif data_root is not None:  # fine-tune both recipes on the given data
        _open_out(out, fresh)
        if init:
            starts = [str(run_weights(w)) if not str(w).startswith("hf://") else str(w)
                      for w in init]  # fmt: skip
        else:  # the demo's own synthetic-Cityscapes weights
            synth = synth_data(plan, cache_root, fresh, progress)
            synth_jobs = [(p, out / "runs" / f"synthcity_{r}") for p, r in zip(recipes, runs)]
            starts = [str(w) for w in train_models(synth_jobs, synth, plan)]
        jobs = [(p, out / "runs" / f"finetune_{r}") for p, r in zip(recipes, runs)]
        # a recipe's own class weights are its data set's (HRNet's Cityscapes ones): this set's
        overrides = [(*plan.finetune, f"model.init={w}", *_own_class_weights(p))
                     for p, w in zip(recipes, starts)]  # fmt: skip
        model_weights = train_models(jobs, data_root, plan, overrides=overrides)
    else:
        _open_out(out, fresh)  # the arguments are checked: nothing is left on an error in them
        data_root = synth_data(plan, cache_root, fresh, progress)
        jobs = [(path, out / "runs" / r) for path, r in zip(recipes, runs)]
        model_weights = train_models(jobs, data_root, plan)
    frames = data_root / "leftImg8bit_demoVideo" / "stuttgart_00"
    if not frames.is_dir():
        frames = data_root / "leftImg8bit" / "demoVideo" / "stuttgart_00"

    metrics_path = out / "metrics.json"
    if metrics_path.exists() and not fresh and _same_models(metrics_path, model_weights):
        doc = json.loads(metrics_path.read_text())
    else:
        doc = run_compare(CompareSpec(
            [(None, w) for w in model_weights], data_root, "val", out,
            images=plan.hardest, corruptions=plan.corrupt, corrupt_images=plan.corrupt_images,
            bench_iters=plan.bench_iters, progress=progress, overwrite=True,
        ))  # fmt: skip
    video = render_demo_video(model_weights, frames, out / "side_by_side.gif", plan, progress)
    doc["files"] = {
        "report_html": str(out / "report.html"),
        "report_md": str(out / "report.md"),
        "metrics": str(metrics_path),
        "video": None if video is None else str(video),
    }
    atomic_write_text(out / "demo.json", json.dumps(doc["files"], indent=2) + "\n")
    return doc


def _own_class_weights(recipe: Path) -> tuple[str, ...]:
    """`--set train.class_weights=auto` for a recipe that lists class weights (they are its data
    set's), so it fine-tunes with the given data set's median-frequency weights; else nothing."""
    import yaml

    weights = (yaml.safe_load(recipe.read_text()).get("train") or {}).get("class_weights")
    return ("train.class_weights=auto",) if isinstance(weights, list) else ()


def _open_out(out: Path, fresh: bool) -> None:
    """The demo's folder, emptied first with --fresh: only a folder that a demo made (or an
    empty one), never a folder of other files given as --out by mistake."""
    if fresh and out.is_dir():
        made_by_demo = (out / "demo.json").is_file() or (out / "runs").is_dir()
        if any(out.iterdir()) and not made_by_demo:
            raise SegcompareError(
                f"--out {out}: --fresh deletes the folder, and this one holds files but no "
                "demo.json or runs/ (it is no demo folder); choose another --out"
            )
        shutil.rmtree(out)
    make_dirs(out)


def _same_models(metrics_path: Path, weights: Sequence[Path]) -> bool:
    """Whether an existing metrics.json was made from these weight files (and is newer)."""
    try:
        doc = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if "pairwise" not in doc:  # written before the report had intervals: make it again
        return False
    listed = [m.get("weights") for m in doc.get("models", [])]
    newest = max(Path(w).stat().st_mtime for w in weights)
    return listed == [str(w) for w in weights] and metrics_path.stat().st_mtime >= newest


def summary_table(doc: dict[str, Any]) -> str:
    """The demo's closing table: accuracy, robustness, size, cost and speed of each model."""
    meta = doc.get("meta", {})
    size = "×".join(str(v) for v in meta.get("stats_size") or meta.get("eval_size") or [])
    at = f" at {size}" if size else ""
    device = meta.get("bench", {}).get("device", "")
    latency = f"{device.upper()} ms" if device else "latency ms"
    # percent, as every table and plot of the report (metrics.json keeps fractions); robustness
    # is a ratio (mIoU under corruptions over the clean mIoU)
    lines = [
        "| model | mIoU % | category mIoU % | Boundary IoU % | relative robustness | parameters | "
        f"GMACs{at} | {latency}{at} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def num(v: Any, fmt: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(scale * v, fmt)

    for m in doc["models"]:
        relative = (m.get("robustness") or {}).get("relative_miou")
        lines.append(
            f"| {m['name']} | {100 * m['miou']:.1f} | {num(m.get('category_miou'), '.1f', 100)} | "
            f"{num(m.get('boundary_iou'), '.1f', 100)} | {num(relative, '.2f')} | "
            f"{m['parameters']:,} | {m['gmacs']:.2f} | {num(m.get('latency_ms'), '.0f')} |"
        )
    boot = meta.get("bootstrap") or {}
    if boot.get("resamples"):  # how sure: each mIoU's interval, and each pair's verdict
        from segcompare.compare.report import miou_text, pairwise_lines

        lines.append(f"\nmIoU in % with its 95% interval (paired bootstrap over the "
                     f"{doc['num_images']} {doc['split']} images, {boot['resamples']} resamples):")
        lines += [f"  {m['label']}: {miou_text(m)}" for m in doc["models"]]
        lines += [f"  {line}" for line in pairwise_lines(doc)]
    bench = meta.get("bench", {})
    if bench.get("cpu") or bench.get("gpu"):  # where the times were measured, and when
        where = bench.get("gpu") or f"{bench['cpu']}, {bench.get('cores')} cores"
        lines.append(f"\nmeasured on {where}, {bench.get('threads')} thread(s), "
                     f"{str(meta.get('created', ''))[:10]}")
    return "\n".join(lines)
