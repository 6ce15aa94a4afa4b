"""Every long command under torchrun: eval and predict sharded over processes, training that
survives a killed worker (elastic restart), preemption signals, and two "nodes" on localhost.

Each test starts real torchrun process groups (gloo, 2 processes of one thread each) on a tiny
synthetic Cityscapes; the reference is always the same command in one process. Every group runs
in its own session and is killed whole on timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same_state, model_state

from segcompare.utils import OUTPUTS_NAME, is_temporary

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT_S = 180

# A SegFormer small enough for seconds-long CPU runs (as in test_train).
TINY_SEGFORMER = {"depths": [1, 1, 1, 1], "embed_dims": [8, 16, 24, 32], "decoder_dim": 16,
                  "num_heads": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 val images (2 processes do not divide them), with instances for iIoU."""
    from segcompare.data.synth import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("synthcity")
    make_synthetic_cityscapes(root, train=8, val=5, size=(64, 128), seed=0)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    torch.manual_seed(3)
    model = build_model("segformer-b0", **TINY_SEGFORMER)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(model, path)
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(cmd: list, **kwargs) -> subprocess.Popen:
    """`cmd` in its own session, so that it and every process it starts can be signalled (and
    killed on a timeout) as one group."""
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)


def _descendants(pid: int) -> list:
    """Every process `pid` started, and theirs (torchrun's workers run in sessions of their own,
    so killing torchrun's process group would leave them running)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [d for c in map(int, children) for d in (c, *_descendants(c))]


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr


def _run(cmd: list) -> tuple[int, str, str]:
    return _finish(_start(cmd))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIGURES = ("miou", "miiou", "category_miou", "category_miiou", "pixel_acc", "mean_acc",
           "per_class", "per_category", "num_images")


def _figures(results: dict) -> dict:
    """eval's figures as its JSON holds them (NaN as null)."""
    from segcompare.metrics import results_to_json

    results = json.loads(results_to_json(results))
    return {key: results[key] for key in FIGURES}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, synth_root: Path,
                weights: Path) -> tuple[dict, Path]:
    """What `segcompare eval --mode whole --save-pred DIR` gives in one process: (figures, DIR)."""
    from segcompare.evaluate import InferenceSettings, run_eval
    from segcompare.infer import Predictor
    from segcompare.models import build_model

    pred_dir = tmp_path_factory.mktemp("pred1")
    predictor = Predictor(build_model(weights=weights), InferenceSettings(mode="whole"))
    results = run_eval(synth_root, scores=predictor.scores, workers=0, save_pred_dir=pred_dir)
    assert results["world_size"] == 1 and results["num_images"] == 5
    return _figures(results), pred_dir


def _eval_args(synth_root: Path, weights: Path, out: Path) -> list:
    return ["-m", "segcompare", "eval", "--weights", str(weights), "--data", str(synth_root),
            "--workers", "0", "--mode", "whole", "--json", str(out / "eval.json"),
            "--save-pred", str(out / "pred")]


def _assert_same_eval(out: Path, one_process: tuple[dict, Path]) -> dict:
    """The run in `out` has one-process figures and predictions; returns its JSON."""
    figures, pred_dir = one_process
    results = json.loads((out / "eval.json").read_text())
    assert _figures(results) == figures
    ours = sorted(p.relative_to(out / "pred") for p in (out / "pred").rglob("*.png"))
    assert ours == sorted(p.relative_to(pred_dir) for p in pred_dir.rglob("*.png"))
    for rel in ours:
        assert (out / "pred" / rel).read_bytes() == (pred_dir / rel).read_bytes()
    assert not [p for p in (out / "pred").rglob("*") if is_temporary(p)]
    return results


# --- 1. eval and predict -------------------------------------------------------------------------
def test_eval_two_processes_equals_one(tmp_path: Path, one_process: tuple, synth_root: Path,
                                       weights: Path) -> None:
    """torchrun eval on 2 processes: every figure (IoU, iIoU, categories, accuracies) equals the
    one-process run's exactly, each of the 5 images is scored once (2 + 3), the predictions
    written by the two processes equal one process's, and rank 0 alone reports."""
    figures, _ = one_process
    # a test that can tell: some class is hit, and iIoU has instances to count
    assert any(c["iou"] for c in figures["per_class"].values())
    assert any(c["iiou"] is not None for c in figures["per_class"].values())
    rc, out, err = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2",
                         *_eval_args(synth_root, weights, tmp_path)])
    assert rc == 0, err[-3000:]
    results = _assert_same_eval(tmp_path, one_process)
    assert results["world_size"] == 2
    assert [p["images"] for p in results["processes"]] == [2, 3]
    # one report: the figures once, a line per process and the total
    assert out.count("pixel accuracy") == 1, out
    assert "process 0: 2 images" in out and "process 1: 3 images" in out
    assert "5 images in" in out and "on 2 process(es)" in out
    # the folder's list of its files, and the count printed, hold both processes' predictions
    _, pred_dir = one_process
    expected = sorted(p.relative_to(pred_dir).as_posix() for p in pred_dir.rglob("*.png"))
    assert len(expected) == 5
    assert json.loads((tmp_path / "pred" / OUTPUTS_NAME).read_text())["files"] == expected
    assert f"wrote 5 prediction PNG(s) to {tmp_path / 'pred'}" in out, out
    # one progress bar, process 0's (2 images); process 1's (3 images) is not drawn
    assert "| 2/2 [" in err and "/3 [" not in err, err[-2000:]


