"""`segcompare demo --tiny`: the whole pipeline end to end, every output file checked."""

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from segcompare.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    out, cache = base / "out", base / "cache"
    rc = main(["demo", "--tiny", "--out", str(out), "--cache", str(cache)])
    assert rc == 0
    return out, cache


def test_demo_writes_every_output(demo, capsys):
    out, cache = demo
    for name in ("metrics.json", "report.md", "report.html", "side_by_side.gif", "demo.json",
                 "per_class_iou.png", "miou_vs_gmacs.png", "miou_vs_latency.png"):
        assert (out / name).is_file(), name
    for run in ("segformer_b0", "hrnet_w18_small_v1"):
        assert (out / "runs" / run / "final.safetensors").is_file()
        assert (out / "runs" / run / "log.jsonl").is_file()
    doc = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["segformer-b0", "hrnet-w18-small-v1"]
    for m in doc["models"]:
        assert 0.0 <= m["miou"] <= 1.0
    gif = Image.open(out / "side_by_side.gif")
    assert gif.n_frames == 3  # TINY renders every frame of its 3-frame drive
    # input | SegFormer | HRNet side by side: three 128-pixel-wide panels
    assert gif.size[0] == 3 * 128
    # the synthetic set is in the cache, complete, with no temporary folder left behind
    (data,) = cache.iterdir()
    assert (data / "leftImg8bit" / "val").is_dir()


