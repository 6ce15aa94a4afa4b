"""Make every figure in docs/ and the README's demo table from ONE `segcompare demo` run folder.

    python docs/make_figures.py segcompare-demo                  # docs/ and README.md here
    python docs/make_figures.py RUN --docs OUT --readme none     # elsewhere (the test suite)

From RUN (the demo's --out folder) it writes into the docs folder:

    demo_per_class_iou.png   the report's per_class_iou.png, as it is
    demo_side_by_side.gif    the side-by-side video of the run's final weights on the run's
                             synthetic drive, every third frame at 6 fps (a page-sized GIF)
    report.png               the top of RUN/report.html, screenshotted with headless Chromium
                             (--no-screenshot: left as it is, and figures.json says so)
    figures.json             which run every file came from: the folder, its weights' SHA-256,
                             the machine its times were measured on, when

and replaces the table between `<!-- demo-table -->` and `<!-- /demo-table -->` in the README
with the run's `segcompare demo` summary table, so the page's figures and numbers agree.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLE_START, TABLE_END = "<!-- demo-table -->", "<!-- /demo-table -->"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SCREENSHOT_PX = (1400, 2400)  # width, height of report.png
GIF_EVERY, GIF_FPS = 3, 6.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a `segcompare demo` output folder")
    p.add_argument("--docs", type=Path, default=HERE, help="where the figures go (docs/)")
    p.add_argument(
        "--readme", default=str(HERE.parent / "README.md"),
        help="the README whose demo table is replaced ('none': no README)",
    )  # fmt: skip
    p.add_argument("--no-screenshot", action="store_true", help="leave report.png as it is")
    args = p.parse_args(argv)

    from segcompare.utils import SegcompareError

    try:
        made = make_figures(args.run, args.docs, None if args.readme == "none" else
                            Path(args.readme), screenshot=not args.no_screenshot)
    except SegcompareError as err:
        print(f"make_figures: error: {err}", file=sys.stderr)
        return 1
    for line in made:
        print(line)
    return 0


def make_figures(run: Path, docs: Path, readme, screenshot: bool = True) -> list[str]:
    from segcompare.demo import summary_table
    from segcompare.utils import SegcompareError, atomic_path, atomic_write_text, make_dirs

    metrics = run / "metrics.json"
    if not (metrics.is_file() and (run / "demo.json").is_file()):
        raise SegcompareError(f"{run}: not a finished `segcompare demo` folder (no metrics.json "
                              "or demo.json)")
    doc = json.loads(metrics.read_text())
    weights = [Path(m["weights"]) for m in doc["models"]]
    for w in weights:
        if not w.is_file():
            raise SegcompareError(f"{w}: the run's weights are missing")
    browser = _browser() if screenshot else None  # refused before anything is made
    make_dirs(docs)
    made = []

    with atomic_path(docs / "demo_per_class_iou.png") as tmp:
        shutil.copyfile(run / "per_class_iou.png", tmp)
    made.append(f"wrote {docs / 'demo_per_class_iou.png'} (the report's per_class_iou.png)")

    frames = Path(doc["data"]) / "leftImg8bit_demoVideo" / "stuttgart_00"
    device = doc.get("meta", {}).get("device", "cpu")  # where the run's latencies were measured
    made.append(_gif(weights, frames, docs / "demo_side_by_side.gif", device))

    shot = None
    if screenshot:
        shot = _screenshot(browser, run / "report.html", docs / "report.png")
        made.append(f"wrote {shot} (headless Chromium, {SCREENSHOT_PX[0]}x{SCREENSHOT_PX[1]})")

    table = summary_table(doc)
    if readme is not None:
        _replace_table(readme, table)
        made.append(f"replaced the demo table in {readme}")

    meta = doc.get("meta", {})
    record = {
        "run": str(run.resolve()),
        "created": meta.get("created"),
        "weights": {m["name"]: {"file": m["weights"], "sha256": _sha256(Path(m["weights"]))}
                    for m in doc["models"]},
        "machine": meta.get("bench", {}),
        "made": datetime.datetime.now().isoformat(timespec="seconds"),
        "files": {
            "demo_per_class_iou.png": "per_class_iou.png of the run",
            "demo_side_by_side.gif": f"segcompare video of the run's weights on {frames}, "
                                     f"every {GIF_EVERY}rd frame, {GIF_FPS:g} fps",
            "report.png": ("screenshot of the run's report.html" if shot else
                           "NOT made from this run (--no-screenshot)"),
        },
        "table": table,
    }
    atomic_write_text(docs / "figures.json", json.dumps(record, indent=2) + "\n")
    made.append(f"wrote {docs / 'figures.json'}: every figure from {run.resolve()}")
    return made


def _gif(weights: list, frames: Path, out: Path, device: str) -> str:
    from segcompare.evaluate import InferenceSettings
    from segcompare.infer import Predictor, render_video
    from segcompare.models import build_model
    from segcompare.utils import SegcompareError

    if not frames.is_dir():
        raise SegcompareError(f"{frames}: the run's synthetic drive is gone (its cache was "
                              "cleared); rerun the demo")
    predictors = [Predictor(build_model(weights=w), InferenceSettings(device=device))
                  for w in weights]
    n = render_video(predictors, frames, out, fps=GIF_FPS, every=GIF_EVERY, progress=False)
    return f"wrote {out} ({n} frames of {frames})"


def _browser() -> str:
    from segcompare.utils import SegcompareError

    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SegcompareError(
            f"no headless Chromium ({', '.join(BROWSERS)}) on PATH for report.png: install one, "
            "or pass --no-screenshot (figures.json then says report.png is not from this run)"
        )
    return browser


def _screenshot(browser: str, html: Path, out: Path) -> Path:
    from segcompare.utils import atomic_path

    with tempfile.TemporaryDirectory() as profile, atomic_path(out) as tmp:
        subprocess.run(
            [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={SCREENSHOT_PX[0]},{SCREENSHOT_PX[1]}",
             f"--screenshot={tmp}", html.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return out


def _replace_table(readme: Path, table: str) -> None:
    from segcompare.utils import SegcompareError, atomic_write_text

    text = readme.read_text()
    pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SegcompareError(f"{readme}: needs one {TABLE_START} ... {TABLE_END} block")
    block = f"{TABLE_START}\n{table}\n{TABLE_END}"
    atomic_write_text(readme, pattern.sub(lambda _: block, text))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    raise SystemExit(main())
