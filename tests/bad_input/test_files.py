"""The bad-input battery, part B (issue 15): weights files (non-finite values, class counts,
pickles under a safetensors name, shard indexes), hub ids and the network, run folders (a
second run, a truncated checkpoint, stale temporaries, identical bytes), write failures and
errors raised in DataLoader workers.

One parametrised case per situation, including those that already behave; helpers in
conftest.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_no_partial, assert_one_line_error, run_cli, write_refusal
from safetensors.torch import load_file, save_file

from segcompare.models import build_model, load_weights
from segcompare.models.checkpoint import read_checkpoint
from segcompare.models.save import save_weights
from segcompare.utils import SegcompareError

TINY_B0 = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _poisoned(src: Path, dst: Path, key: str, value: float) -> Path:
    """A copy of our safetensors file `src` with one element of tensor `key` set to `value`."""
    state = load_file(str(src))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, str(dst), metadata=_metadata(src))
    return dst


# === group 1: non-finite weights ===============================================================
NAN_KEY = "backbone.block2.0.mlp.fc1.weight"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("command", ["eval", "predict", "export", "convert"])
def test_non_finite_weights_are_refused_naming_file_and_tensor(
    cli, tiny_weights, tiny_data, tmp_path, command, value
):
    bad = _poisoned(tiny_weights["segformer"], tmp_path / "bad.safetensors", NAN_KEY, value)
    out = tmp_path / "out"
    argv = {
        "eval": ["eval", "--weights", bad, "--data", tiny_data, "--workers", "0"],
        "predict": ["predict", "--weights", bad, tiny_data / "leftImg8bit" / "val", "--out", out],
        "export": ["export", out / "m.onnx", "--weights", bad, "--size", "64x64"],
        "convert": ["convert", bad, out / "m.safetensors"],
    }[command]
    rc, stdout, err = cli(*argv)
    assert_one_line_error(rc, err, str(bad), NAN_KEY, "non-finite")
    assert "mIoU" not in stdout
    assert not out.exists()


def test_non_finite_state_dict_is_refused_by_the_api(tiny_weights):
    state = load_file(str(tiny_weights["segformer"]))
    state[NAN_KEY][0, 0] = float("nan")
    model = build_model("segformer-b0", **TINY_B0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SegcompareError, match=f"state dict: tensor {NAN_KEY}"):
        load_weights(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_finite_weights_still_load(tiny_weights):
    model = build_model(weights=tiny_weights["segformer"])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


# === group 4: class counts: the tensors are the truth ==========================================
@pytest.fixture(scope="module")
def seven_classes(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("seven") / "b0_7.safetensors"
    save_weights(build_model("segformer-b0", num_classes=7, **TINY_B0), path)
    return path


def test_metadata_class_count_that_contradicts_the_tensors_is_an_error(cli, tiny_weights, tmp_path):
    src = tiny_weights["segformer"]
    meta = _metadata(src)
    meta.update(num_classes="7", class_names=json.dumps([f"c{i}" for i in range(7)]))
    lying = tmp_path / "lying.safetensors"
    save_file(load_file(str(src)), str(lying), metadata=meta)
    with pytest.raises(SegcompareError, match="num_classes=7 but its classifier"):
        build_model(weights=lying)
    rc, _, err = cli("convert", lying, tmp_path / "out.safetensors")
    assert_one_line_error(rc, err, str(lying), "num_classes=7", "19")
    assert_no_partial(tmp_path / "out.safetensors")


def test_other_class_count_in_load_weights_is_an_error_unless_asked(seven_classes, caplog):
    model = build_model("segformer-b0", **TINY_B0)  # 19 classes
    classifier = model.state_dict()["decode_head.linear_pred.weight"].clone()
    with pytest.raises(SegcompareError, match=r"classifier has 7 classes, the model 19.*--num-cl"):
        load_weights(model, seven_classes)
    assert torch.equal(model.state_dict()["decode_head.linear_pred.weight"], classifier)
    with caplog.at_level(logging.WARNING):
        load_weights(model, seven_classes, num_classes=19)  # asked: said once
    assert [r.getMessage() for r in caplog.records if "classes" in r.getMessage()] == [
        f"{seven_classes} has 7 classes, the model 19: the classifier stays initialised: "
        "decode_head.linear_pred.weight (file [7, 32, 1, 1], model [19, 32, 1, 1]), "
        "decode_head.linear_pred.bias (file [7], model [19])"
    ]
    file_state = load_file(str(seven_classes))
    got = model.state_dict()
    assert torch.equal(got[NAN_KEY], file_state[NAN_KEY])  # the backbone came from the file
    assert torch.equal(got["decode_head.linear_pred.weight"], classifier)


def test_build_model_takes_the_class_count_from_the_tensors(seven_classes):
    model = build_model(weights=seven_classes)
    assert model.state_dict()["decode_head.linear_pred.weight"].shape[0] == 7
    asked = build_model(weights=seven_classes, num_classes=19)  # asked for: allowed
    assert asked.state_dict()["decode_head.linear_pred.weight"].shape[0] == 19


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_a_model_of_another_class_count_is_not_scored_on_cityscapes(
    cli, seven_classes, tiny_data, tmp_path, command
):
    out = tmp_path / "out"
    argv = {
        "eval": ["eval", "--weights", seven_classes, "--data", tiny_data, "--workers", "0",
                 "--json", out / "r.json"],
        "compare": ["compare", "--weights", seven_classes, "--data", tiny_data, "--out", out,
                    "--images", "0", "--bench-iters", "1", "--bench-warmup", "0"],
    }[command]  # fmt: skip
    rc, stdout, err = cli(*argv)
    assert_one_line_error(rc, err, "7 classes", "19", allow_log=True)
    assert "mIoU" not in stdout
    assert not (out / "r.json").exists() and not (out / "metrics.json").exists()


def test_convert_with_num_classes_reinitialises_the_classifier_and_says_so(
    cli, seven_classes, tmp_path, caplog
):
    dst = tmp_path / "b0_19.safetensors"
    with caplog.at_level(logging.WARNING):
        rc, stdout, _ = cli("convert", seven_classes, dst, "--num-classes", "19")
    assert rc == 0 and "19 classes" in stdout
    assert sum("stays initialised" in r.getMessage() for r in caplog.records) == 1
    assert load_file(str(dst))["decode_head.linear_pred.weight"].shape[0] == 19


# === groups 12, 13, 14: hub ids, shard indexes, pickles under a safetensors name ===============
@pytest.mark.parametrize(
    "weights",
    ["b0/finall", "nvidia/segformer-b0-finetuned-cityscapes-1024-1024", "missing.safetensors"],
)
def test_a_missing_local_path_is_no_such_file_never_a_hub_id(cli, tiny_data, tmp_path, weights):
    rc, _, err = cli("eval", "--weights", weights, "--data", tiny_data, "--workers", "0")
    line = assert_one_line_error(rc, err, weights, "no such file")
    assert "hf://" in line  # says how a hub model is named


@pytest.mark.parametrize("ref", ["hf://", "hf://just-a-name", "hf://../etc/passwd", "hf://a/b/c"])
def test_a_malformed_hub_id_is_one_line(cli, tmp_path, ref):
    rc, _, err = cli("convert", ref, tmp_path / "out.safetensors")
    assert_one_line_error(rc, err, ref, "hf://owner/name")
    assert_no_partial(tmp_path / "out.safetensors")


# A guard installed in every Python process of the command (sitecustomize): each connect() is
# written to a file and refused, so the test sees an attempt without the network being reached.
_GUARD = """
import os, socket
_log = os.environ["SEGCOMPARE_CONNECT_LOG"]
def _refuse(self, address, *args, **kwargs):
    with open(_log, "a") as f:
        f.write(repr(address) + "\\n")
    raise ConnectionRefusedError(111, "connection refused by the test's network guard")