def test_demo_rerun_reuses_every_step(demo, capsys):
    out, cache = demo
    stamp = (out / "metrics.json").stat().st_mtime
    start = time.time()
    assert main(["demo", "--tiny", "--out", str(out), "--cache", str(cache)]) == 0
    assert time.time() - start < 30
    assert (out / "metrics.json").stat().st_mtime == stamp
    printed = capsys.readouterr().out
    assert "segformer-b0" in printed and "report:" in printed
    # both mIoUs with their intervals, and the pair's verdict
    doc = json.loads((out / "metrics.json").read_text())
    for m in doc["models"]:
        lo, hi = m["miou_ci"]
        assert f"{m['label']}: {100 * m['miou']:.1f} ({100 * lo:.1f}–{100 * hi:.1f})" in printed
    (pair,) = doc["pairwise"]
    assert f"segformer-b0 − hrnet-w18-small-v1: {100 * pair['diff']:+.1f}" in printed
    assert pair["verdict"] in printed or "better" in printed
    for name in ("per_image.csv", "training_curves.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and "What training cost" in md and "| no training log |" not in md


def test_demo_bad_input_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nope"),
                 "--weights", "a.safetensors"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_demo_on_given_data_and_weights_trains_nothing(demo, tmp_path, capsys):
    """`--data ROOT --weights A,B` (real Cityscapes and released checkpoints in real use): the
    same comparison and video, without synthesis or training."""
    out, cache = demo
    (data,) = cache.iterdir()
    weights = [out / "runs" / run / "final.safetensors"
               for run in ("segformer_b0", "hrnet_w18_small_v1")]
    given = tmp_path / "given"
    argv = ["demo", "--tiny", "--out", str(given), "--data", str(data),
            "--weights", ",".join(str(w) for w in weights)]
    assert main(argv) == 0
    assert not (given / "runs").exists()
    doc = json.loads((given / "metrics.json").read_text())
    assert [m["weights"] for m in doc["models"]] == [str(w) for w in weights]
    mine = {m["name"]: m["miou"] for m in json.loads((out / "metrics.json").read_text())["models"]}
    assert {m["name"]: m["miou"] for m in doc["models"]} == pytest.approx(mine, abs=1e-9)
    assert (given / "side_by_side.gif").is_file() and (given / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "| segformer-b0 |" in printed and "CPU ms at" in printed


def test_side_by_side_training_gives_the_same_bits_as_one_after_the_other(demo, tmp_path,
                                                                          monkeypatch):
    """The demo trains its two models at once, one process each with its data prepared in
    process; the weights equal those of sequential runs with a data-loader worker."""
    monkeypatch.undo()  # the real CPU's bf16 rule here too, as in the processes it starts
    from safetensors.torch import load_file

    from segcompare.config import shipped_recipe
    from segcompare.demo import RECIPES, TINY, train_model, train_models

    _, cache = demo
    (data,) = cache.iterdir()
    runs = [r.removesuffix(".yaml") for r in RECIPES]
    jobs = [
        (shipped_recipe(recipe), tmp_path / "side" / run) for recipe, run in zip(RECIPES, runs)
    ]
    side = train_models(jobs, data, TINY, parallel=True)
    for (recipe, _), weights in zip(jobs, side):
        alone = train_model(recipe, data, tmp_path / "alone" / weights.parent.name, TINY,
                            overrides=("train.num_workers=1",))
        a, b = load_file(weights), load_file(alone)
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), weights


def test_make_figures_takes_every_figure_from_one_run(demo, tmp_path):
    """docs/make_figures.py on the tiny demo: the figures, the README table and figures.json all
    come from that run (into a temporary docs folder: no tiny-run figure lands in docs/)."""
    import importlib.util
    import shutil
    from pathlib import Path

    from segcompare.demo import summary_table

    script = Path(__file__).resolve().parent.parent / "docs" / "make_figures.py"
    spec = importlib.util.spec_from_file_location("make_figures", script)
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    out, _ = demo
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- demo-table -->\nold table\n<!-- /demo-table -->\nafter\n")
    docs = tmp_path / "docs"
    assert make_figures.main([str(out), "--docs", str(docs), "--readme", str(readme),
                              "--no-screenshot"]) == 0
    per_class = (docs / "demo_per_class_iou.png").read_bytes()
    assert per_class == (out / "per_class_iou.png").read_bytes()
    with Image.open(docs / "demo_side_by_side.gif") as gif:
        assert gif.n_frames == 1 and gif.size[0] == 3 * 128  # frame 0 of the tiny 3-frame drive
    doc = json.loads((out / "metrics.json").read_text())
    table = summary_table(doc)
    assert readme.read_text() == (
        f"before\n<!-- demo-table -->\n{table}\n<!-- /demo-table -->\nafter\n"
    )
    assert f"| segformer-b0 | {100 * doc['models'][0]['miou']:.1f} |" in table
    record = json.loads((docs / "figures.json").read_text())
    assert record["run"] == str(out.resolve()) and record["created"] == doc["meta"]["created"]
    assert "NOT made from this run" in record["files"]["report.png"]
    if not any(shutil.which(b) for b in make_figures.BROWSERS):  # no browser: one line, no file
        assert make_figures.main([str(out), "--docs", str(tmp_path / "d2"), "--readme",
                                  "none"]) == 1
        assert not (tmp_path / "d2").exists()  # refused before anything was made


def test_demo_fine_tunes_both_models_on_a_folder_set(demo, tmp_path, capsys):
    """`demo --data DIR --init A,B` on a folder set of 3 classes (made here by hand): both recipes
    fine-tuned from the demo's 19-class weights (only the classifiers start anew), compared on
    the set's own classes."""
    import numpy as np
    import yaml

    out, _ = demo
    root = tmp_path / "fields"
    rng = np.random.default_rng(5)
    for split, n in (("train", 2), ("val", 2)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((64, 128), np.uint8)
            mask[20:50, 10:60], mask[5:30, 70:120] = 1, 2
            image = np.array([(30, 30, 30), (40, 200, 40), (200, 40, 40)], np.uint8)[mask]
            image = (image + rng.integers(0, 20, image.shape)).astype(np.uint8)
            Image.fromarray(image).save(root / "img_dir" / split / f"f{i}.jpg")
            Image.fromarray(mask, mode="L").save(root / "ann_dir" / split / f"f{i}.png")
    names = ["soil", "crop", "barn"]
    (root / "id2label.json").write_text(json.dumps(dict(enumerate(names))))
    runs = ("segformer_b0", "hrnet_w18_small_v1")
    init = [out / "runs" / run / "final.safetensors" for run in runs]
    given = tmp_path / "mine"
    argv = ["demo", "--tiny", "--out", str(given), "--data", str(root),
            "--init", ",".join(str(w) for w in init)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((given / "metrics.json").read_text())
    assert doc["classes"]["names"] == names
    assert [m["name"] for m in doc["models"]] == ["segformer-b0", "hrnet-w18-small-v1"]
    for m, start, run in zip(doc["models"], init, runs):
        assert list(m["per_class"]) == names and m["category_miou"] is None
        assert Path(m["weights"]) == given / "runs" / f"finetune_{run}" / "final.safetensors"
        recorded = yaml.safe_load((given / "runs" / f"finetune_{run}" / "config.yaml").read_text())
        assert recorded["model"]["init"] == str(start)
    printed = capsys.readouterr().out
    assert "| segformer-b0 |" in printed and "| - |" in printed  # no category mIoU here
