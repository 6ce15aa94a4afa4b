"""Issue 23's "done means", as one chain through the command line: a 5-class folder data set made
here by hand (not by our synth) goes through `data check` -> fine-tune from a 19-class checkpoint
(`train` with the shipped folder template and model.init) -> `eval` -> `compare` -> HF export
(`convert`) -> transformers' `pipeline`, and at every step the class names and the figures are
checked against the set's own id2label.json and a NumPy computation of mmseg's IoUMetric from
the masks and the saved predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcompare.cli import main

NAMES = ["background", "meadow", "pond", "barn", "tractor"]  # none of them a Cityscapes class
COLOURS = [(40, 40, 40), (60, 200, 60), (40, 90, 220), (200, 40, 40), (230, 200, 30)]
HW = (48, 64)
TINY = ["model.overrides.depths=[1,1,1,1]", "model.overrides.embed_dims=[8,16,24,32]",
        "model.overrides.num_heads=[1,1,1,1]", "model.overrides.decoder_dim=16"]  # fmt: skip


def _hand_made_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An H×W×3 image and its H×W mask: a background with three rectangles of other classes,
    each class its own colour plus noise, and a strip of ignored (255) pixels."""
    mask = np.zeros(HW, np.uint8)
    for k in rng.choice(np.arange(1, 5), 3, replace=False):
        y, x = rng.integers(0, HW[0] - 16), rng.integers(0, HW[1] - 16)
        h, w = rng.integers(10, 17), rng.integers(10, 17)
        mask[y : y + h, x : x + w] = k
    image = np.array(COLOURS, np.float64)[mask] + rng.normal(0, 12, (*HW, 3))
    mask[:, :2] = 255  # an ignored border, as annotation tools leave
    return image.clip(0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mydata")
    rng = np.random.default_rng(23)
    for split, n in (("train", 6), ("val", 3)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            image, mask = _hand_made_sample(rng)
            Image.fromarray(image).save(root / "img_dir" / split / f"field_{i}.png")
            Image.fromarray(mask, mode="L").save(root / "ann_dir" / split / f"field_{i}.png")
    (root / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(NAMES)}))
    return root


