import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segcompare.cli import main
from segcompare.data.cityscapes import (
    BadSampleError,
    CityscapesDataset,
    check_dataset,
    prepare_dataset,
)
from segcompare.data.synth import make_synthetic_cityscapes
from segcompare.data.transforms import build_train_transform
from segcompare.utils import is_temporary


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    make_synthetic_cityscapes(root, train=4, val=2, size=(64, 128), seed=1)
    return root


@pytest.fixture
def root(pristine, tmp_path):
    copy = tmp_path / "cs"
    shutil.copytree(pristine, copy)
    return copy


def _cs_train_id_lut():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    lut = np.full(256, 255, np.int64)
    for lb in labels.labels:
        if lb.id >= 0:
            lut[lb.id] = lb.trainId if lb.trainId >= 0 else 255
    return lut


def test_dataset_reads_label_ids_and_converts(pristine):
    lut = _cs_train_id_lut()
    ds = CityscapesDataset(pristine, "train", with_instances=True)
    assert len(ds) == 4 and all(lab.endswith("_gtFine_labelIds.png") for _, lab in ds.samples)
    sample = ds[0]
    assert set(sample) == {"image", "label", "name", "image_path", "instances"}
    assert sample["image"].shape == (64, 128, 3) and sample["image"].dtype == np.uint8
    assert sample["name"] == "aachen_000000_000019"
    ids = np.asarray(Image.open(ds.samples[0][1]))
    assert np.array_equal(sample["label"], lut[ids])
    assert sample["instances"].dtype == np.int32
    rgb = np.asarray(Image.open(sample["image_path"]).convert("RGB"))
    assert np.array_equal(sample["image"], rgb)


def test_prepare_equals_the_official_conversion(root):
    """createTrainIdLabelImgs draws each polygon with its trainId (json2labelImg "trainIds"):
    run exactly that on the polygons, and compare with the id -> trainId table too."""
    pytest.importorskip("cityscapesscripts")
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    lut = _cs_train_id_lut()
    report = prepare_dataset(root, workers=2, progress=False)
    assert (report.written, report.skipped, report.problems) == (6, 0, [])
    for ids_path in sorted(root.glob("gtFine/*/*/*_labelIds.png")):
        ours = np.asarray(Image.open(str(ids_path).replace("labelIds", "labelTrainIds")))
        ann = Annotation()
        ann.fromJsonFile(str(ids_path).replace("labelIds.png", "polygons.json"))
        assert np.array_equal(ours, np.asarray(createLabelImage(ann, "trainIds")))
        assert np.array_equal(ours, lut[np.asarray(Image.open(ids_path))])
    again = prepare_dataset(root, workers=1, progress=False)
    assert (again.written, again.skipped) == (0, 6)
    lines = (root / "lists" / "train.lst").read_text().splitlines()
    assert len(lines) == 4
    image, label = lines[0].split("\t")
    assert (root / image).exists() and label.endswith("_gtFine_labelTrainIds.png")
    assert not [p for p in root.rglob("*") if is_temporary(p)]
    # the dataset now reads the prepared files, with the same result
    ds = CityscapesDataset(root, "val")
    assert ds.samples[0][1].endswith("_labelTrainIds.png")
    ids = np.asarray(Image.open(ds.samples[0][1].replace("labelTrainIds", "labelIds")))
    assert np.array_equal(ds[0]["label"], lut[ids])


def test_check_passes_on_a_good_set(root, capsys):
    report = check_dataset(root, workers=1, progress=False)
    assert report.ok and report.counts == {"train": 4, "val": 2}
    assert main(["data", "check", str(root), "--split", "val", "--workers", "1"]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_names_every_bad_file(root, capsys):
    gt = root / "gtFine" / "train" / "aachen"
    img = root / "leftImg8bit" / "train" / "bochum"
    truncated = img / "bochum_000000_000019_leftImg8bit.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (gt / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    wrong_size = gt / "aachen_000001_000019_gtFine_instanceIds.png"
    Image.fromarray(np.zeros((32, 64), np.uint16)).save(wrong_size)
    unknown = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png"
    ids = np.asarray(Image.open(unknown)).copy()
    ids[0, 0] = 77
    Image.fromarray(ids).save(unknown)

    assert main(["data", "check", str(root), "--workers", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(str(truncated) in line and "unreadable" in line for line in out)
    assert any(line.startswith(str(gt / "aachen_000000_000019_gtFine_labelIds.png"))
               and "missing" in line for line in out)
    assert any(line.startswith(str(wrong_size)) and "size 64x32" in line for line in out)
    assert any(line.startswith(str(unknown)) and "77" in line for line in out)
    assert "4 problem(s)" in out[-1]


def test_bad_samples_raise_or_are_skipped(root, caplog):
    bad = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadSampleError, match="aachen_000000_000019_leftImg8bit.png"):
        CityscapesDataset(root, "train")[0]
    ds = CityscapesDataset(root, "train", skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="segcompare.data.cityscapes"):
        first, again = ds[0], ds[0]
    assert first["name"] == ds[1]["name"] != "aachen_000000_000019"
    assert first["skipped"] == again["skipped"] == 1 and ds[1]["skipped"] == 0
    assert ds.bad_files == {str(bad)}
    assert len([r for r in caplog.records if "aachen_000000_000019" in r.message]) == 1  # once
    # a missing label: an error naming the image, or the sample left out
    next(root.glob("gtFine/val/*/*_labelIds.png")).unlink()
    with pytest.raises(BadSampleError, match="no label"):
        CityscapesDataset(root, "val")
    assert len(CityscapesDataset(root, "val", skip_bad=True)) == 1


def test_unknown_label_id_is_never_silently_ignored(root):
    path = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png"
    ids = np.asarray(Image.open(path)).copy()
    ids[5, 5] = 200
    Image.fromarray(ids).save(path)
    with pytest.raises(BadSampleError, match=r"unknown label ids \[200\]"):
        CityscapesDataset(root, "val")[0]


def test_samples_depend_only_on_seed_epoch_index(pristine, tmp_path):
    transform = build_train_transform("segformer", crop_size=(32, 32), base_size=128)
    ds = CityscapesDataset(pristine, "train", transform, seed=4)
    a = ds[(2, 5)]
    b = CityscapesDataset(pristine, "train", transform, seed=4)[(2, 5)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(5)
    assert torch.equal(ds[2]["image"], a["image"])
    assert not torch.equal(ds[(2, 6)]["image"], a["image"])
    # the same through worker processes
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=[(2, 5), (0, 5)],
                                         num_workers=2)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][0], a["image"])
    # and with the decoded cache (first read fills it, second reads it)
    cached = CityscapesDataset(pristine, "train", transform, seed=4, cache_dir=tmp_path / "c")
    for _ in range(2):
        c = cached[(2, 5)]
        assert torch.equal(c["image"], a["image"]) and torch.equal(c["label"], a["label"])
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 2


def test_transform_without_rng_argument(pristine):
    ds = CityscapesDataset(pristine, "val", transform=lambda image, label: (image[:8], label[:8]))
    assert ds[0]["image"].shape == (8, 128, 3)
