"""The data commands' outputs under the one output rule (issue 22, 4.A): `data check --histogram
FILE`, `data convert-masks SRC DST` and `data synth OUT` each refuse an output that exists
(unless --overwrite), one inside their input, and a parent they cannot write, in one line naming
the path; and none leaves a partial file or temporary behind. The read-only cases use the
battery's `readonly_dir` / `write_refusal`, so they hold as root and as a normal user."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_no_partial, assert_one_line_error, write_refusal
from PIL import Image

from segcompare.utils import OUTPUTS_NAME

DEAD_PID = 4194305  # above the kernel's largest pid_max (2**22): never a running process


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative name -> bytes) and every folder (name -> b"/")."""
    return {str(p.relative_to(root)): b"/" if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}  # fmt: skip


def _png_indices(path: Path) -> np.ndarray:
    """A mask's values as PIL reads them (P and L alike: the stored indices)."""
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory) -> Path:
    """A 4-class folder-layout set (P-mode masks): 2 train and 2 val pairs. Read-only."""
    from segcompare.data.synth.io import make_synthetic_layout

    root = tmp_path_factory.mktemp("folder_set") / "src"
    make_synthetic_layout(root, "folder", train=2, val=2, size=(64, 64), classes=4)
    return root


def _masks(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): _png_indices(p)
            for p in sorted((root / "ann_dir").rglob("*.png"))}  # fmt: skip


