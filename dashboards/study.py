"""A study (``rmae study``) as figures and tables: each configuration's per-seed values and its
across-seed interval, per-layer curves across seeds, the seed-paired differences with their scope,
and the controls. No Streamlit here.

A study's ``results.json`` (:mod:`analysis.study.aggregate`) has ``meta["kind"] == "study"``; its
``runs`` are configurations (``role: "configuration"``) whose estimates carry ``per_seed`` (one
value per seed, the last layer for per-layer metrics) and ``n_seeds``, and controls
(``role: "control"``) analysed once on the same images. Per-seed per-layer values are not in it:
they come from each seed's own analysis (``STUDY/analysis/NAME/results.json``), passed in as
``seed_curves``. Every value read from the file is checked (:func:`analysis.results.finite`);
anything malformed is left out of a figure, never raised.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis.registry import LAYER_METRICS, METRICS, metric
from analysis.results import DASH, Estimate, Results, finite, format_value

from .results import MARGIN, COLORS, figure_title

CONTROL_COLOR = "#7f7f7f"
#: half the width over which one configuration's seeds are spread on the x axis
JITTER = 0.18


def is_study(results: Results) -> bool:
    return results.meta.get("kind") == "study"


def configurations(results: Results) -> list[str]:
    return results.run_names("configuration")


def controls(results: Results) -> list[str]:
    return results.run_names("control")


def problems(results: Results) -> list[str]:
    """Study-only entries of the wrong type (the typed ones are :attr:`Results.problems`): each is
    left out of the view and named here."""
    out = []
    for c in configurations(results):
        run = results.runs[c]
        folders, seeds = run.extra.get("run_folders"), run.extra.get("seeds")
        if folders is not None and not isinstance(folders, list):
            out.append(f"configuration {c}: run_folders is not a list; its runs are not listed")
        if seeds is not None and not (isinstance(seeds, list) and (not isinstance(folders, list) or len(seeds) == len(folders))):
            out.append(f"configuration {c}: seeds is not a list matching run_folders; seeds are numbered instead")
        for key, est in run.metrics.items():
            values = est.extra.get("per_seed")
            if values is None:
                continue
            if not isinstance(values, list):
                out.append(f"configuration {c} / {key}: per_seed is not a list; its seed points are left out")
            elif any(v is not None and finite(v) is None for v in values):
                out.append(f"configuration {c} / {key}: per_seed holds values that are not numbers; they are left out")
    return out


def per_seed(est: Estimate | None) -> list[float | None]:
    """The per-seed values of an estimate (``[]`` when absent or not a list)."""
    values = est.extra.get("per_seed") if est is not None else None
    return [finite(v) for v in values] if isinstance(values, list) else []


def seed_ids(results: Results, configuration: str, n: int) -> list[str]:
    """Labels of a configuration's ``n`` seeds: its recorded seeds, else 1…n."""
    run = results.runs.get(configuration)
    seeds = run.extra.get("seeds") if run else None
    if isinstance(seeds, list) and len(seeds) == n:
        return [str(s)[:20] for s in seeds]
    return [f"#{i + 1}" for i in range(n)]


def metrics_present(results: Results, configs: list[str]) -> list[str]:
    """Metrics with a value or per-seed values in any of ``configs`` (registry order, then others)."""
    names: dict[str, None] = {}
    for c in configs:
        run = results.runs.get(c)
        for key, est in (run.metrics.items() if run else ()):
            if est.value is not None or any(v is not None for v in per_seed(est)):
                names.setdefault(key, None)
    known = [k for k in METRICS if k in names]
    return known + sorted(k for k in names if k not in METRICS)


def jitter(n: int) -> list[float]:
    """Offsets of ``n`` seeds around their configuration's position (deterministic)."""
    return [0.0] if n == 1 else [-JITTER + 2 * JITTER * i / (n - 1) for i in range(n)]


