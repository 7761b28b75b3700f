"""Figures of a report: matplotlib PNGs and plotly HTML from ``results.json`` content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LAYER_PLOTS = ("attention_distance", "attention_entropy", "attention_nmi", "instance_mass", "instance_leak",
               "instance_jaccard", "cls_jaccard")


class _Figures:
    """pyplot-like ``subplots`` on ``matplotlib.figure.Figure``: no global backend switch, so a
    notebook's inline backend is left alone, and figures need no closing."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, figsize=None, squeeze: bool = True):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze)

    @staticmethod
    def close(fig) -> None:
        pass


def _plt():
    return _Figures


def _band(entry: dict[str, Any], key_mean: str, key_ci: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.array([np.nan if v is None else v for v in entry[key_mean]], dtype=float)
    ci = entry[key_ci]
    lo = np.array([np.nan if c is None else c[0] for c in ci], dtype=float)
    hi = np.array([np.nan if c is None else c[1] for c in ci], dtype=float)
    return mean, lo, hi


def layer_curves(results: dict[str, Any], out: Path) -> None:
    """One PNG + HTML per per-layer metric, every run with its 95 % band."""
    import plotly.graph_objects as go

    plt = _plt()
    for key in LAYER_PLOTS:
        runs = {n: r["metrics"][key] for n, r in results["runs"].items() if key in r["metrics"]}
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        pfig = go.Figure()
        for i, (name, e) in enumerate(runs.items()):
            mean, lo, hi = _band(e, "per_layer", "per_layer_ci")
            x = np.arange(len(mean))
            line, = ax.plot(x, mean, marker="o", ms=3, label=name)
            ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
            from matplotlib.colors import to_hex

            color = to_hex(line.get_color())
            pfig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                                      fillcolor=color, opacity=0.2, line=dict(width=0), hoverinfo="skip",
                                      showlegend=False, legendgroup=name))
            pfig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=name, line=dict(color=color),
                                      legendgroup=name))
        unit = next(iter(runs.values())).get("unit", "")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{key}" + (f" ({unit})" if unit else ""))
        ax.set_title(f"{key} per layer (95 % CI)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=120)
        plt.close(fig)
        pfig.update_layout(title=f"{key} per layer (95 % CI)", xaxis_title="layer", yaxis_title=key,
                           template="plotly_white", height=420)
        pfig.write_html(out / f"{key}.html", include_plotlyjs="cdn")


def interactive_curves(results: dict[str, Any], out: Path) -> None:
    import plotly.graph_objects as go

    curves = {n: r["metrics"]["interactive_iou"] for n, r in results["runs"].items() if "interactive_iou" in r["metrics"]}
    curves.update({f"baseline: {k}": v for k, v in results.get("baselines", {}).get("interactive_iou", {}).items()})
    if not curves:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    pfig = go.Figure()
    for name, e in curves.items():
        mean, lo, hi = _band(e, "per_click", "per_click_ci")
        x = np.array(e["clicks"], dtype=float)
        style = "--" if name.startswith("baseline") else "-"
        line, = ax.plot(x, mean, style, marker="o", ms=3, label=name)
        ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
        pfig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=name,
                                  error_y=dict(type="data", symmetric=False, array=hi - mean, arrayminus=mean - lo),
                                  line=dict(dash="dash" if name.startswith("baseline") else "solid")))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clicks (visible region patches)")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("interactive segmentation (95 % CI)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "interactive_iou.png", dpi=120)
    plt.close(fig)
    pfig.update_layout(title="interactive segmentation IoU vs clicks", xaxis_type="log", xaxis_title="clicks",
                       yaxis_title="IoU", yaxis_range=[0, 1], template="plotly_white", height=420)
    pfig.write_html(out / "interactive_iou.html", include_plotlyjs="cdn")


def overlays(material: dict[str, Any], out: Path) -> None:
    """Rows = images; columns = image, then per run: CLS map and the patch-query map (query
    marked) of the last layer, overlaid on the image."""
    if not material.get("maps"):
        return
    plt = _plt()
    images = material["images"]
    runs = list(material["maps"])
    n = len(images)
    cols = 1 + 2 * len(runs)
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.7 * n + 0.3), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        if i == 0:
            axes[i, 0].set_title("image", fontsize=7)
        for j, run in enumerate(runs):
            m = material["maps"][run]
            for k, (kind, label) in enumerate((("cls", "CLS"), ("query", "patch query"))):
                ax = axes[i, 1 + 2 * j + k]
                ax.imshow(images[i])
                ax.imshow(m[kind][i], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
                if kind == "query":  # mark the query patch
                    ax.plot(*_query_centre(int(m["queries"][i]), m[kind][i].shape, m["grid"]), marker="+",
                            color="cyan", ms=8)
                if i == 0:
                    ax.set_title(f"{run}\n{label}", fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "attention_overlays.png", dpi=110)
    plt.close(fig)


def _query_centre(q: int, shape: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float]:
    """Pixel (x, y) of patch ``q``'s centre in a map of ``shape``."""
    h, w = shape
    gh, gw = grid
    y, x = divmod(q, gw)
    return (x + 0.5) * w / gw, (y + 0.5) * h / gh


def cka_maps(results: dict[str, Any], out: Path) -> None:
    if not results.get("cka"):
        return
    plt = _plt()
    for name, c in results["cka"].items():
        mat = np.asarray(c["matrix"])
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_xlabel(f"{c['b']} layer")
        ax.set_ylabel(f"{c['a']} layer")
        ax.set_title("linear CKA", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / f"cka_{name}.png", dpi=120)
        plt.close(fig)
