import json
import re

import numpy as np
import pytest
from PIL import Image

from segcompare.data.labels import ID_TO_TRAIN_ID, INSTANCE_CLASS_NAMES, LABEL_BY_NAME
from segcompare.data.synth import make_synthetic_cityscapes, synthetic_sample

NAME = re.compile(r"^[a-z]+_\d{6}_\d{6}$")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    counts = make_synthetic_cityscapes(root, train=3, val=2, test=1, size=(128, 256), seed=3,
                                       video_frames=4)
    return root, counts


def test_layout_names_and_files(synth):
    root, counts = synth
    assert counts == {"train": 3, "val": 2, "test": 1, "video": 4}
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == n
        for image in images:
            city, name = image.parent.name, image.name[: -len("_leftImg8bit.png")]
            assert NAME.match(name) and name.startswith(city + "_")
            gt = root / "gtFine" / split / city
            for kind in ("labelIds", "color", "instanceIds"):
                assert (gt / f"{name}_gtFine_{kind}.png").exists()
            assert (gt / f"{name}_gtFine_polygons.json").exists()
            rgb = Image.open(image)
            assert rgb.mode == "RGB" and rgb.size == (256, 128)
            assert Image.open(gt / f"{name}_gtFine_labelIds.png").mode == "L"
            assert Image.open(gt / f"{name}_gtFine_instanceIds.png").mode.startswith("I")
    frames = sorted((root / "leftImg8bit_demoVideo" / "stuttgart_00").glob("*.png"))
    assert [f.name for f in frames] == [
        f"stuttgart_00_000000_{i:06d}_leftImg8bit.png" for i in range(1, 5)]


def test_color_images_use_the_official_palette(synth):
    cs = pytest.importorskip("cityscapesscripts.helpers.labels")
    root, _ = synth
    lut = np.zeros((256, 3), np.uint8)
    for label in cs.labels:
        if label.id >= 0:
            lut[label.id] = label.color
    for ids_path in (root / "gtFine").glob("*/*/*_labelIds.png"):
        ids = np.asarray(Image.open(ids_path))
        color = np.asarray(Image.open(str(ids_path).replace("labelIds", "color")))
        assert color.shape[2] == 4 and (color[..., 3] == 255).all()  # RGBA, as the real set
        assert np.array_equal(color[..., :3], lut[ids])


def test_polygons_reproduce_label_and_instance_images_with_cityscapesscripts(synth):
    """Our polygons.json, drawn by cityscapesscripts, give exactly our labelIds/instanceIds."""
    pytest.importorskip("cityscapesscripts")
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    root, _ = synth
    files = sorted((root / "gtFine").glob("*/*/*_polygons.json"))
    assert len(files) == 6
    for path in files:
        ann = Annotation()
        ann.fromJsonFile(str(path))
        ids = np.asarray(Image.open(str(path).replace("polygons.json", "labelIds.png")))
        inst = np.asarray(Image.open(str(path).replace("polygons.json", "instanceIds.png")))
        assert np.array_equal(np.asarray(createLabelImage(ann, "ids")), ids)
        assert np.array_equal(np.asarray(createInstanceImage(ann, "ids")), inst)


def test_instance_ids_encode_class_and_index():
    _, ids, inst, polygons = synthetic_sample(0, 1, (256, 512))
    inst = inst.astype(np.int64)
    cls = np.where(inst >= 1000, inst // 1000, inst)
    assert np.array_equal(cls, ids)
    instance_ids = {LABEL_BY_NAME[n].id for n in INSTANCE_CLASS_NAMES}
    assert (np.isin(ids, list(instance_ids)) == (inst >= 1000)).all()
    cars = [p for p in polygons if p["label"] == "car"]
    assert len(np.unique(inst[ids == 26])) > 1 and len(cars) >= len(np.unique(inst[ids == 26]))
    assert {p["label"] for p in polygons} <= set(LABEL_BY_NAME)


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_cityscapes(tmp_path / "a", train=2, val=0, size=(64, 128), seed=5)
    make_synthetic_cityscapes(tmp_path / "b", train=2, val=0, size=(64, 128), seed=5)
    make_synthetic_cityscapes(tmp_path / "c", train=2, val=0, size=(64, 128), seed=6)
    assert a["train"] == 2
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 8
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    rel = next(f for f in files if f.name.endswith("leftImg8bit.png"))
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_any_five_images_show_at_least_15_train_classes():
    present = []
    for i in range(9):
        _, ids, _, _ = synthetic_sample(11, i, (256, 512))
        present.append(set(np.unique(ID_TO_TRAIN_ID[ids]).tolist()) - {255})
    for start in range(len(present) - 4):
        assert len(set().union(*present[start : start + 5])) >= 15
    # ...and some void (ignored) pixels, as the ego vehicle in the real set
    assert any((ID_TO_TRAIN_ID[synthetic_sample(11, i, (128, 256))[1]] == 255).mean() > 0.03
               for i in range(3))


def test_video_moves_smoothly(synth):
    root, _ = synth
    frames = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(
        (root / "leftImg8bit_demoVideo" / "stuttgart_00").glob("*.png"))]
    step = np.abs(frames[1] - frames[0]).mean()
    other = np.asarray(Image.open(next((root / "leftImg8bit" / "train").glob("*/*.png"))),
                       dtype=np.float32)
    assert 0 < step < 0.5 * np.abs(frames[0] - other).mean()


def test_polygons_json_format(synth):
    root, _ = synth
    doc = json.loads(next((root / "gtFine" / "val").glob("*/*_polygons.json")).read_text())
    assert doc["imgHeight"] == 128 and doc["imgWidth"] == 256
    obj = doc["objects"][0]
    assert set(obj) == {"label", "polygon"} and all(len(p) == 2 for p in obj["polygon"])
