"""ADE20K is tested as each family's official code tests it; the expected sizes are worked out by
hand from the official formulas, and the expected scores with plain torch ops.

- SegFormer (NVlabs local_configs/_base_/datasets/ade20k_repeat.py test pipeline): mmcv
  imrescale to img_scale (2048, 512) keeping the ratio (factor min(2048 / long, 512 / short),
  each side int(x * factor + 0.5)), AlignedResize rounds each side up to a multiple of 32, one
  whole-image pass, the logits resized to the image.
- HRNet (experiments/ade20k/seg_hrnet_w48_520x520_*.yaml + base_dataset.multi_scale_inference):
  the long side to 520, the other int(x * 520 / long + 0.5), padded to 520x520 with -mean/std,
  one pass, the scores upsampled to the padded size, cropped, resized to the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import QuarterNet

from segcompare.data.transforms import MEAN, STD
from segcompare.evaluate import inference, official_settings
from segcompare.models.variants import FAMILIES


def _up(x, hw):
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def test_the_official_ade20k_sizes():
    segformer = FAMILIES["segformer"].test_for("ade20k").resize
    # 375x500: factor min(2048/500, 512/375) = 1.3653 -> 512x683 -> aligned 512x704
    assert segformer.resized_hw((375, 500)) == (512, 704)
    # 1200x300 (tall): factor min(2048/1200, 512/300) = 1.7067 -> 2048x512, already aligned
    assert segformer.resized_hw((1200, 300)) == (2048, 512)
    # 256x4000 (very wide): the long side caps: 2048/4000 = 0.512 -> 131x2048 -> 160x2048
    assert segformer.resized_hw((256, 4000)) == (160, 2048)
    # aug-test ratio 0.75: img_scale (1536, 384); 375x500 -> factor 1.024 -> 384x512
    assert segformer.resized_hw((375, 500), 0.75) == (384, 512)
    hrnet = FAMILIES["hrnet"].test_for("ade20k").resize
    assert hrnet.resized_hw((512, 683)) == (390, 520)  # 512 * 520 / 683 = 389.8
    assert hrnet.resized_hw((700, 300)) == (520, 223)  # 300 * 520 / 700 = 222.9
    # the Cityscapes tests keep each image's own size
    assert FAMILIES["segformer"].test.resize is None and FAMILIES["hrnet"].test.resize is None


def test_segformer_aligned_resize_whole_image():
    torch.manual_seed(1)
    image = torch.randn(1, 3, 75, 100)
    model = QuarterNet(5).eval()
    settings = official_settings("segformer", "ade20k")
    with torch.no_grad():
        ours = inference(model, image, settings)
        # by hand: factor min(2048/100, 512/75) = 6.827 -> 512x683 -> aligned 512x704
        x = _up(image, (512, 704))
        expected = _up(_up(model.body(x), (512, 704)), (75, 100))
    assert model.seen == [(512, 704)]  # one whole-image pass
    assert ours.shape == (1, 5, 75, 100)
    assert (ours - expected).abs().max().item() < 1e-5


def test_hrnet_520_test_pads_and_crops():
    torch.manual_seed(2)
    image = torch.randn(1, 3, 100, 130)
    model = QuarterNet(5).eval()
    settings = official_settings("hrnet", "ade20k")
    with torch.no_grad():
        ours = inference(model, image, settings)
        # by hand: long side 130 -> 520, 100 * 4 = 400; padded to 520x520 with -mean/std
        x = _up(image, (400, 520))
        black = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
        padded = black.expand(1, 3, 520, 520).clone()
        padded[:, :, :400, :520] = x
        scores = _up(model.body(padded), (520, 520))[:, :, :400, :520]
        expected = _up(scores, (100, 130))
    assert model.seen == [(520, 520)]
    assert (ours - expected).abs().max().item() < 1e-5
    # the padding matters: without it the scores differ
    with torch.no_grad():
        unpadded = _up(_up(model.body(x), (400, 520)), (100, 130))
    assert (unpadded - expected).abs().max().item() > 1e-3


def test_eval_on_an_ade20k_folder_runs_the_official_ade20k_test(tmp_path, capsys):
    import json

    from segcompare.cli import main
    from segcompare.data.synth.io import make_synthetic_layout
    from segcompare.models import build_model
    from segcompare.models.save import save_weights

    make_synthetic_layout(tmp_path / "ade", "ade20k", train=1, val=1, size=(64, 96), seed=0)
    torch.manual_seed(0)
    tiny = dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), decoder_dim=16,
                num_heads=(1, 1, 1, 1))  # fmt: skip
    save_weights(build_model("segformer-b0", num_classes=150, **tiny), tmp_path / "m.safetensors")
    out = tmp_path / "r.json"
    assert main(["eval", "--weights", str(tmp_path / "m.safetensors"), "--data",
                 str(tmp_path / "ade"), "--workers", "0", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["mode"] == "whole" and len(result["per_class"]) == 150
