"""The three layouts, one dataset: a folder set made by hand with PIL (not by our synth), an
ADE20K-layout set scored against NumPy, the dataset doctor's one line per bad mask, convert-masks,
the synthetic sets, and stale or incomplete data never scored (issue 22, mechanism D)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcompare.cli import main
from segcompare.data.cityscapes import CityscapesDataset
from segcompare.utils import SegcompareError

NAMES5 = ["background", "road", "car", "person", "sky"]
COLOURS5 = [[0, 0, 0], [128, 64, 128], [0, 0, 142], [220, 20, 60], [70, 130, 180]]
HW = (48, 80)  # 3 x 5 blocks of 16 pixels


def _mask(seed: int, k: int = 5) -> np.ndarray:
    """Blocks of classes 0..k-1 with a band of 255 (ignore): every class present."""
    rng = np.random.default_rng(seed)
    m = np.repeat(np.repeat(rng.integers(0, k, (3, 5)), 16, 0), 16, 1).astype(np.uint8)
    m[0, :k] = np.arange(k)  # every class has pixels
    m[-1, :] = 255
    return m


def _save(path: Path, array: np.ndarray, palette: list | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette is not None:
        flat = [v for c in palette for v in c]
        im.putpalette(flat + [0] * (768 - len(flat)))  # all 256 entries: 255 stays 255
    im.save(path)


def make_folder5(root: Path, p_mode: bool = True) -> dict[str, list[np.ndarray]]:
    """A 5-class folder data set written with PIL: img_dir/{train,val}, ann_dir/{train,val}
    (P-mode masks with the class colours, or L), id2label.json. Returns the masks per split."""
    masks = {}
    for s, split in enumerate(("train", "val")):
        masks[split] = []
        for i in range(3):
            rgb = np.random.default_rng(100 * s + i).integers(0, 256, HW + (3,), dtype=np.uint8)
            _save(root / "img_dir" / split / f"im{i}.png", rgb)
            m = _mask(10 * s + i)
            _save(root / "ann_dir" / split / f"im{i}.png", m, COLOURS5 if p_mode else None)
            masks[split].append(m)
    (root / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(NAMES5)}))
    return masks


@pytest.fixture
def folder5(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "five"
    return root, make_folder5(root)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


# --- the folder layout ---------------------------------------------------------------------------
def test_folder_set_reads_names_palette_and_masks(folder5):
    root, masks = folder5
    ds = CityscapesDataset(root, "val")
    assert ds.layout.name == "folder"
    assert list(ds.table.names) == NAMES5
    assert [list(c) for c in ds.table.palette] == COLOURS5  # from the P-mode masks' palette
    assert ds.names == ["im0", "im1", "im2"]
    for i in range(3):
        sample = ds[i]
        assert np.array_equal(sample["label"], masks["val"][i])  # P read by index, 255 ignore
        assert sample["image"].shape == HW + (3,)


def test_folder_palette_json_wins_and_generated_colours_otherwise(tmp_path):
    root = tmp_path / "l"
    make_folder5(root, p_mode=False)
    from segcompare.data.labels import generic_table
    from segcompare.data.layouts import FOLDER_LAYOUT, class_table

    assert class_table(root, FOLDER_LAYOUT).palette == generic_table(5).palette
    mine = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]]
    (root / "palette.json").write_text(json.dumps(mine))
    assert [list(c) for c in class_table(root, FOLDER_LAYOUT).palette] == mine


def test_eval_pred_dir_on_a_folder_set_equals_numpy(folder5, tmp_path, capsys):
    root, masks = folder5
    pred_dir = tmp_path / "pred"
    preds = []
    for i, m in enumerate(masks["val"]):
        p = m.copy()
        p[p == 255] = 0
        p[:8, :8] = (p[:8, :8] + 1) % 5  # some errors
        _save(pred_dir / f"im{i}.png", p)
        preds.append(p)
    out = tmp_path / "r.json"
    assert main(["eval", "--pred-dir", str(pred_dir), "--data", str(root), "--workers", "0",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    gt, pr = np.concatenate([m.ravel() for m in masks["val"]]), np.concatenate(
        [p.ravel() for p in preds])
    keep = gt != 255
    ious = []
    for k in range(5):
        inter = np.sum((gt == k) & (pr == k) & keep)
        union = np.sum(((gt == k) | (pr == k)) & keep)
        ious.append(inter / union)
    assert list(res["per_class"]) == NAMES5
    assert [res["per_class"][n]["iou"] for n in NAMES5] == pytest.approx(ious, abs=1e-12)
    assert res["miou"] == pytest.approx(np.mean(ious), abs=1e-12)


def test_train_on_a_folder_set_takes_the_class_count_and_names(folder5, tmp_path, capsys):
    from helpers import TINY_SEGFORMER, write_yaml

    root, _ = folder5
    cfg = {**TINY_SEGFORMER,
           "data": {"root": str(root), "crop_size": [32, 32], "base_size": 40},
           "train": {"max_iters": 1, "batch_size": 2, "num_workers": 0, "eval_every": 1,
                     "log_every": 1}}  # fmt: skip
    recipe = write_yaml(tmp_path, cfg)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    from safetensors import safe_open

    with safe_open(str(run / "final.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["num_classes"] == "5" and json.loads(meta["class_names"]) == NAMES5
    assert json.loads(meta["class_table"])["palette"] == COLOURS5
    # a recipe that names another class count is one error naming both
    write_yaml(tmp_path, {**cfg, "model": {**cfg["model"], "num_classes": 19}}, "bad.yaml")
    assert main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run2")]) == 1
    assert re.search("model.num_classes is 19 .* 5 classes", capsys.readouterr().err)


# --- the ADE20K layout ---------------------------------------------------------------------------
def make_ade20k(root: Path, n: int = 2) -> list[np.ndarray]:
    base = root / "ADEChallengeData2016"  # the root may hold the official folder
    annotations = []
    for i in range(n):
        rng = np.random.default_rng(i)
        rgb = rng.integers(0, 256, HW + (3,), dtype=np.uint8)
        (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(base / "images" / "validation" / f"ADE_val_{i:08d}.jpg")
        ann = rng.integers(0, 151, HW).astype(np.uint8)  # 0 = other, 1..150 the classes
        _save(base / "annotations" / "validation" / f"ADE_val_{i:08d}.png", ann)
        annotations.append(ann)
    return annotations


def test_ade20k_set_with_reduce_zero_label_equals_numpy(tmp_path):
    root = tmp_path / "ade"
    anns = make_ade20k(root)
    preds = []
    for i, ann in enumerate(anns):
        p = np.random.default_rng(50 + i).integers(1, 151, HW).astype(np.uint8)
        p[ann > 0] = np.where(np.arange(ann.size).reshape(HW)[ann > 0] % 3 == 0, p[ann > 0],
                              ann[ann > 0])  # two thirds right
        _save(tmp_path / "pred" / f"ADE_val_{i:08d}.png", p)
        preds.append(p)
    out = tmp_path / "r.json"
    assert main(["eval", "--pred-dir", str(tmp_path / "pred"), "--data", str(root),
                 "--workers", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # NumPy, mmseg's rule: annotation 0 ignored, v -> v - 1; predictions in ADE20K ids 1..150
    gt = np.concatenate([a.ravel() for a in anns]).astype(np.int64) - 1
    pr = np.concatenate([p.ravel() for p in preds]).astype(np.int64) - 1
    keep = gt >= 0
    ious = []
    for k in range(150):
        union = np.sum(((gt == k) | (pr == k)) & keep)
        ious.append(np.sum((gt == k) & (pr == k) & keep) / union if union else np.nan)
    ref = json.loads((Path(__file__).parent / "fixtures/ade20k_mmseg_metainfo.json").read_text())
    assert list(res["per_class"]) == [n.strip() for n in ref["classes"]]
    got = [res["per_class"][n]["iou"] for n in res["per_class"]]
    assert np.allclose(np.nan_to_num(np.array(got, float), nan=-1),
                       np.nan_to_num(np.array(ious), nan=-1), atol=1e-12)
    assert res["miou"] == pytest.approx(np.nanmean(ious), abs=1e-12)


def test_ade20k_dataset_reduces_zero_label(tmp_path):
    root = tmp_path / "ade"
    anns = make_ade20k(root, 1)
    ds = CityscapesDataset(root, "val")
    assert ds.layout.name == "ade20k" and ds.table.num_classes == 150
    expected = anns[0].astype(np.int64) - 1
    expected[expected < 0] = 255
    assert np.array_equal(ds[0]["label"], expected)
    off = CityscapesDataset(root, "val", reduce_zero_label=False, layout="ade20k")
    assert off.table.reduce_zero_label is False


# --- the dataset doctor --------------------------------------------------------------------------
def _check_lines(root: Path, capsys) -> tuple[int, list[str]]:
    code = main(["data", "check", str(root)])
    return code, capsys.readouterr().out.splitlines()


def _one_line(lines: list[str], path: Path, *words: str) -> str:
    found = [ln for ln in lines if str(path) in ln]
    assert len(found) == 1, (path, lines)
    for w in words:
        assert w in found[0], (w, found[0])
    return found[0]


def test_check_passes_and_draws_the_histogram(folder5, tmp_path, capsys):
    root, masks = folder5
    png = tmp_path / "class_histogram.png"
    assert main(["data", "check", str(root), "--histogram", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.is_file() and Image.open(png).size[0] > 100
    counts = np.bincount(np.concatenate([m.ravel() for m in masks["val"]]), minlength=256)
    sky = next(ln for ln in out.splitlines() if " sky " in ln)
    assert sky.split()[-2] == str(counts[4])  # val column: the pixels of class 4 counted by hand


@pytest.mark.parametrize("case", ["rgb", "out_of_range", "binary", "truncated", "size",
                                  "lonely_image", "lonely_mask"])
def test_check_each_bad_mask_is_one_line_naming_file_and_value(folder5, capsys, case):
    root, _ = folder5
    mask = root / "ann_dir" / "val" / "im1.png"
    if case == "rgb":
        _save(mask, np.zeros(HW + (3,), np.uint8) + 7)
        words = ("RGB colour mask", "convert-masks")
    elif case == "out_of_range":
        m = _mask(11)
        m[:2, :3] = 7  # 6 pixels of a value no class has
        _save(mask, m)
        words = ("7 (6 px)", "0..4")
    elif case == "binary":
        m = np.zeros(HW, np.uint8)
        m[5:9, 5:9] = 255
        _save(mask, m)
        words = ("only 0 and 255", "16 px", "--map 255:1")
    elif case == "truncated":
        mask.write_bytes(mask.read_bytes()[:60])
        words = ("cannot decode",)
    elif case == "size":
        _save(mask, _mask(11)[:32])
        words = ("80x32", "80x48")
    elif case == "lonely_image":
        mask.unlink()
        mask = root / "img_dir" / "val" / "im1.png"
        words = ("image without a mask",)
    else:
        _save(root / "ann_dir" / "val" / "extra.png", _mask(3))
        mask = root / "ann_dir" / "val" / "extra.png"
        words = ("mask without an image",)
    code, lines = _check_lines(root, capsys)
    assert code == 1
    _one_line(lines, mask, *words)


def test_check_names_a_class_with_no_pixels(tmp_path, capsys):
    root = tmp_path / "five"
    make_folder5(root)
    for i in range(3):
        m = _mask(10 + i)
        m[m == 3] = 0
        _save(root / "ann_dir" / "val" / f"im{i}.png", m, COLOURS5)
    code, lines = _check_lines(root, capsys)
    assert code == 0
    assert any("3 'person'" in ln and "'val'" in ln and "no pixels" in ln for ln in lines)


# --- convert-masks -------------------------------------------------------------------------------
def test_convert_masks_colours_to_indices_and_maps_leave_the_source(tmp_path, capsys):
    src = tmp_path / "rgb"
    masks = make_folder5(src, p_mode=False)
    (src / "palette.json").write_text(json.dumps(COLOURS5))
    lut = np.zeros((256, 3), np.uint8)
    lut[:5] = COLOURS5
    lut[255] = [255, 255, 255]
    for split in ("train", "val"):
        for i, m in enumerate(masks[split]):
            m = m.copy()
            m[m == 255] = 0
            masks[split][i] = m
            _save(src / "ann_dir" / split / f"im{i}.png", lut[m])  # RGB colour masks
    before = _tree_digest(src)
    dst = tmp_path / "idx"
    assert main(["data", "convert-masks", str(src), str(dst), "--map", "4:3"]) == 0
    assert _tree_digest(src) == before  # nothing changed in place
    got = np.array(Image.open(dst / "ann_dir" / "val" / "im2.png"))
    expected = masks["val"][2].copy()
    expected[expected == 4] = 3
    assert np.array_equal(got, expected)
    assert (dst / "img_dir" / "val" / "im2.png").read_bytes() == (
        src / "img_dir" / "val" / "im2.png").read_bytes()
    assert json.loads((dst / "id2label.json").read_text())["4"] == "sky"
    assert main(["data", "check", str(dst)]) == 0


def test_convert_masks_names_every_colour_not_in_the_palette(tmp_path, capsys):
    src = tmp_path / "rgb"
    make_folder5(src, p_mode=False)
    (src / "palette.json").write_text(json.dumps(COLOURS5))
    bad = np.zeros(HW + (3,), np.uint8)
    bad[:2, :2] = [1, 2, 3]
    bad[5:6, :] = [9, 9, 9]
    _save(src / "ann_dir" / "val" / "im0.png", bad)
    assert main(["data", "convert-masks", str(src), str(tmp_path / "out")]) == 1
    (msg,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert "[1, 2, 3] (4 px" in msg and "[9, 9, 9] (80 px" in msg and "im0.png" in msg
    assert not (tmp_path / "out").exists()


def test_binary_masks_become_trainable_with_map(tmp_path, capsys):
    src = tmp_path / "bin"
    for split in ("train", "val"):
        _save(src / "img_dir" / split / "a.png", np.zeros(HW + (3,), np.uint8))
        m = np.zeros(HW, np.uint8)
        m[4:12, 4:12] = 255
        _save(src / "ann_dir" / split / "a.png", m)
    (src / "id2label.json").write_text('{"0": "background", "1": "object"}')
    assert main(["data", "check", str(src)]) == 1
    assert main(["data", "convert-masks", str(src), str(tmp_path / "fixed"), "--map",
                 "255:1"]) == 0
    ds = CityscapesDataset(tmp_path / "fixed", "val")
    assert np.bincount(ds[0]["label"].ravel()).tolist() == [HW[0] * HW[1] - 64, 64]


# --- synthetic sets in every layout --------------------------------------------------------------
def test_synth_folder_and_ade20k_layouts(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "f"), "--layout", "folder", "--classes", "4",
                 "--train", "1", "--val", "1", "--size", "64x128"]) == 0
    id2label = json.loads((tmp_path / "f" / "id2label.json").read_text())
    assert id2label == {"0": "background", "1": "road", "2": "building", "3": "vegetation"}
    m = Image.open(next((tmp_path / "f" / "ann_dir" / "val").glob("*.png")))
    assert m.mode == "P" and set(np.unique(np.array(m))) <= {0, 1, 2, 3}
    assert main(["data", "synth", str(tmp_path / "a"), "--layout", "ade20k", "--train", "1",
                 "--val", "1", "--size", "64x128"]) == 0
    ref = json.loads((Path(__file__).parent / "fixtures/ade20k_mmseg_metainfo.json").read_text())
    ade_id = {n.strip(): i + 1 for i, n in enumerate(ref["classes"])}
    ann = np.array(Image.open(next((tmp_path / "a/annotations/validation").glob("*.png"))))
    values = set(np.unique(ann).tolist())
    assert {ade_id["road"], ade_id["sky"]} <= values
    assert values <= {0} | {ade_id[n] for n in ("road", "sidewalk", "building", "wall", "fence",
                            "pole", "traffic light", "signboard", "tree", "grass", "sky",
                            "person", "car", "truck", "bus", "minibike", "bicycle", "bridge")}
    assert main(["data", "check", str(tmp_path / "a")]) == 0


# --- mechanism D: stale or incomplete data is never scored --------------------------------------
@pytest.fixture
def cs(tmp_path):
    from segcompare.data.synth import make_synthetic_cityscapes

    root = tmp_path / "cs"
    make_synthetic_cityscapes(root, train=1, val=2, size=(64, 128))
    return root


def _val_ids(root: Path) -> list[Path]:
    return sorted((root / "gtFine" / "val").glob("*/*_labelIds.png"))


def test_stale_labeltrainids_are_redone_by_prepare_and_refused_by_eval(cs, capsys):
    assert main(["data", "prepare", str(cs), "--workers", "1"]) == 0
    ids = _val_ids(cs)[0]
    label = np.array(Image.open(ids))
    label[:4, :4] = 26  # car
    _save(ids, label)
    trainids = Path(str(ids).replace("_labelIds", "_labelTrainIds"))
    earlier = ids.stat().st_mtime_ns - 10**9  # prepared before the edit
    os.utime(trainids, ns=(earlier, earlier))
    with pytest.raises(SegcompareError, match="older than .*labelIds.*data prepare"):
        CityscapesDataset(cs, "val")
    assert main(["data", "check", str(cs), "--workers", "1"]) == 1
    assert "older than" in capsys.readouterr().out
    assert main(["data", "prepare", str(cs), "--workers", "1"]) == 0
    assert "1 written" in capsys.readouterr().out
    assert np.array(Image.open(trainids))[:4, :4].tolist() == [[13] * 4] * 4
    CityscapesDataset(cs, "val")


def test_prepare_refuses_bogus_splits_missing_gtfine_and_gaps(cs, capsys):
    assert main(["data", "prepare", str(cs), "--split", "bogus"]) == 1
    assert "bogus" in capsys.readouterr().err
    _val_ids(cs)[1].unlink()
    assert main(["data", "prepare", str(cs), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "image without a label" in out and not (cs / "lists").exists()
    import shutil

    shutil.rmtree(cs / "gtFine")
    assert main(["data", "prepare", str(cs)]) == 1
    assert "gtFine" in capsys.readouterr().err


def test_palette_and_16_bit_labelids_are_read_by_one_rule(cs, capsys):
    ids = _val_ids(cs)
    original = [np.array(Image.open(p)) for p in ids]
    pal = Image.fromarray(original[0])
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    pal.save(ids[0])  # P mode: the indices are the label ids
    Image.fromarray(original[1].astype(np.uint16)).save(ids[1])  # 16-bit grey
    assert Image.open(ids[0]).mode == "P" and Image.open(ids[1]).mode.startswith("I")
    assert main(["data", "check", str(cs), "--workers", "1", "--split", "val"]) == 0
    from segcompare.data.labels import ID_TO_TRAIN_ID

    ds = CityscapesDataset(cs, "val")
    for i in range(2):
        assert np.array_equal(ds[i]["label"], ID_TO_TRAIN_ID[original[i]])


def test_check_names_a_split_that_is_a_file_and_a_truncated_polygons_json(cs, capsys):
    (cs / "leftImg8bit" / "test").write_text("not a folder")
    poly = next((cs / "gtFine" / "val").glob("*/*_polygons.json"))
    poly.write_text(poly.read_text()[:20])
    assert main(["data", "check", str(cs), "--workers", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    _one_line(lines, cs / "leftImg8bit" / "test", "is a file")
    _one_line(lines, poly, "truncated or not JSON")


def test_a_split_without_a_labelled_pixel_is_an_error(folder5, tmp_path, capsys):
    root, _ = folder5
    for i in range(3):
        _save(root / "ann_dir" / "val" / f"im{i}.png", np.full(HW, 255, np.uint8))
        _save(tmp_path / "pred" / f"im{i}.png", np.zeros(HW, np.uint8))
    assert main(["eval", "--pred-dir", str(tmp_path / "pred"), "--data", str(root),
                 "--workers", "0"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "no labelled pixel" in err[0] and "'val'" in err[0]


def test_lonely_files_are_errors_naming_the_file(folder5):
    root, _ = folder5
    (root / "ann_dir" / "val" / "im2.png").unlink()
    with pytest.raises(SegcompareError, match=r"im2\.png: image without a mask"):
        CityscapesDataset(root, "val")


# --- predict and video read the class table the weights carry ------------------------------------
@pytest.mark.parametrize("which", ["ade20k", "folder5"])
def test_predict_labelid_writes_the_data_sets_own_ids(tmp_path, capsys, which):
    import torch

    from segcompare.data.labels import ADE20K, ClassTable
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    if which == "ade20k":
        table = ADE20K  # its own ids: 1..150, from the fixture below
        ref = json.loads((Path(__file__).parent / "fixtures/ade20k_mmseg_metainfo.json")
                         .read_text())
        own = np.arange(1, len(ref["classes"]) + 1)
    else:
        table = ClassTable("folder", tuple(NAMES5), tuple(map(tuple, COLOURS5)),
                           label_ids=tuple(range(5)))
        own = np.arange(5)
    torch.manual_seed(0)
    model = build_model("segformer-b0", num_classes=table.num_classes, depths=(1, 1, 1, 1),
                        embed_dims=(8, 16, 24, 32), decoder_dim=16, num_heads=(1, 1, 1, 1))
    weights = save_weights(model, tmp_path / "w.safetensors", class_table=table)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    _save(tmp_path / "in" / "x.png", image)
    for fmt in ("trainid", "labelid", "color"):
        assert main(["predict", str(tmp_path / "in"), "--weights", str(weights), "--out",
                     str(tmp_path / fmt), "--format", fmt, "--mode", "whole"]) == 0
    train = np.array(Image.open(tmp_path / "trainid" / "x.png"))
    label = np.array(Image.open(tmp_path / "labelid" / "x.png"))
    colour = np.array(Image.open(tmp_path / "color" / "x.png"))
    assert np.array_equal(label, own[train])
    assert np.array_equal(colour, np.array(table.palette, np.uint8)[train])


def test_video_legend_names_the_class_tables_classes():
    from segcompare.data.labels import ClassTable
    from segcompare.infer.video import legend

    table = ClassTable("folder", ("a", "b"), ((1, 200, 3), (250, 4, 5)))
    strip = legend(400, 18, 2, table)
    colours = {tuple(c) for c in strip.reshape(-1, 3).tolist()}
    assert (1, 200, 3) in colours and (250, 4, 5) in colours
