"""Across seeds: each configuration's metrics over its seeds, and configurations compared by seed.

Input: the per-run analyses of a study (``results.json`` + ``per_image.npz`` of each run, all on the
same images). Output: a :class:`analysis.results.Results` whose ``runs`` are the configurations
(``role: "configuration"``):

- a per-image metric (attention, instance, localisation; interactive IoU per (image, instance)
  pair) is the mean over seeds of each seed's mean over images, with a two-level bootstrap
  interval (seeds resampled, images resampled inside — :func:`analysis.stats.nested_bootstrap_ci`);
- a probe score (one number per seed) gets a bootstrap interval over seeds;
- interactive IoU also carries each seed's gain over the strongest baseline at each click count
  (the baseline with the highest mean IoU on the same pairs, given the same clicks), across seeds
  with the same nested interval (:func:`interactive_gain`);
- every estimate keeps ``per_seed`` (the value of each seed) and ``n_seeds``;
- ``differences`` pair the seeds of two configurations (seed s of A with seed s of B: the same
  initial-weight seed, data order and masks) and carry ``"scope": "method"`` when both sides have
  at least two seeds — only then does the report say "better" or "worse".
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from ..registry import LAYER_METRICS, PROBE_KEYS
from ..results import Estimate, Results, RunResult
from ..stats import nested_bootstrap_ci, seed_bootstrap_ci
from .plan import PlannedRun

PROBE_METRICS = frozenset(PROBE_KEYS.values())


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ci(lo: Any, hi: Any) -> tuple[float, float] | None:
    lo, hi = _num(lo), _num(hi)
    return (lo, hi) if lo is not None and hi is not None else None


def _scope(n_seeds: int) -> str:
    return "method" if n_seeds >= 2 else "checkpoint"


def _per_seed_means(stack: np.ndarray) -> list[float | None]:
    """[S, n, ...] → each seed's mean over images (last layer / last click for curves)."""
    with np.errstate(all="ignore"):
        m = np.nanmean(stack, axis=1)
    m = m.reshape(m.shape[0], -1)[:, -1]
    return [_num(v) for v in m]


def nested_estimate(stack: np.ndarray, seed: int, unit: str = "", per_layer: bool = False) -> Estimate:
    """``[S, n]`` or ``[S, n, layers]`` per-image values of S seeds → an across-seed estimate."""
    mean, (lo, hi) = nested_bootstrap_ci(stack, seed=seed)
    extra: dict[str, Any] = {"per_seed": _per_seed_means(stack), "n_seeds": int(stack.shape[0]),
                             "scope": _scope(stack.shape[0])}
    if unit:
        extra["unit"] = unit
    if per_layer and np.ndim(mean) == 1:
        with np.errstate(all="ignore"):
            seeds = np.nanmean(stack, axis=1)  # [S, layers]
        extra["per_seed_per_layer"] = [[_num(v) for v in row] for row in seeds]
        return Estimate(_num(mean[-1]), _ci(lo[-1], hi[-1]), [_num(v) for v in mean],
                        [_ci(a, b) for a, b in zip(lo, hi)], extra)
    return Estimate(_num(mean), _ci(lo, hi), extra=extra)


def seed_estimate(values: list[float], seed: int) -> Estimate:
    mean, (lo, hi) = seed_bootstrap_ci(np.asarray(values, dtype=float), seed=seed)
    return Estimate(_num(mean), _ci(lo, hi), extra={"per_seed": [_num(v) for v in values], "n_seeds": len(values),
                                                    "scope": _scope(len(values))})


