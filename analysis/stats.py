"""Confidence intervals for per-image measurements.

- :func:`bootstrap_ci`: percentile bootstrap of the mean over images (Efron & Tibshirani),
  for per-image values ``[n]`` or per-image-per-layer values ``[n, layers]``.
- :func:`paired_difference_ci`: the same images for two models, resampled jointly, so the
  interval of ``mean(b) − mean(a)`` accounts for their correlation (paired bootstrap).
- :func:`wilson_ci`: binomial proportion interval for accuracies (Wilson 1927).

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
    z = {0.05: 1.959963984540054, 0.1: 1.6448536269514722, 0.01: 2.5758293035489004}.get(alpha, 1.959963984540054)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return p, (max(0.0, centre - half), min(1.0, centre + half))


def excludes_zero(ci: tuple[float, float]) -> bool:
    lo, hi = ci
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))
