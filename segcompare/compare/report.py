"""The report's text: one list of `Section`s, one function per section, rendered as Markdown and
as a self-contained HTML page; and each model's entry of metrics.json."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence
from urllib.parse import quote

from segcompare.data.corrupt import CORRUPTION_LEVELS, SEVERITIES
from segcompare.precision import recorded_precision
from segcompare.utils import atomic_write_text

if TYPE_CHECKING:
    from segcompare.compare.measure import ModelRun

@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: Optional[tuple[list[str], list[list[str]]]] = None  # header, rows
    numeric_table: bool = True  # right-align every column but the first
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def _pct(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}"


def _num(value: Optional[float], fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _gmacs(value: Optional[float]) -> str:
    return _num(value, ".2f")  # GMACs with two decimals wherever they are printed


def _ci(ci: Optional[Sequence[Optional[float]]]) -> str:
    """' (58.9–62.4)': a 95 % interval of fractions, in %; '' without one."""
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return ""
    return f" ({_pct(ci[0])}–{_pct(ci[1])})"


def with_interval(value: Optional[float], ci: Optional[Sequence[float]]) -> str:
    """A fraction in % with its 95 % interval: '60.7 (58.9–62.4)'; just '60.7' without one."""
    text = _pct(value)
    return text if text == "-" else text + _ci(ci)


def _spread(run: ModelRun) -> str:
    """A row of several runs: ' ± std' of their mIoU in points (sample std); else ''."""
    if len(run.seeds) < 2:
        return ""
    values = [m.results["miou"] for m in run.seeds]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f" ± {100 * std:.1f}"


def describe_inference(inference: dict[str, Any]) -> str:
    """The inference settings of metrics.json's meta in words."""
    mode = {"slide": "sliding windows (the official test)", "whole": "whole-image"}
    size = inference.get("size")
    dataset = inference.get("dataset", "cityscapes")
    if inference.get("official_test") and dataset == "ade20k":  # each family its own
        how = ("each family's official ADE20K test (SegFormer: the whole image, AlignedResize of "
               "the short side to 512; HRNet: its 520 test)")
    else:
        how = f"{mode.get(inference['mode'], inference['mode'])} inference"
    words = [
        how,
        f"at {size[0]}x{size[1]}" if size else "at each image's own size",
        "each family's official multi-scale test (SegFormer scales 0.5-2.0, HRNet 0.5-1.75)"
        if inference.get("aug_test")
        else ("scale " if len(inference["scales"]) == 1 else "scales ")
        + ", ".join(f"{v:g}" for v in inference["scales"]),
    ]
    if inference.get("window"):
        words.append(f"window {inference['window'][0]}x{inference['window'][1]}")
    if inference.get("stride"):
        words.append(f"stride {inference['stride'][0]}x{inference['stride'][1]}")
    precision = recorded_precision(inference)  # 'amp' in files written before --precision
    if precision == "int8":  # segcompare.infer.quantize: a calibrated, compiled int8 graph
        words.append(f"int8 convolutions (PT2E, calibrated on {inference.get('calib_images')} "
                     f"images of {inference.get('calib')})")
    elif precision != "fp32":
        words.append("mixed precision" if precision == "amp" else f"{precision} precision")
    if inference.get("flip"):
        words.append("with flip")
    if precision == "int8":
        words.append("compiled by inductor")
    else:
        words.append("through prepare_for_inference" if inference.get("optimize")
                     else "eager model")
    return ", ".join(words)


def _md(text: str) -> str:
    """Text (a model label, a file name) safe in Markdown: no raw HTML, no table break."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|")


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    out = [f"# {_md(title)}", ""]
    for s in sections:
        out += [f"## {_md(s.title)}", ""]
        for p in s.paragraphs:
            out += [_md(p), ""]
        if s.table:
            header, rows = s.table
            out.append("| " + " | ".join(_md(h) for h in header) + " |")
            rest = "---:" if s.numeric_table else "---"
            out.append("| " + " | ".join(["---"] + [rest] * (len(header) - 1)) + " |")
            out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
            out.append("")
        for name, caption in s.images:
            caption = _md(caption).replace("[", "\\[").replace("]", "\\]")
            out += [f"![{caption}]({quote(name)})", ""]
    return "\n".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 1em 2em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
p { max-width: 60em; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child, table.text td { text-align: left; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.images { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.images figure { flex: 1 1 600px; min-width: 0; }
@media (max-width: 700px) { body { padding: 0.5em 0.8em; } }
"""


