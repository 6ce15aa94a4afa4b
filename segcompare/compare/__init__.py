"""The comparison report: several models on one split, side by side, in numbers and pictures.

    spec = CompareSpec(
        models=[("segformer-b0", "b0.safetensors"), ("hrnet-w18-small-v2", "w18s.safetensors")],
        data_root="data/cityscapes", out_dir="compare", images=4,
        corruptions=("noise", "blur", "jpeg", "brightness"),
    )
    run_compare(spec)

writes into `spec.out_dir`:

- `metrics.json`: per model the Cityscapes metrics of `segcompare eval` (the same function
  computes them: `segcompare.evaluate.evaluate_model`), Boundary IoU, parameters and GMACs
  (`segcompare.stats`), latency, throughput and memory (`segcompare.bench`), and mIoU under
  corruptions;
- `report.md` with the plots beside it as PNG files, and `report.html`, the same report with the
  plots embedded (base64), which opens offline in any browser.

What the report measures beyond `segcompare eval`:

- Boundary IoU (`segcompare.metrics.BoundaryIoU`, Cheng et al., CVPR 2021): IoU restricted to the
  pixels within d of each class's contour;
- the uncertainty of every accuracy figure: a paired bootstrap over the evaluated images (each
  resample sums the images' own confusion matrices), giving mIoU, mAcc and each class's IoU a
  95 % interval and every pair of models a verdict ("better", "worse", "no clear difference");
- several runs of one model (seeds, `CompareSpec.runs`) as one row: mean ± std;
- the training side, for weights from a `segcompare train` run folder: loss, learning rate and
  val mIoU against iteration, and what training cost (iterations, wall time, images/s, memory);
- a verdict paragraph written from the numbers, and the accuracy-latency Pareto front;
- per_image.csv (each image's mIoU and pixel accuracy per model); the K hardest images (lowest
  per-image mIoU averaged over the models) and the K where the models differ most, with every
  model's prediction and a map of where the models disagree;
- row-normalised confusion matrices;
- mIoU under four corruptions of the input at three severities (`segcompare.data.corrupt`), the
  ImageNet-C levels 1, 3 and 5 of Hendrycks & Dietterich (ICLR 2019), as the SegFormer paper's
  robustness study (Cityscapes-C) used them.

The rooms: `measure.py` (what is measured, model by model), `plots.py` (the figures),
`report.py` (the text, Markdown and HTML, and metrics.json's model entries), `run.py`
(`CompareSpec` and `run_compare`, which runs them in order).
"""

from segcompare.compare.measure import (
    ModelRun,
    build_runs,
    evaluate_corruptions,
    evaluate_run,
    hardest_images,
)
from segcompare.compare.plots import NO_WINNER_GREY, disagreement_map, draw_plots
from segcompare.compare.report import (
    Section,
    build_sections,
    describe_inference,
    miou_text,
    model_entry,
    pairwise_lines,
    render_html,
    render_markdown,
    with_interval,
)
from segcompare.compare.run import CompareSpec, run_compare

__all__ = [
    "NO_WINNER_GREY",
    "CompareSpec",
    "ModelRun",
    "Section",
    "build_runs",
    "build_sections",
    "describe_inference",
    "disagreement_map",
    "draw_plots",
    "evaluate_corruptions",
    "evaluate_run",
    "hardest_images",
    "miou_text",
    "model_entry",
    "pairwise_lines",
    "render_html",
    "render_markdown",
    "run_compare",
    "with_interval",
]