def test_predict_two_processes_write_each_file_once(
    tmp_path: Path, synth_root: Path, weights: Path
) -> None:
    """torchrun predict on 2 processes writes every image's file once, equal to what one
    process (a Predictor here) predicts."""
    import numpy as np
    from PIL import Image

    from segcompare.evaluate import InferenceSettings
    from segcompare.infer import Predictor
    from segcompare.models import build_model

    folder = synth_root / "leftImg8bit" / "val"
    images = sorted(folder.rglob("*.png"))
    rc, out, err = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "segcompare",
                         "predict", str(folder), "--weights", str(weights), "--mode", "whole",
                         "--format", "trainid", "--out", str(tmp_path)])
    assert rc == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == f"wrote {len(images)} trainid file(s) to {tmp_path}"
    written = sorted(tmp_path.rglob("*"))
    outputs = json.loads((tmp_path / OUTPUTS_NAME).read_text())["files"]  # both processes' files
    assert [p.relative_to(tmp_path) for p in written if p.is_file()] == sorted(
        [p.relative_to(folder) for p in images] + [Path(OUTPUTS_NAME)]
    )
    assert outputs == [p.relative_to(folder).as_posix() for p in images]
    predictor = Predictor(build_model(weights=weights), InferenceSettings(mode="whole"))
    for image in images:
        got = np.array(Image.open(tmp_path / image.relative_to(folder)))
        assert np.array_equal(got, predictor.predict(image)), image.name


def test_video_under_torchrun_is_rendered_once(tmp_path: Path, synth_root: Path,
                                               weights: Path) -> None:
    """A video has no shares: under torchrun process 0 renders it, once; the other process
    checks the same options and ends."""
    from PIL import Image

    frames = sorted((synth_root / "leftImg8bit" / "val").iterdir())[0]
    out = tmp_path / "v.gif"
    rc, stdout, err = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m",
                            "segcompare", "video", str(frames), "--weights", str(weights),
                            "--mode", "whole", "--out", str(out)])
    assert rc == 0, err[-3000:]
    count = len(list(frames.glob("*.png")))
    assert stdout.count("wrote ") == 1, stdout
    assert f"wrote {out}: {count} frames, 1 model(s)" in stdout
    with Image.open(out) as gif:
        assert gif.n_frames == count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif"]


@pytest.mark.parametrize("env, starts_on_new_line", [
    ({"WORLD_SIZE": "2", "RANK": "1"}, True),  # process 0's open progress bar may hold the line
    ({"WORLD_SIZE": "2", "RANK": "0"}, False),
    ({}, False),  # no torchrun
])
def test_error_line_of_a_process_other_than_0_starts_a_new_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, env: dict,
    starts_on_new_line: bool
) -> None:
    """CI caught process 1's error line glued to process 0's progress bar ("eval: 0%|...| 0/2
    [...]segcompare eval: error: ..."): both write to one stream, and the bar redraws with a
    carriage return, leaving its line open."""
    from segcompare.cli import _say

    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _say("segcompare eval: error: x")
    err = capsys.readouterr().err
    assert err == ("\n" if starts_on_new_line else "") + "segcompare eval: error: x\n"