def _inline_code(escaped: str) -> str:
    """`text` (Markdown inline code) -> <code>text</code>, in already escaped HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(title: str, sections: Sequence[Section], image_dir: Path) -> str:
    """A self-contained page: the plots as data: URIs, the style inline, no external reference."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for s in sections:
        out.append(f"<h2>{esc(s.title)}</h2>")
        out += [f"<p>{_inline_code(esc(p))}</p>" for p in s.paragraphs]
        if s.table:
            header, rows = s.table
            out.append('<div class="scroll">')  # a wide table scrolls, the page does not
            out.append("<table>" if s.numeric_table else '<table class="text">')
            out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            for row in rows:
                out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
            out.append("</div>")
        if s.images:
            out.append('<div class="images">')
            for name, caption in s.images:
                data = base64.b64encode((image_dir / name).read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                    f"<figcaption>{esc(caption)}</figcaption></figure>"
                )
            out.append("</div>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# metrics.json
# ------------------------------------------------------------------------------------------------


def model_entry(run: ModelRun) -> dict[str, Any]:
    """One model's entry of metrics.json (fractions in [0, 1])."""
    r = run.results
    return {
        "name": run.name,
        "label": run.label,  # unique display name: the name, plus the weights' stem if repeated
        "weights": run.weights,
        "miou": r["miou"],
        "miiou": r.get("miiou"),
        "category_miou": r.get("category_miou"),
        "pixel_acc": r["pixel_acc"],
        "boundary_iou": run.boundary.mean() if run.boundary else float("nan"),
        "per_class": r["per_class"],
        "boundary_iou_per_class": dict(zip(r["per_class"], run.boundary.per_class().tolist()))
        if run.boundary
        else {},
        "parameters": run.stats.get("parameters"),
        "gmacs": run.stats.get("gmacs"),
        "latency_ms": run.bench.get("latency_ms"),
        "images_per_s": run.bench.get("images_per_s"),
        "memory_mb": run.bench.get("memory_mb"),
        "robustness": run.robustness,
        # below fp32: the same model scored in float32, and what the lower precision changed
        "miou_fp32": run.fp32.get("miou"),
        "amp_miou_change": r["miou"] - run.fp32["miou"] if run.fp32 else None,
        # the paired bootstrap's 95 % intervals (absent with --bootstrap 0)
        "miou_ci": run.uncertainty.get("miou_ci"),
        "mean_acc_ci": run.uncertainty.get("mean_acc_ci"),
        "per_class_iou_ci": run.uncertainty.get("iou_ci"),
        # a row of several runs (--runs): each run's own figures; the row holds their mean
        "seeds": [{"weights": m.weights, "miou": m.results["miou"],
                   "mean_acc": m.results["mean_acc"], "training": _cost(m.training)}
                  for m in run.seeds] or None,
        "training": _cost(run.training),
    }


def _cost(training: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """metrics.json's `training` object: the cost, and the curves as the log has them."""
    return None if training is None else dict(training)


def write_per_image_csv(path: Path, runs: Sequence[ModelRun]) -> Path:
    """per_image.csv: a row per image and model (image, model, miou, pixel_acc; fractions, empty
    where undefined), images in dataset order."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "model", "miou", "pixel_acc"])
    for i, name in enumerate(runs[0].image_names):
        for run in runs:
            miou, acc = run.image_miou[i], run.image_acc[i]
            writer.writerow([name, run.label, "" if math.isnan(miou) else f"{miou:.6f}",
                             "" if math.isnan(acc) else f"{acc:.6f}"])  # fmt: skip
    atomic_write_text(path, buffer.getvalue())
    return path



# ------------------------------------------------------------------------------------------------
# The sections, in the report's order
# ------------------------------------------------------------------------------------------------


def build_sections(
    runs: Sequence[ModelRun], doc: dict[str, Any], files: dict[str, Any]
) -> list[Section]:
    """The report's sections, from the measured runs, the metrics.json document (`doc`) and the
    plot file names (`files`, as `plots.draw_plots` returns them)."""
    meta = doc["meta"]
    sections = [verdict_section(runs, doc), summary_section(runs, doc)]
    if doc.get("pairwise"):
        sections.append(pairwise_section(doc))
    if any(run.seeds for run in runs):
        sections.append(seeds_section(runs))
    sections += [cost_section(files), training_section(runs, files), per_class_section(files)]
    if "per_class_diff" in files:
        sections.append(difference_section(runs, files))
    sections.append(boundary_section(meta, files))
    if "hardest" in files:
        sections.append(hardest_section(runs, doc, files))
    if "different" in files:
        sections.append(different_section(doc, files))
    sections.append(confusion_section(runs, files))
    if any(run.robustness for run in runs):
        sections.append(robustness_section(runs, meta, files))
    sections.append(method_section(runs, meta))
    return sections


_SUMMARY_HEADER = ["model", "mIoU (95 % interval)", "mAcc (95 % interval)", "iIoU", "cat. mIoU",
                   "pixel acc.", "Boundary IoU",
                   "params (M)", "GMACs", "latency ms", "images/s", "memory MB"]  # fmt: skip


def _has_categories(runs: Sequence[ModelRun]) -> bool:
    """Whether the data set has iIoU and categories (Cityscapes); other data sets have neither."""
    return any(run.results.get("category_miou") is not None for run in runs)


def _summary_row(
    run: ModelRun, robustness: bool, fp32: bool = False, categories: bool = True
) -> list[str]:
    r = run.results
    row = [
        run.label,
        _pct(r["miou"]) + _spread(run) + _ci(run.uncertainty.get("miou_ci")),
        with_interval(r["mean_acc"], run.uncertainty.get("mean_acc_ci")),
        *([_pct(r.get("miiou")), _pct(r.get("category_miou"))] if categories else []),
        _pct(r["pixel_acc"]), _pct(run.boundary.mean()),
        _num(run.stats["parameters"] / 1e6, ".2f"), _gmacs(run.stats["gmacs"]),
        _num(run.bench.get("latency_ms"), ".1f"), _num(run.bench.get("images_per_s"), ".2f"),
        _num(run.bench.get("memory_mb"), ".0f"),
    ]  # fmt: skip
    if robustness:
        rb = run.robustness
        row += [_pct(rb.get("mean_miou")), _num(rb.get("relative_miou"), ".2f")]
    if fp32:
        row += [_pct(run.fp32.get("miou")), _num(100 * (r["miou"] - run.fp32["miou"]), "+.2f")]
    return row


def summary_section(runs: Sequence[ModelRun], doc: dict[str, Any]) -> Section:
    """Every model's headline figures in one table."""
    meta = doc["meta"]
    h, w = meta["eval_size"]
    bench_meta = meta.get("bench", {})
    robustness = any(run.robustness for run in runs)
    categories = _has_categories(runs)
    header = [h for h in _SUMMARY_HEADER if categories or h not in ("iIoU", "cat. mIoU")]
    header += ["corrupted mIoU", "rel. robustness"] if robustness else []
    fp32 = all(run.fp32 for run in runs)
    header += ["fp32 mIoU", "lower − fp32 (points)"] if fp32 else []
    rows = [_summary_row(run, robustness, fp32, categories) for run in runs]
    classes = doc.get("classes") or {}
    how = ("as cityscapesscripts computes them" if categories else
           f"as mmseg's IoUMetric defines them, over the {len(classes.get('names', []))} "
           f"classes of the data set ({classes.get('name', '?')})")  # fmt: skip
    text = (
        f"{doc['num_images']} images of {doc['data']} ({doc['split']}), {h}x{w} (H×W), "
        f"evaluated on {meta['device']} with {describe_inference(meta['inference'])}. IoU "
        f"figures in %, {how} (the same code as "
        f"`segcompare eval`). GMACs and latency are for one forward pass at {h}x{w}, batch 1 "
        f"({bench_meta.get('iters')} timed runs after {bench_meta.get('warmup')} warm-up, "
        f"median; {bench_meta.get('gpu') or bench_meta.get('cpu')}, "
        f"{bench_meta.get('threads')} threads)."
    )  # fmt: skip
    boot = meta.get("bootstrap") or {}
    if boot.get("resamples"):
        text += (
            f" In brackets: the 95 % interval of the figure from a paired bootstrap over the "
            f"{doc['num_images']} images ({boot['resamples']} resamples, seed {boot['seed']}): "
            "how much it would move on another validation set of this size."
        )
    if any(run.seeds for run in runs):
        text += " '±': the standard deviation over a row's runs (seeds), whose mean it shows."
    if fp32:
        text += (
            " Every model was also scored in float32, otherwise the same way: 'fp32 mIoU', and "
            "what the lower precision changed, in points of mIoU."
        )
    return Section("Summary", [text], (header, rows))


# Below this many images a bootstrap interval is known to undercover (the resamples can only
# repeat the few images there are); the verdict says so.
SMALL_SAMPLE = 20


def _lead(runs: Sequence[ModelRun], doc: dict[str, Any]) -> str:
    """The sentence on the most accurate model and whether its lead beats the noise."""
    order = sorted(runs, key=lambda run: -_finite(run.results["miou"]))
    best = order[0]
    miou = with_interval(best.results["miou"], best.uncertainty.get("miou_ci"))
    text = f"Most accurate: {best.label}, {miou} mIoU."
    if len(order) < 2:
        return text
    second = order[1]
    pair = next((p for p in doc.get("pairwise") or []
                 if {p["a"], p["b"]} == {best.label, second.label}), None)  # fmt: skip
    lead = 100 * (best.results["miou"] - second.results["miou"])
    text += f" Its lead over {second.label} is {lead:.1f} points"
    if pair is None:
        return text + " (no bootstrap: no interval to tell it from noise)."
    sign = 1 if pair["a"] == best.label else -1
    lo, hi = sorted(sign * 100 * v for v in pair["ci"])
    if pair["verdict"] == "no clear difference":
        return text + (f", 95 % interval {lo:.1f} to {hi:.1f}: within this validation set's "
                       f"noise ({doc['num_images']} images); these two are not told apart here.")
    return text + (f", 95 % interval {lo:.1f} to {hi:.1f}: larger than this validation set's "
                   "noise.")


def _finite(value: Optional[float], worst: float = -math.inf) -> float:
    return worst if value is None or math.isnan(value) else value


def verdict_section(runs: Sequence[ModelRun], doc: dict[str, Any]) -> Section:
    """A short paragraph written from the numbers: which model for what."""
    paragraphs = [_lead(runs, doc)]
    if doc["num_images"] < SMALL_SAMPLE and doc.get("pairwise"):
        paragraphs[0] += (
            f" With only {doc['num_images']} images the bootstrap sees too little variety: its "
            "intervals are too narrow, and a verdict here is weak evidence."
        )
    if len(runs) > 1:
        def best(key: Any, lowest: bool = False) -> Optional[ModelRun]:
            scored = [(key(run), run) for run in runs]
            scored = [(v, run) for v, run in scored if v is not None and not math.isnan(v)]
            if not scored:
                return None
            return (min if lowest else max)(scored, key=lambda vr: vr[0])[1]

        facts = []
        fastest = best(lambda r: r.bench.get("latency_ms"), lowest=True)
        if fastest:
            facts.append(f"fastest {fastest.label} ({fastest.bench['latency_ms']:.1f} ms)")
        smallest = best(lambda r: r.stats.get("parameters"), lowest=True)
        if smallest:
            facts.append(f"smallest {smallest.label} ({smallest.stats['parameters'] / 1e6:.2f} M "
                         "parameters)")
        robust = best(lambda r: (r.robustness or {}).get("relative_miou"))
        if robust:
            facts.append(f"most robust {robust.label} (keeps "
                         f"{100 * robust.robustness['relative_miou']:.0f}% of its mIoU under "
                         "corruptions)")
        sharp = best(lambda r: r.boundary.mean() if r.boundary else None)
        if sharp:
            facts.append(f"sharpest boundaries {sharp.label} ({_pct(sharp.boundary.mean())} "
                         "Boundary IoU)")
        if facts:
            text = "; ".join(facts)
            paragraphs.append(text[0].upper() + text[1:] + ".")
    front = doc.get("pareto_front") or []
    if front:
        paragraphs.append(
            "On the accuracy–latency Pareto front (no other model is both more accurate and "
            f"faster; ringed in the mIoU-against-latency plot): {', '.join(front)}."
        )
    return Section("Verdict", paragraphs)


def pairwise_section(doc: dict[str, Any]) -> Section:
    rows = [[p["a"], p["b"], _num(100 * p["diff"], "+.1f"),
             f"{100 * p['ci'][0]:+.1f} to {100 * p['ci'][1]:+.1f}",
             {"better": f"{p['a']} better", "worse": f"{p['b']} better"}.get(
                 p["verdict"], p["verdict"])]
            for p in doc["pairwise"]]  # fmt: skip
    boot = doc["meta"]["bootstrap"]
    return Section(
        "Is the difference real? Every pair",
        [f"mIoU of a minus mIoU of b, in points, with its 95 % interval from the paired "
         f"bootstrap ({boot['resamples']} resamples of the {doc['num_images']} images, the same "
         "draws for every model). Where the interval excludes 0 the difference is larger than "
         "this validation set's noise; where it holds 0 there is no clear difference."],
        (["a", "b", "mIoU a − b (points)", "95 % interval", "verdict"], rows),
        numeric_table=False,
    )  # fmt: skip


def seeds_section(runs: Sequence[ModelRun]) -> Section:
    rows = []
    for run in runs:
        if not run.seeds:
            continue
        each = ", ".join(f"{_pct(m.results['miou'])} ({Path(str(m.weights)).parent.name}/"
                         f"{Path(str(m.weights)).name})" for m in run.seeds)  # fmt: skip
        rows.append([run.label, str(len(run.seeds)), _pct(run.results["miou"]) + _spread(run),
                     each])
    return Section(
        "Seeds: the same recipe, run again",
        ["A row given with --runs is several training runs of one model: its figures are the "
         "mean over the runs, '±' their standard deviation (mIoU, points); its speed, size, "
         "Boundary IoU, corruptions and gallery are its first run's."],
        (["row", "runs", "mIoU mean ± std", "each run's mIoU"], rows),
        numeric_table=False,
    )  # fmt: skip


def _cost_cells(t: Optional[dict[str, Any]]) -> list[str]:
    if t is None:
        return ["no training log", "", "", "", ""]
    wall = t.get("wall_s")
    return [_num(t.get("iterations"), "d"),
            "-" if wall is None else f"{wall / 60:.1f} min",
            _num(t.get("images_per_s"), ".1f"), _num(t.get("peak_memory_mb"), ".0f"),
            t.get("device") or "-"]  # fmt: skip


def training_section(runs: Sequence[ModelRun], files: dict[str, Any]) -> Section:
    rows = [[run.label, *_cost_cells(run.training)] for run in runs]
    paragraphs = [
        "What each model cost to train, from its run folder's log.jsonl (weights given as a "
        "`segcompare train` run folder, or its final/best.safetensors): iterations, wall time, "
        "training images per second, peak memory (MB: the CUDA allocator's peak, or on the CPU "
        "the process's peak resident size) and device. Weights from elsewhere: no training log."
    ]
    images = [(files["training"], "Training loss, learning rate and val mIoU against iteration")
              ] if "training" in files else []  # fmt: skip
    return Section("What training cost", paragraphs,
                   (["model", "iterations", "wall time", "images/s", "peak MB", "device"], rows),
                   numeric_table=False, images=images)  # fmt: skip


def cost_section(files: dict[str, Any]) -> Section:
    return Section(
        "Which model? Accuracy against cost",
        ["Each point is a model (circles SegFormer, squares HRNet). A model up and to the left "
         "of another is both more accurate and cheaper."],
        images=[(files["miou_vs_gmacs"], "mIoU against GMACs"),
                (files["miou_vs_latency"], "mIoU against latency")],
    )  # fmt: skip


def per_class_section(files: dict[str, Any]) -> Section:
    return Section(
        "Per-class IoU",
        images=[(files["per_class"], "Per-class IoU of every model")],
    )


def difference_section(runs: Sequence[ModelRun], files: dict[str, Any]) -> Section:
    return Section(
        "Where each model wins",
        [f"IoU of each model minus the IoU of {runs[0].label}, per class."],
        images=[(files["per_class_diff"], "Per-class IoU difference")],
    )


def boundary_section(meta: dict[str, Any], files: dict[str, Any]) -> Section:
    d = meta["boundary"]["d_px"]
    return Section(
        "Boundary IoU: are the edges sharp?",
        [
            "Boundary IoU (Cheng et al., CVPR 2021) is the IoU of each class restricted to the "
            f"pixels within d = {d} px of that class's contour, in the ground truth and in the "
            "prediction: |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|, summed over the "
            "images, averaged over classes. It ignores the easy interiors that dominate mIoU, "
            "so it shows whether a model's higher-resolution features (HRNet keeps a 1/4 "
            "branch all the way; SegFormer fuses 1/4 to 1/32) give sharper edges. "
            f"d is {100 * meta['boundary']['frac']:.1f}% of the image diagonal (the paper uses "
            "2%, 46 px at 1024×2048, wider than most objects); the image frame is not a "
            "contour; ground-truth 'ignore' pixels are left out.",
        ],
        images=[(files["boundary"], "mIoU and Boundary IoU per model; Boundary IoU per class")],
    )


def hardest_section(
    runs: Sequence[ModelRun], doc: dict[str, Any], files: dict[str, Any]
) -> Section:
    return Section(
        f"The {len(doc['hardest'])} hardest images",
        [
            "The images with the lowest per-image mIoU averaged over the models, with each "
            "model's prediction (title: its per-image mIoU in %). Last column: where the "
            "models disagree, in the colour of the one model that is right there (grey: "
            "no single model is right); where they agree the image is dimmed."
            if len(runs) > 1
            else "The images with the lowest per-image mIoU, with the model's prediction "
            "(title: its per-image mIoU in %) and its errors in grey on the dimmed image.",
        ],
        images=[(files["hardest"], "Hardest images")],
    )


def different_section(doc: dict[str, Any], files: dict[str, Any]) -> Section:
    return Section(
        f"The {len(doc['most_different'])} images where the models differ most",
        ["The images (the hardest ones left out) with the largest spread of per-image mIoU "
         "between the best and the worst model: where the choice of model matters. Every "
         "image's figures are in `per_image.csv` (image, model, mIoU, pixel accuracy)."],
        images=[(files["different"], "Images where the models differ most")],
    )  # fmt: skip


def confusion_section(runs: Sequence[ModelRun], files: dict[str, Any]) -> Section:
    return Section(
        "Confusion matrices",
        ["Rows: ground-truth class; columns: predicted class; each row sums to 100% of the "
         "class's pixels. Off-diagonal cells are the classes a model mistakes for each other."],
        images=[(files["confusion"][run.label], f"{run.label}") for run in runs],
    )  # fmt: skip


def robustness_section(
    runs: Sequence[ModelRun], meta: dict[str, Any], files: dict[str, Any]
) -> Section:
    kinds = list(runs[0].robustness["miou"])
    n_corrupt = meta["robustness"]["num_images"]
    header = ["model", "clean"] + [f"{k} {s}" for k in kinds for s in SEVERITIES]
    header += ["mean", "relative"]
    rows = []
    for run in runs:
        rb = run.robustness
        rows.append(
            [run.label, _pct(rb["clean_miou"])]
            + [_pct(v) for k in kinds for v in rb["miou"][k]]
            + [_pct(rb["mean_miou"]), _num(rb["relative_miou"], ".2f")]
        )
    levels = "; ".join(
        f"{k}: {', '.join(str(CORRUPTION_LEVELS[k][s - 1]) for s in SEVERITIES)}"
        for k in kinds
    )
    return Section(
        "Robustness to corrupted inputs",
        [
            f"mIoU (%) on {n_corrupt} images ('clean' on the same images) under each "
            "corruption at ImageNet-C severity "
            f"levels {', '.join(map(str, SEVERITIES))} (Hendrycks & Dietterich 2019). "
            f"Parameters: {levels} (noise: std on [0, 1]; blur: Gaussian sigma in px; jpeg: "
            "quality; brightness: added to V of HSV). 'relative' is the mean corrupted mIoU "
            "over the clean mIoU: the SegFormer paper reports its transformer encoder keeps "
            "more of its accuracy than CNNs do.",
        ],
        (header, rows),
        images=[(files["robustness"], "mIoU against corruption severity")],
    )  # fmt: skip


def _which_weights(weights: Any) -> str:
    """What a weights file is, by the name `segcompare train` gives it."""
    name = Path(str(weights)).name if weights else ""
    return {
        "final.safetensors": "final weights of a training run (as the official tests evaluate)",
        "best.safetensors": "best val mIoU of a training run (chosen on val: optimistic there)",
    }.get(name, "as given" if weights else "untrained")


def method_section(runs: Sequence[ModelRun], meta: dict[str, Any]) -> Section:
    weights_rows = [
        [run.label, str(run.weights or "random (seed 0)"), _which_weights(run.weights)]
        for run in runs
    ]
    boot = meta.get("bootstrap") or {}
    bootstrap = (
        f" Intervals: a paired bootstrap over the evaluated images ({boot.get('resamples')} "
        f"resamples, seed {boot.get('seed')}): each resample draws the images with replacement, "
        "the same draw for every model, and sums their per-image confusion matrices; an "
        "interval holds the 2.5th to 97.5th percentile of the figure over the resamples. It "
        "measures the noise of a validation set of this size, not the noise of training (for "
        "that: several seeds, --runs)."
        if boot.get("resamples") else " No intervals (--bootstrap 0)."
    )
    return Section(
        "How this was measured",
        [
            f"segcompare {meta['segcompare']}, torch {meta['torch']}, {meta['created']}. "
            f"Inference: {describe_inference(meta['inference'])}. Parameters and GMACs: "
            "segcompare stats (every "
            "operation counted, attention included). Latency: segcompare bench (models "
            "interleaved after warm-up; memory MB = peak size of the tensors one forward pass "
            "creates: the CUDA allocator's peak, or on the CPU the live tensors tracked op by op)."
            + bootstrap,
        ],
        (["model", "weights", "which"], weights_rows),
        numeric_table=False,
    )


def write_report(out: Path, runs: Sequence[ModelRun], doc: dict[str, Any],
                 files: dict[str, Any]) -> None:
    """report.md and the self-contained report.html into `out`, where the plots are."""
    title = "segcompare: " + " vs ".join(run.label for run in runs)
    sections = build_sections(runs, doc, files)
    atomic_write_text(out / "report.md", render_markdown(title, sections))
    atomic_write_text(out / "report.html", render_html(title, sections, out))


# ------------------------------------------------------------------------------------------------
# The lines `segcompare compare` and `segcompare demo` print, from metrics.json
# ------------------------------------------------------------------------------------------------


def miou_text(model: dict[str, Any]) -> str:
    """A metrics.json model's mIoU in %, ± the std over its runs where it has several, with its
    95 % interval where there is one: '60.7 (58.9–62.4)'."""
    text = _pct(model.get("miou"))
    seeds = [s["miou"] for s in model.get("seeds") or [] if s.get("miou") is not None]
    if len(seeds) > 1:
        mean = sum(seeds) / len(seeds)
        std = math.sqrt(sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1))
        text += f" ± {100 * std:.1f}"
    return text + _ci(model.get("miou_ci"))


def pairwise_lines(doc: dict[str, Any]) -> list[str]:
    """One line per pair of models: the mIoU difference, its interval and the verdict."""
    lines = []
    for p in doc.get("pairwise") or []:
        if p.get("ci") is None or None in p["ci"]:
            continue
        who = {"better": f"{p['a']} better", "worse": f"{p['b']} better"}.get(
            p["verdict"], "no clear difference")
        lines.append(
            f"{p['a']} − {p['b']}: {100 * p['diff']:+.1f} mIoU points (95% interval "
            f"{100 * p['ci'][0]:+.1f} to {100 * p['ci'][1]:+.1f}): {who}"
        )  # fmt: skip
    return lines
