"""The one output rule (segcompare.utils: check_output, output_folder, atomic_path) and the path
frictions of issue 22: every command refuses to write over its inputs, replaces an existing file
only with --overwrite, locks an --out folder while it writes and keeps none of the last run's
files there, names temporaries with the final suffix, cleans a killed run's temporaries, refuses
an empty path; run folders, repeated/comma-separated --weights and packaged recipes the same way
everywhere."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcompare.cli import main
from segcompare.utils import (
    SegcompareError,
    atomic_path,
    check_output,
    clean_stale_temporaries,
    is_temporary,
    output_folder,
)


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }  # fmt: skip


def _one_line_error(rc, err, command, message):
    lines = err.strip().splitlines()
    assert rc == 1 and lines[-1].startswith(f"segcompare {command}: error: "), err
    assert message in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """2 synthetic val images and 2 demo-video frames (64×128), a tiny seeded SegFormer as our
    checkpoint, and a training run folder holding two different final/best weights."""
    from segcompare.data.synth import make_synthetic_cityscapes
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    root = tmp_path_factory.mktemp("outputs")
    make_synthetic_cityscapes(root / "city", train=0, val=2, size=(64, 128), seed=0, video_frames=2)
    tiny = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)
    torch.manual_seed(0)
    save_weights(build_model("segformer-b0", **tiny), root / "b0.safetensors")
    run = root / "run"
    run.mkdir()
    save_weights(build_model("segformer-b0", **tiny), run / "final.safetensors")
    torch.manual_seed(1)
    save_weights(build_model("segformer-b0", **tiny), run / "best.safetensors")
    return root


# --- the rule itself ------------------------------------------------------------------------------
def test_a_temporary_keeps_the_final_suffix(tmp_path):
    target = tmp_path / "side_by_side.mp4"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4"
        assert tmp.name.startswith(".side_by_side.tmp-") and is_temporary(tmp)
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [target.name]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: no process has this id now
    return child.pid


def test_a_killed_write_leaves_nothing_the_next_run_keeps(tmp_path):
    dead, alive = _dead_pid(), subprocess.Popen([sys.executable, "-c", "input()"],
                                               stdin=subprocess.PIPE)
    try:
        stale = tmp_path / f".model.tmp-{dead}-abcd1234.safetensors"
        stale_dir = tmp_path / f".s2.tmp-{dead}-abcd_234"
        busy = tmp_path / f".other.tmp-{alive.pid}-abcd1234.png"  # another run, still writing
        for path in (stale, busy):
            path.write_bytes(b"half")
        stale_dir.mkdir()
        (stale_dir / "x.png").write_bytes(b"half")
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            tmp.write_bytes(b"whole")
        assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "model.safetensors"]
    finally:
        alive.communicate(b"\n")
    assert clean_stale_temporaries(tmp_path) == []  # once per folder and process


def test_empty_paths_are_refused(tmp_path):
    for what, folder in (("--json", False), ("--out", True)):
        with pytest.raises(SegcompareError, match="empty path"):
            check_output("", what, folder=folder)
        with pytest.raises(SegcompareError, match="empty path"):
            check_output("  ", what, folder=folder)


def test_an_output_is_never_an_input_and_existing_files_need_overwrite(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"w")
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    with pytest.raises(SegcompareError, match="is the input"):
        check_output(weights, "--json", [weights], overwrite=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(weights)
    with pytest.raises(SegcompareError, match="is the input"):
        check_output(link, "--json", [weights], overwrite=True)
    with pytest.raises(SegcompareError, match="lies inside the input"):
        check_output(data / "img", "--save-pred", [data], folder=True)
    with pytest.raises(SegcompareError, match="exists; give --overwrite"):
        check_output(weights, "--json")
    assert check_output(weights, "--json", overwrite=True) == weights
    assert weights.read_bytes() == b"w"


def test_an_output_folder_is_locked_and_keeps_only_this_runs_files(tmp_path):
    out = tmp_path / "report"
    with output_folder(out, "--out", names=["a.png"]):
        for name in ("a.png", "b.png"):
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(name.encode())
        with pytest.raises(SegcompareError, match=r"another segcompare process \(PID"):
            with output_folder(out, "--out"):
                pass
    (out / "mine.txt").write_text("the user's own file")
    assert not (out / ".segcompare.lock").exists()
    with pytest.raises(SegcompareError, match=r"a.png and 1 more file\(s\); give --overwrite"):
        with output_folder(out, "--out"):
            pass
    with output_folder(out, "--out", overwrite=True):  # a second run that writes only a.png
        with atomic_path(out / "a.png") as tmp:
            tmp.write_bytes(b"second")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a.png", "mine.txt"
    ]  # fmt: skip
    assert (out / "a.png").read_bytes() == b"second"


def test_a_failed_run_takes_back_what_it_wrote(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), output_folder(out, "--out"):
        with atomic_path(out / "sub" / "a.png") as tmp:
            tmp.write_bytes(b"a")
        raise RuntimeError("interrupted")
    assert not out.exists()


# --- every command: never over an input ----------------------------------------------------------
def test_eval_json_and_export_and_stats_never_replace_the_weights(synth, tmp_path, capsys):
    w = tmp_path / "w.safetensors"
    w.write_bytes((synth / "b0.safetensors").read_bytes())
    before = w.read_bytes()
    data = synth / "city"
    rc, _, err = _cli(capsys, "eval", "--weights", w, "--data", data, "--json", w, "--overwrite")
    _one_line_error(rc, err, "eval", "is the input")
    rc, _, err = _cli(capsys, "export", w, "--weights", w, "--size", "64x64", "--overwrite")
    _one_line_error(rc, err, "export", "is the input")
    rc, _, err = _cli(capsys, "stats", "segformer-b0", "--size", "64x64", "--json", w)
    _one_line_error(rc, err, "stats", "exists; give --overwrite")
    rc, _, err = _cli(capsys, "bench", "segformer-b0", "--size", "64x64", "--json", w)
    _one_line_error(rc, err, "bench", "exists; give --overwrite")
    assert w.read_bytes() == before


def test_predict_never_overwrites_its_inputs(synth, tmp_path, capsys):
    import shutil

    images = tmp_path / "ov"
    shutil.copytree(synth / "city" / "leftImg8bit" / "val", images)
    before = _digest(images)
    w = synth / "b0.safetensors"
    common = ("--device", "cpu", "--mode", "whole", "--format", "color")
    rc, out, err = _cli(capsys, "predict", images, "--weights", w, "--out", images, *common)
    _one_line_error(rc, err, "predict", "is the input")
    rc, out, err = _cli(capsys, "predict", images, "--weights", w, "--out", images / "pred",
                        *common)  # fmt: skip
    _one_line_error(rc, err, "predict", "lies inside the input")
    flat = images / "frankfurt"
    rc, out, err = _cli(capsys, "predict", f"{flat}/*.png", "--weights", w, "--out", flat,
                        "--overwrite", *common)  # fmt: skip
    _one_line_error(rc, err, "predict", "would replace the input image")
    assert _digest(images) == before and "wrote" not in out


def test_eval_save_pred_never_writes_into_the_data_set(synth, tmp_path, capsys):
    data = synth / "city"
    before = _digest(data)
    rc, _, err = _cli(capsys, "eval", "--weights", synth / "b0.safetensors", "--data", data,
                      "--save-pred", data / "leftImg8bit" / "val", "--device", "cpu",
                      "--workers", 0)  # fmt: skip
    _one_line_error(rc, err, "eval", "lies inside the input")
    assert _digest(data) == before


def test_convert_needs_overwrite_and_a_name(synth, tmp_path, capsys, monkeypatch):
    src = synth / "b0.safetensors"
    dst = tmp_path / "existing.safetensors"
    dst.write_bytes(b"an HRNet checkpoint")
    rc, _, err = _cli(capsys, "convert", src, dst)
    _one_line_error(rc, err, "convert", "exists; give --overwrite")
    assert dst.read_bytes() == b"an HRNet checkpoint"
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(capsys, "convert", src, "")
    _one_line_error(rc, err, "convert", "empty path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors"]
    rc, _, err = _cli(capsys, "convert", src, dst, "--overwrite")
    assert rc == 0 and dst.read_bytes() != b"an HRNet checkpoint"
    hf = tmp_path / "hf"
    assert _cli(capsys, "convert", src, hf)[0] == 0
    rc, _, err = _cli(capsys, "convert", src, hf)  # the HuggingFace folder is there now
    _one_line_error(rc, err, "convert", "give --overwrite")


def test_compare_into_one_out_twice(synth, tmp_path, capsys):
    out = tmp_path / "report"
    args = ("compare", "--weights", synth / "b0.safetensors", "--data", synth / "city",
            "--out", out, "--device", "cpu", "--max-images", 1, "--bench-iters", 1,
            "--bench-warmup", 0)  # fmt: skip
    assert _cli(capsys, *args, "--images", 1)[0] == 0
    assert (out / "hardest_images.png").is_file()
    rc, _, err = _cli(capsys, *args, "--images", 0)
    _one_line_error(rc, err, "compare", "give --overwrite")
    assert _cli(capsys, *args, "--images", 0, "--overwrite")[0] == 0
    # the second report has no hardest images: the first one's plot went with it
    assert not (out / "hardest_images.png").exists() and (out / "report.html").is_file()
    assert not (out / ".segcompare.lock").exists()


# --- friction 1: MP4 output (the video extra is in the test extra) --------------------------------
def test_video_writes_mp4(synth, tmp_path, capsys):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    frames = synth / "city" / "leftImg8bit_demoVideo" / "stuttgart_00"
    out = tmp_path / "side_by_side.mp4"
    rc, stdout, err = _cli(capsys, "video", "--weights", synth / "b0.safetensors", frames,
                           "--out", out, "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    reader = imageio.get_reader(str(out), format="FFMPEG")
    video = [frame for frame in reader]
    reader.close()
    assert len(video) == 2 and video[0].shape[1] == 2 * 128  # input | model
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    rc, _, err = _cli(capsys, "video", "--weights", synth / "b0.safetensors", frames,
                      "--out", out, "--device", "cpu")  # fmt: skip
    _one_line_error(rc, err, "video", "exists; give --overwrite")


# --- friction 3: A,B and repeated flags both mean two models --------------------------------------
def test_weights_a_b_and_repeated_weights_are_two_models(synth, tmp_path, capsys):
    from segcompare.cli import build_parser
    from segcompare.cli.args import _model_list, split_list

    parser = build_parser()
    for argv in (["--weights", "a", "--weights", "b"], ["--weights", "a,b"]):
        assert split_list(parser.parse_args(["demo", *argv]).weights) == ["a", "b"]
        assert _model_list([], parser.parse_args(["compare", "--data", "d", *argv]).weights) == [
            (None, "a"), (None, "b")
        ]  # fmt: skip
    w = synth / "b0.safetensors"
    frames = synth / "city" / "leftImg8bit_demoVideo" / "stuttgart_00"
    rc, out, _ = _cli(capsys, "video", "--weights", f"{w},{w}", frames, "--out",
                      tmp_path / "v.gif", "--device", "cpu", "--max-frames", 1)  # fmt: skip
    assert rc == 0 and "2 model(s)" in out
    rc, _, err = _cli(capsys, "eval", "--weights", f"{w},{w}", "--data", synth / "city")
    _one_line_error(rc, err, "eval", "names 2 models; this command runs one")


# --- friction 5: a run folder is final by default, --checkpoint best, everywhere ------------------
@pytest.mark.parametrize("which", ["final", "best"])
def test_every_command_takes_a_run_folder(synth, tmp_path, capsys, which):
    run = synth / "run"
    image = next((synth / "city" / "leftImg8bit" / "val").rglob("*.png"))
    opts = ("--device", "cpu", "--mode", "whole", "--format", "trainid")
    flag = () if which == "final" else ("--checkpoint", "best")
    assert _cli(capsys, "predict", image, "--weights", run, "--out", tmp_path / "a", *opts,
                *flag)[0] == 0  # fmt: skip
    assert _cli(capsys, "predict", image, "--weights", run / f"{which}.safetensors",
                "--out", tmp_path / "b", *opts)[0] == 0  # fmt: skip
    a, b = (np.asarray(Image.open(tmp_path / d / f"{image.stem}.png")) for d in "ab")
    assert np.array_equal(a, b)
    rc, out, _ = _cli(capsys, "eval", "--weights", run, "--data", synth / "city", "--device", "cpu",
                      "--workers", 0, *flag)  # fmt: skip
    rc2, out2, _ = _cli(capsys, "eval", "--weights", run / f"{which}.safetensors", "--data",
                        synth / "city", "--device", "cpu", "--workers", 0)  # fmt: skip
    assert rc == rc2 == 0 and out.splitlines()[:-1] == out2.splitlines()[:-1]
    assert _cli(capsys, "export", tmp_path / "m.onnx", "--weights", run, "--size", "64x64",
                *flag)[0] == 0  # fmt: skip


# --- friction 4: packaged recipes by name --------------------------------------------------------
def test_recipes_resolve_by_name_outside_the_checkout(tmp_path, monkeypatch, capsys, caplog):
    from segcompare.cli.models import resolve_recipe

    repo_configs = Path(__file__).resolve().parent.parent / "configs"
    monkeypatch.chdir(tmp_path)
    for text in ("synthcity_segformer_b0", "synthcity_segformer_b0.yaml",
                 "configs/synthcity_segformer_b0.yaml"):  # fmt: skip
        found = resolve_recipe(text)
        assert found.read_bytes() == (repo_configs / "synthcity_segformer_b0.yaml").read_bytes()
    local = tmp_path / "synthcity_segformer_b0.yaml"
    local.write_text("model: {name: segformer-b0}\n")
    with caplog.at_level(logging.INFO, logger="segcompare"):
        assert resolve_recipe("synthcity_segformer_b0") == Path("synthcity_segformer_b0.yaml")
    assert "using the local file synthcity_segformer_b0.yaml" in caplog.text
    with pytest.raises(SegcompareError, match="train --list"):
        resolve_recipe("no_such_recipe")
    rc, out, _ = _cli(capsys, "train", "--list")
    listed = [line.split()[0] for line in out.splitlines()]
    assert rc == 0 and listed == sorted(p.stem for p in repo_configs.glob("*.yaml"))


# --- friction 6: a read-only array ----------------------------------------------------------
def test_predict_on_a_read_only_array_warns_nothing(synth):
    from segcompare.evaluate import InferenceSettings
    from segcompare.infer import Predictor
    from segcompare.models import build_model

    image = next((synth / "city" / "leftImg8bit" / "val").rglob("*.png"))
    array = np.asarray(Image.open(image))
    assert not array.flags.writeable
    predictor = Predictor(build_model(weights=synth / "b0.safetensors"),
                          InferenceSettings(device="cpu", mode="whole"))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = predictor.predict(array)
    assert np.array_equal(ids, predictor.predict(np.array(array)))


def test_a_log_line_is_written_above_the_progress_bar_not_on_it():
    """The CLI's console handler writes through tqdm.write: the bar is cleared first, so the
    line starts at column 0 (a plain StreamHandler glues it to the bar: `T` / `ensorBoard: ..`)."""
    import io

    from tqdm import tqdm

    from segcompare.utils import _TqdmHandler

    stream = io.StringIO()
    handler = _TqdmHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    # position 0: a bar another test left open in this process would push a new one down a line
    with tqdm(total=4, file=stream, desc="train", ascii=True, position=0) as bar:
        bar.update(1)
        handler.emit(logging.makeLogRecord({"msg": "TensorBoard: scalars in runs/b0/tb"}))
        bar.update(1)
    before = stream.getvalue().split("TensorBoard:")[0]
    assert before.endswith("\r"), repr(before[-40:])  # the bar was cleared: the line is its own
    assert "TensorBoard: scalars in runs/b0/tb\n" in stream.getvalue()


_SIDE_BY_SIDE_SCRIPT = """
import logging, sys, time
from pathlib import Path
from tqdm import tqdm
from segcompare.demo import side_by_side_pool

