"""The package as a user installs it: a wheel (not the checkout) in a fresh virtual environment,
with the dependencies its metadata declares and nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
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


def _requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:")]  # fmt: skip


def _link_dependencies(requires: list[str], folder: Path) -> set[str]:
    """Link into `folder` the top-level modules and dist-info of every installed distribution
    that `requires` needs here (markers evaluated, extras followed), recursively; their names.
    A requirement of the wheel itself that is not installed here fails the test."""
    requirements = pytest.importorskip("packaging.requirements")
    from packaging.utils import canonicalize_name

    folder.mkdir()
    todo = [(requirements.Requirement(r), True) for r in requires]
    done: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        req, own = todo.pop()
        extras = sorted(req.extras) or [""]
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue  # another platform, Python or extra
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            assert not own, f"{req.name}, a requirement of the wheel, is not installed here"
            continue  # pip check below says whether it was needed
        if (name, tuple(extras)) in done:
            continue
        done.add((name, tuple(extras)))
        for top in sorted({f.parts[0] for f in dist.files or ()} - {"..", "__pycache__"}):
            link = folder / top
            if not link.exists():
                link.symlink_to(dist.locate_file(top))
        for r in dist.requires or ():
            sub = requirements.Requirement(r)
            if sub.marker and not any(sub.marker.evaluate({"extra": e}) for e in extras):
                continue
            todo.append((sub, False))
    return {name for name, _ in done}


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
    # Its dependencies: the distributions its metadata requires, and theirs, taken from this
    # environment (offline, whatever pip's configuration and whoever runs it) into a folder of
    # their own that the venv's path names, so a module the wheel needs and does not declare
    # is missing there, as it would be for a user.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    deps = tmp_path / "dependencies"
    names = _link_dependencies(_requires(wheel), deps)
    assert "torch" in names
    (Path(purelib) / "_segcompare_test_deps.pth").write_text(f"{deps}\n")
    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr  # every requirement, every version

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
