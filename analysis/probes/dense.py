"""The dense probe: a per-patch linear classifier scored by pixel mIoU.

BatchNorm + Linear on each patch token, trained on each patch's majority ground-truth category
(:func:`analysis.groundtruth.patch_labels`); its logits are upsampled (bilinear by default) to
pixels, arg-maxed and scored by mIoU against the ground-truth category maps with
:func:`rmae.evaluation.iou_from_confusion` (background is category 0 and counts as a class; the
mean is over classes present in the ground truth or the prediction, as mmsegmentation does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rmae.device import resolve_device
from rmae.evaluation import confusion_matrix, iou_from_confusion

from .config import DEFAULT_BATCH, DEFAULT_EPOCHS, DEFAULT_LRS, DEFAULT_WEIGHT_DECAY, UPSAMPLING, ProbeError
from .fit import fit_grid, grid_logits, grid_values, intra_op_threads, select, split_holdout
from .heads import DenseGrid
from .result import ProbeResult, count_labels


def upsample_predictions(logits: torch.Tensor, grid_hw: tuple[int, int], image_hw: tuple[int, int],
                         mode: str = "bilinear") -> torch.Tensor:
    """Per-patch logits [B, L, C] → per-pixel predicted category int64 [B, H, W] (logits are
    upsampled, then arg-maxed — not the labels, so bilinear blends neighbouring patches)."""
    B, L, C = logits.shape
    h, w = grid_hw
    maps = logits.transpose(1, 2).reshape(B, C, h, w)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps, size=tuple(image_hw), mode=mode, **kw).argmax(1)


def grid_miou(grid: nn.Module, tokens: torch.Tensor, maps: torch.Tensor, num_labels: int,
              grid_hw: tuple[int, int], heads: Sequence[int] | None = None, upsample: str = "bilinear",
              device: str | torch.device = "auto") -> tuple[list[float], list[list[float | None]]]:
    """Pixel mIoU of dense heads: tokens [N, L, D], maps int [N, H, W] ground-truth categories.

    Returns (mIoU per head, per-class IoU per head) for ``heads`` (default: all). Memory is
    bounded: images go through in chunks sized so the upsampled logits stay ≲ 32 M floats.
    """
    G = len(grid.weight)
    heads = list(range(G)) if heads is None else list(heads)
    H, W = maps.shape[-2:]
    chunk = max(1, min(256, (32 << 20) // max(1, num_labels * H * W)))
    conf = [torch.zeros(num_labels, num_labels, dtype=torch.int64, device=torch.device("cpu")) for _ in heads]
    for sl, logits in grid_logits(grid, tokens, chunk, resolve_device(device)):  # [G, b, L, C]
        gt = maps[sl].long()
        for j, g in enumerate(heads):
            conf[j] += confusion_matrix(upsample_predictions(logits[g], grid_hw, (H, W), upsample).cpu(), gt,
                                        num_labels)
    out = [iou_from_confusion(c) for c in conf]
    return [m for m, _ in out], [p for _, p in out]


def dense_probe(train_tokens: torch.Tensor, train_patch_labels: torch.Tensor, train_maps: torch.Tensor,
                eval_tokens: torch.Tensor, eval_maps: torch.Tensor, *, grid_hw: tuple[int, int],
                num_labels: int | None = None, upsample: str = "bilinear", lrs: Sequence[float] | None = None,
                epochs: int = DEFAULT_EPOCHS["dense"], batch_size: int = DEFAULT_BATCH["dense"],
                optimizer: str = "sgd", weight_decay: float | None = None, holdout: float = 0.2, seed: int = 0,
                device: str | torch.device = "auto", threads: int | None = None, patience: int = 0,
                progress: bool = False) -> ProbeResult:
    """Dense per-patch linear probe scored by pixel mIoU.

    train_tokens [N, L, D] / eval_tokens [M, L, D] patch tokens (L = h·w of ``grid_hw``, row
    major); train_patch_labels int64 [N, L] training targets (majority category per patch,
    -1 = ignore); train_maps [N, H, W] / eval_maps [M, H, W] ground-truth category per pixel
    (0 = background). The held-out split is by image, so no image's patches are on both sides.
    ``num_labels`` = number of categories including background (default: from the maps).
    ``chance`` is the mIoU of predicting the most frequent training patch category everywhere.
    """
    if train_tokens.ndim != 3 or train_tokens.shape[1] != grid_hw[0] * grid_hw[1]:
        raise ProbeError(f"the dense probe needs patch tokens [N, {grid_hw[0] * grid_hw[1]}, D] (pool='tokens')")
    if upsample not in UPSAMPLING:
        raise ProbeError(f"upsample must be {', '.join(UPSAMPLING)}, got {upsample!r}")
    C = num_labels or count_labels(train_patch_labels, train_maps, eval_maps)
    fit_idx, held_idx = split_holdout(train_tokens.shape[0], holdout, seed)
    lrs = grid_values(lrs, DEFAULT_LRS.get(optimizer, DEFAULT_LRS["sgd"]))
    wd = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0) if weight_decay is None else weight_decay
    dev = resolve_device(device)
    L, D = train_tokens.shape[1:]
    heads = DenseGrid(D, C, len(lrs), torch.Generator().manual_seed(int(seed)))
    with intra_op_threads(batch_size * L * D * C * len(lrs), threads):
        fit_grid(heads, train_tokens[fit_idx], train_patch_labels[fit_idx], lrs, epochs=epochs,
                 batch_size=batch_size, optimizer=optimizer, weight_decay=wd, seed=seed, device=dev,
                 progress=progress, desc="dense probe", patience=patience,
                 held_out=lambda: grid_miou(heads, train_tokens[held_idx], train_maps[held_idx], C, grid_hw,
                                            upsample=upsample, device=dev)[0])
        held, _ = grid_miou(heads, train_tokens[held_idx], train_maps[held_idx], C, grid_hw, upsample=upsample,
                            device=dev)
        best, grid = select(held, lrs)
        (value,), (per_class,) = grid_miou(heads, eval_tokens, eval_maps, C, grid_hw, [best], upsample, dev)
    known = train_patch_labels[train_patch_labels >= 0].reshape(-1)
    majority = int(torch.bincount(known, minlength=C).argmax())
    gt = eval_maps.long()
    chance = iou_from_confusion(confusion_matrix(torch.full_like(gt, majority), gt, C))[0]
    return ProbeResult("dense", "miou", value, lrs[best], grid, chance,
                       int(train_tokens.shape[0]), int(eval_tokens.shape[0]),
                       {"grid_param": "lr", "per_class_iou": per_class, "num_labels": C, "upsample": upsample,
                        "optimizer": optimizer, "weight_decay": wd, "epochs": epochs, "batch_size": batch_size})