# --- data convert-masks DST -------------------------------------------------------------------
def test_convert_masks_refuses_a_dst_that_is_not_empty(cli, folder_set, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    rc, _, err = cli("data", "convert-masks", folder_set, dst)
    assert_one_line_error(rc, err, str(dst), "not empty", "--overwrite")
    assert _tree(dst) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary beside it


def test_convert_masks_overwrite_replaces_the_last_conversion_and_keeps_other_files(
    cli, folder_set, tmp_path
):
    """A second conversion into DST with --overwrite: its masks are the new SRC's, a pair the new
    SRC no longer has is gone (a stale pair would be scored), a file of the user's is kept."""
    dst = tmp_path / "dst"
    rc, _, err = cli("data", "convert-masks", folder_set, dst)
    assert rc == 0, err
    (dst / "notes.txt").write_text("mine")
    src = tmp_path / "src2"
    shutil.copytree(folder_set, src)
    gone = sorted((src / "ann_dir" / "val").glob("*.png"))[0]
    gone.unlink()
    (src / "img_dir" / "val" / gone.name).unlink()
    mask = src / "ann_dir" / "train" / sorted(p.name for p in (src / "ann_dir/train").iterdir())[0]
    changed = np.full_like(_png_indices(mask), 2)  # one mask now of class 2 only
    Image.fromarray(changed).save(mask)

    rc, _, err = cli("data", "convert-masks", src, dst, "--overwrite")
    assert rc == 0, err
    assert set(_masks(dst)) == set(_masks(src))
    for rel, values in _masks(src).items():
        assert np.array_equal(_png_indices(dst / rel), values), rel
    assert not (dst / "ann_dir" / "val" / gone.name).exists()
    assert not (dst / "img_dir" / "val" / gone.name).exists()
    assert (dst / "notes.txt").read_text() == "mine"
    assert_no_partial(tmp_path)
    assert not (dst / ".segcompare.lock").exists()


def test_convert_masks_into_an_empty_folder_lists_what_it_wrote(cli, folder_set, tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    rc, _, err = cli("data", "convert-masks", folder_set, dst)
    assert rc == 0, err
    listed = json.loads((dst / OUTPUTS_NAME).read_text())["files"]
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert listed == [f for f in files if f != OUTPUTS_NAME]
    assert len([f for f in listed if f.startswith("ann_dir/")]) == 4


@pytest.mark.parametrize("where", ["src", "inside"])
def test_convert_masks_never_writes_into_its_source(cli, folder_set, tmp_path, where):
    src = tmp_path / "src"
    shutil.copytree(folder_set, src)
    before = _tree(src)
    dst = src if where == "src" else src / "ann_dir" / "converted"
    rc, _, err = cli("data", "convert-masks", src, dst, "--overwrite")
    assert_one_line_error(rc, err, str(dst), str(src))
    assert _tree(src) == before


def test_convert_masks_into_an_unwritable_folder_is_one_line(cli, folder_set, readonly_dir):
    dst = readonly_dir / "dst"
    refusal = write_refusal(readonly_dir)  # root: "Read-only file system", else "Permission denied"
    rc, _, err = cli("data", "convert-masks", folder_set, dst)
    assert_one_line_error(rc, err, str(readonly_dir), refusal, allow_log=True)
    assert not any(readonly_dir.iterdir())


def test_a_failing_conversion_leaves_the_last_one_as_it_was(cli, folder_set, tmp_path):
    """A mask that does not decode stops the conversion: with --overwrite too, DST keeps the last
    conversion byte for byte, and no temporary is left beside it."""
    dst = tmp_path / "dst"
    assert cli("data", "convert-masks", folder_set, dst)[0] == 0
    before = _tree(dst)
    src = tmp_path / "src2"
    shutil.copytree(folder_set, src)
    bad = sorted((src / "ann_dir" / "val").glob("*.png"))[-1]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    rc, _, err = cli("data", "convert-masks", src, dst, "--overwrite")
    assert_one_line_error(rc, err, bad.name, allow_log=True)
    assert _tree(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src2"]


def test_a_killed_conversions_temporary_is_removed_by_the_next(cli, folder_set, tmp_path):
    stale = tmp_path / f".dst.tmp-{DEAD_PID}-abcd1234"  # the temporary of a SIGKILLed run
    (stale / "ann_dir").mkdir(parents=True)
    (stale / "ann_dir" / "half.png").write_bytes(b"half")
    rc, _, err = cli("data", "convert-masks", folder_set, tmp_path / "dst")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# --- data check --histogram FILE ---------------------------------------------------------------
def test_histogram_exists_needs_overwrite(cli, folder_set, tmp_path):
    png = tmp_path / "h.png"
    png.write_bytes(b"an older plot")
    rc, _, err = cli("data", "check", folder_set, "--histogram", png)
    assert_one_line_error(rc, err, str(png), "--overwrite")
    assert png.read_bytes() == b"an older plot"
    rc, _, err = cli("data", "check", folder_set, "--histogram", png, "--overwrite")
    assert rc == 0, err
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert_no_partial(tmp_path)


@pytest.mark.parametrize("target", ["ann_dir/val", "."], ids=["over-a-mask", "new-file"])
def test_histogram_is_never_written_inside_the_data_set(cli, folder_set, tmp_path, target):
    """Not over one of its masks, even with --overwrite, and not as a new file in it either
    (an extra PNG in a split folder would be an image or mask without its pair)."""
    root = tmp_path / "set"
    shutil.copytree(folder_set, root)
    before = _tree(root)
    existing = sorted((root / "ann_dir" / "val").glob("*.png"))[0]
    png = existing if target != "." else root / "class_histogram.png"
    rc, _, err = cli("data", "check", root, "--histogram", png, "--overwrite")
    assert_one_line_error(rc, err, str(png), str(root))
    assert _tree(root) == before


def test_histogram_into_an_unwritable_folder_is_one_line(cli, folder_set, readonly_dir):
    png = readonly_dir / "h.png"
    refusal = write_refusal(readonly_dir)
    rc, _, err = cli("data", "check", folder_set, "--histogram", png)
    assert_one_line_error(rc, err, str(png), refusal, allow_log=True)
    assert not any(readonly_dir.iterdir())


def test_histogram_on_a_full_disk_leaves_no_partial_file(cli, folder_set, full_fs):
    png = full_fs / "h.png"
    rc, _, err = cli("data", "check", folder_set, "--histogram", png)
    assert_one_line_error(rc, err, str(png), "No space left on device", allow_log=True)
    assert_no_partial(png)
    assert_no_partial(full_fs)


# --- data synth OUT ------------------------------------------------------------------------------
SYNTH = ("--train", "1", "--val", "0", "--size", "64x64")


@pytest.mark.parametrize("layout", ["cityscapes", "folder"])
def test_synth_refuses_a_file_as_out(cli, tmp_path, layout):
    out = tmp_path / "out"
    out.write_text("not a folder")
    rc, _, err = cli("data", "synth", out, "--layout", layout, *SYNTH, "--overwrite")
    assert_one_line_error(rc, err, str(out), "not a folder")
    assert out.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("layout", ["cityscapes", "ade20k"])
def test_synth_refuses_a_folder_that_is_not_empty(cli, tmp_path, layout):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli("data", "synth", out, "--layout", layout, *SYNTH)
    assert_one_line_error(rc, err, str(out), "--overwrite")
    assert _tree(out) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("layout", ["cityscapes", "folder"])
def test_synth_into_an_unwritable_folder_is_one_line(cli, readonly_dir, layout):
    out = readonly_dir / "s"
    refusal = write_refusal(readonly_dir)
    rc, _, err = cli("data", "synth", out, "--layout", layout, *SYNTH)
    assert_one_line_error(rc, err, str(readonly_dir), refusal, allow_log=True)
    assert not any(readonly_dir.iterdir())


def test_a_killed_synthesis_temporary_is_removed_by_the_next(cli, tmp_path):
    stale = tmp_path / f".out.tmp-{DEAD_PID}-abcd1234"
    (stale / "leftImg8bit").mkdir(parents=True)
    rc, _, err = cli("data", "synth", tmp_path / "out", *SYNTH)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_synthesis_stopped_midway_leaves_nothing_in_the_folder_it_was_given(tmp_path,
                                                                            monkeypatch):
    """An empty folder given as OUT stays empty when the synthesis fails after writing a
    sample (the set is made beside it and moved in only when whole)."""
    from segcompare.data.synth import io

    out = tmp_path / "out"
    out.mkdir()
    real = io.write_sample

    def write_then_fail(tmp, *args):
        real(tmp, *args)
        raise OSError(28, os.strerror(28))  # ENOSPC after the first sample

    monkeypatch.setattr(io, "write_sample", write_then_fail)
    with pytest.raises(Exception, match="No space left on device"):
        io.make_synthetic_cityscapes(out, train=2, val=0, size=(64, 64))
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("layout", ["cityscapes", "folder"])
def test_synth_overwrite_leaves_none_of_the_last_sets_files(cli, tmp_path, layout):
    """A second synthesis with fewer images, --overwrite, into the first's folder: the folder
    holds the second set only (before, the first's extra images stayed, a silently larger set),
    and a file of the user's own is kept."""
    out = tmp_path / "out"
    rc, _, err = cli("data", "synth", out, "--layout", layout, "--train", "3", "--val", "1",
                     "--size", "64x64")
    assert rc == 0, err
    (out / "notes.txt").write_text("mine")
    fresh = tmp_path / "fresh"
    for target, extra in ((out, ["--overwrite"]), (fresh, [])):
        rc, _, err = cli("data", "synth", target, "--layout", layout, "--train", "1",
                         "--val", "1", "--size", "64x64", *extra)
        assert rc == 0, err
    got = {k: v for k, v in _tree(out).items() if k != "notes.txt"}
    assert got == _tree(fresh)
    assert (out / "notes.txt").read_text() == "mine"
