"""segcompare.train: losses, optimizer groups, schedule, and the loop itself.

Loss and schedule tests compare against numbers worked out by hand from the official formulas
(HRNet's lib/core/criterion.py, mmcv's PolyLrUpdaterHook). The loop tests train tiny models on
a tiny synthetic Cityscapes for a few iterations on the CPU.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_SEGFORMER, assert_same_state, model_state
from helpers import write_yaml as _write
from reference import load_io, load_manifest, official_error, seeded_state_dict

from segcompare.config import OptimConfig, config_from_dict, load_config
from segcompare.losses import cross_entropy, ohem_cross_entropy
from segcompare.models import build_model
from segcompare.models.segformer import UNUSED_OFFICIAL_KEYS
from segcompare.train import (
    build_optimizer,
    learning_rate,
    param_groups,
    set_learning_rate,
    split_head,
)
from segcompare.utils import SegcompareError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# --- losses: hand-computed ---------------------------------------------------------------------
# Five pixels, two classes. Target-class probabilities 0.5, 0.9, 0.75, 0.95 (by construction of
# the logits: p = e^a / (e^a + 1)), and one ignored pixel.
LOGITS = torch.tensor(
    [[0.0, math.log(9), math.log(3), 0.0, 5.0], [0.0, 0.0, 0.0, math.log(19), 0.0]]
).view(1, 2, 1, 5)
LABEL = torch.tensor([[0, 0, 0, 1, 255]]).view(1, 1, 5)
NLL = [math.log(2), -math.log(0.9), math.log(4 / 3), -math.log(0.95)]  # -log p per pixel


def test_cross_entropy_hand_computed() -> None:
    assert cross_entropy(LOGITS, LABEL).item() == pytest.approx(sum(NLL) / 4, rel=1e-6)
    # mmseg averages over every pixel, the ignored one counting 0
    got = cross_entropy(LOGITS, LABEL, average="all").item()
    assert got == pytest.approx(sum(NLL) / 5, rel=1e-6)
    # class weights (2, 1): torch's weighted mean, sum w*l / sum w, as HRNet's CrossEntropy
    w = torch.tensor([2.0, 1.0])
    expected = (2 * (NLL[0] + NLL[1] + NLL[2]) + NLL[3]) / (2 + 2 + 2 + 1)
    assert cross_entropy(LOGITS, LABEL, class_weights=w).item() == pytest.approx(expected, 1e-6)


def test_ohem_hand_computed() -> None:
    # sorted probabilities 0.5, 0.75, 0.9, 0.95. min_kept=1: cutoff max(p[1]=0.75, 0.8) = 0.8
    # -> the pixels with p < 0.8: 0.5 and 0.75.
    got = ohem_cross_entropy(LOGITS, LABEL, threshold=0.8, min_kept=1).item()
    assert got == pytest.approx((NLL[0] + NLL[2]) / 2, rel=1e-6)
    # min_kept=3: cutoff max(p[3]=0.95, 0.8) = 0.95 -> p < 0.95 keeps three pixels
    got = ohem_cross_entropy(LOGITS, LABEL, threshold=0.8, min_kept=3).item()
    assert got == pytest.approx((NLL[0] + NLL[1] + NLL[2]) / 3, rel=1e-6)
    # threshold above everything: all four labelled pixels
    got = ohem_cross_entropy(LOGITS, LABEL, threshold=0.99, min_kept=1).item()
    assert got == pytest.approx(sum(NLL) / 4, rel=1e-6)
    # class weights scale each kept pixel; the mean is a plain mean (official code)
    w = torch.tensor([2.0, 1.0])
    got = ohem_cross_entropy(LOGITS, LABEL, threshold=0.8, min_kept=1, class_weights=w).item()
    assert got == pytest.approx((2 * NLL[0] + 2 * NLL[2]) / 2, rel=1e-6)


def test_losses_upsample_to_label_size() -> None:
    logits = torch.randn(2, 3, 4, 4)
    label = torch.randint(0, 3, (2, 16, 16))
    up = torch.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear",
                                         align_corners=False)
    assert cross_entropy(logits, label).item() == pytest.approx(
        torch.nn.functional.cross_entropy(up, label).item(), rel=1e-6)


# --- schedule: mmcv's poly + linear warmup, HRNet's poly 0.9 ----------------------------------
def test_schedule_matches_formula() -> None:
    seg = OptimConfig(lr=6e-5, power=1.0, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6)
    n = 160000
    # it 0: warmup factor 1 - (1 - 0)(1 - 1e-6) = 1e-6 of the regular lr 6e-5
    assert learning_rate(0, 6e-5, seg, n) == pytest.approx(6e-11, rel=1e-9)
    # it 750: regular 6e-5 * (1 - 750/160000), factor 1 - 0.5 * (1 - 1e-6) = 0.5000005
    assert learning_rate(750, 6e-5, seg, n) == pytest.approx(
        6e-5 * (159250 / 160000) * 0.5000005, rel=1e-12)
    # from it 1500 on: plain poly, power 1
    assert learning_rate(1500, 6e-5, seg, n) == pytest.approx(6e-5 * 158500 / 160000, rel=1e-12)
    assert learning_rate(159999, 6e-5, seg, n) == pytest.approx(6e-5 / 160000, rel=1e-9)
    # HRNet: 0.01 * (1 - it / max) ** 0.9, no warmup; half way: 0.01 * 0.5 ** 0.9 = 0.0053589
    hr = OptimConfig(name="sgd", lr=0.01, power=0.9, warmup_iters=0)
    assert learning_rate(0, 0.01, hr, 119548) == 0.01
    assert learning_rate(59774, 0.01, hr, 119548) == pytest.approx(0.0053588673, rel=1e-7)


def test_set_learning_rate_scales_head_groups() -> None:
    model = torch.nn.ModuleDict(
        {"backbone": torch.nn.Linear(2, 2), "decode_head": torch.nn.Linear(2, 2)}
    )
    cfg = OptimConfig(lr=1e-3, head_lr_mult=10.0, power=1.0, warmup_iters=0)
    opt = build_optimizer(model, cfg)
    base = set_learning_rate(opt, 50, cfg, 100)
    assert base == pytest.approx(5e-4)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([5e-4, 5e-3])


# --- optimizer groups --------------------------------------------------------------------------
def test_segformer_groups_head_lr_and_no_decay() -> None:
    from segcompare.models import build_model

    cfg = config_from_dict({**TINY_SEGFORMER, "optim": {
        "lr": 6e-5, "weight_decay": 0.01, "head_lr_mult": 10.0, "no_decay": ["norm", "pos_block"]}})
    model = build_model("segformer-b0", **cfg.model.overrides)
    groups = param_groups(model, cfg.optim)
    names = {n for g in groups for n in g["param_names"]}
    assert names == {n for n, _ in model.named_parameters()}  # every parameter, once
    assert sum(len(g["param_names"]) for g in groups) == len(names)
    by_name = {n: g for g in groups for n in g["param_names"]}
    # head: everything under decode_head, lr x10, decayed (its BN is not named "norm")
    for name in ("decode_head.linear_c1.proj.weight", "decode_head.linear_fuse.bn.weight",
                 "decode_head.linear_pred.bias"):
        assert by_name[name]["lr"] == pytest.approx(6e-4) and by_name[name]["weight_decay"] == 0.01
    # no decay: every LayerNorm of the encoder (block, stage, patch-embedding, attention's
    # spatial-reduction norm), backbone lr
    for name in ("backbone.block1.0.norm1.weight", "backbone.block1.0.norm2.bias",
                 "backbone.norm4.weight", "backbone.patch_embed1.norm.bias",
                 "backbone.block1.0.attn.norm.weight"):
        assert by_name[name]["weight_decay"] == 0.0 and by_name[name]["lr"] == pytest.approx(6e-5)
    # decayed at backbone lr: linear/conv weights and their biases (mmcv decays biases)
    for name in ("backbone.block1.0.attn.q.weight", "backbone.block1.0.attn.q.bias",
                 "backbone.block1.0.mlp.dwconv.dwconv.weight", "backbone.patch_embed1.proj.weight"):
        assert by_name[name]["weight_decay"] == 0.01 and by_name[name]["lr"] == pytest.approx(6e-5)
    assert all(("norm" in n) == (by_name[n]["weight_decay"] == 0.0) for n in names)
    assert all(n.startswith("decode_head.") == (by_name[n]["lr_mult"] == 10.0) for n in names)


def test_hrnet_recipe_is_one_sgd_group() -> None:
    from segcompare.models import build_model

    cfg = load_config(CONFIGS / "hrnet_w18_small_v1_cityscapes_512x1024.yaml")
    model = build_model(cfg.model.name)
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups  # the official code: one group, decay on every parameter
    assert len(group["params"]) == len(list(model.parameters()))
    assert group["lr"] == 0.01 and group["weight_decay"] == 5e-4 and group["momentum"] == 0.9
    assert group["nesterov"] is False


# --- the loop ----------------------------------------------------------------------------------
# Tiny runs on a tiny synthetic Cityscapes: 64×128 images, 48×48 crops, batch 4.
def _tiny_run_config(root: Path, **train: object) -> dict:
    return {
        **TINY_SEGFORMER,
        "data": {"root": str(root), "crop_size": [48, 48], "base_size": 128},
        "optim": {"lr": 2e-3, "head_lr_mult": 10.0, "no_decay": ["norm"], "warmup_iters": 2},
        "train": {"max_iters": 12, "batch_size": 4, "num_workers": 0, "log_every": 2,
                  "eval_every": 0, "checkpoint_every": 4, **train},
    }


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segcompare.data.synth import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("synthcity")
    make_synthetic_cityscapes(root, train=8, val=2, size=(64, 128), seed=0)
    return root


@pytest.fixture()
def one_thread():
    """In-process runs on one thread: tiny tensors gain nothing from more, and on a busy machine
    OpenMP threads waiting for each other cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _subprocess_env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # the same threads in every run (and torchrun's default)
    return env


