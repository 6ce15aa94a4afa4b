import os

import pytest

from segcompare.utils import atomic_path, atomic_write_text


def test_atomic_write_has_plain_file_mode(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "hi")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "hi"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "b.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]