def _refuse_lookup(host, *args, **kwargs):
    return _refuse(None, host)
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.getaddrinfo = _refuse_lookup  # name resolution is the first step of any connection
"""


@pytest.fixture
def network_guard(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(textwrap.dedent(_GUARD))
    log = tmp_path / "connects.log"
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), str(guard)]),
        "SEGCOMPARE_CONNECT_LOG": str(log),
        "HF_HUB_OFFLINE": "0",  # the guard, not the offline switch, must keep the network away
        "HF_HOME": str(tmp_path / "hf_home"),  # an empty cache
    }
    return env, log


def test_no_command_opens_a_connection_without_a_hub_id(network_guard, tiny_data, tmp_path):
    env, log = network_guard
    for argv in (
        ["eval", "--weights", "b0/finall", "--data", tiny_data, "--workers", "0"],
        ["convert", "nvidia/segformer-b0-finetuned-cityscapes-1024-1024", tmp_path / "x.st"],
    ):
        rc, _, err = run_cli(*argv, env=env)
        assert_one_line_error(rc, err, "no such file")
    assert not log.exists(), log.read_text()
    # the guard works: a hub id is the one thing that may try the network
    rc, _, err = run_cli("convert", "hf://org/name", tmp_path / "y.safetensors", env=env)
    assert_one_line_error(rc, err, "hf://org/name", "cannot be reached")
    assert log.exists() and log.read_text().strip()


@pytest.fixture
def sharded(tiny_weights, tmp_path) -> Path:
    """A HuggingFace-style sharded model folder of our tiny SegFormer, and a shard outside it."""
    folder = tmp_path / "model"
    folder.mkdir()
    state = load_file(str(tiny_weights["segformer"]))
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, str(folder / "part1.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(tmp_path / "outside.safetensors"))
    (folder / "config.json").write_text('{"model_type": "segformer"}')  # as every HF folder has
    return folder


def _index(folder: Path, second: str) -> Path:
    state = load_file(str(folder / "part1.safetensors"))
    weight_map = {k: "part1.safetensors" for k in state}
    weight_map["decode_head.linear_pred.weight"] = second
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "..", ""]
)
def test_a_shard_index_may_name_only_files_inside_the_model_folder(cli, sharded, tmp_path, shard):
    index = _index(sharded, shard)
    with pytest.raises(SegcompareError, match="a shard must be a plain file name"):
        read_checkpoint(sharded)
    rc, _, err = cli("convert", sharded, tmp_path / "out.safetensors")
    assert_one_line_error(rc, err, str(index), repr(shard))
    assert_no_partial(tmp_path / "out.safetensors")


def test_a_shard_index_of_plain_names_still_loads(sharded, tmp_path):
    (tmp_path / "outside.safetensors").rename(sharded / "part2.safetensors")
    _index(sharded, "part2.safetensors")
    state = read_checkpoint(sharded).state_dict
    assert "backbone.patch_embed1.proj.weight" in state and len(state) > 100


class _CreatesFile:
    """Unpickling this creates the file `path` (pickle calls open(path, "w"))."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("how", ["zip", "legacy", "hostile"])
