"""``results.json`` (written by ``rmae analyze`` / ``analysis.report.analyze``), training logs and
configs → tables and plotly figures. No Streamlit here.

Any metric may be missing or null in a report (a run without a region decoder has no
``interactive_iou``, a report computed without probes has no ``linear_probe``…): every reader
here skips what is absent instead of failing, and the tables show "—".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: per-layer metrics, in the order the page shows them: name → (title, unit, higher is …)
LAYER_METRICS: dict[str, tuple[str, str]] = {
    "attention_distance": ("Mean attention distance", "px"),
    "attention_entropy": ("Attention entropy", "nats"),
    "attention_nmi": ("Attention NMI (query ↔ key)", ""),
    "instance_mass": ("Instance mass (own instance)", "fraction"),
    "instance_leak": ("Instance leak (other instances)", "fraction"),
    "instance_jaccard": ("Instance Jaccard (60 % mass)", ""),
    "cls_jaccard": ("CLS Jaccard (60 % mass)", ""),
}
#: scalar metrics of the probe table
PROBE_METRICS: dict[str, str] = {
    "linear_probe": "linear probe",
    "knn": "k-NN",
    "attentive_probe": "attentive probe",
    "dense_miou": "dense mIoU",
    "corloc": "CorLoc",
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


class ResultsError(ValueError):
    pass


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and minimally validate a ``results.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path.name}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path.name}: not valid JSON ({e.msg} at line {e.lineno}); re-run `rmae analyze`") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise ResultsError(f"{path.name}: not an `rmae analyze` results file (no 'runs' mapping)")
    if data.get("version", 1) != 1:
        raise ResultsError(f"{path.name}: results version {data.get('version')!r}; this dashboard reads version 1")
    return data


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def metric(results: dict, run: str, name: str) -> dict | None:
    m = ((results.get("runs", {}).get(run) or {}).get("metrics") or {}).get(name)
    return m if isinstance(m, dict) else None


def fmt(value: Any, ci: Any = None, digits: int = 3) -> str:
    v = _num(value)
    if v is None:
        return "—"
    s = f"{v:.{digits}f}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and _num(ci[0]) is not None and _num(ci[1]) is not None:
        s += f" [{float(ci[0]):.{digits}f}, {float(ci[1]):.{digits}f}]"
    return s


def layer_metrics_present(results: dict, runs: list[str]) -> list[str]:
    out = []
    for name in LAYER_METRICS:
        if any((metric(results, r, name) or {}).get("per_layer") for r in runs):
            out.append(name)
    return out


def _band(fig, x, lo, hi, color, name, group):
    import plotly.graph_objects as go

    pts = [(a, b, c) for a, b, c in zip(x, lo, hi) if _num(b) is not None and _num(c) is not None]
    if not pts:
        return
    xs = [p[0] for p in pts]
    fig.add_trace(go.Scatter(x=xs + xs[::-1], y=[p[2] for p in pts] + [p[1] for p in pts][::-1], fill="toself", mode="lines",
                             fillcolor=color, opacity=0.18, line={"width": 0}, hoverinfo="skip",
                             name=f"{name} 95 % CI", legendgroup=group, showlegend=False))


def layer_figure(results: dict, name: str, runs: list[str]):
    """Per-layer curves of one metric, a line per run with its bootstrap 95 % CI band."""
    import plotly.graph_objects as go

    title, unit = LAYER_METRICS.get(name, (name, ""))
    fig = go.Figure()
    for i, run in enumerate(runs):
        m = metric(results, run, name) or {}
        ys = m.get("per_layer") or []
        if not ys:
            continue
        color = COLORS[i % len(COLORS)]
        x = list(range(1, len(ys) + 1))
        cis = m.get("per_layer_ci") or []
        if len(cis) == len(ys):
            _band(fig, x, [c[0] if c else None for c in cis], [c[1] if c else None for c in cis], color, run, run)
        fig.add_trace(go.Scatter(x=x, y=[_num(v) for v in ys], mode="lines+markers", name=run, legendgroup=run,
                                 line={"color": color}))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=unit, height=320,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(tickmode="linear", tick0=1, dtick=max(1, len(x_all(results, name, runs)) // 12))
    return fig


def x_all(results: dict, name: str, runs: list[str]) -> list[int]:
    n = max((len((metric(results, r, name) or {}).get("per_layer") or []) for r in runs), default=0)
    return list(range(1, n + 1))


def interactive_figure(results: dict, runs: list[str]):
    """IoU vs number of clicks per region run, with the baselines dashed."""
    import plotly.graph_objects as go

    fig = go.Figure()
    any_curve = False
    for i, run in enumerate(runs):
        m = metric(results, run, "interactive_iou") or {}
        clicks, ys = m.get("clicks") or [], m.get("per_click") or []
        if not clicks or len(clicks) != len(ys):
            continue
        any_curve = True
        color = COLORS[i % len(COLORS)]
        cis = m.get("per_click_ci") or []
        if len(cis) == len(ys):
            _band(fig, clicks, [c[0] if c else None for c in cis], [c[1] if c else None for c in cis], color, run, run)
        fig.add_trace(go.Scatter(x=clicks, y=[_num(v) for v in ys], mode="lines+markers", name=run, legendgroup=run,
                                 line={"color": color}))
    for j, (name, b) in enumerate(sorted((results.get("baselines", {}).get("interactive_iou") or {}).items())):
        if not isinstance(b, dict) or not b.get("clicks") or len(b.get("clicks")) != len(b.get("per_click") or []):
            continue
        any_curve = True
        fig.add_trace(go.Scatter(x=b["clicks"], y=[_num(v) for v in b["per_click"]], mode="lines+markers",
                                 name=f"baseline: {name}", line={"dash": "dash", "color": "#7f7f7f" if j == 0 else "#bcbd22"}))
    ticks = sorted({x for tr in fig.data for x, y in zip(tr.x, tr.y) if y is not None})
    fig.update_layout(title="Interactive segmentation: IoU vs clicks", xaxis_title="clicks (visible region patches)",
                      yaxis_title="IoU", height=340, margin={"l": 40, "r": 10, "t": 40, "b": 40},
                      legend={"orientation": "h", "y": -0.3})
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[str(t) for t in ticks])
    return fig if any_curve else None


def cka_entries(results: dict) -> list[dict]:
    """CKA matrices of a report: ``{"a", "b", "matrix"}``, or several of them keyed by run name
    (``analyze`` compares every run with its reference)."""
    cka = results.get("cka")
    if not isinstance(cka, dict):
        return []
    if "matrix" in cka:
        return [cka] if cka.get("matrix") else []
    return [v for v in cka.values() if isinstance(v, dict) and v.get("matrix")]


def cka_figure(entry: dict):
    import plotly.graph_objects as go

    z = entry["matrix"]
    a, b = entry.get("a", "A"), entry.get("b", "B")
    fig = go.Figure(go.Heatmap(z=z, x=list(range(1, len(z[0]) + 1)), y=list(range(1, len(z) + 1)), zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "CKA"}))
    fig.update_layout(title=f"Linear CKA per layer: {a} (rows) vs {b} (columns)",
                      xaxis_title=f"{b} layer", yaxis_title=f"{a} layer", height=380,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})
    fig.update_xaxes(tickmode="linear", tick0=1, dtick=max(1, len(z[0]) // 12))
    fig.update_yaxes(tickmode="linear", tick0=1, dtick=max(1, len(z) // 12))
    return fig


def probe_files_table(files: dict[str, list[dict]]):
    """Probe results stored in run folders by ``rmae probe`` (``RUN/analysis/probes/*.json``)."""
    import pandas as pd

    rows = []
    for run, items in files.items():
        for d in items:
            rows.append({"run": run, "probe": d.get("probe", "?"), "metric": d.get("metric", "?"),
                         "value": _num(d.get("value")), "chance": _num(d.get("chance")),
                         "layer": d.get("layer"), "pool": d.get("pool"), "train": d.get("train"), "eval": d.get("eval"),
                         "n_train": d.get("n_train"), "n_eval": d.get("n_eval")})
    return pd.DataFrame(rows) if rows else None


def scalar_table(results: dict, runs: list[str], names: dict[str, str] | None = None):
    """Rows = runs, columns = metrics, cells "value [lo, hi]" (last layer for per-layer metrics)."""
    import pandas as pd

    names = names or {**PROBE_METRICS, **{k: v[0] for k, v in LAYER_METRICS.items()}}
    rows = {}
    for run in runs:
        info = results["runs"].get(run) or {}
        row = {"family": info.get("family") or "—", "model": info.get("model") or "—"}
        for key, label in names.items():
            m = metric(results, run, key)
            row[label] = fmt(m.get("value"), m.get("ci")) if m else "—"
        rows[run] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "run"
    return df


def differences_table(results: dict):
    import pandas as pd

    diffs = results.get("differences")
    if not isinstance(diffs, dict) or not diffs:
        return None
    rows = []
    for pair, metrics in diffs.items():
        for key, m in (metrics or {}).items():
            if not isinstance(m, dict):
                continue
            lo_hi = m.get("ci")
            sig = ""
            if isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2 and None not in lo_hi:
                sig = "yes" if (lo_hi[0] > 0 or lo_hi[1] < 0) else "no"
            rows.append({"difference": pair, "metric": key, "value [95 % CI]": fmt(m.get("value"), lo_hi),
                         "CI excludes 0": sig or "—"})
    return pd.DataFrame(rows) if rows else None


# ------------------------------------------------------------------------------------------
# training logs and configs


def numeric_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("step",) and _num(v) is not None:
                keys.setdefault(k, None)
    return list(keys)


def training_figure(logs: dict[str, list[dict]], key: str, log_y: bool = False):
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (run, rows) in enumerate(logs.items()):
        pts = [(r.get("step"), _num(r.get(key))) for r in rows if _num(r.get("step")) is not None]
        pts = [(s, v) for s, v in pts if v is not None]
        if not pts:
            continue
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers" if len(pts) < 30 else "lines",
                                 name=run, line={"color": COLORS[i % len(COLORS)]}))
    fig.update_layout(title=f"{key} per step", xaxis_title="step", yaxis_title=key, height=340,
                      yaxis_type="log" if log_y else "linear", margin={"l": 40, "r": 10, "t": 40, "b": 40},
                      legend={"orientation": "h", "y": -0.3})
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


def config_table(configs: dict[str, dict], only_differences: bool = False):
    """Configs side by side: rows = keys (``model_config.*`` flattened), columns = runs."""
    import pandas as pd

    flat = {run: _flatten(cfg) for run, cfg in configs.items()}
    keys: dict[str, None] = {}
    for f in flat.values():
        for k in f:
            keys.setdefault(k, None)
    rows = {}
    for k in keys:
        vals = [f.get(k, "—") for f in flat.values()]
        shown = ["—" if v is None else (json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for v in vals]
        if only_differences and len(set(shown)) <= 1:
            continue
        rows[k] = dict(zip(flat, shown))
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(flat))
    df.index.name = "key"
    return df
