import cv2
import numpy as np
import pytest
import torch

from segcompare.data.labels import PALETTE
from segcompare.data.transforms import (
    MEAN,
    STD,
    HRNetTrainTransform,
    PhotometricParams,
    SegFormerTrainTransform,
    apply_photometric,
    build_test_transform,
    build_train_transform,
    draw_photometric,
    hrnet_rescale_hw,
    mmseg_rescale_hw,
    normalize,
    random_crop_window,
    resized_image_window,
    resized_label_window,
)


def test_normalize_by_hand():
    image = np.array([[[0, 128, 255], [123, 116, 104]]], dtype=np.uint8)  # 1×2×3
    out = normalize(image)
    assert out.shape == (3, 1, 2) and out.dtype == torch.float32
    expect = (image.astype(np.float64) - np.array(MEAN)) / np.array(STD)
    assert np.allclose(out.numpy(), expect.transpose(2, 0, 1), atol=1e-6)
    # HRNet's form: RGB/255, ImageNet mean/std
    hrnet = (image / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    assert np.allclose(out.numpy(), hrnet.transpose(2, 0, 1), atol=1e-5)


def test_rescale_sizes_follow_the_official_formulas():
    # mmcv.imrescale: factor = min(long / max(h, w), short / min(h, w)), int(x * factor + 0.5)
    assert mmseg_rescale_hw((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert mmseg_rescale_hw((1024, 2048), (1536, 768)) == (768, 1536)
    assert mmseg_rescale_hw((1000, 1500), (2048, 1024)) == (1024, 1536)
    # HRNet: long side int(2048 * s + 0.5), other side int(w * long / h + 0.5)
    assert hrnet_rescale_hw((1024, 2048), int(2048 * 2.1 + 0.5)) == (2151, 4301)
    assert hrnet_rescale_hw((1024, 2048), int(2048 * 0.5 + 0.5)) == (512, 1024)
    assert hrnet_rescale_hw((300, 200), 450) == (450, 300)


@pytest.mark.parametrize("src,out", [((64, 128), (100, 201)), ((97, 131), (250, 301)),
                                     ((128, 256), (64, 128)), ((128, 256), (229, 459))])
def test_windows_equal_resize_then_crop(src, out):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 19, src, dtype=np.uint8)
    image = cv2.GaussianBlur(rng.integers(0, 256, src + (3,), dtype=np.uint8), (5, 5), 0)
    y0, x0, h, w = out[0] // 3, out[1] // 5, out[0] - out[0] // 3, out[1] // 2
    full_label = cv2.resize(label, out[::-1], interpolation=cv2.INTER_NEAREST)
    full_image = cv2.resize(image, out[::-1], interpolation=cv2.INTER_LINEAR)
    window = resized_label_window(label, out, y0, x0, h, w)
    assert np.array_equal(window, full_label[y0:y0 + h, x0:x0 + w])
    diff = np.abs(resized_image_window(image, out, y0, x0, h, w).astype(int)
                  - full_image[y0:y0 + h, x0:x0 + w])
    assert diff.max() <= 1 and diff.mean() < 0.3  # cv2's warp rounds positions to 1/32 px


def _mmseg_photometric(img_bgr, p):
    """mmseg's PhotoMetricDistortion.__call__, written out for given draws (BGR, float32)."""
    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        return np.clip(img, 0, 255).astype(np.uint8)

    img = img_bgr
    if p.brightness is not None:
        img = convert(img, beta=p.brightness)
    if p.contrast is not None and p.contrast_first:
        img = convert(img, alpha=p.contrast)
    if p.saturation is not None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=p.saturation)
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if p.hue is not None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + p.hue) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if p.contrast is not None and not p.contrast_first:
        img = convert(img, alpha=p.contrast)
    return img


@pytest.mark.parametrize("params", [
    PhotometricParams(31.7, 1.43, True, 0.61, -17),
    PhotometricParams(-25.2, 0.55, False, 1.49, 18),
    PhotometricParams(None, 1.2, False, None, 5),
    PhotometricParams(7.5, None, True, 1.3, None),
])
def test_photometric_equals_mmseg_arithmetic(params):
    rgb = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    ours = apply_photometric(rgb.copy(), params)
    theirs = _mmseg_photometric(np.ascontiguousarray(rgb[..., ::-1]), params)[..., ::-1]
    assert np.array_equal(ours, theirs)


def test_photometric_hue_range_is_mmsegs():
    # mmseg's PhotoMetricDistortion.hue draws np.random.randint(-18, 18): -18..17, never 18
    official = set(np.random.RandomState(0).randint(-18, 18, size=5000).tolist())
    rng = np.random.default_rng(0)
    ours = {draw_photometric(rng).hue for _ in range(5000)} - {None}
    assert ours == official == set(range(-18, 18))


