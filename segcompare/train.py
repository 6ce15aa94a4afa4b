"""Training: both papers' recipes, one loop you can read top to bottom.

    segcompare train configs/synthcity_segformer_b0.yaml --set data.root=/tmp/s --out /tmp/run
    torchrun --nproc-per-node 2 -m segcompare train CONFIG --out OUT      # many processes
    segcompare train CONFIG --out OUT --resume                            # continue a run
    torchrun --nproc-per-node 2 --max-restarts 3 -m segcompare train ...   # elastic: restarts
                                                                          # resume by themselves

The config is segcompare.config's, the losses segcompare.losses'. This file reads in the order
a run happens:

1. the optimizer's parameter groups (SegFormer: head lr x10, no decay on norms) and the poly
   schedule with linear warmup;
2. the data order, made so that a resumed run sees exactly the samples and augmentations an
   uninterrupted run sees;
3. validation, the random states a checkpoint holds, signals;
4. the run: its shared state (`Run`), its steps (datasets, resume, data loaders, run folder, log,
   validation, checkpoint) and `train()`: processes, model, optimizer, data, the loop, the end.

Batch size and learning rate are stated for the TOTAL batch over all processes: a run on fewer
processes gives each process more images (and says so in its log), the recipe's numbers stay.

Run folder `OUT/`: `config.yaml` (the resolved config), `log.jsonl` (one JSON object per log step
and per validation), `checkpoints/iter_N.pt` (everything needed to continue bit-identically),
`best.safetensors` (best val mIoU), `final.safetensors`, and TensorBoard events in `tb/` when
tensorboard is installed (the `tensorboard` extra; the log says whether it is on). Only rank 0
writes. A run that fails before it writes config.yaml takes back what taking the folder created
(`RunLock.discard`: `.lock`, and the folder while empty); a folder that was there stays as it was.

Stopping: SIGINT, SIGTERM or SIGUSR1 (SLURM's warning before a time limit) to any process, or
to its whole process group (data workers ignore them): all processes stop after the same
iteration, rank 0 writes one checkpoint there, and every process exits 0; the summary record
says "stopped", and `--resume` continues.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from segcompare.config import (
    Config,
    OptimConfig,
    check_class_weights,
    check_config,
    config_to_dict,
    with_data_classes,
)
from segcompare.data.labels import IGNORE_INDEX
from segcompare.losses import cross_entropy, ohem_cross_entropy
from segcompare.models import precision as model_precision
from segcompare.models.precision import guard_bf16
from segcompare.models.segformer import AllMLPHead
from segcompare.run_folder import (
    RecordingFile,
    last_checkpoint,
    list_checkpoints,
    lock_run_folder,
    rng_states,
    set_rng_states,
)
from segcompare.utils import (
    SegcompareError,
    atomic_path,
    atomic_write_text,
    cpu_model_name,
    torchrun_rank_world,
)

log = logging.getLogger(__name__)



# =================================================================================================
# 1. Optimizer and learning-rate schedule
# =================================================================================================
def param_groups(model: nn.Module, cfg: OptimConfig) -> List[dict]:
    """Trainable parameters in up to four groups: (backbone | head) x (decay | no decay).

    mmcv's `custom_keys` rule, which the SegFormer config uses as
    `{'pos_block': decay_mult 0, 'norm': decay_mult 0, 'head': lr_mult 10}`: a substring match on
    the parameter's name. With the official names no head parameter contains "norm", so the two
    rules never compete. Each group records its `lr_mult` for the schedule.
    """
    groups: Dict[Tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = "head" in name
        decay = not any(key in name for key in cfg.no_decay)
        if (head, decay) not in groups:
            lr_mult = cfg.head_lr_mult if head else 1.0
            groups[(head, decay)] = {
                "params": [],
                "param_names": [],
                "lr": cfg.lr * lr_mult,
                "lr_mult": lr_mult,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        groups[(head, decay)]["params"].append(param)
        groups[(head, decay)]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over `param_groups`, as torch's fused kernel (one loop over all parameters)
    where the parameters are on a CPU or a CUDA GPU. On the CPU its step takes a third of the
    per-parameter loop's time (B0: 21 against 66 ms; W18-Small-v1 SGD 7 against 24 ms; 2-core
    Intel Xeon VM, 2026-12-04): the same update, SGD's to the bit, AdamW's to the last bit or
    two (its arithmetic runs in another order)."""
    groups = param_groups(model, cfg)
    fused = next(model.parameters()).device.type in ("cpu", "cuda") or None
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov, fused=fused,
    )


def training_amp(amp: str, device: torch.device) -> tuple[str, Optional[str]]:
    """(the autocast a run's steps take, a note or None) for `train.amp` on `device`.

    bf16 on a CPU without bfloat16 units (`cpu_has_bf16_units`: no AVX512-BF16, no AMX) trains
    in float32: there bfloat16 is emulated and each step takes 2-14x as long as in float32 (the
    demo's steps, benchmarks/RESULTS.md), for no gain in memory worth the time on a CPU. The
    note says so; the weights then differ in their last digits from a bf16 run's, as any
    precision change makes them differ. Everything else is kept as asked."""
    if amp != "bf16" or device.type != "cpu" or model_precision.cpu_has_bf16_units():
        return amp, None
    cpu = cpu_model_name() or "this CPU"
    return "off", (f"train.amp bf16: {cpu} has no bfloat16 units (AVX512-BF16, AMX), where bf16 "
                   "is emulated and a step takes 2-14x as long: training in float32")


