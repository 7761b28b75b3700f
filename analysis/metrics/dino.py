"""DINO's view of attention: keep the top mass of a map, and the cls map's Jaccard with the objects.

Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers"). Attention
inputs follow :mod:`analysis.metrics._layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analysis.groundtruth import foreground_patches

from ._layers import AttentionInput, HeadMode, Tensor, check_layer, map_layers

__all__ = ["cls_jaccard", "keep_mass_threshold"]

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
    flat = maps.reshape(*maps.shape[: maps.ndim - ndim], -1).double()
    if (flat < 0).any():
        raise ValueError("keep_mass_threshold needs non-negative maps (attention weights, not logits)")
    values, order = flat.sort(dim=-1, descending=True, stable=True)
    total = values.sum(dim=-1, keepdim=True)
    before = values.cumsum(dim=-1) - values  # exclusive prefix sums S_{k-1}
    keep_sorted = before < mass * total * (1.0 - _MASS_RTOL)
    keep_sorted &= total > 0
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


def cls_jaccard(attn: AttentionInput, foreground: Tensor, patch_size: int | Sequence[int], *,
                mass: float = 0.6, heads: HeadMode = "mean", num_prefix: int = 1) -> Tensor:
    """DINO-style Jaccard of the thresholded CLS→patch attention with the object mask.

    Caron et al. 2021 (DINO, Table 6 / §4.2.1): threshold the cls token's attention over patches
    to keep ``mass`` (60 %) of it (:func:`keep_mass_threshold`) and compare with the foreground::

        J = |T ∩ F| / |T ∪ F|,   T = keep_mass_threshold(ã_cls, mass),
        F = patches whose pixels are more than half foreground (union of all object masks)

    ``ã_cls`` is the cls query's row over patch keys, renormalised (its weights on prefix keys —
    cls itself, registers — dropped).
    ``heads="mean"`` thresholds the head-mean map; ``"each"`` gives one value per head (DINO
    shows per-head maps; report the best or the mean as needed). NaN for images without
    foreground patches (J undefined: there is no object to find).

    Args:
        attn: ``[B, h, N, N]`` or a sequence of layers (DINO uses the last layer).
        foreground: ``[B, H, W]`` bool, or an instance/class id map where non-zero = object.
    Returns:
        float64 ``[B]`` / ``[B, h]`` (``heads``), with a layer dim at 1 for a sequence.
    """
    if heads not in ("mean", "each"):
        raise ValueError(f"heads must be 'mean' or 'each', got {heads!r}")
    if num_prefix < 1:
        raise ValueError("cls_jaccard needs a cls token (num_prefix ≥ 1); this encoder has none")
    fg = foreground_patches(foreground, patch_size)
    B = fg.shape[0]
    fg = fg.reshape(B, 1, -1)
    has_fg = fg.any(-1)  # [B, 1]

    def one(a: Tensor) -> Tensor:
        check_layer(a, num_prefix, fg.shape[-1])
        row = a[:, :, 0, num_prefix:].double()
        row = row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        if heads == "mean":
            row = row.mean(dim=1, keepdim=True)
        kept = keep_mass_threshold(row, mass)
        j = (kept & fg).sum(-1).double() / (kept | fg).sum(-1).double().clamp_min(1.0)
        j = torch.where(has_fg, j, torch.full_like(j, float("nan")))
        return j[:, 0] if heads == "mean" else j

    return map_layers(one, attn)
