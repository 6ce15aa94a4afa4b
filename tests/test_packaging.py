"""The package as a user installs it: a wheel (not the checkout) in a fresh virtual environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(dest: Path) -> Path:
    """Build the wheel from a copy of the source (no build/ or egg-info left in the checkout),
    offline: with the setuptools of this environment (the `test` extra installs it)."""
    pytest.importorskip("setuptools")
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "configs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name)
        else:
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "segcompare", src / "segcompare", symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )  # fmt: skip
    wheels = dest / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", str(src), "-w", str(wheels)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("segcompare-*.whl")
    return wheel


@pytest.mark.slow  # a minute or more: a wheel build and the tiny demo in a fresh process
def test_wheel_in_a_fresh_venv_runs_the_demo(tmp_path):
    wheel = _build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    # The dependencies (torch, ...) come from this environment's site-packages, appended after
    # the venv's own: a path in a .pth file is added as it is (its own .pth files, such as an
    # editable install of segcompare, are not run), so `import segcompare` is the wheel's.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_segcompare_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing of it on the path
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    where = subprocess.run(
        [str(python), "-c", "import segcompare, pathlib; print(pathlib.Path(segcompare.__file__))"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where
    script = env_dir / ("Scripts/segcompare.exe" if os.name == "nt" else "bin/segcompare")
    run = subprocess.run(
        [str(script), "demo", "--tiny", "--out", "demo-out"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = elsewhere / "demo-out"
    for name in ("metrics.json", "report.html", "side_by_side.gif", "demo.json"):
        assert (out / name).is_file(), name
