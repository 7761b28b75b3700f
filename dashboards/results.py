"""Analysis results, training logs and configs → tables and plotly figures. No Streamlit here.

Reports are :class:`analysis.results.Results` (read tolerantly by their owner); names, titles,
units, directions and descriptions come from :mod:`analysis.registry`; every number is formatted
by :func:`analysis.results.format_value`. Any metric may be missing in a report (a run without a
region decoder has no ``interactive_iou``, a report computed without probes has no
``linear_probe``…): every function here skips what is absent and the tables show "—".
"""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis.registry import LAYER_METRICS, METRICS, metric
from analysis.results import DASH, Estimate, Results, finite, format_value

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
MARGIN = {"l": 40, "r": 10, "t": 40, "b": 40}
#: metrics of the per-run table: every registered metric (per-layer ones at their last layer)
TABLE_METRICS: tuple[str, ...] = tuple(METRICS)


def direction(name: str) -> str:
    """"higher is better", "lower is better", or "descriptive" (from the registry)."""
    return {1: "higher is better", -1: "lower is better"}.get(metric(name).better, "descriptive")


def metric_help(name: str) -> str:
    """One line for a column's tooltip / a figure's caption: what is measured, and its direction."""
    return f"{metric(name).description} — {direction(name)}."


def figure_title(name: str) -> str:
    """The registry's title, with an arrow when a direction is better (none for descriptive metrics)."""
    m = metric(name)
    return m.title + {1: " (↑ better)", -1: " (↓ better)"}.get(m.better, "")


# ------------------------------------------------------------------------------------------
# per-layer and interactive curves


def layer_metrics_present(results: Results, runs: list[str]) -> list[str]:
    """The registry's per-layer metrics that at least one of ``runs`` has, in registry order."""
    return [name for name in LAYER_METRICS
            if any((e := results.metric(r, name)) is not None and e.per_layer for r in runs)]


def _band(fig: go.Figure, x: list, cis: list[tuple[float, float] | None], color: str, group: str) -> None:
    pts = [(a, c) for a, c in zip(x, cis) if c is not None]
    if not pts:
        return
    xs = [p[0] for p in pts]
    lo, hi = [p[1][0] for p in pts], [p[1][1] for p in pts]
    fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", mode="lines",
                             fillcolor=color, opacity=0.18, line={"width": 0}, hoverinfo="skip",
                             name=f"{group} 95 % CI", legendgroup=group, showlegend=False))


