"""Confidence intervals for per-image measurements.

- :func:`bootstrap_ci`: percentile bootstrap of the mean over images (Efron & Tibshirani),
  for per-image values ``[n]`` or per-image-per-layer values ``[n, layers]``.
- :func:`paired_difference_ci`: the same images for two models, resampled jointly, so the
  interval of ``mean(b) − mean(a)`` accounts for their correlation (paired bootstrap).
- :func:`wilson_ci`: binomial proportion interval for accuracies (Wilson 1927).
- :func:`nested_bootstrap_ci`: images nested in seeds — the interval of a *method* (``rmae study``).

NaN entries (e.g. an image with no instance query) are ignored per resample.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

N_BOOT = 1000
ALPHA = 0.05


def _nanmean_rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Means over the resampled rows: idx [n_boot, n] → [n_boot, ...]."""
    sample = x[idx]  # [n_boot, n, ...]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples give NaN, on purpose
        return np.nanmean(sample, axis=1)


def bootstrap_ci(values, n_boot: int = N_BOOT, alpha: float = ALPHA, seed: int = 0):
    """Mean and (1 − alpha) percentile-bootstrap interval over the first axis.

    values [n] → (mean, (lo, hi)); values [n, m] → (means [m], (lo [m], hi [m])).
    """
    x = np.asarray(values, dtype=float)
    if x.shape[0] == 0 or not np.isfinite(x).any():
        nan = np.full(x.shape[1:], np.nan)
        return (float("nan"), (float("nan"), float("nan"))) if x.ndim == 1 else (nan, (nan, nan))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    means = _nanmean_rows(x, idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point = np.nanmean(x, axis=0)
        lo, hi = np.nanpercentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    if x.ndim == 1:
        return float(point), (float(lo), float(hi))
    return point, (lo, hi)


def paired_difference_ci(a, b, n_boot: int = N_BOOT, alpha: float = ALPHA, seed: int = 0):
    """``mean(b) − mean(a)`` over the same images with a paired bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(b - a, n_boot, alpha, seed)


def wilson_ci(correct: int, total: int, alpha: float = ALPHA) -> tuple[float, tuple[float, float]]:
    """Accuracy and its Wilson score interval."""
    if total == 0:
        return float("nan"), (float("nan"), float("nan"))
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    from scipy.stats import norm

    z = float(norm.ppf(1.0 - alpha / 2.0))  # two-sided: 1.96 for alpha 0.05
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return p, (max(0.0, centre - half), min(1.0, centre + half))


def excludes_zero(ci: tuple[float, float]) -> bool:
    lo, hi = ci
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))


def nested_bootstrap_ci(values, n_boot: int = N_BOOT, alpha: float = ALPHA, seed: int = 0):
    """Mean over seeds and images with a two-level bootstrap interval: images nested in seeds.

    ``values [S, n, ...]``: one row per seed (checkpoint), the same ``n`` images in every row.
    Each resample draws ``S`` seeds with replacement *and* one resample of the images, shared by
    the drawn seeds (they were all scored on the same images), then averages — so the interval
    carries both seed-to-seed spread (how far another seed of the method would land) and the
    sampling of images. With a single seed only the image level remains: that interval describes
    one checkpoint, not a method (callers mark it ``"scope": "checkpoint"``).
    Returns (mean, (lo, hi)) with the trailing shape of ``values[0, 0]``; NaNs are ignored.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim < 2:
        raise ValueError(f"values must be [seeds, images, ...], got shape {x.shape}")
    S, n = x.shape[:2]
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point = np.nanmean(np.nanmean(x, axis=1), axis=0)  # mean of per-seed means: seeds weigh equally
        means = np.empty((n_boot, *x.shape[2:]))
        for b in range(n_boot):  # a loop keeps memory at S·n per resample, whatever n_boot
            s_idx = rng.integers(0, S, size=S)
            i_idx = rng.integers(0, n, size=n)
            means[b] = np.nanmean(np.nanmean(x[s_idx][:, i_idx], axis=1), axis=0)
        lo, hi = np.nanpercentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    if x.ndim == 2:
        return float(point), (float(lo), float(hi))
    return point, (lo, hi)


def seed_bootstrap_ci(values, n_boot: int = N_BOOT, alpha: float = ALPHA, seed: int = 0):
    """Mean of one number per seed (e.g. a probe accuracy) with a bootstrap interval over seeds."""
    x = np.asarray(values, dtype=float)
    return bootstrap_ci(x, n_boot=n_boot, alpha=alpha, seed=seed)