def curve_estimate(stack: np.ndarray, clicks: list[int], seed: int) -> Estimate:
    """Interactive IoU ``[S, pairs, clicks]`` → per-click curve across seeds; value = last click."""
    per_click, cis = [], []
    for j in range(stack.shape[2]):
        m, (lo, hi) = nested_bootstrap_ci(stack[:, :, j], seed=seed)
        per_click.append(_num(m))
        cis.append(_ci(lo, hi))
    return Estimate(per_click[-1], cis[-1], extra={
        "clicks": clicks, "per_click": per_click, "per_click_ci": [list(c) if c else None for c in cis],
        "n_pairs": int(stack.shape[1]), "per_seed": _per_seed_means(stack), "n_seeds": int(stack.shape[0]),
        "scope": _scope(stack.shape[0])})


def interactive_gain(stack: np.ndarray, baselines: list[dict[str, np.ndarray]], clicks: list[int],
                     seed: int) -> Estimate | None:
    """Model IoU ``[S, pairs, clicks]`` minus the strongest baseline's, pair by pair, across seeds.

    ``baselines[s]`` maps each baseline of seed s's analysis to its ``[pairs, clicks]`` IoUs on the
    same pairs. The strongest baseline is chosen per seed and click count by its mean IoU — never by
    the model's — so the gain is what the model adds over the best use of exactly its clicks.
    Returns a curve estimate (value = the most clicks) with ``best_baseline`` per click, or None when
    a seed's analysis has no baseline on the same pairs."""
    if len(baselines) != stack.shape[0] or any(not b for b in baselines):
        return None
    gains, best = np.empty_like(stack), []
    for s, tables in enumerate(baselines):
        if any(t.shape != stack.shape[1:] for t in tables.values()):
            return None
        names = sorted(tables)
        with np.errstate(all="ignore"):
            means = np.stack([np.nanmean(tables[n], axis=0) for n in names])  # [baselines, clicks]
        strongest = [names[int(np.nanargmax(np.nan_to_num(means[:, j], nan=-np.inf)))] for j in range(stack.shape[2])]
        for j, name in enumerate(strongest):
            gains[s, :, j] = stack[s, :, j] - tables[name][:, j]
        best.append(strongest)
    est = curve_estimate(gains, clicks, seed)
    est.extra["best_baseline"] = best[0] if all(b == best[0] for b in best) else best
    return est


class _Seeds:
    """The analyses of one configuration's seeds."""

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.results: list[Results] = []
        self.per_image: list[dict[str, np.ndarray]] = []
        self.baselines: list[dict[str, np.ndarray]] = []  # per seed: interactive baseline → [pairs, clicks]
        self.folders: list[str] = []

    def stack(self, key: str) -> np.ndarray | None:
        arrays = [p.get(key) for p in self.per_image]
        if any(a is None for a in arrays) or len({a.shape for a in arrays}) != 1:
            return None
        return np.stack(arrays).astype(float)

    def scalars(self, key: str) -> list[float] | None:
        vals = [(r.runs[next(iter(r.run_names("run")))].metrics.get(key)) for r in self.results]
        if any(v is None or v.value is None for v in vals):
            return None
        return [float(v.value) for v in vals]


def _load(planned: list[PlannedRun]) -> dict[str, _Seeds]:
    by_label: dict[str, _Seeds] = defaultdict(_Seeds)
    for run in planned:
        res = Results.load(run.analysis / "results.json")
        every = res.load_per_image(run.analysis)
        per_image = every.get(run.folder.name, {})
        baselines = {k.removeprefix("baseline:"): v["interactive_iou"] for k, v in every.items()
                     if k.startswith("baseline:") and "interactive_iou" in v}
        s = by_label[run.configuration.label]
        s.seeds.append(run.seed)
        s.results.append(res)
        s.per_image.append(per_image)
        s.baselines.append(baselines)
        s.folders.append(f"runs/{run.folder.name}")  # relative to the study folder: it may move
    return by_label


