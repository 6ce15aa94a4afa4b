import pytest

from segcompare.data import labels as L


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