def _mean_with_ci(x: float, est: Estimate, name: str, color: str, group: str,
                  symbol: str = "line-ew-open") -> list[go.Scatter]:
    """The mean as a marker with its 95 % interval as an error bar (none without a finite mean)."""
    value = finite(est.value)
    if value is None:
        return []
    ci = est.ci
    error = {"type": "data", "symmetric": False, "array": [ci[1] - value], "arrayminus": [value - ci[0]],
             "thickness": 2, "width": 10, "color": color} if ci else None
    return [go.Scatter(x=[x], y=[value], mode="markers", name=name, legendgroup=group, error_y=error,
                       marker={"symbol": symbol, "size": 18, "color": color, "line": {"width": 3, "color": color}},
                       hovertemplate=f"{name}: %{{y:.4g}}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
                       + "<extra></extra>")]


def _points(x: float, values: list[float | None], ids: list[str], name: str, color: str, group: str) -> list[go.Scatter]:
    """One point per seed, spread around ``x`` (:func:`jitter`); missing values left out."""
    pts = [(x + dx, v, s) for dx, v, s in zip(jitter(len(values)), values, ids) if v is not None]
    if not pts:
        return []
    return [go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name=name, legendgroup=group,
                       customdata=[p[2] for p in pts], marker={"size": 9, "color": color, "opacity": 0.75},
                       hovertemplate=f"{group}, seed %{{customdata}}: %{{y:.4g}}<extra></extra>")]


def _categories(ticks: list[str]) -> dict:
    return {"tickmode": "array", "tickvals": list(range(len(ticks))), "ticktext": ticks, "range": [-0.6, len(ticks) - 0.4]}


def seed_figure(results: Results, name: str, configs: list[str], with_controls: bool = True) -> go.Figure:
    """One metric across seeds: for each configuration its per-seed values as points (spread
    sideways, one per seed) and the mean with its across-seed 95 % CI as a bar; controls (one
    analysis each, CI over images) as grey diamonds after them. Per-layer metrics: last layer."""
    traces: list[go.Scatter] = []
    ticks: list[str] = []
    for i, c in enumerate(configs):
        color = COLORS[i % len(COLORS)]
        est = results.metric(c, name)
        ticks.append(c)
        values = per_seed(est)
        traces += _points(i, values, seed_ids(results, c, len(values)), f"{c}: seeds", color, c)
        if est is not None:
            traces += _mean_with_ci(i, est, f"{c}: mean, 95 % CI over seeds", color, c)
    for c in controls(results) if with_controls else []:
        est = results.metric(c, name)
        if est is None or finite(est.value) is None:
            continue
        ticks.append(f"control: {c}")
        traces += _mean_with_ci(len(ticks) - 1, est, f"control: {c}", CONTROL_COLOR, f"control: {c}", symbol="diamond")
    suffix = " — last layer" if name in LAYER_METRICS else ""
    return go.Figure(data=traces, layout={"title": {"text": figure_title(name) + suffix}, "height": 320,
                                          "yaxis": {"title": {"text": metric(name).unit}}, "margin": MARGIN,
                                          "showlegend": False, "xaxis": _categories(ticks)})