def test_one_process_bad_image_is_one_line_on_every_process(
    tmp_path: Path, synth_root: Path, weights: Path
) -> None:
    """Under torchrun, an image only process 1 reads is truncated: process 1 says so in its one
    line, and process 0, left waiting in the collective, says in one line that another process
    failed: no gloo "Connection closed by peer" traceback."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    images = sorted((root / "leftImg8bit" / "val").rglob("*.png"))
    bad = images[-1]  # the last of 5: process 1's share (2 + 3)
    bad.write_bytes(bad.read_bytes()[:100])
    rc, _, err = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "segcompare",
                       "eval", "--weights", str(weights), "--data", str(root), "--workers", "0",
                       "--mode", "whole"])
    assert rc != 0
    ours = [line for line in err.splitlines() if line.startswith("segcompare eval: ")]
    line = f"segcompare eval: error: {bad}: cannot decode (truncated, not an image, or too large)"
    assert line in ours, err[-3000:]
    ours.remove(line)
    # process 0 may be stopped by torchrun before it speaks; if it speaks, it is this line
    assert ours in ([], ["segcompare eval: error: process 0 stopped: another process failed "
                         "(see its error line)"]), ours
    assert "closed by peer" not in err and "[rank0]: Traceback" not in err, err[-3000:]


_PER_IMAGE_SCRIPT = """
import sys
import numpy as np
from segcompare.evaluate import InferenceSettings, eval_dataset, evaluate_model
from segcompare.data.transforms import build_test_transform
from segcompare.infer import Predictor
from segcompare.metrics import ConfusionMatrix
from segcompare.models import build_model
from segcompare.utils import init_distributed

rank, world = init_distributed()
cm = ConfusionMatrix(per_image=True)
predictor = Predictor(build_model(weights=sys.argv[2]), InferenceSettings(mode="whole"))
evaluate_model(predictor.scores, eval_dataset(sys.argv[1], "val", build_test_transform()),
               progress=False, confusion=cm)
if rank == 0:
    np.save(sys.argv[3], cm.image_matrices())
# leave the process group before exit, as the CLI does: a gloo group torn down at interpreter
# exit can abort a rank ("terminate called without an active exception")
import torch.distributed as dist
dist.barrier()
dist.destroy_process_group()
"""


def test_per_image_matrices_under_torchrun_come_in_image_order(
    tmp_path: Path, synth_root: Path, weights: Path
) -> None:
    """The comparison's bootstrap resamples images: under torchrun each image's confusion
    matrix is gathered from its process, in the one-process order (2 + 3 images), and equals
    the matrix one process computes for it."""
    import numpy as np

    from segcompare.data.transforms import build_test_transform
    from segcompare.evaluate import InferenceSettings, eval_dataset, evaluate_model
    from segcompare.infer import Predictor
    from segcompare.metrics import ConfusionMatrix
    from segcompare.models import build_model

    script = tmp_path / "per_image.py"
    script.write_text(_PER_IMAGE_SCRIPT)
    rc, _, err = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script),
                       str(synth_root), str(weights), str(tmp_path / "mats.npy")])
    assert rc == 0, err[-3000:]
    import torch

    cm = ConfusionMatrix(per_image=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): the same sums, bit
    try:  # for bit, so that no pixel's argmax can tip between the two runs
        predictor = Predictor(build_model(weights=weights), InferenceSettings(mode="whole"))
        evaluate_model(predictor.scores, eval_dataset(synth_root, "val", build_test_transform()),
                       progress=False, confusion=cm)
    finally:
        torch.set_num_threads(threads)
    one = cm.image_matrices()
    two = np.load(tmp_path / "mats.npy")
    assert one.shape[0] == 5 and len({m.tobytes() for m in one}) == 5  # five different images
    assert np.array_equal(two, one)


def test_shares_cover_each_item_once() -> None:
    from segcompare.utils import share

    for world in (1, 2, 3, 8):
        for n in (0, 1, 2, 3, 7, 500):
            shares = [list(share(n, rank, world)) for rank in range(world)]
            assert sum(shares, []) == list(range(n))  # each once, in order
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


# --- training: a tiny recipe ---------------------------------------------------------------------
def _config(tmp_path: Path, root: Path, **train: object) -> Path:
    cfg = {
        "model": {"name": "segformer-b0", "overrides": TINY_SEGFORMER},
        "data": {"root": str(root), "crop_size": [48, 48], "base_size": 128},
        "optim": {"lr": 2e-3, "head_lr_mult": 10.0, "no_decay": ["norm"], "warmup_iters": 2},
        "train": {"max_iters": 12, "batch_size": 4, "num_workers": 0, "log_every": 2,
                  "eval_every": 0, "checkpoint_every": 4, **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def _workers(torchrun_pid: int) -> dict:
    """{rank: pid} of the processes a torchrun started (they run in their own sessions)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((e[5:] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = pid
    return ranks


def _records(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --- issue 15, group 10: SIGTERM to the whole process group --------------------------------------
def test_sigterm_to_the_process_group_checkpoints(tmp_path: Path, synth_root: Path) -> None:
    """What systemd, SLURM and `timeout` do: SIGTERM to every process of the group, the data
    loader's workers included. The run checkpoints at the signal and exits 0."""
    config = _config(tmp_path, synth_root, max_iters=10_000, checkpoint_every=10_000,
                     num_workers=1)
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "segcompare", "train", str(config), "--out", str(out)])
    _wait_for(out / "log.jsonl", proc)  # the first log step: the workers are running
    os.killpg(proc.pid, signal.SIGTERM)
    rc, stdout, stderr = _finish(proc)
    assert rc == 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    (path,) = (out / "checkpoints").iterdir()
    done = torch.load(path, weights_only=True)["iter"]
    assert 0 < done < 10_000 and path.name == f"iter_{done}.pt"
    assert _records(out)[-1]["summary"] == "stopped" and _records(out)[-1]["iter"] == done


# --- 3. preemption: SIGUSR1 to one process of two ------------------------------------------------
def test_sigusr1_to_one_rank_stops_every_rank_at_one_iteration(
    tmp_path: Path, synth_root: Path
) -> None:
    """SLURM's warning before a time limit (SIGUSR1), here to rank 1 only: both processes stop
    after the same iteration, rank 0 writes one checkpoint there, all exit 0."""
    config = _config(tmp_path, synth_root, max_iters=10_000, checkpoint_every=10_000)
    out = tmp_path / "run"
    proc = _start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "segcompare",
                   "train", str(config), "--out", str(out)])
    _wait_for(out / "log.jsonl", proc)
    os.kill(_workers(proc.pid)[1], signal.SIGUSR1)
    rc, stdout, stderr = _finish(proc)
    assert rc == 0, stderr[-3000:]
    assert "stopped by a signal to another process" in stdout  # rank 0's line: it got none
    assert "SIGUSR1 received" in stderr
    (path,) = (out / "checkpoints").iterdir()
    done = torch.load(path, weights_only=True)["iter"]
    summary = _records(out)[-1]
    assert summary["summary"] == "stopped" and summary["iter"] == done and 0 < done < 10_000