LINES = 12


def draw(position, folder):
    # both processes start drawing only when both are up (spawn takes a while), so their bars
    # and lines interleave as two trainings' do
    (Path(folder) / f"ready{position}").touch()
    while len(list(Path(folder).glob("ready*"))) < 2:
        time.sleep(0.01)
    # as a training side by side: a bar at its own line, a log line after each step
    log = logging.getLogger("segcompare.train")
    with tqdm(total=LINES, position=position, desc=f"model{position}", ncols=70, ascii=True,
              mininterval=0) as bar:
        for i in range(LINES):
            time.sleep(0.01)
            bar.update(1)
            log.info("model%d: log line %d of the run", position, i)


if __name__ == "__main__":
    with side_by_side_pool(2) as pool:
        for future in [pool.submit(draw, p, sys.argv[1]) for p in range(2)]:
            future.result()
"""


def test_log_lines_of_processes_side_by_side_never_land_on_a_bar(tmp_path):
    """The demo's two trainings draw a bar each on one terminal and log lines between steps.
    Their captured stderr, replayed on a terminal emulator (pyte), shows every log line whole on
    a line of its own: no line lands on the other process's bar or splits one."""
    import pyte  # the test extra
    script = tmp_path / "side_by_side.py"
    script.write_text(_SIDE_BY_SIDE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    screen = pyte.Screen(100, 200)  # tall enough that nothing scrolls away
    screen.set_mode(pyte.modes.LNM)  # "\n" as a terminal's line discipline turns it: CR LF
    pyte.ByteStream(screen).feed(proc.stderr)
    shown = [line.rstrip() for line in screen.display]
    expected = [f"model{p}: log line {i} of the run" for p in range(2) for i in range(12)]
    for line in expected:
        assert shown.count(line) == 1, (line, "\n".join(s for s in shown if s))
    fragments = [s for s in shown if "log line" in s and s not in expected]
    assert not fragments, fragments  # a log line glued to a bar, or a bar drawn over a line
    for p in range(2):  # both bars finished whole
        assert any(s.startswith(f"model{p}: 100%|") and s.endswith("it/s]") for s in shown)
