"""Scoring predictions against ground truth: the one home of accuracy, confusion and IoU.

Fine-tuning (``rmae finetune``), the dense probe and interactive segmentation
(``analysis``) all score with these functions, so an mIoU means the same thing everywhere.
"""

from __future__ import annotations

import math

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """int64 ``[C, C]`` counts, rows = ground truth, columns = prediction. Entries of ``target``
    equal to ``ignore_index`` (or outside ``0..C-1``) are not counted."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[float, list[float | None]]:
    """conf ``[C, C]`` (rows ground truth, columns prediction) → (mIoU, per-class IoU).

    ``IoU_c = TP / (TP + FP + FN)``; a class absent from both ground truth and prediction is
    undefined (None) and left out of the mean, as mmsegmentation does. NaN when nothing is defined.
    """
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    valid = ~iou.isnan()
    miou = float(iou[valid].mean()) if valid.any() else float("nan")
    return miou, [None if math.isnan(v) else float(v) for v in iou.tolist()]


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two axes: ``[..., H, W]`` → ``[...]`` float32.
    Two empty masks have IoU 0 (nothing was found because there was nothing; no credit)."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return inter / union.clamp(min=1)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of ``pred == target`` (NaN for empty inputs)."""
    return float((pred == target).double().mean()) if target.numel() else float("nan")