def _mmseg_iou(preds: list[np.ndarray], masks: list[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """mmseg IoUMetric's per-class figures in NumPy: areas summed over images, 255 ignored."""
    inter, union, label_area = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, mask in zip(preds, masks):
        keep = mask != 255
        p, t = pred[keep].astype(np.int64), mask[keep].astype(np.int64)
        hit = p[p == t]
        i = np.bincount(hit, minlength=k)[:k]
        ap, at = np.bincount(p, minlength=k)[:k], np.bincount(t, minlength=k)[:k]
        inter, union, label_area = inter + i, union + ap + at - i, label_area + at
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"iou": inter / union, "acc": inter / label_area,
                "aacc": inter.sum() / label_area.sum()}  # fmt: skip


def _cli(capsys, *args: str) -> str:
    """Run a command that must succeed; its stdout and stderr together."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out + err


def test_a_hand_made_folder_set_through_the_whole_chain(folder_set, tmp_path, capsys, caplog):
    transformers = pytest.importorskip("transformers")
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    torch.set_num_threads(1)
    # 1. data check: OK, and the histogram is in the set's own class names
    out = _cli(capsys, "data", "check", folder_set)
    assert "OK (folder layout)" in out and "5 classes" in out
    assert all(name in out for name in NAMES)

    # 2. fine-tune from a 19-class (Cityscapes) checkpoint with the shipped template
    torch.manual_seed(0)
    city = build_model("segformer-b0", depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32),
                       num_heads=(1, 1, 1, 1), decoder_dim=16)  # fmt: skip
    save_weights(city, tmp_path / "city.safetensors")
    common = [*TINY, f"data.root={folder_set}", "data.crop_size=[32,32]", "data.img_scale=[64,48]",
              "data.base_size=64", "train.max_iters=6", "train.batch_size=2",
              "train.num_workers=0", "train.eval_every=0", "train.checkpoint_every=6",
              "train.log_every=3", "optim.warmup_iters=1", "optim.lr=1e-3"]  # fmt: skip
    runs = {}
    for name, init in (("init", tmp_path / "city.safetensors"), ("scratch", None)):
        sets = [*common, *([f"model.init={init}"] if init else [])]
        runs[name] = tmp_path / f"run_{name}"
        caplog.clear()
        _cli(capsys, "train", "finetune_segformer_b0_folder.yaml", "--out", runs[name],
             *[a for s in sets for a in ("--set", s)])
        # from the 19-class file only the classifier starts anew, said once
        said = [r for r in caplog.records if "has 19 classes, the model 5" in r.getMessage()]
        assert len(said) == (init is not None)
    weights = runs["init"] / "final.safetensors"

    # 3. eval: the set's names; every figure equals mmseg's IoUMetric in NumPy, computed from the
    # masks and the predictions `eval --save-pred` wrote (the set's own ids: class indices)
    _cli(capsys, "eval", "--weights", weights, "--data", folder_set, "--workers", "0",
         "--device", "cpu", "--json", tmp_path / "eval.json", "--save-pred", tmp_path / "pred")
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert list(ev["per_class"]) == NAMES and "miiou" not in ev and "category_miou" not in ev
    masks_dir = folder_set / "ann_dir" / "val"
    stems = sorted(p.stem for p in masks_dir.glob("*.png"))
    masks = [np.array(Image.open(masks_dir / f"{s}.png")) for s in stems]
    preds = [np.array(Image.open(tmp_path / "pred" / f"{s}.png")) for s in stems]
    assert all(p.max() < 5 for p in preds)
    hand = _mmseg_iou(preds, masks, 5)
    got = np.array([ev["per_class"][n]["iou"] for n in NAMES], np.float64)
    np.testing.assert_allclose(got, hand["iou"], atol=1e-9)
    assert ev["miou"] == pytest.approx(np.nanmean(hand["iou"]), abs=1e-9)
    assert ev["mean_acc"] == pytest.approx(np.nanmean(hand["acc"]), abs=1e-9)
    assert ev["pixel_acc"] == pytest.approx(hand["aacc"], abs=1e-9)

    # 4. compare: the fine-tuned run and the one from scratch, on the set's 5 classes
    report = tmp_path / "report"
    _cli(capsys, "compare", "--weights", f"{runs['init']},{runs['scratch']}", "--data",
         folder_set, "--out", report, "--device", "cpu", "--images", "1", "--bench-iters", "1",
         "--bench-warmup", "0", "--bootstrap", "20")
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["classes"]["names"] == NAMES and doc["num_images"] == 3
    first = doc["models"][0]
    assert list(first["per_class"]) == NAMES and list(first["boundary_iou_per_class"]) == NAMES
    assert list(first["per_class_iou_ci"]) == NAMES
    assert first["miou"] == pytest.approx(ev["miou"], abs=1e-12)  # compare scores as eval does
    assert first["category_miou"] is None and first["miiou"] is None
    md = (report / "report.md").read_text()
    assert "cat. mIoU" not in md and "5 classes of the data set (folder)" in md

    # 5. HuggingFace export: id2label and label2id are the set's
    _cli(capsys, "convert", weights, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(NAMES)}
    assert config["label2id"] == {n: i for i, n in enumerate(NAMES)}

    # 6. transformers' pipeline names the set's classes, and its segments are predict's whole-
    # image prediction (the export's preprocessing is ours: the image at its own size)
    segment = transformers.pipeline("image-segmentation", model=str(tmp_path / "hf"))
    image = Image.open(folder_set / "img_dir" / "val" / f"{stems[0]}.png").convert("RGB")
    items = segment(image)
    assert items and {item["label"] for item in items} <= set(NAMES)
    hf_pred = np.full(HW, 255, np.uint8)
    for item in items:
        hf_pred[np.array(item["mask"]) > 0] = NAMES.index(item["label"])
    source = folder_set / "img_dir" / "val" / f"{stems[0]}.png"
    _cli(capsys, "predict", source, "--weights", weights, "--out", tmp_path / "whole",
         "--mode", "whole", "--format", "trainid", "--device", "cpu")
    ours = np.array(Image.open(next((tmp_path / "whole").rglob("*.png"))))
    assert (ours == hf_pred).mean() > 0.99


def test_a_shipped_cityscapes_recipe_takes_the_sets_class_count(folder_set, tmp_path, capsys):
    """The shipped recipes leave model.num_classes to the data set (19 on Cityscapes): a
    Cityscapes recipe trains a 5-class model on a 5-class folder set without --set; a count
    given by hand that differs is one line that says what to pass."""
    from safetensors import safe_open

    torch.set_num_threads(1)
    sets = [*TINY, f"data.root={folder_set}", "data.crop_size=[32,32]", "data.base_size=64",
            "train.max_iters=1", "train.batch_size=2", "train.num_workers=0",
            "train.eval_every=0", "train.amp=off", "optim.warmup_iters=0"]  # fmt: skip
    args = ["train", "synthcity_segformer_b0.yaml", *[a for s in sets for a in ("--set", s)]]
    _cli(capsys, *args, "--out", tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "final.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["num_classes"] == "5" and json.loads(meta["class_names"]) == NAMES
    assert main([*args, "--set", "model.num_classes=19", "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.num_classes is 19" in err
    assert "--set model.num_classes=null" in err and "--set model.num_classes=5" in err
    assert not (tmp_path / "r2").exists()


def test_images_smaller_than_the_model_takes_are_refused_before_training(tmp_path, capsys):
    """A val image below the 32-pixel input both families need is one line naming it and its
    size before any training (the official tests do not pad at test time; crops are padded)."""
    root = tmp_path / "small"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(2):
            hw = (20, 24) if (split, i) == ("val", 1) else (40, 64)  # windows 40x32 in 40x64
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(
                root / "img_dir" / split / f"s{i}.png")
            Image.fromarray(rng.integers(0, 3, hw, dtype=np.uint8), mode="L").save(
                root / "ann_dir" / split / f"s{i}.png")
    (root / "id2label.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    sets = [*TINY, f"data.root={root}", "data.crop_size=[32,32]", "data.img_scale=[64,40]",
            "train.max_iters=1", "train.batch_size=2", "train.num_workers=0",
            "train.eval_every=1", "optim.warmup_iters=0"]  # fmt: skip
    rc = main(["train", "finetune_segformer_b0_folder.yaml", "--out", str(tmp_path / "run"),
               *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert str(root / "img_dir" / "val" / "s1.png") in err and "20x24" in err and "32" in err
    assert not (tmp_path / "run").exists()


def _palette_png(path: Path, indices: np.ndarray, palette: list[tuple[int, int, int]]) -> None:
    """An 8-bit palette PNG written chunk by chunk from the PNG specification (not by Pillow,
    whose writer shrinks the bit depth to the palette): `indices` as stored, PLTE `palette`."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w = indices.shape
    rows = b"".join(b"\x00" + indices[y].astype(np.uint8).tobytes() for y in range(h))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", bytes(v for c in palette for v in c))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )  # fmt: skip


def test_a_palette_shorter_than_the_mask_indices_reads_the_indices(folder_set, tmp_path, capsys):
    """A P-mode mask whose palette (3 colours) is shorter than its largest index (4) is read by
    its indices, as stored: no crash, no index mapped to a colour's class; `data check` says so
    in one warning line, and an index beyond the classes is one problem line naming it."""
    import shutil

    from segcompare.data.layouts import class_table, detect_layout, read_mask

    root = tmp_path / "set"
    shutil.copytree(folder_set, root)
    mask_path = root / "ann_dir" / "val" / "field_0.png"
    stored = np.array(Image.open(mask_path))
    stored[10:12, 10:12] = 4  # the last class, beyond the 3 colours
    _palette_png(mask_path, stored, [(0, 0, 0), (255, 0, 0), (0, 255, 0)])
    np.testing.assert_array_equal(read_mask(mask_path), stored)
    table = class_table(root, detect_layout(root))
    assert table.names == tuple(NAMES)
    out = _cli(capsys, "data", "check", root)
    said = [line for line in out.splitlines() if str(mask_path) in line]
    assert len(said) == 1 and "3 colour(s)" in said[0] and "index 4" in said[0]
    bad = stored.copy()
    bad[0, 5] = 6  # no class 6 in a 5-class set
    _palette_png(mask_path, bad, [(0, 0, 0)])
    assert main(["data", "check", str(root)]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if str(mask_path) in ln]
    assert len(lines) == 1 and "6 (1 px)" in lines[0]


def test_a_19_class_count_or_set_is_not_cityscapes():
    """Only Cityscapes' own table adds iIoU and categories: a count of 19, or a folder set of
    19 classes, gets mmseg's figures alone."""
    from segcompare.data.labels import CITYSCAPES, ClassTable, nameless_table
    from segcompare.metrics import ConfusionMatrix

    pred = torch.arange(19).repeat(4, 1)
    names = tuple(f"kind {i}" for i in range(19))
    folder19 = ClassTable("folder", names, nameless_table(19).palette)
    for classes in (19, folder19):
        cm = ConfusionMatrix(classes)
        cm.update(pred, pred)
        got = cm.compute()
        assert "miiou" not in got and "category_miou" not in got and got["miou"] == 1.0
    assert list(ConfusionMatrix(folder19).compute()["per_class"]) == list(folder19.names)
    cm = ConfusionMatrix(CITYSCAPES)
    cm.update(pred, pred)
    assert "category_miou" in cm.compute()


def test_a_recipe_with_another_sets_class_weights_says_what_to_pass(folder_set, tmp_path, capsys):
    """HRNet's Cityscapes recipes weight the 19 Cityscapes classes (its official
    class_weights): on a 5-class set that is one line naming both counts and what to --set."""
    sets = [f"data.root={folder_set}", "train.max_iters=1", "train.batch_size=2",
            "train.num_workers=0", "train.eval_every=0", "optim.warmup_iters=0"]  # fmt: skip
    rc = main(["train", "synthcity_hrnet_w18_small_v1.yaml", "--out", str(tmp_path / "run"),
               *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "train.class_weights has 19 values" in err and "5 classes" in err
    assert "--set train.class_weights=auto" in err and "--set train.class_weights=null" in err
    assert not (tmp_path / "run").exists()


def test_compare_on_an_ade20k_set_scores_its_150_classes_after_reduce_zero_label(tmp_path, capsys):
    """compare on an ADE20K-layout set: the 150 ADE20K names, each model run by its family's
    official ADE20K test (whole image, AlignedResize), every per-class IoU equal to mmseg's
    IoUMetric in NumPy on the masks after reduce_zero_label and the predictions eval saved."""
    from segcompare.data.labels import ADE20K
    from segcompare.data.synth.io import make_synthetic_layout
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    torch.set_num_threads(1)
    root = tmp_path / "ade"
    make_synthetic_layout(root, "ade20k", train=0, val=2, size=(48, 64), seed=0)
    torch.manual_seed(0)
    model = build_model("segformer-b0", num_classes=150, depths=(1, 1, 1, 1),
                        embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1), decoder_dim=16)
    weights = save_weights(model, tmp_path / "ade_b0.safetensors")  # a nameless 150: ADE20K's
    _cli(capsys, "compare", "--weights", weights, "--data", root, "--out", tmp_path / "report",
         "--device", "cpu", "--images", "1", "--bench-iters", "1", "--bench-warmup", "0",
         "--bootstrap", "0")
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert doc["classes"]["name"] == "ade20k" and doc["classes"]["reduce_zero_label"]
    (entry,) = doc["models"]
    assert tuple(entry["per_class"]) == ADE20K.names
    assert doc["meta"]["tests"][entry["label"]]["mode"] == "whole"
    assert "AlignedResize" in (tmp_path / "report" / "report.md").read_text()
    _cli(capsys, "eval", "--weights", weights, "--data", root, "--workers", "0", "--device",
         "cpu", "--save-pred", tmp_path / "pred")
    masks_dir = root / "ADEChallengeData2016" / "annotations" / "validation"
    if not masks_dir.is_dir():
        masks_dir = root / "annotations" / "validation"
    stems = sorted(p.stem for p in masks_dir.glob("*.png"))
    lut = np.full(256, 255, np.uint8)  # reduce_zero_label, by hand: 0 -> 255, v -> v - 1
    lut[1:151] = np.arange(150)
    masks = [lut[np.array(Image.open(masks_dir / f"{s}.png"))] for s in stems]
    preds = [lut[np.array(Image.open(tmp_path / "pred" / f"{s}.png"))] for s in stems]
    hand = _mmseg_iou(preds, masks, 150)
    got = np.array([entry["per_class"][n]["iou"] for n in ADE20K.names], np.float64)
    np.testing.assert_allclose(got, hand["iou"], atol=1e-9)
    assert entry["miou"] == pytest.approx(np.nanmean(hand["iou"]), abs=1e-9)