# --- 2. elastic: a worker killed, torchrun restarts the group ------------------------------------
def test_elastic_restart_ends_with_the_uninterrupted_weights(
    tmp_path: Path, synth_root: Path
) -> None:
    """torchrun --max-restarts 1: SIGKILL rank 1 after the first checkpoint; torchrun restarts
    both processes, which continue from the last checkpoint (and say so); the final weights
    equal those of a run nobody interrupted."""
    config = _config(tmp_path, synth_root, max_iters=16, checkpoint_every=4)
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "-m", "segcompare", "train", str(config)]
    whole = _start([*cmd, "--out", str(tmp_path / "whole")])
    killed = _start([*cmd, "--out", str(tmp_path / "killed")])
    _wait_for(tmp_path / "killed" / "checkpoints" / "iter_4.pt", killed)
    os.kill(_workers(killed.pid)[1], signal.SIGKILL)
    rc, _, stderr = _finish(killed)
    assert rc == 0, stderr[-3000:]
    assert "torchrun restart 1 (TORCHELASTIC_RESTART_COUNT)" in stderr
    start = [r for r in _records(tmp_path / "killed") if r.get("event") == "start"]
    assert any("resumed from" in note for note in start[-1]["notes"])  # not from scratch
    rc, _, stderr = _finish(whole)
    assert rc == 0, stderr[-3000:]
    assert_same_state(model_state(tmp_path / "whole" / "checkpoints" / "iter_16.pt"),
                       model_state(tmp_path / "killed" / "checkpoints" / "iter_16.pt"))


# --- 4. two nodes on localhost: the c10d rendezvous ----------------------------------------------
def test_two_nodes_on_localhost(tmp_path: Path, one_process: tuple, synth_root: Path) -> None:
    """Two torchrun launches with --nnodes 2 meet at a c10d rendezvous on a free port, as two
    machines would; scoring the one-process predictions (`eval --pred-dir`) there gives the
    one-process figures."""
    figures, pred_dir = one_process
    port = _free_port()
    nodes = [
        _start([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                "-m", "segcompare", "eval", "--pred-dir", str(pred_dir), "--data",
                str(synth_root), "--workers", "0", "--json", str(tmp_path / "eval.json")])
        for _ in range(2)
    ]
    finished = [_finish(node) for node in nodes]
    for rc, _, stderr in finished:
        assert rc == 0, stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert _figures(results) == figures
    assert results["world_size"] == 2 and [p["images"] for p in results["processes"]] == [2, 3]


def test_compare_under_torchrun_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """compare measures latencies and per-image figures in one process: under torchrun it says
    so in one line (rank 0) and fails, rather than running N times over."""
    from segcompare.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["compare", "--model", "segformer-b0", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not under torchrun (WORLD_SIZE=2)" in err[0]
    monkeypatch.setenv("RANK", "1")
    assert main(["compare", "--model", "segformer-b0", "--data", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ""
