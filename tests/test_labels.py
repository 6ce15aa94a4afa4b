import numpy as np
import pytest

from segcompare.data import labels as L
from segcompare.utils import SegcompareError


def test_labels_equal_cityscapesscripts():
    cs = pytest.importorskip("cityscapesscripts.helpers.labels")
    ours = [(lb.name, lb.id, lb.train_id, lb.category, lb.category_id, lb.has_instances,
             lb.ignore_in_eval, lb.color) for lb in L.LABELS]
    theirs = [(lb.name, lb.id, lb.trainId, lb.category, lb.categoryId, lb.hasInstances,
               lb.ignoreInEval, tuple(lb.color)) for lb in cs.labels]
    assert ours == theirs


def test_train_classes():
    assert len(L.CLASS_NAMES) == 19
    assert L.CLASS_NAMES[0] == "road" and L.CLASS_NAMES[-1] == "bicycle"
    assert L.CATEGORY_NAMES == ("flat", "construction", "object", "nature", "sky", "human",
                                "vehicle")
    assert L.ID_TO_TRAIN_ID[7] == 0 and L.ID_TO_TRAIN_ID[33] == 18 and L.ID_TO_TRAIN_ID[0] == 255
    assert L.ID_TO_TRAIN_ID[29] == 255  # caravan: not a train class
    assert L.TRAIN_ID_TO_ID[13] == 26


def test_palette_of_19_classes_is_the_official_one_bit_for_bit():
    cs = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = sorted((lb.trainId, lb.color) for lb in cs.labels if 0 <= lb.trainId < 255)
    table = L.palette(19)
    assert table.dtype == np.uint8 and table.shape == (256, 3)
    assert table[:19].tolist() == [list(color) for _, color in official]
    assert not table[19:].any()  # no class there, and 255 (ignore) black
    ids = np.array([[0, 18, 255], [7, 13, 1]], dtype=np.uint8)
    assert np.array_equal(L.colorize(ids), L.colorize(ids, 19))
    assert L.colorize(ids).tolist() == [
        [[128, 64, 128], [119, 11, 32], [0, 0, 0]], [[220, 220, 0], [0, 0, 142], [244, 35, 232]]
    ]
    assert L.class_names(19) == L.CLASS_NAMES


@pytest.mark.parametrize("k", [1, 2, 5, 18, 20, 25, 255])
def test_palette_of_other_counts_has_k_distinct_colours_none_black(k):
    table = L.palette(k)
    assert table.dtype == np.uint8 and table.shape == (256, 3)
    colours = {tuple(c) for c in table[:k].tolist()}
    assert len(colours) == k and (0, 0, 0) not in colours
    assert not table[k:].any()  # ids the model has no class for, and 255 (ignore), are black
    assert np.array_equal(table[: min(k, 5)], L.palette(5)[: min(k, 5)])  # a prefix of one map
    assert L.class_names(k) == tuple(f"class_{i}" for i in range(k))


def test_palette_is_the_bit_interleaving_map_from_colour_1():
    # PASCAL VOC's colour map (bits of the index spread over the channels' high bits), skipping
    # its colour 0 (black): class 0 is VOC colour 1
    assert L.palette(25)[:9].tolist() == [
        [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
        [128, 128, 128], [64, 0, 0], [192, 0, 0],
    ]
    ids = np.arange(19, 26, dtype=np.uint8)
    ids[-1] = 255
    colours = L.colorize(ids, 25)
    assert colours[:-1].any(axis=1).all() and not colours[-1].any()  # 19..24 coloured, 255 black
    assert L.colorize(np.array([3]), 5).tolist() != L.colorize(np.array([3])).tolist()


@pytest.mark.parametrize("k", [0, 256, 1000, 2.0, True])
def test_palette_refuses_counts_without_colours(k):
    with pytest.raises(SegcompareError, match="num_classes"):
        L.palette(k)


def test_ade20k_table_equals_mmseg_metainfo():
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "fixtures/ade20k_mmseg_metainfo.json").read_text())
    assert L.ADE20K.num_classes == 150 and L.ADE20K.reduce_zero_label
    assert list(L.ADE20K.names) == [n.strip() for n in ref["classes"]]
    assert [list(c) for c in L.ADE20K.palette] == ref["palette"]
    assert L.ADE20K.label_ids == tuple(range(1, 151))  # the files' values before the reduction
    assert L.ADE20K.train_id_to_label_id()[[0, 149, 255]].tolist() == [1, 150, 0]


def test_cityscapes_table_is_the_train_label_table():
    cs = pytest.importorskip("cityscapesscripts.helpers.labels")
    train = sorted((lb.trainId, lb.name, lb.color, lb.id) for lb in cs.labels
                   if 0 <= lb.trainId < 255)
    assert L.CITYSCAPES.names == tuple(n for _, n, _, _ in train)
    assert L.CITYSCAPES.palette == tuple(tuple(c) for _, _, c, _ in train)
    assert L.CITYSCAPES.label_ids == tuple(i for _, _, _, i in train)
    assert np.array_equal(L.CITYSCAPES.train_id_to_label_id(), L.TRAIN_ID_TO_ID)
    assert not L.CITYSCAPES.reduce_zero_label and L.CITYSCAPES.ignore_index == 255


@pytest.mark.parametrize("table", [L.CITYSCAPES, L.ADE20K, L.generic_table(5)])
def test_class_table_json_round_trip_is_plain_json(table):
    import json

    text = json.dumps(table.to_json())
    assert L.ClassTable.from_json(json.loads(text)) == table
    assert table.id2label()["0"] == table.names[0]


def test_generic_table_is_what_palette_and_class_names_give():
    for k in (1, 5, 19, 150):
        t = L.generic_table(k)
        assert t.names == L.class_names(k) and np.array_equal(t.palette_256(), L.palette(k))
    assert L.generic_table(19) is L.CITYSCAPES


@pytest.mark.parametrize("bad", [
    {"name": "x", "names": ["a", "b"], "palette": [[0, 0, 0]]},
    {"name": "x", "names": ["a"], "palette": [[0, 0, 300]]},
    {"name": "x", "names": ["a"], "palette": [[0, 0, 0]], "ignore_index": 0},
    {"name": "x", "names": ["a"]},
])
def test_a_malformed_class_table_is_one_error(bad):
    with pytest.raises(SegcompareError, match="class table"):
        L.ClassTable.from_json(bad)
