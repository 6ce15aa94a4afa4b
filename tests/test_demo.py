"""`segcompare demo --tiny`: the whole pipeline end to end, every output file checked."""

import json
import time

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


def test_side_by_side_training_gives_the_same_bits_as_one_after_the_other(demo, tmp_path):
    """The demo trains its two models at once, one process each with its data prepared in
    process; the weights equal those of sequential runs with a data-loader worker."""
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
