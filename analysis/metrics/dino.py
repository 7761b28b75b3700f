"""DINO's view of attention: keep the top mass of a map, and the cls map's Jaccard with the objects
(DINO's protocol: per head, pixel resolution, the best head for each object).

Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers"). Attention
inputs follow :mod:`analysis.metrics._layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analysis.groundtruth import compact_ids

from ._layers import AttentionInput, LayerMetric, Tensor, layer_values, pair

__all__ = ["ClsJaccardLayer", "cls_jaccard", "keep_mass_threshold"]

# Relative slack when comparing float64 prefix sums with a mass target: a prefix whose exact sum
# equals the target must count as reaching it even if summation rounded it a hair below.
_MASS_RTOL = 1e-10


def keep_mass_threshold(maps: Tensor, mass: float = 0.6, ndim: int = 1) -> Tensor:
    """DINO's thresholding: keep the smallest set of largest values holding ``mass`` of the total.

    Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers", §4.2.1 /
    ``visualize_attention.py``): sort a map's values in decreasing order and keep the shortest
    prefix whose sum reaches ``mass · Σ values``. Formally, with values sorted
    ``v_(1) ≥ v_(2) ≥ …`` and ``S_k = Σ_{m≤k} v_(m)``, entry ``(k)`` is kept iff
    ``S_{k−1} < mass · S_total`` — so the kept sum is ``≥ mass · total`` and dropping the
    smallest kept value would fall below it (minimal cardinality).

    Ties: the sort is stable, so among equal values the one at the lower flat index is kept
    first; the result is deterministic and has exactly the minimal number of entries (DINO's
    unstable ``torch.sort`` leaves this arbitrary). E.g. a uniform map of n values keeps the
    first ``ceil(mass·n)`` entries in index order.

    Float rounding: the decision is made on the values as given (float32 maps convert exactly to
    float64, so e.g. ``0.3f + 0.4f`` is not ``0.7 · total`` of float32 decimals); prefix sums are
    float64 and compared with a relative slack of 1e-10, so a
    prefix whose exact sum equals the target counts as reaching it (the kept mass is
    ``≥ mass·(1 − 1e-10)·total``). All-zero maps keep nothing; ``mass = 0`` keeps nothing.

    Args:
        maps: non-negative ``[..., n]`` (or ``[..., *spatial]`` with ``ndim`` trailing dims
            forming one map, e.g. ``ndim=2`` for ``[B, h, gh, gw]``).
        mass: fraction in [0, 1].
    Returns:
        bool tensor shaped like ``maps``.
    """
    if not 0.0 <= mass <= 1.0:
        raise ValueError(f"mass must be in [0, 1], got {mass}")
    if ndim < 1 or ndim > maps.ndim:
        raise ValueError(f"ndim must be in [1, {maps.ndim}] for maps of shape {list(maps.shape)}, got {ndim}")
    flat = maps.flatten(maps.ndim - ndim)  # (a reshape to [..., -1] is ambiguous for empty maps)
    if not flat.is_floating_point():
        flat = flat.double()
    if flat.numel() and flat.min() < 0:
        raise ValueError("keep_mass_threshold needs non-negative maps (attention weights, not logits)")
    # Sorting in the maps' own precision orders exactly as sorting their (exact) float64 values
    # would; only the prefix sums that decide membership need float64.
    values, order = flat.sort(dim=-1, descending=True, stable=True)
    values = values.double()
    total = values.sum(dim=-1, keepdim=True)
    before = values.cumsum(dim=-1) - values  # exclusive prefix sums S_{k-1}
    keep_sorted = before < mass * total * (1.0 - _MASS_RTOL)
    keep_sorted &= total > 0
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def cls_jaccard(attn: AttentionInput, instances: Tensor, patch_size: int | Sequence[int], *,
                mass: float = 0.6, num_prefix: int = 1) -> Tensor:
    """DINO's Jaccard of the thresholded CLS attention with the objects, by DINO's protocol.

    Caron et al. 2021 (DINO, §4.2.1 / Table 5 and ``visualize_attention.py``): each head's CLS →
    patch attention is thresholded to keep ``mass`` (60 %) of it (:func:`keep_mass_threshold`),
    the kept patches are taken at **pixel resolution** (each covers its ``p×p`` pixels, as the
    nearest-neighbour upsampling of the attention map does), and every object is scored by the
    **best head**::

        T_h     = pixels of the patches in keep_mass_threshold(ã_cls,h, mass)   (per head h)
        J_o     = max_h |T_h ∩ M_o| / |T_h ∪ M_o|                               (per object o)
        J(image) = mean over the image's objects of J_o

    ``ã_cls,h`` is head h's CLS row over patch keys, renormalised (the prefix keys dropped).
    Objects are the instance ids of ``instances`` (pixel masks ``M_o``). NaN for an image without
    objects. The head-mean variant (one map against the union of objects) is not this protocol
    and is not offered: it scores a different question and disagrees (0.625 vs 0.75 on the
    two-object, two-head case of the tests).

    Args:
        attn: ``[B, h, N, N]`` or a sequence of layers (DINO uses the last layer).
        instances: int ``[B, H, W]``, 0 = background, ``H = gh·p``, ``W = gw·p``.
    Returns:
        float64 ``[B]`` (one layer) or ``[B, layers]``.
    """
    if num_prefix < 1:
        raise ValueError("cls_jaccard needs a cls token (num_prefix ≥ 1); this encoder has none")
    metric = ClsJaccardLayer(instances, patch_size, mass=mass, num_prefix=num_prefix)
    return layer_values(metric, attn, num_prefix, metric.L)


class ClsJaccardLayer(LayerMetric):
    """:func:`cls_jaccard` of one layer at a time → ``[B]`` (it reads the cls row only, not the
    query chunks); the objects' pixel counts per patch are prepared once, at construction."""

    def __init__(self, instances: Tensor, patch_size: int | Sequence[int], *, mass: float = 0.6,
                 num_prefix: int = 1) -> None:
        if instances.ndim != 3 or instances.is_floating_point() or instances.dtype == torch.bool:
            raise ValueError("cls_jaccard needs an integer instance map [B, H, W] (0 = background, one id per object)")
        self.ph, self.pw = pair(patch_size)
        B, H, W = instances.shape
        if H % self.ph or W % self.pw:
            raise ValueError(f"instance map {H}×{W} is not divisible by the patch size {self.ph}×{self.pw}")
        gh, gw = H // self.ph, W // self.pw
        self.L = L = gh * gw
        # pixels of every id inside every patch, [B, L, K]: |T_h ∩ M_o| is then a sum over kept patches
        ids, dense = compact_ids(instances)
        K = ids.numel()
        dev = instances.device
        patch = (torch.arange(H, device=dev) // self.ph)[:, None] * gw + (torch.arange(W, device=dev) // self.pw)[None, :]
        index = (torch.arange(B, device=dev)[:, None, None] * L + patch[None]) * K + dense
        self.counts = torch.bincount(index.reshape(-1), minlength=B * L * K).view(B, L, K).double()
        self.area = self.counts.sum(1)  # [B, K] pixels of each id in each image
        self.present = (self.area > 0) & (ids > 0)[None]  # the objects of each image
        self.mass, self.num_prefix = mass, num_prefix

    def begin(self, attn: Tensor) -> None:
        P = self.num_prefix
        row = attn[:, :, 0, P:].double()
        row = row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        kept = keep_mass_threshold(row, self.mass).double()  # [B, h, L]
        inter = torch.einsum("bhl,blk->bhk", kept, self.counts)  # [B, h, K] pixels in T_h ∩ M_o
        union = kept.sum(-1, keepdim=True) * (self.ph * self.pw) + self.area[:, None, :] - inter
        best = (inter / union.clamp_min(1.0)).max(dim=1).values  # [B, K]: the best head per object
        best = torch.where(self.present, best, torch.zeros_like(best))
        self._result = best.sum(-1) / self.present.sum(-1).double()  # 0/0 = NaN for an image without objects

    def result(self) -> Tensor:
        return self._result