def _run_group(cmd: list, timeout: float = 300) -> tuple:
    """Run `cmd` in its own process group (torchrun and its workers); kill the group on timeout.
    Returns (returncode, stderr)."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    return proc.returncode, stderr


def _assert_tensorboard_scalars(tb: Path, losses: list) -> None:
    """The event file, read by tensorboard's own reader, holds the log's scalars."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # the 'tensorboard' extra (in 'test'); without it no events are written
        assert not tb.exists()
        return
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/time_per_iter", "train/data_time", "val/mIoU"} <= tags
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in events.Scalars("val/mIoU")] == [15, 30]


def test_loss_decreases_and_run_folder(tmp_path: Path, synth_root: Path, one_thread) -> None:
    import json

    from segcompare.models import build_model
    from segcompare.train import train

    cfg = config_from_dict(_tiny_run_config(synth_root, max_iters=30, log_every=5,
                                            eval_every=15, checkpoint_every=10))
    out = tmp_path / "run"
    summary = train(cfg, out)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    step = next(r for r in records if "loss" in r)
    assert {"iter", "loss", "lr", "time_per_iter", "data_time", "memory_mb"} <= step.keys()
    assert [r["iter"] for r in records if "val_IoU" in r] == [15, 30]
    assert summary["iter"] == 30 and summary["val_mIoU"] is not None
    assert summary["final_loss"] == losses[-1]  # the summary's final loss is log.jsonl's
    assert not (out / ".lock").exists()  # a run that ended leaves no lock
    assert load_config(out / "config.yaml").train.max_iters == 30  # the resolved config
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_20.pt", "iter_30.pt"]
    # final.safetensors is our format: build_model rebuilds the trained model from it alone
    final = build_model(weights=out / "final.safetensors")
    assert_same_state(final.state_dict(), model_state(out / "checkpoints" / "iter_30.pt"))
    assert (out / "best.safetensors").is_file()
    _assert_tensorboard_scalars(out / "tb", losses)
    # --resume refuses a changed recipe, naming the key; a finished run resumes to its end
    changed = config_from_dict({**_tiny_run_config(synth_root, max_iters=30, log_every=5,
                                                   eval_every=15, checkpoint_every=10),
                                "optim": {"lr": 1e-3}})
    with pytest.raises(SegcompareError, match="optim.lr"):
        train(changed, out, resume=True)
    again = train(cfg, out, resume=True)
    assert again["iter"] == 30 and again["final_loss"] == losses[-1]