def layer_figure(results: Results, name: str, runs: list[str]) -> go.Figure:
    """Per-layer curves of one metric, a line per run with its bootstrap 95 % CI band."""
    m = metric(name)
    fig = go.Figure()
    depth = 0
    for i, run in enumerate(runs):
        est = results.metric(run, name)
        ys = (est.per_layer if est else None) or []
        if not ys:
            continue
        depth = max(depth, len(ys))
        color = COLORS[i % len(COLORS)]
        x = list(range(1, len(ys) + 1))
        _band(fig, x, est.per_layer_ci or [], color, run)
        fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=run, legendgroup=run, line={"color": color}))
    fig.update_layout(title=figure_title(name), xaxis_title="layer", yaxis_title=m.unit, height=320, margin=MARGIN,
                      legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(tickmode="linear", tick0=1, dtick=max(1, depth // 12))
    return fig


def _curve(est: Estimate) -> tuple[list, list, list] | None:
    """(clicks, IoU per click, CI per click) of an interactive estimate, or None if malformed."""
    clicks, ys, cis = est.get("clicks"), est.get("per_click"), est.get("per_click_ci")
    if not isinstance(clicks, list) or not isinstance(ys, list) or not clicks or len(clicks) != len(ys):
        return None
    cis = [c if isinstance(c, list) and len(c) == 2 and None not in c else None for c in cis] \
        if isinstance(cis, list) and len(cis) == len(ys) else []
    return clicks, [finite(v) for v in ys], cis


def interactive_figure(results: Results, runs: list[str]) -> go.Figure | None:
    """IoU vs number of clicks per region run, with the baselines dashed."""
    fig = go.Figure()
    for i, run in enumerate(runs):
        est = results.metric(run, "interactive_iou")
        curve = _curve(est) if est else None
        if curve is None:
            continue
        clicks, ys, cis = curve
        color = COLORS[i % len(COLORS)]
        _band(fig, clicks, cis, color, run)
        fig.add_trace(go.Scatter(x=clicks, y=ys, mode="lines+markers", name=run, legendgroup=run, line={"color": color}))
    for j, (name, est) in enumerate(sorted(results.baselines.get("interactive_iou", {}).items())):
        curve = _curve(est)
        if curve is None:
            continue
        fig.add_trace(go.Scatter(x=curve[0], y=curve[1], mode="lines+markers", name=f"baseline: {name}",
                                 line={"dash": "dash", "color": "#7f7f7f" if j == 0 else "#bcbd22"}))
    if not fig.data:
        return None
    ticks = sorted({x for tr in fig.data for x, y in zip(tr.x, tr.y) if y is not None})
    fig.update_layout(title="Interactive segmentation: IoU vs clicks", xaxis_title="clicks (visible region patches)",
                      yaxis_title="IoU", height=340, margin=MARGIN, legend={"orientation": "h", "y": -0.3})
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[str(t) for t in ticks])
    return fig


# ------------------------------------------------------------------------------------------
# CKA


def cka_entries(results: Results) -> list[dict]:
    """CKA matrices of a report: ``{"a", "b", "matrix"}``, or several of them keyed by run name
    (``analyze`` compares every run with its reference). Malformed entries are left out."""
    cka = results.cka
    entries = [cka] if "matrix" in cka else list(cka.values())
    return [e for e in entries if isinstance(e, dict) and _matrix(e.get("matrix"))]


def _matrix(z: Any) -> bool:
    return isinstance(z, list) and bool(z) and all(isinstance(row, list) and row for row in z)


def cka_figure(entry: dict) -> go.Figure:
    z = [[finite(v) for v in row] for row in entry["matrix"]]
    a, b = entry.get("a", "A"), entry.get("b", "B")
    fig = go.Figure(go.Heatmap(z=z, x=list(range(1, len(z[0]) + 1)), y=list(range(1, len(z) + 1)), zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "CKA"}))
    how = {"patch": "patch tokens", "mean": "mean patch token per image", "cls": "cls token per image"}.get(
        str(entry.get("tokens")), "")
    inputs = re.sub(r"[^\w .,x-]", "", str(entry.get("inputs", "")))[:60]  # written by analyze; shown as plain words
    fig.update_layout(title=f"Linear CKA per layer: {a} (rows) vs {b} (columns)"
                            + (f"<br><sup>{', '.join(x for x in (how, inputs) if x)}</sup>" if how or inputs else ""),
                      xaxis_title=f"{b} layer", yaxis_title=f"{a} layer", height=380, margin=MARGIN)
    fig.update_xaxes(tickmode="linear", tick0=1, dtick=max(1, len(z[0]) // 12))
    fig.update_yaxes(tickmode="linear", tick0=1, dtick=max(1, len(z) // 12))
    return fig


# ------------------------------------------------------------------------------------------
# tables


def scalar_table(results: Results, runs: list[str], names: tuple[str, ...] = TABLE_METRICS) -> pd.DataFrame:
    """Rows = runs, columns = metric titles, cells "value [lo, hi]" (last layer for per-layer metrics)."""
    rows = {}
    for run in runs:
        info = results.runs.get(run)
        row = {"family": (info.family if info else "") or DASH, "model": (info.model if info else "") or DASH}
        for key in names:
            est = results.metric(run, key)
            row[metric(key).title] = format_value(est.value, est.ci) if est else DASH
        rows[run] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "run"
    return df


def differences_table(results: Results) -> pd.DataFrame | None:
    """One row per (difference, metric): value with its interval, whether the interval excludes
    0, and the scope the interval speaks for (checkpoint or method)."""
    rows = []
    for pair, estimates in results.differences.items():
        for key, est in estimates.items():
            sig = DASH if est.ci is None else ("yes" if est.ci[0] > 0 or est.ci[1] < 0 else "no")
            rows.append({"difference": pair, "metric": key, "value [95 % CI]": format_value(est.value, est.ci),
                         "CI excludes 0": sig, "scope": str(est.extra.get("scope") or DASH)})
    return pd.DataFrame(rows) if rows else None


def _text(v: Any) -> str:
    """A table cell from a value read from a file: strings as they are, anything else as short JSON."""
    if isinstance(v, str):
        return v[:200]
    return DASH if v is None else json.dumps(v, default=str)[:80]


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def probe_files_table(files: dict[str, list[dict]]) -> pd.DataFrame | None:
    """Probe results stored in run folders by ``rmae probe`` (``RUN/analysis/probes/*.json``);
    every cell typed (text, number or count), whatever the file holds."""
    rows = []
    for run, items in files.items():
        for d in items:
            rows.append({"run": run, "probe": _text(d.get("probe", "?")), "metric": _text(d.get("metric", "?")),
                         "value": finite(d.get("value")), "chance": finite(d.get("chance")),
                         "layer": _count(d.get("layer")), "pool": _text(d.get("pool")), "train": _text(d.get("train")),
                         "eval": _text(d.get("eval")), "n_train": _count(d.get("n_train")),
                         "n_eval": _count(d.get("n_eval"))})
    return pd.DataFrame(rows) if rows else None


# ------------------------------------------------------------------------------------------
# training logs and configs


def numeric_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and finite(v) is not None:
                keys.setdefault(k, None)
    return list(keys)


def training_figure(logs: dict[str, list[dict]], key: str, log_y: bool = False) -> go.Figure:
    fig = go.Figure()
    for i, (run, rows) in enumerate(logs.items()):
        pts = [(finite(r.get("step")), finite(r.get(key))) for r in rows]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if not pts:
            continue
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers" if len(pts) < 30 else "lines",
                                 name=run, line={"color": COLORS[i % len(COLORS)]}))
    fig.update_layout(title=f"{key} per step", xaxis_title="step", yaxis_title=key, height=340,
                      yaxis_type="log" if log_y else "linear", margin=MARGIN, legend={"orientation": "h", "y": -0.3})
    return fig


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_table(configs: dict[str, dict], only_differences: bool = False) -> pd.DataFrame:
    """Configs side by side: rows = keys (``model_config.*`` flattened), columns = runs."""
    flat = {run: _flatten(cfg) for run, cfg in configs.items()}
    keys: dict[str, None] = {}
    for f in flat.values():
        for k in f:
            keys.setdefault(k, None)
    rows = {}
    for k in keys:
        vals = [f.get(k, DASH) for f in flat.values()]
        shown = [DASH if v is None else (json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for v in vals]
        if only_differences and len(set(shown)) <= 1:
            continue
        rows[k] = dict(zip(flat, shown))
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(flat))
    df.index.name = "key"
    return df
