"""Running a trained model: the predictor, predictions written to files, the side-by-side video,
and the inference rewrites that make the model faster.

    predictor.py   Predictor (the one place a model is called), predict_files, render_prediction
    video.py       render_video: input | model 1 | model 2 ..., titled, with a class legend
    fast.py        prepare_for_inference: BN folded, fused oneDNN convs, the heads per branch
"""

from segcompare.infer.fast import prepare_for_inference, tune_cpu_allocator
from segcompare.infer.predictor import (
    FORMATS,
    IMAGE_SUFFIXES,
    Predictor,
    collect_inputs,
    load_image,
    predict_files,
    render_prediction,
)
from segcompare.infer.video import (
    GifWriter,
    compose_frame,
    iter_frames,
    legend,
    render_video,
)

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "GifWriter",
    "Predictor",
    "collect_inputs",
    "compose_frame",
    "iter_frames",
    "legend",
    "load_image",
    "predict_files",
    "prepare_for_inference",
    "render_prediction",
    "render_video",
    "tune_cpu_allocator",
]