def prepare_for_training(
    model: nn.Module, amp_dtype: Optional[torch.dtype], what: str = ""
) -> nn.Module:
    """`model` (in place, on its device) ready for the training loop: the head's fuse conv split
    by branch (`split_head`); with bf16 autocast on a CPU, the convs that bf16 computes wrongly
    there run in float32 (`guard_bf16`). Parameters and state dict are unchanged."""
    split_head(model)
    if amp_dtype is torch.bfloat16 and next(model.parameters()).device.type == "cpu":
        guard_bf16(model, what)  # layers bf16 gets wrong on this CPU run in fp32
    return model


def split_head(model: nn.Module) -> tuple[int, ...]:
    """Let a SegFormer's head apply its fuse conv's columns for a far stage of C_j channels at
    that stage's resolution, then upsample the conv's D output channels, wherever C_j >= D/2
    (B0: stages 3 and 4): the same function with fewer MACs (`AllMLPHead.forward_split`).
    Measured on a training step of 4×3×128×256 (1 thread, fp32 and bf16 autocast, 2-core Intel
    Xeon VM, 2026-12-04, benchmarks/RESULTS.md): a stage that upsamples D instead of C_j < D/2
    channels loses more in resizing than it saves in MACs. Returns the low stages.

    HRNet's head is left in the official order: split, its step gained under a tenth, while the
    other rounding, through OHEM's pixel selection and SGD at lr 0.05, moved the demo's HRNet
    run away from the unsplit one within 20 iterations (loss 2.367 against 2.313)."""
    head = getattr(model, "decode_head", None)
    if isinstance(head, AllMLPHead):
        d = head.linear_fuse.conv.out_channels
        widths = [getattr(head, f"linear_c{s}").proj.in_features
                  for s in range(1, head.num_stages + 1)]
        head.low_stages = tuple(s for s, c in enumerate(widths, 1) if s > 1 and 2 * c >= d)
        return head.low_stages
    return ()


def learning_rate(it: int, base_lr: float, cfg: OptimConfig, max_iters: int) -> float:
    """The lr of iteration `it` (0-based) for a group whose initial lr is `base_lr`.

    mmcv's PolyLrUpdaterHook (by_epoch=False), computed before iteration `it`:
        regular = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    and, while it < warmup_iters, its linear warmup scales that:
        k = (1 - it / warmup_iters) * (1 - warmup_ratio);  lr = regular * (1 - k)
    HRNet's `adjust_learning_rate` is the same poly with power 0.9, min_lr 0 and no warmup (the
    official loop sets it after each step, so it runs one iteration behind this formula).
    """
    regular = (base_lr - cfg.min_lr) * (1 - it / max_iters) ** cfg.power + cfg.min_lr
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular


