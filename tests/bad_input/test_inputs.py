"""The bad-input battery, part A (issue 15): sliding windows, image modes, synth targets, sizes
and memory, numeric arguments, the Python API and which errors the CLI prints as one line.

One parametrised case per situation, including those that already behave; helpers in
conftest.py."""

from __future__ import annotations

import pytest
from conftest import assert_no_partial, assert_one_line_error, run_cli


# --- the helpers themselves -------------------------------------------------------------------
def test_unknown_model_is_one_line_in_process_and_in_a_subprocess(cli):
    rc, _, err = cli("stats", "no-such-model")
    assert_one_line_error(rc, err, "no-such-model")
    rc, _, err = run_cli("stats", "no-such-model")
    assert_one_line_error(rc, err, "no-such-model")


def test_readonly_and_full_helpers_refuse_writes(readonly_dir, full_fs):
    for folder in (readonly_dir, full_fs):
        with pytest.raises(OSError):
            (folder / "x").write_bytes(b"\0" * 65536)
    assert_no_partial(readonly_dir / "x")
