"""Shared helpers of the bad-input battery (issue 15): a user who makes mistakes, an attacker.

Every case asserts the exit code, a one-line error naming the file, key or value at fault, no
traceback, and that nothing half-written is left behind. The helpers (names are stable; both
test_inputs.py and test_files.py use them):

- `run_cli(*argv, timeout=120, env=None, cwd=None) -> (rc, out, err)`: `python -m segcompare`
  in a subprocess of this checkout (for cases that need a real process: signals, exit codes
  of the interpreter, strace).
- `cli` (fixture): `cli(*argv) -> (rc, out, err)`, `segcompare.cli.main(argv)` in this process
  with the output captured; argparse's exit (code 2) is returned as rc, not raised. Cheaper
  than a subprocess: prefer it where a process of its own is not needed.
- `assert_one_line_error(rc, err, *must_name)`: non-zero exit, exactly one non-empty stderr
  line (log lines from `logging` excepted only if `allow_log=True`), no "Traceback", and each
  string of `must_name` in that line.
- `assert_no_partial(path)`: no `*.tmp` temporaries under `path` (a folder) and, if `path`
  is a file path, that it does not exist.
- `tiny_data` (session fixture): a synthetic Cityscapes (train 2, val 2, 64x128, 2 demo-video
  frames) in the real layout; treat it as read-only (copy it to change it).
- `tiny_weights` (session fixture): a dict {"segformer": Path, "hrnet": Path} of seeded,
  small models saved as our safetensors (a 1-block SegFormer-B0, HRNet-W18-Small-v1).
- `readonly_dir` (fixture): an empty folder that cannot be written to (chmod 0555 for a normal
  user; a read-only tmpfs mount for root); skips with the reason where neither works.
- `write_refusal(folder) -> str`: what the system itself says to a write in `folder`
  ("Permission denied" in the 0555 folder, "Read-only file system" on the read-only mount), so
  a test demands the reason its own setup really produces, as root and as a normal user.
- `full_fs` (fixture): a folder on a tiny tmpfs that is already full (writes fail with ENOSPC);
  skips with the reason where mounting is not allowed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from segcompare.utils import is_temporary

REPO = Path(__file__).resolve().parents[2]


def _env(env: dict | None = None) -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "1")
    out["HF_HUB_OFFLINE"] = "1"  # no test of the battery may reach the network
    out.update(env or {})
    return out


def run_cli(*argv, timeout: float = 120, env: dict | None = None, cwd=None):
    """`python -m segcompare ARGV` in a subprocess -> (returncode, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "segcompare", *[str(a) for a in argv]],
        capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=cwd,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def cli(capsys):
    """`cli(*argv) -> (rc, out, err)`: segcompare.cli.main in this process, output captured."""
    from segcompare.cli import main

    def call(*argv):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as stop:  # argparse: exit 2 with its usage line
            rc = stop.code if isinstance(stop.code, int) else 1
        out, err = capsys.readouterr()
        return rc, out, err

    return call


def assert_one_line_error(rc: int, err: str, *must_name: str, allow_log: bool = False) -> str:
    """A user error: exit code not 0, one stderr line, no traceback, naming `must_name`."""
    assert rc not in (0, None), f"exit code {rc} for an error; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if allow_log:  # keep only the final error line (argparse's usage line is not logged)
        lines = [line for line in lines if "error:" in line] or lines
    else:
        lines = [line for line in lines if not line.startswith("usage:") and line[:1] != " "]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}: {err!r}"
    line = lines[0]
    for name in must_name:
        assert str(name) in line, f"{name!r} not named in {line!r}"
    return line


def assert_no_partial(path) -> None:
    """Nothing half-written: no temporaries under a folder, no file under a file's name."""
    path = Path(path)
    if path.is_dir():
        leftovers = [p for p in path.rglob("*") if is_temporary(p)]
        assert not leftovers, f"temporaries left: {leftovers}"
    else:
        assert not path.exists(), f"{path} was written"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from segcompare.data.synth import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("bad_input_data")
    make_synthetic_cityscapes(root, train=2, val=2, size=(64, 128), seed=0, video_frames=2)
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict:
    import torch

    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    root = tmp_path_factory.mktemp("bad_input_weights")
    torch.manual_seed(0)
    tiny = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), decoder_dim=32)
    paths = {"segformer": root / "b0.safetensors", "hrnet": root / "hr.safetensors"}
    save_weights(build_model("segformer-b0", **tiny), paths["segformer"])
    save_weights(build_model("hrnet-w18-small-v1"), paths["hrnet"])
    return paths


def _mount_tmpfs(path: Path, options: str) -> str | None:
    """Mount a tmpfs at `path`; None on success, else the reason it was refused."""
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if proc.returncode == 0:
        return None
    return proc.stderr.strip() or f"mount exited {proc.returncode}"


def _umount(path: Path) -> None:
    # lazy: detached at once even while a file in it is still open (a killed child's)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    path = tmp_path / "readonly"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            if _writable(path):  # a user with CAP_DAC_OVERRIDE ignores modes, as root does
                pytest.skip(f"{path} is mode 0555 yet writable: this user ignores file modes")
            yield path
        finally:
            path.chmod(0o755)
        return
    reason = _mount_tmpfs(path, "ro,size=64k")
    if reason:
        pytest.skip(f"root ignores file modes and a read-only tmpfs cannot be mounted: {reason}")
    try:
        assert not _writable(path), f"{path} is mounted read-only yet writable"
        yield path
    finally:
        _umount(path)


def _writable(folder: Path) -> bool:
    try:
        write_refusal(folder)
    except AssertionError:
        return True
    return False


def write_refusal(folder: Path) -> str:
    """The system's own words for a refused write in `folder` (its errno's strerror)."""
    probe = folder / ".probe"
    try:
        probe.mkdir()
    except OSError as err:
        return os.strerror(err.errno)
    probe.rmdir()
    raise AssertionError(f"{folder} can be written")


@pytest.fixture
def full_fs(tmp_path) -> Path:
    path = tmp_path / "full"
    path.mkdir()
    reason = _mount_tmpfs(path, "size=64k")
    if reason:
        pytest.skip(f"a small tmpfs cannot be mounted here: {reason}")
    try:
        with open(path / ".filler", "wb", buffering=0) as f:  # fill it: later writes: ENOSPC
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield path
    finally:
        _umount(path)


# --- Hypothesis profiles (test_fuzz.py) ---------------------------------------------------------
# "fast" (the default, CI): tens of examples per property, the same ones every run (derandomized),
# no example database written into the checkout. "deep" (SEGCOMPARE_HYPOTHESIS=deep): thousands,
# random, with the database in .hypothesis/ so that a failure found is replayed first next time.
from hypothesis import HealthCheck, settings  # noqa: E402

_NO_FIXTURE_CHECK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("fast", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_NO_FIXTURE_CHECK)
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=_NO_FIXTURE_CHECK)
settings.load_profile(os.environ.get("SEGCOMPARE_HYPOTHESIS", "fast"))
if settings().database is None:
    # Hypothesis also keeps caches (constants/, unicode_data/) in its home folder, ./.hypothesis by
    # default: the fast profile puts them in a temporary folder, so the suite writes nothing into
    # the checkout (.ci/run checks that as the unprivileged user).
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="segcompare-hypothesis-")
    set_hypothesis_home_dir(_HYPOTHESIS_HOME)
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
