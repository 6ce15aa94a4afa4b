"""The training losses of both papers, at label resolution.

SegFormer trains with mmseg's cross-entropy, HRNet with its own cross-entropy or with online hard
example mining (OHEM, HRNet's Cityscapes recipe); both with optional class weights.
"""

from __future__ import annotations

from typing import Optional

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
