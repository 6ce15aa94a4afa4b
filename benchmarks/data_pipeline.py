"""Samples/s of our SegFormer training pipeline against the same steps done as mmseg does them.

Both read a 1024×2048 PNG pair (image + labelTrainIds) and produce a normalised 3×1024×1024
float tensor and an int64 label: random rescale (2048×1024 × 0.5-2.0), random crop 1024×1024
with cat_max_ratio 0.75, flip, photometric distortion, normalise, pad (SegFormer's Cityscapes
recipe). The reference follows mmseg 0.x (the version SegFormer ships) call by call:
cv2 decode of the image and Pillow decode of the label (LoadImageFromFile / LoadAnnotations),
mmcv.imrescale of the whole image (cv2, bilinear / nearest), np.unique for cat_max_ratio,
PhotoMetricDistortion in float32 per step on the crop, mmcv.imnormalize, impad,
DefaultFormatBundle. Ours: cv2 decode, the crop window chosen first and only it resampled,
bincount, lookup-table photometric on uint8, one fused normalise in torch; and, optionally,
the decoded-uint8 cache (memory-mapped .npy) after a first pass has filled it.

Same machine, same run, DataLoader with 1 and 2 worker processes (each single-threaded).

    python benchmarks/data_pipeline.py                      # 6 synthetic 1024×2048 pairs
    python benchmarks/data_pipeline.py --data /path/to/cityscapes --samples 40
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segcompare.data.cityscapes import CityscapesDataset, prepare_dataset  # noqa: E402
from segcompare.data.synth import make_synthetic_cityscapes  # noqa: E402
from segcompare.data.transforms import build_train_transform  # noqa: E402
from segcompare.utils import atomic_write_text  # noqa: E402

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


class MmsegStyle(torch.utils.data.Dataset):
    """The SegFormer Cityscapes train_pipeline, step by step as mmseg/mmcv compute it."""

    def __init__(self, samples, crop=(1024, 1024), scale=(2048, 1024), ratio=(0.5, 2.0)):
        self.samples, self.crop, self.scale, self.ratio = samples, crop, scale, ratio

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image_path, label_path = self.samples[i]
        # LoadImageFromFile: bytes -> mmcv.imfrombytes(flag='color', backend='cv2'), BGR
        img = cv2.imdecode(np.frombuffer(Path(image_path).read_bytes(), np.uint8),
                           cv2.IMREAD_COLOR)
        # LoadAnnotations: imdecode_backend='pillow', flag='unchanged'
        with Image.open(label_path) as im:
            seg = np.array(im).squeeze().astype(np.uint8)
        # Resize: ratio_range sampling, mmcv.imrescale (keep ratio), bilinear / nearest
        r = np.random.random_sample() * (self.ratio[1] - self.ratio[0]) + self.ratio[0]
        scale = int(self.scale[0] * r), int(self.scale[1] * r)
        h, w = img.shape[:2]
        f = min(max(scale) / max(h, w), min(scale) / min(h, w))
        size = int(w * f + 0.5), int(h * f + 0.5)
        img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
        seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)
        # RandomCrop with cat_max_ratio 0.75 (np.unique, up to 10 redraws)
        def bbox():
            mh, mw = max(img.shape[0] - self.crop[0], 0), max(img.shape[1] - self.crop[1], 0)
            y, x = np.random.randint(0, mh + 1), np.random.randint(0, mw + 1)
            return y, y + self.crop[0], x, x + self.crop[1]
        box = bbox()
        for _ in range(10):
            labels, cnt = np.unique(seg[box[0]:box[1], box[2]:box[3]], return_counts=True)
            cnt = cnt[labels != 255]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < 0.75:
                break
            box = bbox()
        img, seg = img[box[0]:box[1], box[2]:box[3]], seg[box[0]:box[1], box[2]:box[3]]
        # RandomFlip(prob=0.5): np.flip views, the label copied
        if np.random.rand() < 0.5:
            img, seg = np.flip(img, axis=1), np.flip(seg, axis=1).copy()
        img = self.photometric(img)
        # Normalize: mmcv.imnormalize (copy, float32, BGR->RGB, subtract, multiply)
        img = img.copy().astype(np.float32)
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
        cv2.subtract(img, np.float64(MEAN.reshape(1, -1)), img)
        cv2.multiply(img, 1 / np.float64(STD.reshape(1, -1)), img)
        # Pad to the crop size (image 0, label 255)
        ph, pw = self.crop[0] - img.shape[0], self.crop[1] - img.shape[1]
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        seg = cv2.copyMakeBorder(seg, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=255)
        # DefaultFormatBundle
        img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return {"image": img, "label": torch.from_numpy(seg[None].astype(np.int64))[0]}

    @staticmethod
    def photometric(img):
        def convert(img, alpha=1, beta=0):
            img = img.astype(np.float32) * alpha + beta
            return np.clip(img, 0, 255).astype(np.uint8)

        rnd = np.random
        if rnd.randint(2):
            img = convert(img, beta=rnd.uniform(-32, 32))
        mode = rnd.randint(2)
        if mode == 1 and rnd.randint(2):
            img = convert(img, alpha=rnd.uniform(0.5, 1.5))
        if rnd.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = convert(img[:, :, 1], alpha=rnd.uniform(0.5, 1.5))
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        if rnd.randint(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + rnd.randint(-18, 18)) % 180
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        if mode == 0 and rnd.randint(2):
            img = convert(img, alpha=rnd.uniform(0.5, 1.5))
        return img


def _worker_init(worker_id: int) -> None:
    cv2.setNumThreads(1)
    np.random.seed(1000 + worker_id)


def measure(dataset, workers: int, count: int, pairs: bool) -> float:
    """Samples/s over `count` samples, after one warm-up batch (worker start-up excluded)."""
    n = len(dataset)
    order = [((i % n), 0) if pairs else i % n for i in range(count + 2)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=order,
                                         num_workers=workers, worker_init_fn=_worker_init)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    done = 0
    for batch in it:
        done += batch["image"].shape[0]
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a Cityscapes root (default: synthetic, made here)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=6, help="synthetic pairs to make")
    parser.add_argument("--count", type=int, default=24, help="samples timed per setting")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds, best kept")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                              "data_pipeline.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    tmp = tempfile.TemporaryDirectory(prefix="segcompare-bench-")
    root = Path(args.data) if args.data else Path(tmp.name) / "cs"
    if not args.data:
        t = time.perf_counter()
        make_synthetic_cityscapes(root, train=args.samples, val=0, size=(1024, 2048), seed=0)
        print(f"made {args.samples} synthetic 1024x2048 pairs in {time.perf_counter() - t:.1f} s")
    prepare_dataset(root, [args.split], progress=False)  # both read labelTrainIds
    ours = CityscapesDataset(root, args.split, build_train_transform("segformer"), seed=0)
    cached = CityscapesDataset(root, args.split, build_train_transform("segformer"), seed=0,
                               cache_dir=Path(tmp.name) / "cache")
    for i in range(len(cached)):  # fill the cache
        cached[i]
    reference = MmsegStyle(ours.samples)
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        # interleaved rounds, best of each: other load on the machine hits all three alike
        ref = our = cac = 0.0
        for _ in range(args.repeats):
            ref = max(ref, measure(reference, workers, args.count, pairs=False))
            our = max(our, measure(ours, workers, args.count, pairs=True))
            cac = max(cac, measure(cached, workers, args.count, pairs=True))
        rows.append(dict(workers=workers, mmseg_style=ref, ours=our, ours_cached=cac,
                         ratio=our / ref, ratio_cached=cac / ref))
    print(f"\n{'workers':>7} {'mmseg-style':>12} {'ours':>8} {'ours+cache':>11} "
          f"{'ratio':>7} {'ratio+cache':>12}   (samples/s)")
    for r in rows:
        print(f"{r['workers']:>7} {r['mmseg_style']:>12.2f} {r['ours']:>8.2f} "
              f"{r['ours_cached']:>11.2f} {r['ratio']:>6.2f}x {r['ratio_cached']:>11.2f}x")
    result = dict(
        benchmark="data_pipeline", pipeline="segformer cityscapes 1024x1024 train",
        image_size=[1024, 2048], samples=len(ours), timed_per_setting=args.count,
        repeats=args.repeats,
        data=str(args.data or "synthetic"), machine=platform.processor() or platform.machine(),
        python=platform.python_version(), torch=torch.__version__, opencv=cv2.__version__,
        rows=rows,
    )
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
