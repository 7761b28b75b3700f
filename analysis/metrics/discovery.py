"""Unsupervised object discovery: TokenCut on the last layer's keys, scored by CorLoc.

:func:`tokencut` and the box helpers are pure functions; :func:`discover_objects` **runs the
encoder** (through :func:`analysis.encoder.attention_pass`) to get the keys. Ground-truth boxes
come from :func:`analysis.groundtruth.boxes_from_instances`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from analysis import encoder
from analysis.groundtruth import mask_boxes

Tensor = torch.Tensor

__all__ = ["TokenCut", "box_iou", "corloc", "discover_objects", "tokencut"]


class TokenCut(NamedTuple):
    """Result of :func:`tokencut` for a batch.

    boxes: float64 ``[B, 4]`` (x0, y0, x1, y1) pixels, x1/y1 exclusive (the data's box convention).
    masks: bool ``[B, gh, gw]`` the seed's connected foreground component.
    seeds: int64 ``[B]`` patch index with the largest |eigenvector| entry.
    eigenvectors: float64 ``[B, gh, gw]`` second-smallest generalised eigenvector, signed so the
        foreground side is the one above the mean.
    """

    boxes: Tensor
    masks: Tensor
    seeds: Tensor
    eigenvectors: Tensor


def _seed_component(mask: Tensor, seeds: Tensor) -> Tensor:
    """4-connected component of ``mask [B, gh, gw]`` containing patch ``seeds [B]`` (flood fill,
    vectorised over the batch; at most ``L`` dilation steps)."""
    B, gh, gw = mask.shape
    comp = torch.zeros(B, gh * gw, dtype=torch.bool, device=mask.device)
    comp[torch.arange(B, device=mask.device), seeds] = True
    comp = comp.view(B, gh, gw) & mask
    while True:
        grown = comp.clone()
        grown[:, 1:, :] |= comp[:, :-1, :]
        grown[:, :-1, :] |= comp[:, 1:, :]
        grown[:, :, 1:] |= comp[:, :, :-1]
        grown[:, :, :-1] |= comp[:, :, 1:]
        grown &= mask
        if torch.equal(grown, comp):
            return comp
        comp = grown


def bipartition(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TokenCut's split of the eigenvector ``y [B, L]``: the seed is ``argmax |y|``; the foreground
    is the side of the **mean** of ``y`` (not of 0) that holds the seed. Returns (foreground bool
    ``[B, L]``, seeds ``[B]``, ``y`` signed so the foreground is the side above the mean)."""
    seeds = y.abs().argmax(dim=1)
    part = y > y.mean(dim=1, keepdim=True)
    flip = ~part.gather(1, seeds[:, None])  # seed not in the "above mean" side → swap sides
    return torch.where(flip, ~part, part), seeds, torch.where(flip, -y, y)


def tokencut(keys: Tensor, grid_hw: tuple[int, int], patch_size: int | Sequence[int], *,
             tau: float = 0.2, eps: float = 1e-5) -> TokenCut:
    """TokenCut object discovery: normalised cut on the patch-key affinity graph, batched.

    Wang et al. 2022 ("Self-Supervised Transformers for Unsupervised Object Discovery using
    Normalized Cut", CVPR; official ``object_discovery.py``)::

        W_ij = 1 if cos(k_i, k_j) > τ else ε          (τ = 0.2, ε = 1e-5: binary graph)
        D    = diag(Σ_j W_ij)
        (D − W) y = λ D y,   y = second-smallest generalised eigenvector
        foreground = {i : y_i > mean(y)}, flipped if needed so it contains the seed argmax_i |y_i|
        box  = bounding box of the 4-connected component of the foreground containing the seed

    The generalised problem is solved as the symmetric one ``D^{-½}(D − W)D^{-½} z = λ z``,
    ``y = D^{-½} z`` (``torch.linalg.eigh``, float64, batched) — the same eigenvector as scipy's
    ``eigh(D − W, D)`` up to sign, and the sign is fixed by the seed rule. Boxes are patch
    boxes scaled by the patch size.

    Args:
        keys: ``[B, L, D]`` patch keys (no prefix tokens), e.g. the last layer's keys from
            :func:`analysis.encoder.attention_pass` with ``keys=True``, prefix dropped.
        grid_hw: ``(gh, gw)``, ``gh·gw = L``.
    """
    if keys.ndim == 2:
        keys = keys[None]
    B, L, _ = keys.shape
    gh, gw = grid_hw
    if gh * gw != L:
        raise ValueError(f"keys have {L} patches but the grid {gh}×{gw} has {gh * gw}")
    if L < 2:
        raise ValueError("a normalised cut needs at least 2 patches")
    f = F.normalize(keys.double(), dim=-1)
    sim = f @ f.transpose(1, 2)
    W = torch.full_like(sim, eps).masked_fill_(sim > tau, 1.0)
    d_isqrt = W.sum(-1).rsqrt()  # degrees ≥ L·ε > 0
    eye = torch.eye(L, dtype=torch.float64, device=keys.device)
    lap = eye - d_isqrt[:, :, None] * W * d_isqrt[:, None, :]
    _, vecs = torch.linalg.eigh(lap)  # ascending eigenvalues
    y = d_isqrt * vecs[:, :, 1]
    part, seeds, y = bipartition(y)
    masks = _seed_component(part.view(B, gh, gw), seeds)
    return TokenCut(boxes=mask_boxes(masks, patch_size), masks=masks, seeds=seeds, eigenvectors=y.view(B, gh, gw))


def discover_objects(model: nn.Module, images: Tensor, *, tau: float = 0.2, eps: float = 1e-5) -> TokenCut:
    """Runs ``model`` (ours or a timm ViT) once and applies :func:`tokencut` to its last layer's
    patch keys (heads concatenated, after ``k_norm``; prefix tokens — cls, registers — dropped),
    as TokenCut / LOST do. ``images`` go to the model's device; so does the result."""
    _, rec = encoder.attention_pass(model, images, layers=[-1], keys=True)
    keys = rec.keys[0][:, encoder.num_prefix_tokens(model):]
    return tokencut(keys, encoder.grid_size(model), encoder.patch_size(model), tau=tau, eps=eps)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a [n, 4]`` and ``b [m, 4]`` (x0, y0, x1, y1; continuous coordinates, so a
    pixel box with exclusive x1/y1 has area ``(x1 − x0)(y1 − y0)``) → float64 ``[n, m]``."""
    a, b = a.double().reshape(-1, 4), b.double().reshape(-1, 4)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp_min(torch.finfo(torch.float64).tiny)


def corloc(pred_boxes: Tensor, gt_boxes: Sequence[Tensor], threshold: float = 0.5) -> Tensor:
    """Correct localisation per image: 1 if the predicted box has IoU ≥ ``threshold`` with any
    ground-truth box of the image, else 0 (Deselaers et al. 2012; the unsupervised object
    discovery protocol of LOST / TokenCut). CorLoc = ``corloc(...).nanmean()``.

    Args:
        pred_boxes: ``[B, 4]`` one box per image (e.g. ``TokenCut.boxes``).
        gt_boxes: B tensors ``[n_i, 4]`` (e.g. :func:`analysis.groundtruth.boxes_from_instances`),
            same convention.
    Returns:
        float64 ``[B]`` of 0/1; NaN for an image without ground-truth boxes.
    """
    if len(gt_boxes) != pred_boxes.shape[0]:
        raise ValueError(f"{pred_boxes.shape[0]} predicted boxes but ground truth for {len(gt_boxes)} images")
    hits = []
    for pred, gt in zip(pred_boxes, gt_boxes):
        if gt.numel() == 0:
            hits.append(float("nan"))
        else:
            hits.append(float(box_iou(pred[None], gt.to(pred.device)).max() >= threshold))
    return torch.tensor(hits, dtype=torch.float64, device=pred_boxes.device)