def test_a_pickle_under_a_safetensors_name_is_one_line(cli, tiny_weights, tmp_path, how):
    path = tmp_path / "model.safetensors"
    state = load_file(str(tiny_weights["hrnet"]))  # default settings: its keys name the variant
    if how == "zip":
        torch.save(state, path)
    elif how == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a pickle that runs code when loaded (it creates `marker`): refused, not run
        import pickle

        marker = tmp_path / "marker"
        payload = pickle.dumps({"state_dict": _CreatesFile(str(marker))}, protocol=2)
        pickle.loads(payload)  # the payload is real: a plain load runs it
        assert marker.exists()
        marker.unlink()
        path.write_bytes(payload)
    rc, stdout, err = cli("convert", path, tmp_path / "out.safetensors")
    if how == "hostile":
        assert_one_line_error(rc, err, str(path), "refused")
        assert not marker.exists(), "the pickle's code ran"
        assert not (tmp_path / "out.safetensors").exists()
    else:  # a PyTorch file by its bytes, whatever its name: it loads
        assert rc == 0 and "hrnet-w18-small-v1" in stdout, err
    assert "Traceback" not in err


# === groups 8, 9, 11: run folders ==============================================================
def _train_config(tmp_path: Path, data: Path, **train) -> Path:
    cfg = {
        "model": {"name": "segformer-b0", "overrides": {
            "depths": [1, 1, 1, 1], "embed_dims": [8, 16, 24, 32], "decoder_dim": 16,
            "num_heads": [1, 1, 1, 1]}},
        "data": {"root": str(data), "crop_size": [32, 32], "base_size": 128},
        "optim": {"warmup_iters": 1},
        "train": {"max_iters": 2, "batch_size": 2, "num_workers": 0, "threads": 1,
                  "log_every": 1, "eval_every": 0, "checkpoint_every": 1, "keep_checkpoints": 2,
                  **train},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data) -> list[Path]:
    """Two identical tiny runs. (safetensors' writer orders the metadata differently on every
    call, in one process as in two.)"""
    from segcompare.cli import main

    root = tmp_path_factory.mktemp("runs")
    config = _train_config(root, tiny_data)
    for name in ("a", "b"):
        assert main(["train", str(config), "--out", str(root / name)]) == 0
    return [root / "a", root / "b"]


