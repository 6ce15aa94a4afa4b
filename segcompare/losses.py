"""The training losses of both papers, at label resolution.

SegFormer trains with mmseg's cross-entropy, HRNet with its own cross-entropy or with online hard
example mining (OHEM, HRNet's Cityscapes recipe); both with optional class weights.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F


# Both official codes compute the loss at label resolution: the 1/4-resolution logits are
# upsampled bilinearly (align_corners=False) to the label's size first.
def cross_entropy(
    logits: torch.Tensor,  # N×C×h×w
    label: torch.Tensor,  # N×H×W int64
    ignore_index: int = 255,
    class_weights: Optional[torch.Tensor] = None,  # C
    average: str = "labelled",
) -> torch.Tensor:
    """Cross-entropy at label resolution.

    average="labelled": torch's CrossEntropyLoss mean (with class weights: sum w_y*l / sum w_y over
    labelled pixels), as HRNet's `CrossEntropy` (lib/core/criterion.py).
    average="all": sum over labelled pixels / number of pixels, as mmseg's `CrossEntropyLoss`
    that SegFormer trained with (its `weight_reduce_loss` averages over every pixel, ignored
    pixels counting as 0).
    """
    logits = _to_label_size(logits, label)
    if average == "labelled":
        return F.cross_entropy(logits, label, weight=class_weights, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(
        logits, label, weight=class_weights, ignore_index=ignore_index, reduction="none"
    )
    return per_pixel.mean()


def ohem_cross_entropy(
    logits: torch.Tensor,  # N×C×h×w
    label: torch.Tensor,  # N×H×W int64
    threshold: float = 0.7,
    min_kept: int = 100000,
    ignore_index: int = 255,
    class_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HRNet's online hard example mining (`OhemCrossEntropy` of lib/core/criterion.py).

    Over the labelled pixels of the batch, sorted by the softmax probability of their target
    class: keep those below max(threshold, the (min_kept+1)-th smallest probability), i.e. every
    pixel predicted with less than `threshold` confidence and at least `min_kept` pixels; the
    loss is the plain mean of their (class-weighted) per-pixel cross-entropies (0 when none is
    kept: no labelled pixel, or all at a probability of exactly the cutoff).

    Computed without a host sync (no boolean indexing, no `.any()`, no full sort), so a GPU
    never waits for the CPU here: ignored pixels get probability +inf, `topk` finds the
    min_kept+1 smallest, and the cutoff's index, min(min_kept, labelled - 1), stays a tensor.
    The official sort-based formula gives the same loss (tests/test_gpu_paths.py).
    """
    logits = _to_label_size(logits, label)
    per_pixel = F.cross_entropy(
        logits, label, weight=class_weights, ignore_index=ignore_index, reduction="none"
    ).flatten()
    labelled = label.flatten() != ignore_index
    target = label.clamp(max=logits.shape[1] - 1).unsqueeze(1)  # ignored pixels -> any class
    prob = F.softmax(logits, dim=1).gather(1, target).flatten().detach()
    prob = prob.masked_fill(~labelled, float("inf"))  # ignored pixels sort last
    k = min(min_kept + 1, prob.numel())
    smallest = prob.topk(k, largest=False).values  # ascending
    index = (labelled.sum() - 1).clamp(min=0, max=k - 1)  # min(min_kept, labelled - 1)
    cutoff = smallest.gather(0, index.view(1)).clamp(min=threshold)
    kept = prob < cutoff  # never an ignored pixel (+inf)
    # the mean over the kept pixels; a sum over the graph even when none is kept, so DDP's
    # gradient hooks fire
    return torch.where(kept, per_pixel, 0.0).sum() / kept.sum().clamp(min=1)


def _to_label_size(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def median_frequency_weights(pixels: Sequence[int], image_pixels: Sequence[int]) -> list[float]:
    """Class weights by median frequency balancing (Eigen & Fergus, ICCV 2015, section 4.1):
    w_c = median(freq) / freq_c, where freq_c is the number of pixels of class c divided by the
    total number of pixels of the images in which c appears (`pixels[c]`, `image_pixels[c]`,
    counted over the training split). The median is over the classes that appear; a class that
    never appears gets weight 0 (no pixel would use it)."""
    freq = [p / n if p else 0.0 for p, n in zip(pixels, image_pixels)]
    present = sorted(f for f in freq if f > 0)
    if not present:
        raise ValueError("no labelled pixel of any class: no class weights can be derived")
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
    return [median / f if f > 0 else 0.0 for f in freq]


def label_histogram(labels: Iterable[Any], num_classes: int) -> tuple[list[int], list[int]]:
    """(pixels, image_pixels) per class over H×W label arrays (class indices, anything else
    ignored): what `median_frequency_weights` takes. image_pixels[c] counts every pixel of the
    images where c appears (their labelled and ignored pixels alike, as Eigen & Fergus)."""
    import numpy as np

    pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for label in labels:
        label = np.asarray(label)
        valid = (label >= 0) & (label < num_classes)
        counts = np.bincount(label[valid].ravel().astype(np.int64), minlength=num_classes)
        pixels += counts[:num_classes]
        image_pixels += np.where(counts[:num_classes] > 0, label.size, 0)
    return pixels.tolist(), image_pixels.tolist()
