"""Ground truth at patch resolution: which instance owns each patch, which patches are foreground,
and the boxes of instances — the one home of these conversions (metrics, probes, interactive
segmentation and the dashboard all use them).

Patch ownership is a **majority vote per patch**: the owner of a patch is the id covering the
most of its ``p·p`` pixels (ties go to the lowest id, so background 0 wins a tie with an object),
and its *purity* is that id's pixel fraction. Patch ``i`` (row-major) sits at grid cell
``(i // gw, i % gw)``, the ViT's token order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


def compact_ids(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.unique(ids, sorted=True, return_inverse=True)`` for non-negative integer maps:
    (the distinct ids ascending ``[K]``, each entry's index among them, shaped like ``ids``). Maps
    of small ids (instance and category maps) are counted with one ``bincount`` — linear time,
    several times faster than ``unique``'s sort; large sparse ids (e.g. COCO annotation ids) fall
    back to ``unique``."""
    flat = ids.reshape(-1)
    top = int(flat.max()) if flat.numel() else 0
    if top >= max(1 << 16, 4 * flat.numel()):
        return torch.unique(ids, sorted=True, return_inverse=True)
    present = torch.bincount(flat, minlength=top + 1) > 0
    distinct = torch.nonzero(present).squeeze(1)
    lut = torch.cumsum(present, 0) - 1  # id → its index among the distinct ids
    return distinct, lut[ids]


def patch_ownership(instances: Tensor, patch_size: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Majority-vote instance id of every patch, and its purity.

    ``owner[b, r, c] = argmax_id #{pixels of patch (r, c) with that id}`` (ties → lowest id, so
    background 0 wins a tie), ``purity = that count / (p_h·p_w)``. Counting uses one
    ``bincount`` over (image, patch, id) — memory ``B·L·K`` for K distinct ids, never a one-hot
    image — and ids are compacted first, so sparse ids (e.g. COCO annotation ids) cost nothing.

    Args:
        instances: int ``[B, H, W]`` (or ``[H, W]``), 0 = background, ids ≥ 0; H, W multiples
            of the patch size.
    Returns:
        ``owner`` int64 ``[B, gh, gw]`` and ``purity`` float64 ``[B, gh, gw]`` (no batch dim for
        a ``[H, W]`` input).
    """
    squeeze = instances.ndim == 2
    if squeeze:
        instances = instances[None]
    if instances.ndim != 3:
        raise ValueError(f"instances must be [B, H, W], got {list(instances.shape)}")
    if instances.is_floating_point() or instances.dtype == torch.bool:
        raise ValueError(f"instances must be an integer id map, got {instances.dtype}")
    if (instances < 0).any():
        raise ValueError("instance ids must be ≥ 0 (0 = background)")
    B, H, W = instances.shape
    ph, pw = _pair(patch_size)
    if H % ph or W % pw:
        raise ValueError(f"instance map {H}×{W} is not divisible by the patch size {ph}×{pw}")
    gh, gw = H // ph, W // pw
    L = gh * gw
    ids, dense = compact_ids(instances)  # dense ids 0..K-1
    K = ids.numel()
    dev = instances.device
    patch = (torch.arange(H, device=dev) // ph)[:, None] * gw + (torch.arange(W, device=dev) // pw)[None, :]
    index = (torch.arange(B, device=dev)[:, None, None] * L + patch[None]) * K + dense
    counts = torch.bincount(index.reshape(-1), minlength=B * L * K).view(B, L, K)
    best = counts.argmax(dim=-1)  # first maximum → lowest id on ties
    owner = ids[best].view(B, gh, gw)
    purity = (counts.gather(-1, best[..., None])[..., 0].double() / (ph * pw)).view(B, gh, gw)
    if squeeze:
        return owner[0], purity[0]
    return owner, purity


def patch_labels(labels: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """Majority label of every patch, flattened in token order: int ``[B, H, W]`` (instance ids or
    category ids, 0 = background) → int64 ``[B, L]``. Ties go to the smaller id (so a
    half-background patch counts as background)."""
    owner, _ = patch_ownership(labels, patch_size)
    return owner.reshape(owner.shape[0], -1) if owner.ndim == 3 else owner.reshape(-1)


def foreground_patches(foreground: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """Pixel foreground (bool, or ids with 0 = background) → ``[B, gh, gw]`` bool by strict
    majority: a patch is foreground iff more than half of its pixels are."""
    ph, pw = _pair(patch_size)
    fg = (foreground != 0).double()[:, None]
    if fg.shape[-2] % ph or fg.shape[-1] % pw:
        raise ValueError(f"foreground map {list(fg.shape[-2:])} is not divisible by the patch size {ph}×{pw}")
    return F.avg_pool2d(fg, kernel_size=(ph, pw), stride=(ph, pw))[:, 0] > 0.5


def mask_boxes(masks: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """Tight box of each non-empty ``masks [B, gh, gw]`` in pixels (x0, y0, x1, y1), x1/y1 exclusive."""
    ph, pw = _pair(patch_size)
    gh, gw = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [B, gh], [B, gw]
    r0 = rows.int().argmax(1)
    r1 = gh - 1 - rows.flip(1).int().argmax(1)
    c0 = cols.int().argmax(1)
    c1 = gw - 1 - cols.flip(1).int().argmax(1)
    return torch.stack([c0 * pw, r0 * ph, (c1 + 1) * pw, (r1 + 1) * ph], dim=1).double()


def boxes_from_instances(instances: Tensor) -> list[Tensor]:
    """Ground-truth boxes from an instance map: for each image of ``[B, H, W]`` (0 = background) a
    float64 ``[n_i, 4]`` tensor (x0, y0, x1, y1), x1/y1 exclusive, one row per id present (in
    increasing id order). Use this after cropping/resizing so boxes match the images."""
    if instances.ndim == 2:
        instances = instances[None]
    out = []
    for inst in instances:  # per image; the per-id work below is vectorised
        ids = compact_ids(inst)[0]
        ids = ids[ids > 0]
        if ids.numel() == 0:
            out.append(torch.zeros(0, 4, dtype=torch.float64, device=inst.device))
            continue
        m = inst[None] == ids[:, None, None]  # [n, H, W]
        out.append(mask_boxes(m, 1))
    return out