def _metrics(s: _Seeds, seed: int) -> dict[str, Estimate]:
    out: dict[str, Estimate] = {}
    first = s.results[0].runs[s.results[0].run_names("run")[0]]
    for key in sorted(set.intersection(*(set(p) for p in s.per_image)) if s.per_image else ()):
        stack = s.stack(key)
        if stack is None:
            continue
        if key == "interactive_iou":
            clicks = list(first.metrics[key].extra.get("clicks") or [])
            out[key] = curve_estimate(stack, clicks, seed)
            gain = interactive_gain(stack, s.baselines, clicks, seed)
            if gain is not None:
                out[key].extra["gain"] = gain.to_json()
        else:
            unit = (first.metrics.get(key) or Estimate()).extra.get("unit", "")
            out[key] = nested_estimate(stack, seed, unit, per_layer=key in LAYER_METRICS)
    for key in PROBE_METRICS:
        vals = s.scalars(key)
        if vals is not None:
            out[key] = seed_estimate(vals, seed)
            out[key].extra["chance"] = first.metrics[key].extra.get("chance")
    return out


def _difference(a: _Seeds, b: _Seeds, key: str, seed: int) -> Estimate | None:
    """b − a, seed s paired with seed s (only the seeds both have)."""
    common = [s for s in a.seeds if s in b.seeds]
    if not common:
        return None
    ia, ib = [a.seeds.index(s) for s in common], [b.seeds.index(s) for s in common]
    if key in PROBE_METRICS:
        va, vb = a.scalars(key), b.scalars(key)
        if va is None or vb is None:
            return None
        est = seed_estimate([vb[j] - va[i] for i, j in zip(ia, ib)], seed)
    else:
        sa, sb = a.stack(key), b.stack(key)
        if sa is None or sb is None or sa.shape[1:] != sb.shape[1:]:
            return None
        d = sb[ib] - sa[ia]
        if key == "interactive_iou":
            d = d[:, :, -1]  # the headline click count
        est = nested_estimate(d, seed, per_layer=key in LAYER_METRICS)
    est.extra["seeds"] = common
    return est


def aggregate(planned: list[PlannedRun], seed: int = 0) -> Results:
    """The study's :class:`Results` (see module docstring)."""
    groups = _load(planned)
    configs = {r.configuration.label: r.configuration for r in planned}
    ref = next((label for label, c in configs.items() if c.family == "mae"), next(iter(configs)))
    any_res = groups[ref].results[0]
    res = Results(data=any_res.data, n_images=any_res.n_images, seed=any_res.seed, reference=ref)
    for label, s in groups.items():
        c = configs[label]
        res.runs[label] = RunResult(label, path="runs", family=c.family, model=label,
                                    role="configuration", config={"family": c.family, **c.overrides()},
                                    metrics=_metrics(s, seed), extra={"seeds": s.seeds, "run_folders": s.folders})
    for label, s in groups.items():
        if label == ref:
            continue
        diffs = {}
        for key in res.runs[label].metrics:
            if key in res.runs[ref].metrics and (d := _difference(groups[ref], s, key, seed)) is not None:
                diffs[key] = d
        res.differences[f"{label} − {ref}"] = diffs
    # RAE against the from-scratch encoder too: the paper's test that regions alone are a pre-text task
    scratch = next((label for label, c in configs.items() if c.family == "scratch" and label in groups), None)
    for label, s in groups.items():
        if scratch is not None and configs[label].family == "rae":
            res.differences[f"{label} − {scratch}"] = {
                key: d for key in res.runs[label].metrics if key in res.runs[scratch].metrics
                and (d := _difference(groups[scratch], s, key, seed)) is not None}
    baselines = any_res.baselines.get("interactive_iou")
    for s in groups.values():
        for r in s.results:
            if r.baselines.get("interactive_iou"):
                baselines = r.baselines["interactive_iou"]
                break
    if baselines:
        res.baselines["interactive_iou"] = baselines  # data-only: the same for every run
    res.meta.update(kind="study", seeds=sorted({r.seed for r in planned}),
                    configurations={label: {"family": c.family, **c.overrides()} for label, c in configs.items()})
    return res