def test_demo_training_logs_name_the_model_and_no_resume_note(
    tmp_path: Path, synth_root: Path, one_thread, caplog
) -> None:
    """The demo trains two models side by side: each val line names its model, and a fresh run
    says nothing about --resume, which the user never gave."""
    import logging

    from segcompare.config import shipped_recipe
    from segcompare.demo import TINY, train_model

    with caplog.at_level(logging.INFO):
        train_model(shipped_recipe("synthcity_segformer_b0.yaml"), synth_root, tmp_path / "r", TINY)
    assert "segformer-b0 iter 4: val mIoU" in caplog.text
    assert "--resume" not in caplog.text


def test_hrnet_ohem_bf16_sgd_run(tmp_path: Path, synth_root: Path, monkeypatch, capsys) -> None:
    """The other recipe family end to end: HRNet (BatchNorm), SGD, class-weighted OHEM, bf16
    (as on a CPU with bfloat16 units, on any CPU); train.threads applies to the run only; the
    progress bar shows no loss before one is read (it showed loss=nan)."""
    from segcompare.models import precision
    from segcompare.train import train

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    threads = torch.get_num_threads()
    raw = _tiny_run_config(synth_root, max_iters=4, eval_every=4, amp="bf16", loss="ohem",
                           ohem_min_kept=1000, class_weights=[1.0] * 18 + [2.0], threads=1)
    raw["model"] = {"name": "hrnet-w18-small-v1"}
    raw["data"]["pipeline"] = "hrnet"
    raw["optim"] = {"name": "sgd", "lr": 0.01, "power": 0.9}
    summary = train(config_from_dict(raw), tmp_path / "run")
    assert summary["iter"] == 4 and math.isfinite(summary["final_loss"])
    assert summary["val_mIoU"] is not None
    assert torch.get_num_threads() == threads
    # min_kept is for 3 images per process (the official split); this process has 4
    start = yaml.safe_load((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert "OHEM min_kept 1000 is for 3 image(s) per process: 1333 for this run's 4" in " ".join(
        start["notes"]
    )
    assert start["amp"] == "bf16"
    bar = capsys.readouterr().err
    assert "loss=" in bar and "loss=nan" not in bar, bar


@pytest.mark.parametrize("units", [True, False])
def test_bf16_training_runs_in_float32_where_the_cpu_only_emulates_it(units, monkeypatch):
    """train.amp bf16 on a CPU without bfloat16 units trains in float32 and says why in a note;
    with units, and for every other setting and device, the steps run as asked."""
    from segcompare.models import precision
    from segcompare.train import training_amp

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    amp, note = training_amp("bf16", torch.device("cpu"))
    if units:
        assert (amp, note) == ("bf16", None)
    else:
        assert amp == "off"
        assert "has no bfloat16 units (AVX512-BF16, AMX)" in note and "float32" in note
    for asked in ("off", "fp16"):
        assert training_amp(asked, torch.device("cpu")) == (asked, None)
    assert training_amp("bf16", torch.device("cuda")) == ("bf16", None)


def test_cpu_bf16_units_are_read_from_the_cpu(monkeypatch):
    """x86: torch's reading of the CPU (AVX512-BF16, AMX) decides; other architectures keep
    bf16."""
    import platform

    from segcompare.models import precision

    monkeypatch.undo()  # the real check, not conftest's
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for bf16, amx in [(False, False), (True, False), (False, True)]:
        caps = {"avx2": True, "avx512_bf16": bf16, "amx_bf16": amx, "num_sockets": 1}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=caps: c)
        assert precision.cpu_has_bf16_units() is (bf16 or amx)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert precision.cpu_has_bf16_units() is True


def test_ohem_min_kept_scales_with_the_images_per_process() -> None:
    from segcompare.train import ohem_min_kept_for

    cfg = load_config(CONFIGS / "hrnet_w48_cityscapes_512x1024_ohem.yaml")
    # LOSS.OHEMKEEP 131072 for 3 images per GPU: 43690.67 pixels per image
    assert [ohem_min_kept_for(cfg, n) for n in (1, 2, 3, 6, 12)] == [
        43691, 87381, 131072, 262144, 524288
    ]
    with pytest.raises(SegcompareError, match="train.ohem_min_kept_images"):
        config_from_dict({**yaml.safe_load((CONFIGS / "synthcity_segformer_b0.yaml").read_text()),
                          "train": {"ohem_min_kept_images": 0}})


def test_kill_and_resume_is_bit_identical(tmp_path: Path, synth_root: Path) -> None:
    """SIGKILL a run after its first checkpoint, resume it (with data workers this time): the
    weights equal those of a run that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    config = _write(tmp_path, _tiny_run_config(synth_root, max_iters=40))
    cmd = [sys.executable, "-m", "segcompare", "train", str(config)]
    env = _subprocess_env()
    whole = subprocess.Popen([*cmd, "--out", str(tmp_path / "whole")], env=env,
                             stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    killed = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env,
                              stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "iter_4.pt"
    deadline = time.time() + 120
    while not first.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL  # it was killed mid-run, not finished
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    resumed = subprocess.run(
        [*cmd, "--out", str(tmp_path / "killed"), "--resume", "--set", "train.num_workers=2"],
        env=env, capture_output=True, text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert whole.wait() == 0
    assert_same_state(model_state(tmp_path / "whole" / "checkpoints" / "iter_40.pt"),
                       model_state(tmp_path / "killed" / "checkpoints" / "iter_40.pt"))


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path, synth_root: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    config = _write(tmp_path, _tiny_run_config(synth_root, max_iters=10_000,
                                               checkpoint_every=10_000))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "segcompare", "train", str(config), "--out", str(out)],
        env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    (done, path), = [(int(p.stem.split("_")[1]), p) for p in (out / "checkpoints").iterdir()]
    assert 0 < done < 10_000 and torch.load(path, weights_only=True)["iter"] == done


def test_torchrun_two_processes_agree(tmp_path: Path, synth_root: Path) -> None:
    """torchrun --nproc-per-node 2 (gloo): the run finishes and both processes end with the same
    weights (each process saves its own copy here; the tool itself writes from rank 0 only)."""
    import sys

    config = _write(tmp_path, _tiny_run_config(synth_root, max_iters=6, eval_every=6))
    script = tmp_path / "run_rank.py"
    script.write_text(
        "import os, sys, torch\n"
        "from segcompare.config import load_config\n"
        "from segcompare.train import train\n"
        "import segcompare.train as t\n"
        "models = []\n"
        "orig = t.build_optimizer\n"
        "def spy(model, cfg):\n"
        "    models.append(model)\n"
        "    return orig(model, cfg)\n"
        "t.build_optimizer = spy\n"
        "train(load_config(sys.argv[1]), sys.argv[2])\n"
        "torch.save(models[0].state_dict(), f\"{sys.argv[2]}/rank{os.environ['RANK']}.pt\")\n"
    )
    out = tmp_path / "run"
    returncode, stderr = _run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(config), str(out)],
    )
    assert returncode == 0, stderr[-3000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert_same_state(rank0, rank1)
    assert_same_state(rank0, model_state(out / "checkpoints" / "iter_6.pt"))
    import json

    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["batch_per_process"] == 2


def test_bad_input_is_one_line_before_work(
    tmp_path: Path, synth_root: Path, capsys, one_thread
) -> None:
    from segcompare.cli import main

    config = _write(tmp_path, _tiny_run_config(synth_root))
    cases = [
        (["--set", f"data.root={tmp_path / 'nowhere'}"], "nowhere"),
        (["--set", f"model.pretrained={tmp_path / 'mit_b0.pth'}"], "mit_b0.pth"),
        (["--set", "model.overrides.depth=[1,1,1,1]"], "depth"),
        (["--set", "train.batch_size=9"], "train.batch_size"),
    ]
    for extra, word in cases:
        out = tmp_path / f"run{len(extra)}"
        assert main(["train", str(config), "--out", str(out), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
        assert not (out / "checkpoints").exists()  # nothing was started
    # a folder holding a run is not overwritten without --resume
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "iter_4.pt").write_bytes(b"")
    assert main(["train", str(config), "--out", str(tmp_path / "old")]) == 1
    assert "--resume" in capsys.readouterr().err


def test_non_finite_loss_stops_naming_the_iteration(
    tmp_path: Path, synth_root: Path, one_thread
) -> None:
    from segcompare.train import train

    # SGD at the largest learning rate the value rule allows (100), no warm-up: a few steps
    # make the weights explode (the loss was nan at iteration 4 when measured)
    raw = _tiny_run_config(synth_root, max_iters=12, checkpoint_every=1)
    raw["optim"].update(name="sgd", lr=100.0, momentum=0.9, warmup_iters=0)
    cfg = config_from_dict(raw)
    out = tmp_path / "run"
    with pytest.raises(SegcompareError, match=r"non-finite loss .* at iteration (\d+)") as err:
        train(cfg, out)
    it = int(err.value.args[0].split("at iteration ")[1].split(";")[0])
    kept = sorted(int(p.stem.split("_")[1]) for p in (out / "checkpoints").iterdir())
    assert kept and kept[-1] == it - 1  # the checkpoint before the bad step stays
    assert f"iter_{it - 1}.pt" in err.value.args[0]


def test_init_reinitialises_only_the_classifier_and_auto_weights(
    tmp_path: Path, one_thread, caplog
) -> None:
    """model.init: a 19-class checkpoint fine-tuned on a 4-class folder set keeps every tensor
    but the classifier (an lr of 1e-12 leaves them as loaded), names the classifier's tensors once
    in the log; train.class_weights auto is recorded as median-frequency weights of the labels."""
    import logging

    import numpy as np

    from segcompare.data.layouts import read_mask
    from segcompare.data.synth.io import make_synthetic_layout
    from segcompare.losses import label_histogram, median_frequency_weights
    from segcompare.models import build_model
    from segcompare.models.save import save_weights
    from segcompare.train import train

    root = tmp_path / "folder"
    make_synthetic_layout(root, "folder", train=4, val=1, size=(64, 128), seed=0, classes=4)
    torch.manual_seed(1)
    source = build_model("segformer-b0", **TINY_SEGFORMER["model"]["overrides"])
    save_weights(source, tmp_path / "city.safetensors")
    raw = _tiny_run_config(root, max_iters=1, checkpoint_every=1)
    raw["model"] = {**raw["model"], "init": str(tmp_path / "city.safetensors")}
    raw["optim"] = {"lr": 1e-12, "warmup_iters": 0}
    raw["train"]["class_weights"] = "auto"
    with caplog.at_level(logging.WARNING):
        train(config_from_dict(raw), tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "stays initialised" in r.getMessage()]
    assert len(said) == 1 and "decode_head.linear_pred.weight (file [19, 16, 1, 1], model [4, 16" \
        in said[0]  # fmt: skip
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "run" / "final.safetensors"))
    for key, value in source.state_dict().items():
        if key.startswith("decode_head.linear_pred."):
            assert got[key].shape[0] == 4
        elif not key.startswith("decode_head.linear_fuse.bn.") and value.is_floating_point():
            assert torch.allclose(got[key], value, atol=1e-6), key  # as loaded
    # auto weights: the labels' median frequencies, by hand from the masks
    masks = [read_mask(p) for p in sorted((root / "ann_dir" / "train").glob("*.png"))]
    expected = median_frequency_weights(*label_histogram(masks, 4))
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["class_weights"] == pytest.approx(expected, abs=1e-6)
    assert np.isfinite(expected).all()


# -- the training model: its head's fuse conv split by branch (train.split_head) ----------------
SPLIT_CASES = [("segformer_b0", (3, 4))]


def test_split_head_leaves_hrnet_in_the_official_order():
    """HRNet trains with the official head (train.split_head says why): bit for bit."""
    official, model = (_official_model("hrnet_w18_small_v1").train() for _ in range(2))
    assert split_head(model) == ()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(images), official(images))


def _official_model(stem: str) -> torch.nn.Module:
    family = stem.split("_")[0]
    state = seeded_state_dict(load_manifest(stem), family)
    for key in UNUSED_OFFICIAL_KEYS if family == "segformer" else ():
        del state[key]
    overrides = {"drop_path_rate": 0.0, "dropout": 0.0} if family == "segformer" else {}
    model = build_model(stem.replace("_", "-"), **overrides)  # no randomness in train mode
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("stem, low", SPLIT_CASES)
def test_split_head_gives_the_official_logits(stem, low):
    model = _official_model(stem).eval()
    assert split_head(model) == low  # the far, wide branches run at their own resolution
    io = load_io(stem)
    with torch.no_grad():
        logits = model(io["input"])
    official_error(logits, io["logits_quarter"], stem)


@pytest.mark.parametrize("stem, low", SPLIT_CASES)
def test_split_head_gives_the_official_gradients(stem, low):
    """One training-mode step (batch statistics) of the split head against the official order
    of operations (the eager model, equal to the official code: the fixtures)."""
    official = _official_model(stem).train()
    split = _official_model(stem).train()
    split_head(split)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 19, (2, 64, 96))
    for model in (official, split):
        cross_entropy(model(images), labels).backward()
    # relative to each parameter's largest gradient, or to a thousandth of the model's for the
    # biases before a BatchNorm, whose gradient is 0 but for rounding (1e-9 here)
    model_scale = max(p.grad.abs().max().item() for p in official.parameters())
    worst = 0.0
    for a, b in zip(official.parameters(), split.parameters()):
        scale = max(a.grad.abs().max().item(), 1e-3 * model_scale)
        worst = max(worst, (a.grad - b.grad).abs().max().item() / scale)
    print(f"{stem}: largest relative gradient difference {worst:.2g}")
    assert worst < 1e-4
    for a, b in zip(official.buffers(), split.buffers()):  # BN running statistics
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["segformer-b0", "hrnet-w18-small-v1"])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_fused_optimizer_steps_as_the_per_parameter_loop(name, optim):
    """Two steps of `build_optimizer`'s fused kernel, the second after a checkpoint round trip
    of the optimizer, against torch's per-parameter loop, with the gradients of a real backward
    pass of the training model (SegFormer's depthwise-conv gradients come back with other
    strides than their weights: the fused kernel must read them right)."""
    from segcompare.train import prepare_for_training

    torch.manual_seed(0)
    overrides = {"drop_path_rate": 0.0, "dropout": 0.0} if name.startswith("segformer") else {}
    ours = prepare_for_training(build_model(name, num_classes=5, **overrides).train(), None)
    plain = copy.deepcopy(ours)
    cross_entropy(ours(torch.randn(2, 3, 64, 96)), torch.randint(0, 5, (2, 64, 96))).backward()
    grads = [p.grad.clone(memory_format=torch.preserve_format) for p in ours.parameters()]
    cfg = OptimConfig(name=optim, lr=0.01, weight_decay=5e-4)
    fused = build_optimizer(ours, cfg)
    assert fused.defaults["fused"]
    groups = param_groups(plain, cfg)
    loop = (
        torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if optim == "adamw"
        else torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    )
    for step in range(2):
        if step == 1:  # as a resumed run
            saved = copy.deepcopy(fused.state_dict())
            fused = build_optimizer(ours, cfg)
            fused.load_state_dict(saved)
        for model, opt in ((plain, loop), (ours, fused)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone(memory_format=torch.preserve_format)
            opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), ours.parameters()))
    print(f"{name} {optim}: largest weight difference after 2 steps {worst:.2g}")
    assert worst < 1e-6