def set_learning_rate(optimizer: torch.optim.Optimizer, it: int, cfg: OptimConfig,
                      max_iters: int) -> float:
    """Set every group's lr for iteration `it`; returns the base (lr_mult 1) lr."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(it, cfg.lr * group["lr_mult"], cfg, max_iters)
    return learning_rate(it, cfg.lr, cfg, max_iters)


# =================================================================================================
# 2. Data order: every sample's randomness is a pure function of (seed, epoch, index)
# =================================================================================================
# The DistributedSampler shuffles with a generator seeded by (seed + epoch); each process takes
# its share of the permutation. `EpochSampler` yields (index, epoch) pairs and can start inside
# an epoch, so a resumed run continues the permutation where the checkpoint left it. The dataset,
# made with `seed`, gives sample `ds[(index, epoch)]` the augmentation generator
# `np.random.default_rng((seed, epoch, index))` (every random draw of segcompare.data.transforms
# comes from it): the same sample gets the same crop whichever worker process makes it, so a run
# does not depend on num_workers either.
class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that yields (index, epoch) from position `start`."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0  # samples of this process's share to skip

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


# =================================================================================================
# 3. Validation, the checkpoint's random states, signals
# =================================================================================================
@torch.no_grad()
def validate(
    model: nn.Module, loader: Any, classes: Any, device: torch.device, family: str
) -> dict:
    """This process's share of the val split, tested as the family's official single-scale test
    of the data set (`classes`: its ClassTable, or a class count; Cityscapes and any other data
    set: SegFormer sliding windows, HRNet the whole image; ADE20K: AlignedResize, HRNet's 520
    test), counts summed over processes.

    Returns {"mIoU": float, "IoU": [per class, None where absent]}. Inference and metrics are
    segcompare.evaluate's, the one place both are computed, so the figure equals `segcompare
    eval` on the same weights.
    """
    from segcompare.evaluate import inference, official_settings
    from segcompare.metrics import ConfusionMatrix

    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(classes)
    settings = official_settings(family, cm.classes.name)
    for sample in loader:
        image, label = sample["image"].to(device), sample["label"].to(device)
        scores = inference(model, image, settings, out_hw=tuple(label.shape[-2:]))  # N×C×H×W
        cm.update(scores.argmax(1), label)
    cm.all_reduce()
    model.train(was_training)
    return {"mIoU": cm.miou(), "IoU": [None if math.isnan(v) else v for v in cm.iou().tolist()]}


def _forget_autotuning_peak(device: torch.device) -> None:
    """cuDNN's autotuning (`cudnn.benchmark`) tries each new convolution shape with workspaces as
    large as the free memory: on an H200 the first iteration of SegFormer-B0 at 1024x1024, batch
    2, fp32 peaked at 132 GiB (gpu_smoke, 2026-12-04). That is no memory the run needs, so the
    peak is started again after the first training iteration and the first validation, when the
    shapes have been tuned; the cache the trials left is handed back first."""
    if device.type == "cuda" and torch.backends.cudnn.benchmark:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory_mb(device: torch.device) -> float:
    """`memory_mb` of log.jsonl: the peak memory this process has held on its device since it
    started, in MiB. CPU: the peak resident set size; CUDA: the peak the caching allocator
    reserved (what nvidia-smi shows, less the CUDA context)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# The signals that stop a run: Ctrl-C, what `kill`, systemd, SLURM and `timeout` send (SIGTERM),
# and what SLURM sends ahead of a job's time limit with `--signal=USR1@SECONDS` (SIGUSR1).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave the stop signals to the training process, which checkpoints and
    exits: a signal to the whole process group (Ctrl-C, systemd, SLURM, `timeout`) would else
    kill the workers first, and the loader would fail before the checkpoint. (SIGUSR1 would end
    a worker too: that is its default action.)"""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _StopRequest:
    """A stop signal (STOP_SIGNALS) sets a flag; the loop checkpoints after the current
    iteration and exits 0. Under torchrun every process reports its flag in the step's one
    all_reduce, so all of them stop after the same iteration, whichever got the signal.

    A second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: checkpointing after this iteration", self.signal)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _StepStats:
    """Each step's loss and stop flag, summed over the processes by one all_reduce on the
    device, read by the host one step late: while the device runs step i, the host reads step
    i-1's figures (done by then) and queues step i+1. A `.item()` per step would make the host
    wait for each forward pass before it could queue the backward. Every process reads the
    same steps' figures at the same iterations, so all stop after the same one."""

    def __init__(self, device: torch.device, world: int) -> None:
        self.device, self.world = device, world
        self.stop_flag = torch.zeros((), device=device)  # 1 once this process got a signal
        self.flagged = False
        self.pending: List[Tuple[int, torch.Tensor, Any]] = []  # (iteration, figures, event)

    def push(self, done: int, loss: torch.Tensor, stop: bool) -> None:
        """Queue iteration `done`'s figures (no host sync)."""
        if stop and not self.flagged:
            self.stop_flag.fill_(1.0)
            self.flagged = True
        stats = torch.stack([loss.detach().float(), self.stop_flag])
        if self.world > 1:
            dist.all_reduce(stats)
        event = None
        if self.device.type == "cuda":  # copied to pinned memory; the event says when it is
            host = torch.empty(2, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            stats = host
        self.pending.append((done, stats, event))

    def read(self, everything: bool) -> List[Tuple[int, float, bool]]:
        """(iteration, mean loss over the processes, whether any process was asked to stop) of
        the queued iterations: all of them, or all but the newest."""
        out = []
        while len(self.pending) > (0 if everything else 1):
            done, stats, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            loss, stop = stats.tolist()
            out.append((done, loss / self.world, stop > 0))
        return out


def _take_figures(run: Run, step_stats: _StepStats, window: dict,
                  everything: bool) -> Tuple[Optional[float], bool]:
    """Read the queued steps' figures (`_StepStats.read`) into the log `window`: (the last mean
    loss read, or None; whether any process was asked to stop). A non-finite loss stops the
    run, naming its iteration."""
    last, asked = None, False
    for done, loss, stop in step_stats.read(everything):
        if not math.isfinite(loss):
            raise _non_finite_loss(run, loss, done)
        window["loss"] += loss
        window["n"] += 1
        last, asked = loss, asked or stop
    return last, asked


# =================================================================================================
# 4. The run
# =================================================================================================
@dataclass
class Run:
    """What the steps of a run share: its processes, the model it trains and its folder."""

    cfg: Config
    out: Path  # the run folder
    rank: int
    world: int  # number of processes
    device: torch.device
    family: str  # segformer | hrnet: which official test validation runs
    model: nn.Module  # unwrapped (no DDP, no compile): what is saved and validated
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    iters_per_epoch: int = 0  # known once the data loader is made
    best: dict = field(default_factory=lambda: {"mIoU": None, "iter": None})  # best val mIoU
    records: List[dict] = field(default_factory=list)  # log.jsonl (rank 0 writes it)
    writer: Any = None  # TensorBoard's SummaryWriter (rank 0, when tensorboard is installed)
    class_table: Any = None  # the data set's `ClassTable`, written into the saved weights
    amp: str = "off"  # the autocast the steps run under (`training_amp`), in the start record

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _datasets(cfg: Config, world: int) -> Tuple[str, Any, Any]:
    """(family, train set, val set or None), everything the user gave checked first: a wrong
    batch, model setting or data folder is one error before any work starts."""
    from segcompare.data.cityscapes import CityscapesDataset
    from segcompare.data.transforms import build_test_transform, build_train_transform
    from segcompare.models import family_of, model_settings

    if cfg.train.batch_size % world:
        raise SegcompareError(
            f"train.batch_size {cfg.train.batch_size} (the total batch) does not split over "
            f"{world} processes; choose a multiple"
        )
    try:
        model_settings(cfg.model.name, **cfg.model.overrides)
    except ValueError as err:
        raise SegcompareError(f"model: {err}") from None
    family = family_of(cfg.model.name)
    train_transform = build_train_transform(cfg.data.pipeline, crop_size=cfg.data.crop_size,
                                            scale_range=cfg.data.scale_range,
                                            base_size=cfg.data.base_size,
                                            scale=cfg.data.img_scale)
    dc = cfg.data
    train_set = CityscapesDataset(
        dc.root, split=dc.train_split, transform=train_transform, seed=cfg.train.seed,
        layout=dc.layout, reduce_zero_label=dc.reduce_zero_label, ignore_index=dc.ignore_index,
    )  # fmt: skip
    if len(train_set) < cfg.train.batch_size:
        raise SegcompareError(
            f"{cfg.data.root}: the {cfg.data.train_split!r} split has {len(train_set)} images, "
            f"fewer than the total batch train.batch_size={cfg.train.batch_size}"
        )
    _warn_padded_crops(train_set, train_transform, cfg.data.crop_size)
    val_set = None if cfg.train.eval_every == 0 else CityscapesDataset(
        dc.root, split=dc.val_split, transform=build_test_transform(), layout=train_set.layout,
        reduce_zero_label=dc.reduce_zero_label, ignore_index=dc.ignore_index)
    if val_set is not None:  # validation runs the official test: an image too small fails now
        from segcompare.evaluate import check_test_sizes, official_settings

        check_test_sizes(val_set, official_settings(family, val_set.table.name))
    return family, train_set, val_set


def _auto_class_weights(cfg: Config, train_set: Any) -> Config:
    """The config with train.class_weights `auto` made concrete: median-frequency weights of the
    training labels (`losses.median_frequency_weights`), as config.yaml records them."""
    from segcompare.losses import label_histogram, median_frequency_weights

    if cfg.train.class_weights != "auto":
        return cfg
    plain = copy.copy(train_set)
    plain.transform = None  # the labels as stored, every pixel
    labels = (plain[i]["label"] for i in range(len(plain)))
    try:
        weights = median_frequency_weights(*label_histogram(labels, cfg.model.num_classes))
    except ValueError as err:
        raise SegcompareError(f"train.class_weights auto: {cfg.data.root}: {err}") from None
    weights = [round(w, 6) for w in weights]
    check_class_weights(weights, cfg.model.num_classes)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, class_weights=weights))


def _start_weights(cfg: Config) -> Optional[str]:
    """model.init (a whole segmentation checkpoint: one with a head) or model.pretrained."""
    if not cfg.model.init:
        return cfg.model.pretrained
    from segcompare.models import describe_weights

    if describe_weights(cfg.model.init, cfg.model.name).num_classes is None:
        raise SegcompareError(
            f"model.init {cfg.model.init}: holds no segmentation head (a backbone only); give "
            "it as model.pretrained"
        )
    return cfg.model.init


def _warn_padded_crops(train_set: Any, transform: Any, crop_hw: Tuple[int, int]) -> None:
    """Warn, with the cost, when the crop is larger than every training image even at the
    largest scale: part of every crop is then padding (label 255) that each step computes and
    ignores."""
    from PIL import Image

    sizes = set()
    for image_path, _ in train_set.samples:
        with Image.open(image_path) as im:  # the header only
            sizes.add((im.height, im.width))
    largest = [transform.largest_hw(hw) for hw in sizes]
    kept = max(min(crop_hw[0], h) * min(crop_hw[1], w) for h, w in largest)
    if kept < crop_hw[0] * crop_hw[1]:
        h, w = max(largest, key=lambda hw: hw[0] * hw[1])
        log.warning(
            "data.crop_size %dx%d is larger than every training image even at the largest scale "
            "(%dx%d): at least %.0f%% of every crop is padding, computed and ignored at each "
            "step; a crop of %dx%d gives the same pixels for %.1fx less work",
            crop_hw[0], crop_hw[1], h, w, 100 * (1 - kept / (crop_hw[0] * crop_hw[1])),
            min(crop_hw[0], h), min(crop_hw[1], w), crop_hw[0] * crop_hw[1] / kept,
        )  # fmt: skip


def _resume(run: Run, checkpoint: dict, path: Path, notes: List[str]) -> int:
    """Weights, optimizer, scaler, random generators, best mIoU and the log up to the checkpoint;
    returns the iteration to continue from."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    start_iter, run.best = checkpoint["iter"], checkpoint["best"]
    if checkpoint["world_size"] == run.world:
        set_rng_states(checkpoint["rng"][run.rank])
    else:
        notes.append(
            f"resumed on {run.world} process(es), the checkpoint was written by "
            f"{checkpoint['world_size']}: training continues, but not bit-identically"
        )
    if (run.out / "log.jsonl").exists():
        records = [json.loads(line) for line in (run.out / "log.jsonl").read_text().splitlines()
                   if line.strip()]
        run.records = [r for r in records if r.get("iter", 0) <= start_iter and "summary" not in r]
    notes.append(f"resumed from {path} at iteration {start_iter}")
    return start_iter


def _loaders(run: Run, train_set: Any, val_set: Any, per_process: int) -> Tuple[Any, Any]:
    """(train loader, val loader or None): an `EpochSampler` share of the train set for this
    process, and every world-th val image from this process's rank on."""
    tc = run.cfg.train
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_process, drop_last=True,
        sampler=EpochSampler(train_set, num_replicas=run.world, rank=run.rank, seed=tc.seed),
        num_workers=tc.num_workers, pin_memory=run.device.type == "cuda",
        # the (index, epoch) keys carry the epoch, so workers can live across epochs
        persistent_workers=tc.num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
        generator=torch.Generator(),  # keeps the loader off the global torch generator
    )
    val_loader = None if val_set is None else torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_set, range(run.rank, len(val_set), run.world)), batch_size=1,
        num_workers=min(tc.num_workers, 2), worker_init_fn=_ignore_stop_signals,
        generator=torch.Generator(),
    )
    return loader, val_loader


def _batches(loader: Any, it: int, iters_per_epoch: int) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Training batches (image, label) from iteration `it` on, epoch after epoch."""
    while True:
        epoch, step = divmod(it, iters_per_epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = step * loader.batch_size
        for sample in loader:
            yield sample["image"], sample["label"]
            it += 1


def _open_run_folder(run: Run, start_iter: int, per_process: int, notes: List[str]) -> None:
    """config.yaml, TensorBoard and the start record; the notes go to the log (rank 0)."""
    if not run.master:
        return
    (run.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out / "config.yaml",
                      yaml.safe_dump(config_to_dict(run.cfg), sort_keys=False))
    try:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.out / "tb"))
        log.info("TensorBoard: scalars in %s (tensorboard --logdir %s)", run.out / "tb", run.out)
    except ImportError:
        run.writer = None
        log.info("TensorBoard off: pip install tensorboard (the 'tensorboard' extra) to log to it")
    run.records.append({
        "event": "start", "iter": start_iter, "model": run.cfg.model.name, "family": run.family,
        "world_size": run.world, "batch_per_process": per_process, "device": str(run.device),
        "iters_per_epoch": run.iters_per_epoch, "amp": run.amp, "notes": notes,
    })
    for note in notes:
        log.info(note)


def _global_settings() -> tuple:
    """The process-wide settings `_set_determinism` changes."""
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
            torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def _restore_global_settings(settings: tuple) -> None:
    deterministic, warn_only, benchmark, precision, cublas = settings
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    torch.set_float32_matmul_precision(precision)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    """Process-wide settings for the run (put back when train() returns). On CUDA, TF32
    matmuls as well as convolutions (torch's default for convolutions): Ampere and newer GPUs
    run fp32 layers at their tensor-core speed, with 10 mantissa bits for the products."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if deterministic:
        # cuBLAS needs this for deterministic matmuls; CUDA's bilinear-upsampling backward has no
        # deterministic kernel, hence warn_only (the CPU is deterministic without any of this)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def ohem_min_kept_for(cfg: Config, per_process: int) -> int:
    """OHEM's min_kept for a process of `per_process` images: the recipe's `ohem_min_kept` is
    for `ohem_min_kept_images` images (the official 131072 for 3 per GPU), scaled by the ratio,
    so the fraction of pixels kept stays the official one whatever the split of the batch."""
    tc = cfg.train
    return max(1, round(tc.ohem_min_kept * per_process / tc.ohem_min_kept_images))


def _loss(logits: torch.Tensor, label: torch.Tensor, cfg: Config,
          class_weights: Optional[torch.Tensor], min_kept: int) -> torch.Tensor:
    """The recipe's loss: HRNet's OHEM (keeping at least `min_kept` pixels) or cross-entropy."""
    tc = cfg.train
    if tc.loss == "ohem":
        return ohem_cross_entropy(logits, label, tc.ohem_threshold, min_kept,
                                  IGNORE_INDEX, class_weights)
    # the dataset maps data.ignore_index (and 255) to IGNORE_INDEX in every label it returns
    return cross_entropy(logits, label, IGNORE_INDEX, class_weights, tc.loss_average)


def _write_log(run: Run) -> None:
    if run.master:
        atomic_write_text(run.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in run.records))


def _log_step(run: Run, window: dict, done: int, epoch: int, lr: float) -> None:
    """The mean loss and timings of the iterations since the last log step (`window`)."""
    n = window["n"]
    record = {
        "iter": done, "epoch": epoch,
        "loss": window["loss"] / n, "lr": lr,
        "time_per_iter": (time.time() - window["t0"]) / n,
        "data_time": window["data_time"] / n, "memory_mb": _memory_mb(run.device),
    }
    if run.master:
        run.records.append(record)
        _write_log(run)
        if run.writer:
            for k in ("loss", "lr", "time_per_iter", "data_time"):
                run.writer.add_scalar(f"train/{k}", record[k], done)


def _sync_buffers(run: Run) -> None:
    """BN running statistics from rank 0 on every process. With SyncBatchNorm they agree anyway;
    on the CPU, DDP broadcasts them only at the start of each forward pass, so after a step each
    process holds its own batch's update. Validation and checkpoints use one."""
    if run.ddp:
        for buffer in run.model.buffers():
            dist.broadcast(buffer, src=0)


def _save_weights(run: Run, name: str) -> None:
    """Our safetensors (loadable by build_model(weights=...)); iteration and mIoU are in
    log.jsonl."""
    if run.master:
        from segcompare.models.save import save_weights

        save_weights(run.model, run.out / name, class_table=run.class_table)


def _validate(run: Run, loader: Any, done: int) -> float:
    """Validate, keep the best weights in best.safetensors, write the log; returns the mIoU."""
    t0 = time.time()
    _sync_buffers(run)
    result = validate(run.model, loader, run.class_table, run.device, run.family)
    miou = result["mIoU"]
    if run.master:
        run.records.append({"iter": done, "val_mIoU": miou, "val_IoU": result["IoU"],
                            "val_time": time.time() - t0})
        log.info("%s iter %d: val mIoU %.4f", run.cfg.model.name, done, miou)
        if run.writer:
            run.writer.add_scalar("val/mIoU", miou, done)
    if run.best["mIoU"] is None or miou > run.best["mIoU"]:
        run.best.update({"mIoU": miou, "iter": done})
        _save_weights(run, "best.safetensors")
    _write_log(run)
    return miou


def _save_checkpoint(run: Run, done: int) -> None:
    """checkpoints/iter_{done}.pt: everything a resumed run needs, every process's random
    generators included; only the newest `keep_checkpoints` stay."""
    _sync_buffers(run)
    rng = [None] * run.world
    if run.ddp:
        dist.all_gather_object(rng, rng_states())
    else:
        rng = [rng_states()]
    if run.master:
        tc, ipe = run.cfg.train, run.iters_per_epoch
        state = {
            "iter": done, "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "schedule": {"name": run.cfg.optim.schedule, "iter": done, "max_iters": tc.max_iters},
            "rng": rng,
            "data": {"epoch": done // ipe, "step": done % ipe,
                     "samples_seen": done * tc.batch_size},
            "world_size": run.world, "best": run.best, "config": config_to_dict(run.cfg),
        }
        with atomic_path(run.out / "checkpoints" / f"iter_{done}.pt") as tmp:
            with RecordingFile(tmp, "wb") as f:
                try:
                    torch.save(state, f)
                except RuntimeError:  # torch says "unexpected pos"; the OS said why
                    if f.error is not None:
                        raise f.error from None
                    raise
        for _, old in list_checkpoints(run.out)[: -tc.keep_checkpoints]:
            old.unlink()
        _write_log(run)
    if run.ddp:
        dist.barrier()


def _non_finite_loss(run: Run, loss: float, it: int) -> SegcompareError:
    """The error that stops a run whose loss became inf or NaN at iteration `it` (1-based)."""
    _write_log(run)
    kept = list_checkpoints(run.out)
    return SegcompareError(
        f"non-finite loss ({loss}) at iteration {it}; stopped. The last good "
        + (f"checkpoint is {kept[-1][1]}" if kept else "state was never saved")
    )


def _init_process_group(backend: str, restarts: int) -> None:
    """Join torchrun's process group, the group's keys in torchrun's store under a prefix of
    their own per restart: after an elastic restart the store can still hold the addresses of
    the processes that died, and the new group would wait for them (pytorch/pytorch#167288)."""
    from torch.distributed.rendezvous import rendezvous

    store, rank, world = next(rendezvous("env://"))
    store = dist.PrefixStore(f"segcompare/restart_{restarts}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def _setup_notes(
    cfg: Config, world: int, per_process: int, device: torch.device, restarts: int
) -> List[str]:
    """What the run's first log record says about how it is set up."""
    tc = cfg.train
    notes = [
        f"total batch {tc.batch_size} = {world} process(es) x {per_process} image(s); "
        f"lr {cfg.optim.lr:g} is for the total batch and is not rescaled"
    ]
    if tc.loss == "ohem" and per_process != tc.ohem_min_kept_images:
        notes.append(
            f"OHEM min_kept {tc.ohem_min_kept} is for {tc.ohem_min_kept_images} image(s) "
            f"per process: {ohem_min_kept_for(cfg, per_process)} for this run's {per_process}"
        )
    if world > 1 and device.type != "cuda":
        notes.append("SyncBatchNorm needs GPUs: on the CPU each process normalises with its "
                     "own batch statistics")
    if device.type == "cuda":
        notes.append(
            "CUDA: TF32 matmuls and convolutions; weights are not bit-reproducible across runs "
            "or resumes: the backward passes of bilinear interpolate, nll_loss and memory-"
            "efficient attention have no deterministic CUDA kernel"
            + ("" if tc.deterministic else ", and cuDNN autotuning (train.deterministic: "
               "false) may choose other kernels in each run")
        )
    if restarts:
        notes.append(f"torchrun restart {restarts} (TORCHELASTIC_RESTART_COUNT) of at most "
                     f"{os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}: a process of the "
                     "group had died; continuing from the last checkpoint")
    return notes


def train_device(requested: str = "auto") -> Tuple[torch.device, str]:
    """(this process's device, the process group's backend) for `requested` (auto|cpu|cuda|mps).

    Under torchrun each process takes GPU LOCAL_RANK; where a node runs more processes than it
    has GPUs (a 2-process test on one GPU) they share the GPUs round-robin and reduce with gloo,
    as NCCL refuses two processes on one GPU. CPU processes reduce with gloo."""
    from segcompare.utils import select_device

    device = select_device(requested)
    if device.type != "cuda":
        return device, "gloo"
    gpus = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    index = local_rank % gpus if device.index is None else device.index
    return torch.device("cuda", index), "nccl" if local_world <= gpus else "gloo"


def train(
    cfg: Config, out_dir: Union[str, os.PathLike], resume: bool = False, bar_position: int = 0,
    device: str = "auto",
) -> dict:
    """Train as `cfg` says into the run folder `out_dir` (see the module docstring).

    Runs as one process, or as one of WORLD_SIZE processes started by torchrun. Returns the
    summary (also the last line of log.jsonl): iterations, minutes, final loss, val mIoU.
    `bar_position`: the terminal line of the progress bar, for runs side by side (the demo).
    `device`: auto (a GPU where torch sees one), cpu, cuda or mps (`train_device`).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from segcompare.models import build_model

    t_start = time.time()
    cfg = check_config(cfg)  # a Config built in Python passes the recipe's checks too
    out = Path(out_dir)
    tc, oc = cfg.train, cfg.optim

    # -- processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK ----------------------------------
    rank, world = torchrun_rank_world()
    ddp, master = world > 1, rank == 0
    device, backend = train_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads_before = torch.get_num_threads()  # restored at the end: train() is also a library call
    settings_before = _global_settings()  # likewise
    run_lock = None  # rank 0's lock on the run folder, held until the run ends
    writing = False  # whether rank 0 has begun to write the run's files (config.yaml on)
    try:
        if device.type == "cpu" and tc.threads:
            torch.set_num_threads(tc.threads)

        # -- everything the user gave is checked before any work starts ----------------------------
        family, train_set, val_set = _datasets(cfg, world)
        table = train_set.table  # the data set's classes: the model's count and names
        cfg = with_data_classes(cfg, table.num_classes, f"{cfg.data.root} ({table.name})")
        cfg = _auto_class_weights(cfg, train_set)
        tc = cfg.train
        per_process = tc.batch_size // world
        if master:
            run_lock = lock_run_folder(out)
        # torchrun --max-restarts K restarts the whole group when a process dies: every restart
        # continues from the run's last checkpoint, as --resume does
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        checkpoint_path, checkpoint = last_checkpoint(out, cfg, resume or restarts > 0)
        torch.manual_seed(tc.seed)  # the same initial weights on every process
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes,
                            weights=_start_weights(cfg) if checkpoint is None else None,
                            **cfg.model.overrides)

        # -- distributed setup: gloo on the CPU, nccl on GPUs --------------------------------------
        if ddp:
            _init_process_group(backend, restarts)
            if device.type == "cpu":
                # depthwise-conv gradients come back channels-last on the CPU; DDP copies them
                # into its buckets and warns every step about a cost that is negligible here (on
                # a GPU the warning is a real performance signal and stays)
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        _set_determinism(tc.deterministic, device)
        notes = _setup_notes(cfg, world, per_process, device, restarts)
        min_kept = ohem_min_kept_for(cfg, per_process)
        if ddp and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # both papers train with SyncBN
        model.to(device)
        amp, amp_note = training_amp(tc.amp, device)
        notes += [amp_note] if amp_note else []
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)  # off: None
        prepare_for_training(model, amp_dtype, cfg.model.name)
        run = Run(cfg, out, rank, world, device, family, model, build_optimizer(model, oc),
                  torch.amp.GradScaler(device.type, enabled=amp == "fp16"), class_table=table,
                  amp=amp)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        class_weights = None if tc.class_weights is None else torch.tensor(
            tc.class_weights, dtype=torch.float32, device=device)

        # -- resume: weights, optimizer, scaler, random generators, position in the data order -----
        # each process draws its own dropout / drop-path masks
        torch.manual_seed(int(np.random.SeedSequence([tc.seed, rank]).generate_state(1)[0]))
        start_iter = 0
        if checkpoint is not None:
            start_iter = _resume(run, checkpoint, checkpoint_path, notes)
        elif resume:
            notes.append(f"--resume: no checkpoint in {out}, starting from scratch")
        if ddp:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if tc.compile:  # after DDP: dynamo splits the graph at DDP's buckets, so the gradient
            model = torch.compile(model)  # all-reduce overlaps the backward pass

        # -- data and the run folder (rank 0 writes) -----------------------------------------------
        loader, val_loader = _loaders(run, train_set, val_set, per_process)
        run.iters_per_epoch = loader.sampler.num_samples // per_process
        writing = True  # from here on a failed run leaves its folder as it is
        _open_run_folder(run, start_iter, per_process, notes)

        # -- the loop ------------------------------------------------------------------------------
        model.train()
        data = _batches(loader, start_iter, run.iters_per_epoch)
        window = {"loss": 0.0, "n": 0, "data_time": 0.0, "t0": time.time()}
        last_loss = next((r["loss"] for r in reversed(run.records) if "loss" in r), math.nan)
        loss_read = not math.isnan(last_loss)  # a resumed run shows its last logged loss
        last_miou = next((r["val_mIoU"] for r in reversed(run.records) if "val_IoU" in r), None)
        stop, done = None, start_iter
        validated = False
        t_loop = time.time()
        bar = tqdm(total=tc.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True,
                   desc=cfg.model.name, unit="it", position=bar_position)
        step_stats = _StepStats(device, world)
        with _StopRequest() as stop_request, logging_redirect_tqdm():
            for it in range(start_iter, tc.max_iters):
                t0 = time.time()
                image, label = next(data)
                image = image.to(device, non_blocking=True)
                label = label.to(device, non_blocking=True).long()
                window["data_time"] += time.time() - t0
                lr = set_learning_rate(run.optimizer, it, oc, tc.max_iters)

                with autocast:
                    logits = model(image)  # N×C×H/4×W/4
                loss = _loss(logits, label, cfg, class_weights, min_kept)
                run.optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                run.scaler.step(run.optimizer)
                run.scaler.update()
                done = it + 1
                step_stats.push(done, loss, stop_request.signal is not None)

                # the host reads the previous step's loss and stop flag, or every step's before
                # a log, validation or checkpoint (a non-finite loss is never checkpointed)
                log_now = done % tc.log_every == 0 or done == tc.max_iters
                val_now = val_loader is not None and (
                    done % tc.eval_every == 0 or done == tc.max_iters)
                save_now = done % tc.checkpoint_every == 0 or done == tc.max_iters
                flush = log_now or val_now or save_now
                read_loss, asked = _take_figures(run, step_stats, window, flush)
                if asked and not flush:  # stopping after this iteration: read it too
                    read_loss = _take_figures(run, step_stats, window, True)[0]
                last_loss = last_loss if read_loss is None else read_loss
                loss_read = loss_read or read_loss is not None
                if asked and stop is None:
                    stop = stop_request.signal or "a signal to another process"
                if it == start_iter:
                    _forget_autotuning_peak(device)
                bar.update(1)
                # the loss is read a step late: none is shown before the first is read
                shown = {"loss": f"{last_loss:.4f}"} if loss_read else {}
                bar.set_postfix(**shown, lr=f"{lr:.2e}", refresh=False)
                if log_now:
                    _log_step(run, window, done, it // run.iters_per_epoch, lr)
                    window = {"loss": 0.0, "n": 0, "data_time": 0.0, "t0": time.time()}
                if val_now:
                    last_miou = _validate(run, val_loader, done)
                    if not validated:  # this process's first validation: its shapes are tuned
                        _forget_autotuning_peak(device)
                        validated = True
                if save_now or stop:
                    _save_checkpoint(run, done)
                if stop:
                    break
        bar.close()

        # -- the end -------------------------------------------------------------------------------
        minutes = (time.time() - t_start) / 60
        if stop is None:
            _save_weights(run, "final.safetensors")
        summary = {
            "summary": "stopped" if stop else "finished", "iter": done, "max_iters": tc.max_iters,
            # log.jsonl's loss at this iteration (the mean since its previous line), if it has one
            "minutes": minutes, "val_mIoU": last_miou, "final_loss": next(
                (r["loss"] for r in reversed(run.records) if r.get("iter") == done and "loss" in r),
                last_loss),
            "best_mIoU": run.best["mIoU"], "best_iter": run.best["iter"], "out": str(out),
            "model": cfg.model.name, "stopped_by": stop,
            **_cost(run, start_iter, done, time.time() - t_loop, time.time() - t_start),
        }
        if master:
            run.records.append(summary)
            _write_log(run)
            if run.writer:
                run.writer.close()
        if ddp:
            dist.barrier()
            dist.destroy_process_group()
        return summary
    except BaseException:
        if run_lock is not None and not writing:
            # stopped before its first output (a bad value, file or model found after the lock):
            # no folder of its own left holding only .lock; a folder that was there stays as it was
            run_lock.discard()
        raise
    finally:
        torch.set_num_threads(threads_before)
        _restore_global_settings(settings_before)
        if run_lock is not None:
            run_lock.close()  # releases the lock


def _cost(run: Run, start_iter: int, done: int, loop_s: float, wall_s: float) -> dict:
    """What the run cost, for the summary record (the comparison report's training cost): wall
    time and training images/s (validation left out) of this process's session (a resumed run:
    since `resumed_at`), peak memory and the device."""
    device = run.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        cpu = platform.processor() or platform.machine()
        name = f"cpu ({cpu}, {torch.get_num_threads()} threads)"
    images = (done - start_iter) * run.cfg.train.batch_size
    val_s = sum(r["val_time"] for r in run.records if "val_time" in r and r["iter"] > start_iter)
    train_s = loop_s - val_s  # the loop less validation (checkpoints stay in: they are rare)
    return {"wall_s": wall_s, "images_per_s": images / train_s if train_s > 0 else None,
            "peak_memory_mb": _memory_mb(device), "device": name,
            "processes": run.world, "resumed_at": start_iter}  # fmt: skip


def summary_line(summary: dict) -> str:
    """The line the CLI prints at the end of a run."""
    what = "trained" if summary["summary"] == "finished" else (
        f"stopped by {summary['stopped_by']} (continue with --resume):"
    )
    line = (
        f"{what} {summary['model']} {summary['iter']}/{summary['max_iters']} iterations in "
        f"{summary['minutes']:.1f} min, final loss {summary['final_loss']:.4f}"
    )
    if summary["val_mIoU"] is not None:
        line += f", val mIoU {summary['val_mIoU']:.4f}"
    if summary["best_mIoU"] is not None:
        line += f" (best {summary['best_mIoU']:.4f} at iteration {summary['best_iter']})"
    return line + f"; run folder {summary['out']}"