def test_cat_max_ratio_is_respected():
    label = np.zeros((200, 200), np.uint8)
    label[:, 130:] = 1  # fewer than half of the 96×96 windows hold 25-75% of each class
    label[:8] = 255

    def ok(window):
        counts = np.bincount(window[window != 255].ravel(), minlength=2)
        return (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75

    checked = unchecked = 0
    for seed in range(60):
        (y0, x0, h, w), window = random_crop_window(
            (200, 200), (96, 96), np.random.default_rng(seed), label, cat_max_ratio=0.75)
        assert np.array_equal(window, label[y0:y0 + h, x0:x0 + w])
        checked += ok(window)
        _, free = random_crop_window((200, 200), (96, 96), np.random.default_rng(seed), label)
        unchecked += ok(free)
    # 11 windows are tried at most (as mmseg), so a rare crop may still break the ratio
    assert checked >= 58 and unchecked < 36


def test_cat_max_ratio_gives_up_after_ten_checks_like_mmseg():
    class Counting:
        def __init__(self):
            self.calls, self.rng = 0, np.random.default_rng(0)

        def integers(self, *a, **k):
            self.calls += 1
            return self.rng.integers(*a, **k)

    rng = Counting()
    random_crop_window((100, 100), (50, 50), rng, np.zeros((100, 100), np.uint8), 0.75)
    assert rng.calls == 2 * 11  # a first window and 10 redraws, each (y, x)


def _pattern(h=96, w=192):
    """Large coloured blocks whose colour is the palette colour of their label."""
    label = np.zeros((h, w), np.uint8)
    for k in range(6):
        label[(k // 3) * h // 2:(k // 3 + 1) * h // 2, (k % 3) * w // 3:(k % 3 + 1) * w // 3] = k
    label[h // 3:h // 2, w // 4:w // 2] = 12
    label[-6:, :] = 255
    return PALETTE[np.minimum(label, 18)], label


@pytest.mark.parametrize("pipeline", ["segformer", "hrnet"])
def test_pipelines_keep_image_and_label_aligned(pipeline):
    image, label = _pattern()
    transform = build_train_transform(pipeline, crop_size=(64, 96), base_size=192,
                                      photometric=False)
    mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
    for seed in range(12):
        img, lab = transform(image, label, rng=np.random.default_rng(seed))
        assert img.shape == (3, 64, 96) and lab.shape == (64, 96)
        assert img.dtype == torch.float32 and lab.dtype == torch.int64
        rgb = img.numpy() * std + mean  # back to 0-255
        lab = lab.numpy()
        valid = lab != 255
        expected = PALETTE[np.minimum(lab, 18)].transpose(2, 0, 1)
        close = (np.abs(rgb - expected).max(0) < 3) & valid
        # all but the blurred block edges match the colour of their label
        assert close.sum() >= 0.9 * valid.sum()


def test_padding_values():
    image, label = _pattern(40, 80)
    # crop larger than any resized image: everything outside is padding
    seg = SegFormerTrainTransform(crop_size=(200, 200), scale=(80, 40), ratio_range=(1.0, 1.0),
                                  photometric=False, flip_prob=0.0)
    img, lab = seg(image, label, rng=np.random.default_rng(0))
    assert (lab[40:] == 255).all() and (lab[:, 80:] == 255).all()
    assert (img[:, 40:] == 0).all()  # mmseg pads after Normalize with 0
    hr = HRNetTrainTransform(crop_size=(200, 200), base_size=80, scale_range=(1.0, 1.0),
                             flip_prob=0.0)
    img, lab = hr(image, label, rng=np.random.default_rng(0))
    black = normalize(np.zeros((1, 1, 3), np.uint8))[:, 0, 0]
    assert (lab[40:] == 255).all()
    assert torch.allclose(img[:, 150, 150], black)  # HRNet pads the image with 0 (black) first


def test_same_rng_same_sample_and_test_transform():
    image, label = _pattern()
    for pipeline in ("segformer", "hrnet"):
        t = build_train_transform(pipeline, crop_size=(48, 48), base_size=192)
        a = t(image, label, rng=np.random.default_rng(7))
        b = t(image, label, rng=np.random.default_rng(7))
        c = t(image, label, rng=np.random.default_rng(8))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])
    img, lab = build_test_transform()(image, label)
    assert img.shape == (3, 96, 192) and torch.equal(lab, torch.from_numpy(label).long())
    with pytest.raises(ValueError, match="unknown pipeline"):
        build_train_transform("deeplab")


def test_defaults_are_the_official_recipes():
    seg = build_train_transform("segformer")
    assert (seg.crop_size, seg.scale, seg.ratio_range, seg.cat_max_ratio, seg.photometric) == (
        (1024, 1024), (2048, 1024), (0.5, 2.0), 0.75, True)
    hr = build_train_transform("hrnet")
    assert (hr.crop_size, hr.base_size, hr.scale_range, hr.photometric) == (
        (512, 1024), 2048, (0.5, 2.1), False)
    assert build_train_transform("segformer", base_size=512).scale == (512, 256)
