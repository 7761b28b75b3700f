"""Sample k binary region maps from the segments inside an augmented crop, as R-MAE does.

Rule (official R-MAE ``PretrainWithMask._process_mask``): pool the segments of every scale;
with n ≥ k segments pick k uniformly without replacement; with 0 < n < k tile the n indices
``ceil(k / n)`` times, shuffle, keep the first k (so some segments appear twice); with n = 0
return k all-zero maps.

Optional filters, applied before the rule: ``min_size`` (pixels) and ``min_patches`` (the
segment must touch at least that many patches of ``patch_size`` — the official
``filter_small_patches`` uses 2). If the filters leave nothing, all segments are used rather
than returning empty maps: a tiny target is still a target.
"""

from __future__ import annotations

import numpy as np


def segment_table(label_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All segments of all scales: (scale index, label, pixel count), each ``[n]``.

    ``label_maps``: int ``[S, H, W]``, 0 = no segment.
    """
    scales, labels, counts = [], [], []
    for s, m in enumerate(label_maps):
        ids, cnt = np.unique(m, return_counts=True)
        keep = ids > 0
        scales.append(np.full(int(keep.sum()), s, np.int64))
        labels.append(ids[keep].astype(np.int64))
        counts.append(cnt[keep].astype(np.int64))
    if not scales:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return np.concatenate(scales), np.concatenate(labels), np.concatenate(counts)


def _patch_counts(label_maps: np.ndarray, scales: np.ndarray, labels: np.ndarray,
                  patch_size: int) -> np.ndarray:
    """How many ``patch_size`` patches each segment touches."""
    S, H, W = label_maps.shape
    hp, wp = H // patch_size, W // patch_size
    out = np.zeros(len(labels), np.int64)
    if hp == 0 or wp == 0:
        return out
    patch_id = (np.arange(hp * patch_size)[:, None] // patch_size) * wp + \
        np.arange(wp * patch_size)[None, :] // patch_size
    P = hp * wp
    for s in range(S):
        lab = label_maps[s, : hp * patch_size, : wp * patch_size].astype(np.int64)
        # distinct (label, patch) pairs, then how many pairs each label has
        pairs = np.unique(lab * P + patch_id)
        ids, n_patches = np.unique(pairs // P, return_counts=True)
        sel = np.nonzero(scales == s)[0]
        pos = np.searchsorted(ids, labels[sel])
        pos = np.minimum(pos, len(ids) - 1)
        found = ids[pos] == labels[sel]
        out[sel] = np.where(found, n_patches[pos], 0)
    return out


def choose_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into n segments for k region maps (the official rule; see module docstring)."""
    if n == 0:
        return np.zeros(0, np.int64)
    if n >= k:
        return rng.permutation(n)[:k]
    tiled = np.tile(np.arange(n), -(-k // n))
    return rng.permutation(tiled)[:k]


def sample_regions(label_maps: np.ndarray, k: int, rng: np.random.Generator,
                   min_size: int = 0, min_patches: int = 0, patch_size: int = 16
                   ) -> tuple[np.ndarray, int]:
    """k binary region maps from ``label_maps``.

    Args:
        label_maps: int ``[S, H, W]`` (already cropped/resized), 0 = no segment.
        k: number of maps to return.
        rng: the per-sample generator (makes the choice reproducible).
        min_size, min_patches, patch_size: optional filters (see module docstring).

    Returns:
        ``(regions, n)`` — ``regions`` uint8 ``[k, H, W]`` in {0, 1}; ``n`` the number of
        distinct segments that were eligible (``n < k`` means duplicates are present).
    """
    if label_maps.ndim != 3:
        raise ValueError(f"label_maps must be [S, H, W], got shape {label_maps.shape}")
    S, H, W = label_maps.shape
    scales, labels, counts = segment_table(label_maps)
    keep = counts >= max(1, min_size)
    if min_patches > 0 and keep.any():
        keep &= _patch_counts(label_maps, scales, labels, patch_size) >= min_patches
    if keep.any():
        scales, labels = scales[keep], labels[keep]
    idx = choose_indices(len(labels), k, rng)
    if len(idx) == 0:
        return np.zeros((k, H, W), np.uint8), 0
    regions = label_maps[scales[idx]] == labels[idx][:, None, None]
    return regions.astype(np.uint8), len(labels)