def seed_layer_figure(results: Results, name: str, configs: list[str],
                      seed_curves: dict[str, list[list[float | None]]]) -> go.Figure:
    """A per-layer metric across seeds: per configuration the mean over seeds with its across-seed
    95 % CI band, and a thin line per seed (``seed_curves[configuration]``: one list per seed)."""
    traces: list[go.Scatter] = []
    depth = 0
    for i, c in enumerate(configs):
        color = COLORS[i % len(COLORS)]
        for curve in seed_curves.get(c, []):
            ys = [finite(v) for v in curve] if isinstance(curve, list) else []
            if not any(v is not None for v in ys):
                continue
            depth = max(depth, len(ys))
            traces.append(go.Scatter(x=list(range(1, len(ys) + 1)), y=ys, mode="lines", name=f"{c}: seed line",
                                     legendgroup=c, showlegend=False, opacity=0.45, line={"width": 1, "color": color},
                                     hoverinfo="skip"))
        est = results.metric(c, name)
        ys = (est.per_layer if est else None) or []
        if not ys:
            continue
        depth = max(depth, len(ys))
        x = list(range(1, len(ys) + 1))
        band = [(a, ci) for a, ci in zip(x, est.per_layer_ci or []) if ci is not None]
        if band:
            xs = [b[0] for b in band]
            traces.append(go.Scatter(x=xs + xs[::-1], y=[b[1][1] for b in band] + [b[1][0] for b in band][::-1],
                                     fill="toself", mode="lines", fillcolor=color, opacity=0.18, line={"width": 0},
                                     hoverinfo="skip", name=f"{c} 95 % CI over seeds", legendgroup=c, showlegend=False))
        traces.append(go.Scatter(x=x, y=ys, mode="lines+markers", name=c, legendgroup=c, line={"color": color, "width": 3}))
    return go.Figure(data=traces, layout={
        "title": {"text": figure_title(name)}, "height": 320, "margin": MARGIN, "legend": {"orientation": "h", "y": -0.25},
        "xaxis": {"title": {"text": "layer"}, "tickmode": "linear", "tick0": 1, "dtick": max(1, depth // 12)},
        "yaxis": {"title": {"text": metric(name).unit}}})


def differences_table(results: Results) -> pd.DataFrame | None:
    """Seed-paired differences: one row per (difference, metric) with its interval, whether the
    interval excludes 0, its scope ("method": seeds on both sides; "checkpoint": one), the seeds
    paired and each seed's difference."""
    rows = []
    for pair, estimates in results.differences.items():
        for key, est in estimates.items():
            ci = est.ci
            seeds = est.extra.get("seeds")
            rows.append({"difference": pair, "metric": key, "value [95 % CI]": format_value(est.value, ci),
                         "CI excludes 0": DASH if ci is None else ("yes" if ci[0] > 0 or ci[1] < 0 else "no"),
                         "scope": str(est.extra.get("scope") or DASH),
                         "seeds paired": len(seeds) if isinstance(seeds, list) else DASH,
                         "per seed": ", ".join(format_value(v) for v in per_seed(est)) or DASH})
    return pd.DataFrame(rows) if rows else None


def difference_figure(results: Results, name: str) -> go.Figure | None:
    """Each difference on ``name``: the per-seed differences as points and the mean with its
    interval (its scope in the name); a dashed line at 0."""
    traces: list[go.Scatter] = []
    pairs = [p for p, e in results.differences.items() if name in e]
    for i, pair in enumerate(pairs):
        est = results.differences[pair][name]
        color = COLORS[i % len(COLORS)]
        values = per_seed(est)
        seeds = est.extra.get("seeds")
        ids = [str(s)[:20] for s in seeds] if isinstance(seeds, list) and len(seeds) == len(values) \
            else [f"#{k + 1}" for k in range(len(values))]
        traces += _points(i, values, ids, f"{pair}: seeds", color, pair)
        traces += _mean_with_ci(i, est, f"{pair}: mean, 95 % CI ({str(est.extra.get('scope') or '?')[:20]})", color, pair)
    if not traces:
        return None
    return go.Figure(data=traces, layout={
        "title": {"text": f"Seed-paired differences: {metric(name).title}"}, "height": 300, "margin": MARGIN,
        "showlegend": False, "yaxis": {"title": {"text": metric(name).unit}}, "xaxis": _categories(pairs),
        "shapes": [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 0, "y1": 0,
                    "line": {"dash": "dash", "color": "#999999"}}]})


def seeds_of(results: Results, configuration: str) -> list[tuple[Any, Any]]:
    """(seed, recorded run folder) of a configuration, as its ``results.json`` lists them
    (``extra["seeds"]``, ``extra["run_folders"]``); malformed lists give what they can."""
    run = results.runs.get(configuration)
    if run is None:
        return []
    folders = run.extra.get("run_folders")
    seeds = run.extra.get("seeds")
    folders = folders if isinstance(folders, list) else []
    seeds = seeds if isinstance(seeds, list) and len(seeds) == len(folders) else [f"#{i + 1}" for i in range(len(folders))]
    return list(zip(seeds, folders))