def test_two_identical_runs_write_identical_bytes(two_runs):
    digests = {hashlib.sha256((out / "final.safetensors").read_bytes()).hexdigest()
               for out in two_runs}  # fmt: skip
    assert len(digests) == 1
    umask = os.umask(0)
    os.umask(umask)
    for out in two_runs:  # the mode a plain open() gives, not mkstemp's private 0600
        assert (out / "final.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_second_run_into_the_same_folder_stops_naming_the_holder(cli, tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another process that holds the run folder, as a run does
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            f = open({str(out / ".lock")!r}, "a+")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.write(f"{{os.getpid()}}\\n"); f.flush()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = cli("train", _train_config(tmp_path, tiny_data), "--out", out)
        assert_one_line_error(rc, err, str(out), f"PID {holder.pid}", allow_log=True)
        assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    with open(out / ".lock") as f:  # the holder gone, the lock is free again
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _snapshot(folder: Path) -> dict:
    """Every path under `folder` (relative) -> its bytes, or None for a folder."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}  # fmt: skip


def test_a_run_failing_after_the_lock_leaves_no_folder_it_created(cli, tiny_data, tmp_path):
    # model.pretrained is read after the run folder is locked: a missing file fails there
    out = tmp_path / "runs" / "new"  # its parent is new too
    missing = tmp_path / "missing.safetensors"
    rc, _, err = cli("train", _train_config(tmp_path, tiny_data), "--out", out,
                     "--set", f"model.pretrained={missing}")
    assert_one_line_error(rc, err, str(missing), allow_log=True)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lock_before", [False, True], ids=["user-folder", "with-a-lock-file"])
def test_a_run_failing_after_the_lock_leaves_a_folder_that_was_there_as_it_was(
    cli, tiny_data, tmp_path, lock_before
):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's")
    if lock_before:  # an earlier run's lock file: not this run's to remove
        (out / ".lock").write_text("12345\n")
    before = _snapshot(out)
    missing = tmp_path / "missing.safetensors"
    rc, _, err = cli("train", _train_config(tmp_path, tiny_data), "--out", out,
                     "--set", f"model.pretrained={missing}")
    assert_one_line_error(rc, err, str(missing), allow_log=True)
    after = _snapshot(out)
    if lock_before:  # it names the last holder, this run
        assert after.pop(".lock") == f"{os.getpid()}\n".encode()
        before.pop(".lock")
    assert after == before


def test_a_failed_resume_leaves_the_run_as_it_was(cli, two_runs, tiny_data, tmp_path):
    out = _copy_run(two_runs[0], tmp_path / "run")
    before = _snapshot(out)
    rc, _, err = cli("train", _train_config(tmp_path, tiny_data), "--out", out, "--resume",
                     "--set", "optim.lr=0.5")
    assert_one_line_error(rc, err, "optim.lr", allow_log=True)
    after = _snapshot(out)
    assert after == before and ".lock" not in after  # a run that ended leaves no lock


def test_a_lock_on_a_removed_lock_file_is_not_taken(tmp_path):
    from segcompare.run_folder import RUN_LOCK_NAME, _is_current, lock_run_folder

    out = tmp_path / "run"
    first = lock_run_folder(out)
    waiting = open(out / RUN_LOCK_NAME, "a+b")  # another run opened it, not yet locked
    try:
        first.discard()  # a run that failed: its lock file and folder go
        assert not out.exists()
        fcntl.flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a lock on the removed file ...
        assert not _is_current(waiting, out / RUN_LOCK_NAME)  # ... which lock_run_folder sees
    finally:
        waiting.close()
    second = lock_run_folder(out)  # and takes the lock on a new file
    assert _is_current(second.file, out / RUN_LOCK_NAME)
    assert (out / RUN_LOCK_NAME).read_text() == f"{os.getpid()}\n"
    second.close()
    assert not (out / RUN_LOCK_NAME).exists()  # released and removed


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_falls_back_to_the_newest_intact_checkpoint(cli, two_runs, tiny_data, tmp_path,
                                                           caplog):
    out = _copy_run(two_runs[0], tmp_path / "run")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_1.pt", "iter_2.pt"]
    data = (ckpts / "iter_2.pt").read_bytes()
    (ckpts / "iter_2.pt").write_bytes(data[: len(data) // 2])  # truncated by a full disk
    stale = ckpts / ".iter_2.tmp-4194304-abc12345.pt"  # atomic_path's name (PID above pid_max)
    stale.write_bytes(b"")  # a SIGKILLed write's temporary
    (out / "final.safetensors").unlink()
    with caplog.at_level(logging.INFO):
        rc, stdout, err = cli("train", _train_config(tmp_path, tiny_data), "--out", out,
                              "--resume")
    assert rc == 0, err
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped iter_2.pt (unreadable" in messages
    assert "newest intact one, iter_1.pt" in messages
    assert "removed 1 temporary file(s)" in messages
    assert not stale.exists()
    assert "trained segformer-b0 2/2" in stdout
    # resumed at 1, the run equals the uninterrupted one bit for bit
    assert (out / "final.safetensors").read_bytes() == (
        two_runs[0] / "final.safetensors"
    ).read_bytes()


def test_resume_without_any_intact_checkpoint_is_one_line(cli, two_runs, tiny_data, tmp_path):
    out = _copy_run(two_runs[0], tmp_path / "run")
    for path in (out / "checkpoints").glob("iter_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    before = _contents(out)
    rc, _, err = cli("train", _train_config(tmp_path, tiny_data), "--out", out, "--resume")
    assert_one_line_error(rc, err, "no intact checkpoint", "iter_1.pt", "iter_2.pt",
                          allow_log=True)
    assert _contents(out) == before  # the run folder as it was: nothing removed, added, changed


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes) and every folder (name -> b"/")."""
    return {str(p.relative_to(folder)): b"/" if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}  # fmt: skip


# === group 15: write failures ==================================================================
def _write_commands(tiny_weights, tiny_data, target: Path, tmp_path: Path) -> dict:
    """Each writing command with its output at `target` (a folder or a file path)."""
    w = tiny_weights["segformer"]
    images = tiny_data / "leftImg8bit" / "val"
    frames = tiny_data / "leftImg8bit_demoVideo" / "stuttgart_00"
    return {
        "train": ["train", _train_config(tmp_path, tiny_data), "--out", target],
        "predict": ["predict", "--weights", w, images, "--out", target],
        "eval --json": ["eval", "--weights", w, "--data", tiny_data, "--workers", "0",
                        "--json", target / "r.json"],
        "eval --save-pred": ["eval", "--weights", w, "--data", tiny_data, "--workers", "0",
                             "--save-pred", target],
        "convert": ["convert", w, target / "m.safetensors"],
        "convert hf": ["convert", w, target / "hf"],
        "export": ["export", target / "m.onnx", "--weights", w, "--size", "64x64"],
        "video": ["video", frames, "--weights", w, "--out", target / "v.gif"],
        "stats --json": ["stats", "segformer-b0", "--size", "64x64", "--json", target / "s.json"],
        "compare": ["compare", "--weights", w, "--data", tiny_data, "--out", target,
                    "--images", "0", "--bench-iters", "1", "--bench-warmup", "0"],
        "synth": ["data", "synth", target / "s", "--train", "1", "--val", "1", "--size",
                  "64x128"],
        "demo": ["demo", "--out", target, "--data", tiny_data, "--weights", w],
    }  # fmt: skip


WRITERS = ["train", "predict", "eval --json", "eval --save-pred", "convert", "convert hf",
           "export", "video", "stats --json", "compare", "synth"]  # fmt: skip


@pytest.mark.parametrize("command", WRITERS)
def test_a_read_only_file_system_is_one_line(cli, tiny_weights, tiny_data, readonly_dir, tmp_path,
                                             command):
    target = readonly_dir / "out"
    argv = _write_commands(tiny_weights, tiny_data, target, tmp_path)[command]
    refusal = write_refusal(readonly_dir)  # root: "Read-only file system", else "Permission denied"
    rc, _, err = cli(*argv)
    assert_one_line_error(rc, err, str(readonly_dir), refusal, allow_log=True)
    assert not any(readonly_dir.iterdir())


@pytest.mark.parametrize("command", ["train", "convert", "predict", "synth"])
def test_a_full_disk_is_one_line(cli, tiny_weights, tiny_data, full_fs, tmp_path, command):
    target = full_fs / "out"
    argv = _write_commands(tiny_weights, tiny_data, target, tmp_path)[command]
    rc, _, err = cli(*argv)
    assert_one_line_error(rc, err, str(full_fs), "No space left on device", allow_log=True)
    assert_no_partial(full_fs)


@pytest.mark.parametrize(
    "command",
    ["predict", "eval --save-pred", "convert", "convert hf", "export", "synth", "train",
     "compare", "eval --json", "demo"],
)  # fmt: skip
def test_a_file_where_a_folder_is_needed_is_one_line(cli, tiny_weights, tiny_data, tmp_path,
                                                     command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = _write_commands(tiny_weights, tiny_data, blocker, tmp_path)[command]
    rc, _, err = cli(*argv)
    assert_one_line_error(rc, err, str(blocker), allow_log=True)
    assert blocker.read_text() == "not a folder"
    assert_no_partial(tmp_path)


@pytest.mark.parametrize("command", ["convert", "export", "stats --json", "eval --json"])
def test_a_folder_where_a_file_is_needed_is_one_line(cli, tiny_weights, tiny_data, tmp_path,
                                                     command):
    argv = _write_commands(tiny_weights, tiny_data, tmp_path / "t", tmp_path)[command]
    outputs = [a for a in argv if str(a).startswith(str(tmp_path / "t"))]
    target = Path(outputs[-1])  # the output, after the weights
    target.mkdir(parents=True)
    rc, _, err = cli(*argv)
    assert_one_line_error(rc, err, str(target), "folder", allow_log=True)
    assert target.is_dir() and not any(target.iterdir())


@pytest.mark.parametrize(
    "argv, named",
    [(["--weights", "x.st"], ["--weights", "--data"]),  # --weights needs --data
     (["--data", "nowhere"], ["--data", "nowhere"]),  # --data alone fine-tunes: on a folder
     (["--data", "nowhere", "--init", "a,b,c"], ["--init", "3"]),  # two --init weights
     (["--data", "nowhere", "--weights", "a"], ["nowhere"])],
)  # fmt: skip
def test_demo_argument_errors_leave_no_out_folder(cli, tmp_path, argv, named):
    out = tmp_path / "demo"
    rc, _, err = cli("demo", "--out", out, *argv)
    assert_one_line_error(rc, err, *named, allow_log=True)
    assert not out.exists()


# === group 16: errors in DataLoader workers ====================================================
def test_a_bad_sample_read_by_a_worker_is_the_same_one_line(cli, tiny_weights, tiny_data,
                                                            tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = sorted((data / "leftImg8bit" / "val").rglob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    lines = []
    for workers in (0, 1, 2):
        rc, _, err = cli("eval", "--weights", tiny_weights["segformer"], "--data", data,
                         "--workers", str(workers))
        lines.append(assert_one_line_error(rc, err, str(bad), allow_log=True))
        assert "Original Traceback" not in err
    assert lines[1] == lines[0] and lines[2] == lines[0]
    assert "DataLoader worker" not in lines[0]


def test_a_disk_that_fills_during_training_is_one_line(cli, tiny_data, tmp_path):
    """Room for the run folder but not for a checkpoint: torch.save's own error says only
    "unexpected pos"; the line names the checkpoint and the system's reason."""
    disk = tmp_path / "small"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode:
        pytest.skip(f"a small tmpfs cannot be mounted here: {mount.stderr.strip()}")
    try:
        out = disk / "run"
        rc, _, err = cli("train", _train_config(tmp_path, tiny_data), "--out", out)
        assert_one_line_error(rc, err, str(out / "checkpoints" / "iter_1.pt"),
                              "No space left on device", allow_log=True)
        assert_no_partial(disk)
        assert not (out / "checkpoints" / "iter_1.pt").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy, as conftest


@pytest.mark.parametrize("command", ["convert", "eval", "predict", "export"])
def test_help_says_how_a_hub_model_is_named(cli, command):
    rc, stdout, _ = cli(command, "--help")
    assert rc == 0 and "hf://owner/name" in stdout
